//! Trace export over OTLP/HTTP, configured by the standard `OTEL_*` environment variables and
//! off unless an endpoint is set. Spans go through the SDK's batch processor: ending a span
//! only queues it (a full queue drops it), and a thread of the processor's own exports them
//! with a blocking HTTP client, so nothing that handles requests or delivers messages ever
//! waits for the collector.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The samplers `OTEL_TRACES_SAMPLER` may name (the SDK's; remote samplers are not built in).
const SAMPLERS: &[&str] = &[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

/// A bad `OTEL_*` variable, named in the message: start-up stops on it.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// A variable's value is not one this service takes.
    #[error("{key}: {message}")]
    Invalid {
        /// The variable.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The exporter could not be built from the variables.
    #[error("building the OTLP trace exporter: {0}")]
    Build(String),
}

fn invalid(key: &'static str, message: impl Into<String>) -> OtlpError {
    OtlpError::Invalid {
        key,
        message: message.into(),
    }
}

/// What the environment asks for, checked: export is on.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Where spans go, as given (for the start-up log line; the exporter reads the variable).
    pub endpoint: String,
    /// `http/protobuf` (the default) or `http/json`.
    pub protocol: Protocol,
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub default_service_name: Option<&'static str>,
}

impl OtlpConfig {
    /// Reads the variables through `var` (an unset or empty variable is absent). `None`: export
    /// is off — no endpoint, `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` — and no
    /// other variable is looked at.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, OtlpError> {
        let var = |key: &str| var(key).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match var("OTEL_TRACES_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(invalid(
                    "OTEL_TRACES_EXPORTER",
                    format!("{other:?} is not supported: otlp or none"),
                ));
            }
        }
        let Some((key, endpoint)) = first(
            &var,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ],
        ) else {
            return Ok(None);
        };
        check_endpoint(key, &endpoint)?;
        let protocol = match first(
            &var,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ],
        ) {
            None => Protocol::HttpBinary,
            Some((_, p)) if p.trim() == "http/protobuf" => Protocol::HttpBinary,
            Some((_, p)) if p.trim() == "http/json" => Protocol::HttpJson,
            Some((key, p)) => {
                return Err(invalid(
                    key,
                    format!(
                        "{p:?} is not supported: http/protobuf or http/json (gRPC is not built in)"
                    ),
                ));
            }
        };
        if let Some((key, headers)) = first(
            &var,
            &[
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ],
        ) && let Some(n) = headers.split(',').map(str::trim).position(|h| {
            !h.is_empty() && h.split_once('=').is_none_or(|(k, _)| k.trim().is_empty())
        }) {
            // The value is a secret (it may carry an API key): named, never shown.
            return Err(invalid(
                key,
                format!(
                    "expected key=value pairs separated by commas; entry {} is not one",
                    n + 1
                ),
            ));
        }
        check_sampler(&var)?;
        let names_service = var("OTEL_SERVICE_NAME").is_some()
            || var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs.split(',').any(|kv| {
                    kv.split_once('=')
                        .is_some_and(|(k, _)| k.trim() == "service.name")
                })
            });
        Ok(Some(OtlpConfig {
            endpoint,
            protocol,
            default_service_name: (!names_service).then_some("smsbatch"),
        }))
    }

    /// Builds the tracer provider: the OTLP/HTTP exporter behind the batch processor, with the
    /// SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) and sampler
    /// (`OTEL_TRACES_SAMPLER`); `OTEL_BSP_*` and `OTEL_EXPORTER_OTLP_TIMEOUT` as the SDK reads
    /// them.
    pub fn provider(&self) -> Result<SdkTracerProvider, OtlpError> {
        // reqwest links rustls without a crypto provider of its own: the process's must be
        // installed before its client is built (an `https` endpoint; a no-op when it is).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(self.protocol)
            .build()
            .map_err(|e| OtlpError::Build(e.to_string()))?;
        let mut resource = Resource::builder();
        if let Some(name) = self.default_service_name {
            resource = resource.with_service_name(name);
        }
        let resource = resource
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    }
}

/// The tracer the `tracing` layer records through.
pub fn tracer(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::SdkTracer {
    provider.tracer("smsbatch")
}

/// Exports what is queued and stops the exporter, waiting at most `timeout`.
pub fn shut_down(provider: &SdkTracerProvider, timeout: Duration) -> Result<(), String> {
    provider
        .shutdown_with_timeout(timeout)
        .map_err(|e| e.to_string())
}

/// The first of `keys` that is set, with its value.
fn first(
    var: &impl Fn(&str) -> Option<String>,
    keys: &[&'static str],
) -> Option<(&'static str, String)> {
    keys.iter().find_map(|k| var(k).map(|v| (*k, v)))
}

fn check_endpoint(key: &'static str, endpoint: &str) -> Result<(), OtlpError> {
    let url = reqwest::Url::parse(endpoint.trim())
        .map_err(|e| invalid(key, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(
            key,
            "expected an http:// or https:// URL with a host (OTLP/HTTP, port 4318 by convention)",
        ));
    }
    Ok(())
}

fn check_sampler(var: &impl Fn(&str) -> Option<String>) -> Result<(), OtlpError> {
    let Some(sampler) = var("OTEL_TRACES_SAMPLER") else {
        return Ok(());
    };
    let sampler = sampler.trim();
    if !SAMPLERS.contains(&sampler) {
        return Err(invalid(
            "OTEL_TRACES_SAMPLER",
            format!("{sampler:?} is not one of {}", SAMPLERS.join(", ")),
        ));
    }
    if sampler.ends_with("traceidratio")
        && let Some(arg) = var("OTEL_TRACES_SAMPLER_ARG")
        && !arg
            .trim()
            .parse::<f64>()
            .is_ok_and(|r| (0.0..=1.0).contains(&r))
    {
        return Err(invalid(
            "OTEL_TRACES_SAMPLER_ARG",
            format!("{arg:?} is not a ratio between 0 and 1"),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests;
