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
        classify(status, &body, &self.id_field)
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
}

/// Maps a gateway's answer to the provider outcome.
fn classify(status: StatusCode, body: &[u8], id_field: &str) -> Result<Accepted, ProviderError> {
    if status.is_success() {
        return Ok(Accepted {
            provider_message_id: message_id(body, id_field),
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
#[path = "../../../tests/common/sink.rs"]
mod sink;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::sink::{Answer, Sink};
    use super::*;
    use crate::secret::Secret;

    fn settings(url: &str) -> HttpProviderSettings {
        HttpProviderSettings {
            url: Secret::new(url),
            headers: BTreeMap::from([("Authorization".into(), Secret::new("Bearer t0ken"))]),
            timeout_ms: 2000,
            ..HttpProviderSettings::default()
        }
    }

    fn provider(sink: &Sink) -> HttpProvider {
        HttpProvider::new("sink", &settings(&sink.url())).expect("builds")
    }

    fn sms(message_id: i64, phone: &str, attempt: i32) -> OutgoingSms<'_> {
        OutgoingSms {
            message_id,
            phone,
            body: "Hi Ann, 30% off",
            attempt,
        }
    }

    #[tokio::test]
    async fn accepted_posts_the_message_with_its_idempotency_key() {
        let sink = Sink::start();
        let provider = provider(&sink);
        let accepted = provider
            .send(&sms(42, "+8613800001234", 1))
            .await
            .expect("2xx is accepted");
        assert_eq!(accepted.provider_message_id.as_deref(), Some("sink-0"));
        let received = sink.received();
        assert_eq!(received.len(), 1);
        let r = &received[0];
        assert_eq!(
            (r.id, r.to.as_str(), r.body.as_str(), r.attempt),
            (42, "+8613800001234", "Hi Ann, 30% off", 1)
        );
        assert_eq!(r.idempotency_key.as_deref(), Some("42"));
        assert_eq!(r.authorization.as_deref(), Some("Bearer t0ken"));
        assert_eq!(r.answer, Answer::Accepted(200));
    }

    #[tokio::test]
    async fn status_codes_map_to_outcomes() {
        let sink = Sink::start();
        let provider = provider(&sink);
        let cases = [
            (400, Some(false)),
            (401, Some(false)),
            (404, Some(false)),
            (422, Some(false)),
            (408, Some(true)),
            (429, Some(true)),
            (500, Some(true)),
            (502, Some(true)),
            (503, Some(true)),
            (301, Some(false)),
            (201, None),
            (202, None),
        ];
        for (i, (status, transient)) in cases.into_iter().enumerate() {
            sink.fail_next(1, status);
            let answer = provider.send(&sms(i as i64, "+8613800001234", 1)).await;
            match (answer, transient) {
                (Ok(_), None) => {}
                (Err(e), Some(transient)) => {
                    assert_eq!(e.is_transient(), transient, "{status}: {e}");
                    assert!(e.to_string().contains(&status.to_string()), "{status}: {e}");
                }
                (answer, _) => panic!("{status}: unexpected {answer:?}"),
            }
        }
        // Each status went to the gateway once: no redirect was followed, nothing retried here.
        assert_eq!(sink.total(), cases.len());
    }

    #[tokio::test]
    async fn refusal_by_number_is_permanent_and_names_the_reason() {
        let sink = Sink::start();
        sink.refuse_ending(&["0003"], 400);
        let provider = provider(&sink);
        let err = provider
            .send(&sms(1, "+8613800000003", 1))
            .await
            .expect_err("refused");
        assert!(!err.is_transient());
        assert_eq!(
            err.to_string(),
            r#"gateway answered 400 Bad Request: {"error":"invalid destination"}"#
        );
        assert!(provider.send(&sms(2, "+8613800000004", 1)).await.is_ok());
    }

    #[tokio::test]
    async fn gateway_id_is_read_from_the_configured_field() {
        let sink = Sink::start();
        let mut config = settings(&sink.url());
        config.id_field = "/data/message_id".into();
        let nested = HttpProvider::new("nested", &config).expect("builds");
        sink.accept_with(202, Some(r#"{"data": {"message_id": 9001}}"#));
        let accepted = nested.send(&sms(1, "+8613800001234", 1)).await;
        assert_eq!(
            accepted.expect("accepted").provider_message_id.as_deref(),
            Some("9001")
        );

        let flat = provider(&sink);
        for body in [
            Some("not json"),
            Some(r#"{"other": "x"}"#),
            Some(r#"{"id": ""}"#),
        ] {
            sink.accept_with(200, body);
            let accepted = flat.send(&sms(2, "+8613800001234", 1)).await;
            assert_eq!(
                accepted.expect("accepted").provider_message_id,
                None,
                "{body:?}"
            );
        }
        sink.accept_with(204, None);
        let accepted = flat.send(&sms(3, "+8613800001234", 1)).await;
        assert_eq!(accepted.expect("accepted").provider_message_id, None);
    }

    #[tokio::test]
    async fn a_hanging_gateway_times_out_as_transient() {
        let sink = Sink::start();
        let mut config = settings(&sink.url());
        config.timeout_ms = 200;
        let provider = HttpProvider::new("slow", &config).expect("builds");
        sink.hang_next(1, Duration::from_secs(3));
        let err = provider
            .send(&sms(7, "+8613800001234", 1))
            .await
            .expect_err("times out");
        assert!(err.is_transient(), "{err}");
        assert_eq!(
            err.to_string(),
            "transient provider error: gateway timed out after 200 ms"
        );
        // The retry carries the same idempotency key, and goes through.
        assert!(provider.send(&sms(7, "+8613800001234", 2)).await.is_ok());
        let report = sink.report();
        assert_eq!(report.total, 2);
        assert_eq!(report.duplicates.len(), 1);
        assert!(report.duplicates[0].keys_match);
        assert_eq!(report.duplicates[0].attempts, vec![1, 2]);
        assert!(report.accepted_twice.is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_transient_and_hides_the_url() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let url = format!("http://127.0.0.1:{port}/sms?api_key=s3cret");
        let provider = HttpProvider::new("down", &settings(&url)).expect("builds");
        let err = provider
            .send(&sms(1, "+8613800001234", 1))
            .await
            .expect_err("refused");
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("gateway unreachable"), "{err}");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn https_goes_through_rustls() {
        // The sink speaks plain HTTP: the TLS handshake fails, as a transient error (and the
        // rustls stack, with its crypto provider, was built and used).
        let sink = Sink::start();
        let url = format!("https://{}/sms", sink.addr());
        let provider = HttpProvider::new("tls", &settings(&url)).expect("builds");
        let err = provider
            .send(&sms(1, "+8613800001234", 1))
            .await
            .expect_err("no TLS on the other side");
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("gateway unreachable"), "{err}");
    }

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

    #[tokio::test]
    async fn environment_spelling_of_a_header_wins() {
        let sink = Sink::start();
        let mut config = settings(&sink.url());
        config
            .headers
            .insert("authorization".into(), Secret::new("Bearer from-env"));
        let provider = HttpProvider::new("x", &config).expect("builds");
        provider
            .send(&sms(1, "+8613800001234", 1))
            .await
            .expect("accepted");
        assert_eq!(
            sink.received()[0].authorization.as_deref(),
            Some("Bearer from-env")
        );
    }
}
