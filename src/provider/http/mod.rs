//! The `http` provider: a generic JSON-over-HTTP SMS gateway (`providers.http.<name>.*`).
//!
//! Each message is one `POST {url}` with the body `{"id", "to", "body", "attempt"}` and the
//! message id in the `Idempotency-Key` header, so that a gateway can drop a resend of a message
//! it already took. The answer maps to the provider outcome by status alone: 2xx is accepted
//! (the gateway's id read from the JSON answer when it gives one), 408 and 429 are transient,
//! any other 4xx is permanent, 5xx, connection errors and timeouts are transient; anything else
//! (a redirect) is permanent, since following it could send the message twice.
//!
//! The client is reqwest, built without default features: a thin, widely used layer over hyper,
//! whose futures are `Send` (the trait's `BoxFuture` needs that), with connection pooling and a
//! whole-request timeout built in. Without its default features it brings no HTTP/2, no system
//! proxy and no aws-lc; TLS is rustls on ring with the platform's roots, the same rustls and ring
//! that lapin already links, so the binary keeps one TLS stack. hyper-util directly would save
//! only reqwest's own thin crate and need the pool, timeout and TLS wiring written by hand.

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;

mod settings;

pub use settings::{HttpProviderSettings, Kind};

use super::kinds::BuildError;
use super::{Accepted, OutgoingSms, ProviderError, SmsProvider};
use crate::domain::receipt::canonical_text;
use crate::secret::Secret;

/// The header that carries a message's idempotency key: its message id.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Most bytes of an answer read: enough for any gateway's JSON receipt, so that a misbehaving
/// gateway cannot make a worker buffer without bound.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Most characters of a refusal's body kept in the message's error text.
const MAX_ERROR_TEXT: usize = 200;

/// The request body.
#[derive(Serialize)]
struct Payload<'a> {
    id: i64,
    to: &'a str,
    body: &'a str,
    attempt: i32,
}

/// One configured JSON-over-HTTP gateway.
pub struct HttpProvider {
    client: reqwest::Client,
    url: reqwest::Url,
    id_field: String,
    timeout: Duration,
    /// Opens the webhooks; empty: closed, and no receipts expected.
    webhook_token: Secret,
}

impl HttpProvider {
    /// Builds the provider `name` from its (validated) settings.
    pub fn new(name: &str, settings: &HttpProviderSettings) -> Result<Self, BuildError> {
        let error = |reason: String| BuildError {
            name: name.to_owned(),
            reason,
        };
        // reqwest is built without a crypto provider of its own: make ring (already linked by
        // lapin) the process default. A provider installed earlier stays; that is the goal too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = reqwest::Url::parse(settings.url.expose())
            .map_err(|e| error(format!("url: not a URL ({e})")))?;
        let mut headers = HeaderMap::new();
        // An environment variable writes a header name in lower case; it overrides the same
        // header written in another case in a file, so lower-case names go in last.
        let mut configured: Vec<_> = settings.headers.iter().collect();
        configured.sort_by_key(|(header, _)| !header.bytes().any(|b| b.is_ascii_uppercase()));
        for (header, value) in configured {
            let header_name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| error(format!("headers.{header}: not a valid header name")))?;
            let mut value = HeaderValue::from_str(value.expose())
                .map_err(|_| error(format!("headers.{header}: not a valid header value")))?;
            // Kept out of any debug output of the client.
            value.set_sensitive(true);
            headers.insert(header_name, value);
        }
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("smsbatch/", env!("CARGO_PKG_VERSION")))
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| error(format!("HTTP client: {}", chain(&e.without_url()))))?;
        Ok(HttpProvider {
            client,
            url,
            id_field: settings.id_field.clone(),
            timeout,
            webhook_token: settings.webhook_token.clone(),
        })
    }

    /// Sends one message and maps the answer.
    async fn post(&self, sms: &OutgoingSms<'_>) -> Result<Accepted, ProviderError> {
        let payload = Payload {
            id: sms.message_id,
            to: sms.phone,
            body: sms.body,
            attempt: sms.attempt,
        };
        let mut response = self
            .client
            .post(self.url.clone())
            .header(IDEMPOTENCY_KEY, sms.message_id)
            .json(&payload)
            .send()
            .await
            .map_err(|e| self.request_error(e))?;
        let status = response.status();
        // The status is the gateway's answer: once it is 2xx the message went, whatever happens
        // to the rest of the answer, and a failure to read it must not cause a resend.
        let body = read_capped(&mut response).await;
        let mut accepted = classify(status, &body, &self.id_field)?;
        // With the webhook open, the gateway reports on the message under its id.
        if !self.webhook_token.is_empty()
            && let Some(id) = &accepted.provider_message_id
        {
            accepted.receipt_ids = vec![canonical_text(id)];
        }
        Ok(accepted)
    }

    fn request_error(&self, e: reqwest::Error) -> ProviderError {
        // The URL may hold a key in its query string: never in an error text.
        let e = e.without_url();
        if e.is_timeout() {
            ProviderError::Transient(format!(
                "gateway timed out after {} ms",
                self.timeout.as_millis()
            ))
        } else if e.is_builder() {
            ProviderError::Permanent(format!("request could not be built: {}", chain(&e)))
        } else {
            ProviderError::Transient(format!("gateway unreachable: {}", chain(&e)))
        }
    }
}

impl SmsProvider for HttpProvider {
    fn send<'a>(
        &'a self,
        sms: &'a OutgoingSms<'a>,
    ) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(self.post(sms))
    }

    fn webhook_accepts(&self, token: &str) -> bool {
        !self.webhook_token.is_empty() && self.webhook_token.matches(token)
    }
}

/// Maps a gateway's answer to the provider outcome.
fn classify(status: StatusCode, body: &[u8], id_field: &str) -> Result<Accepted, ProviderError> {
    if status.is_success() {
        return Ok(Accepted {
            provider_message_id: message_id(body, id_field),
            receipt_ids: Vec::new(),
        });
    }
    let refusal = match error_text(body) {
        Some(text) => format!("gateway answered {status}: {text}"),
        None => format!("gateway answered {status}"),
    };
    if status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
    {
        Err(ProviderError::Transient(refusal))
    } else {
        Err(ProviderError::Permanent(refusal))
    }
}

/// The gateway's id of the message: `id_field` of a JSON answer (a field name, or a JSON pointer
/// when it starts with `/`), if it is a non-empty string or a number.
fn message_id(body: &[u8], id_field: &str) -> Option<String> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    let value = if id_field.starts_with('/') {
        answer.pointer(id_field)
    } else {
        answer.get(id_field)
    }?;
    match value {
        serde_json::Value::String(id) if !id.is_empty() => Some(id.clone()),
        serde_json::Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// The start of a refusal's body, on one line, for the message's error text.
fn error_text(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(MAX_ERROR_TEXT)
        .collect();
    (!text.is_empty()).then_some(text)
}

/// Reads at most `MAX_ANSWER_BYTES` of the answer; an error ends the read with what came.
async fn read_capped(response: &mut reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ANSWER_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    body
}

/// An error with its causes, `top: cause: cause`.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their cause in their own text.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_without_a_network() {
        let ok = classify(StatusCode::OK, br#"{"id": "abc"}"#, "id").expect("2xx");
        assert_eq!(ok.provider_message_id.as_deref(), Some("abc"));
        let long = "x".repeat(1000);
        let err = classify(StatusCode::BAD_REQUEST, long.as_bytes(), "id").expect_err("4xx");
        assert!(err.to_string().len() < MAX_ERROR_TEXT + 50, "{err}");
        let err = classify(StatusCode::SERVICE_UNAVAILABLE, b"", "id").expect_err("5xx");
        assert_eq!(
            err.to_string(),
            "transient provider error: gateway answered 503 Service Unavailable"
        );
    }
}
