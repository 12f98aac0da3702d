use super::*;

fn config(vars: &[(&str, &str)]) -> Result<Option<OtlpConfig>, OtlpError> {
    OtlpConfig::from_env(|key| {
        vars.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (*v).to_owned())
    })
}

fn refused(vars: &[(&str, &str)]) -> String {
    match config(vars) {
        Err(e) => e.to_string(),
        Ok(c) => panic!("{vars:?} accepted: {c:?}"),
    }
}

const ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");

#[test]
fn off_without_an_endpoint_whatever_else_is_set() {
    assert_eq!(config(&[]).ok(), Some(None));
    assert_eq!(
        config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", " "),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        ])
        .ok(),
        Some(None)
    );
    // Nothing else is read while export is off: start-up is as without the variables.
    assert_eq!(
        config(&[
            ("OTEL_TRACES_SAMPLER", "bogus"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        ])
        .ok(),
        Some(None)
    );
    assert_eq!(
        config(&[ENDPOINT, ("OTEL_SDK_DISABLED", "TRUE")]).ok(),
        Some(None)
    );
    assert_eq!(
        config(&[ENDPOINT, ("OTEL_TRACES_EXPORTER", "none")]).ok(),
        Some(None)
    );
}

#[test]
fn on_with_either_endpoint() {
    let on = config(&[ENDPOINT]).unwrap().unwrap();
    assert_eq!(on.endpoint, "http://collector:4318");
    assert_eq!(on.protocol, Protocol::HttpBinary);
    assert_eq!(on.default_service_name, Some("smsbatch"));
    let traces = config(&[
        ENDPOINT,
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://otel.example/v1/traces",
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "otlp"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(traces.endpoint, "https://otel.example/v1/traces");
    assert_eq!(traces.protocol, Protocol::HttpJson);
    // The signal's own protocol wins over the general one.
    let binary = config(&[
        ENDPOINT,
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(binary.protocol, Protocol::HttpBinary);
}

#[test]
fn a_named_service_keeps_its_name() {
    let named = config(&[ENDPOINT, ("OTEL_SERVICE_NAME", "sms-eu")])
        .unwrap()
        .unwrap();
    assert_eq!(named.default_service_name, None);
    let by_attributes = config(&[
        ENDPOINT,
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, service.name=sms-eu",
        ),
    ])
    .unwrap()
    .unwrap();
    assert_eq!(by_attributes.default_service_name, None);
}

#[test]
fn bad_values_are_refused_by_their_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
            "OTEL_EXPORTER_OTLP_ENDPOINT:",
        ),
        (
            &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url")],
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:",
        ),
        (
            &[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
            "OTEL_EXPORTER_OTLP_PROTOCOL:",
        ),
        (
            &[ENDPOINT, ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "json")],
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL:",
        ),
        (
            &[ENDPOINT, ("OTEL_TRACES_SAMPLER", "sometimes")],
            "OTEL_TRACES_SAMPLER:",
        ),
        (
            &[
                ENDPOINT,
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            "OTEL_TRACES_SAMPLER_ARG:",
        ),
        (
            &[ENDPOINT, ("OTEL_TRACES_EXPORTER", "zipkin")],
            "OTEL_TRACES_EXPORTER:",
        ),
    ];
    for (vars, key) in cases {
        let message = refused(vars);
        assert!(message.starts_with(key), "{vars:?}: {message}");
    }
}

#[test]
fn bad_headers_are_refused_without_showing_them() {
    let message = refused(&[
        ENDPOINT,
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=ok,s3cr3t"),
    ]);
    assert!(
        message.starts_with("OTEL_EXPORTER_OTLP_HEADERS:"),
        "{message}"
    );
    assert!(message.contains("entry 2"), "{message}");
    assert!(!message.contains("s3cr3t"), "{message}");
    assert!(config(&[ENDPOINT, ("OTEL_EXPORTER_OTLP_HEADERS", "a=1, b=x=y")]).is_ok());
}

#[test]
fn the_provider_builds_with_either_protocol() {
    for protocol in ["http/protobuf", "http/json"] {
        let on = config(&[ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)])
            .unwrap()
            .unwrap();
        let provider = on.provider().unwrap();
        // Nothing was recorded: nothing to send, and the exporter stops at once.
        shut_down(&provider, Duration::from_secs(1)).unwrap();
    }
}
