//! The `http` provider's client against a real HTTP server (the sink in `common`): what it
//! posts, and how each answer maps to an outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use smsbatch::provider::http::{HttpProvider, HttpProviderSettings};
use smsbatch::provider::{OutgoingSms, SmsProvider};
use smsbatch::secret::Secret;

use crate::common::sink::{Answer, Sink};

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
