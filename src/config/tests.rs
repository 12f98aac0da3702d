use std::collections::BTreeMap;

use super::*;
use crate::provider::http::HttpProviderSettings;
use crate::provider::kinds;
use crate::provider::simulator::SimulatorSettings;

fn simulator(s: &Settings) -> SimulatorSettings {
    kinds::read("providers.simulator", s.providers.kinds.get("simulator"))
        .expect("simulator settings")
}

fn gateways(s: &Settings) -> BTreeMap<String, HttpProviderSettings> {
    crate::provider::http::Kind::gateways(s.providers.kinds.get("http")).expect("gateways")
}

fn vars(pairs: &[(&str, &str)]) -> config::Map<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn empty_dir() -> PathBuf {
    std::env::temp_dir().join(format!("smsbatch-config-{}", uuid::Uuid::now_v7()))
}

#[test]
fn defaults_serve_the_embedded_case() {
    let s = Settings::load_from(&empty_dir(), None, Some(vars(&[]))).expect("defaults load");
    assert_eq!(s.http.bind, "127.0.0.1:8080");
    assert_eq!(s.database.url.expose(), "sqlite://data/smsbatch.db");
    assert_eq!(s.transport.kind, TransportKind::InProcess);
    assert_eq!(s.transport.queue, "smsbatch.delivery");
    assert!(s.admin.token.is_empty());
    assert_eq!(simulator(&s).latency_ms, 0);
    assert_eq!(s.smsbatch.redelivery, Redelivery::AtMostOnce);
}

#[test]
fn environment_overrides_nested_keys() {
    let s = Settings::load_from(
        &empty_dir(),
        None,
        Some(vars(&[
            ("SMSBATCH__HTTP__BIND", "127.0.0.1:0"),
            ("SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS", "7"),
            ("SMSBATCH__TRANSPORT__KIND", "rabbitmq"),
            ("SMSBATCH__SMSBATCH__REDELIVERY", "at_least_once"),
            ("SMSBATCH__ADMIN__TOKEN", "s3cret"),
        ])),
    )
    .expect("loads");
    assert_eq!(s.http.bind, "127.0.0.1:0");
    assert_eq!(simulator(&s).latency_ms, 7);
    assert_eq!(s.transport.kind, TransportKind::Rabbitmq);
    assert_eq!(s.smsbatch.redelivery, Redelivery::AtLeastOnce);
    assert_eq!(s.admin.token.expose(), "s3cret");
    assert!(!format!("{s:?}").contains("s3cret"));
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("SMSBATCH__SMSBATCH__WORKER_COUNT", "lots", "worker_count"),
        (
            "SMSBATCH__SMSBATCH__WORKER_COUNT",
            "0",
            "smsbatch.worker_count",
        ),
        (
            "SMSBATCH__SMSBATCH__ACTIVE_STEPS",
            "0",
            "smsbatch.active_steps",
        ),
        ("SMSBATCH__HTTP__BIND", "nowhere", "http.bind"),
        ("SMSBATCH__HTTP__MAX_SEGMENTS", "0", "http.max_segments"),
        ("SMSBATCH__DATABASE__URL", "mysql://x", "database.url"),
        (
            "SMSBATCH__SMSBATCH__PARTITION_COUNT",
            "300",
            "smsbatch.partition_count",
        ),
        (
            "SMSBATCH__SMSBATCH__DEFAULT_REGION",
            "XX",
            "smsbatch.default_region",
        ),
        (
            "SMSBATCH__TRANSPORT__KIND",
            "carrier_pigeon",
            "transport.kind",
        ),
        ("SMSBATCH__PROVIDERS__DEFAULT", "nope", "providers.default"),
        (
            "SMSBATCH__PROVIDERS__PIGEON__LOFT",
            "roof",
            "providers.pigeon",
        ),
        (
            "SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS",
            "slow",
            "providers.simulator",
        ),
    ];
    for (var, value, key) in cases {
        let err = Settings::load_from(&empty_dir(), None, Some(vars(&[(var, value)])))
            .expect_err(var)
            .to_string();
        assert!(
            err.contains(key),
            "{var}={value}: `{err}` does not name {key}"
        );
    }
}

#[test]
fn http_providers_come_from_the_file_and_the_environment() {
    let dir = empty_dir();
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("default.yaml"),
        "providers:\n  default: gw\n  http:\n    gw:\n      url: \"https://sms.example/send?key=k3y\"\n      headers: {Authorization: \"Bearer file\"}\n",
    )
    .expect("write");
    let s = Settings::load_from(
        &dir,
        None,
        Some(vars(&[
            ("SMSBATCH__PROVIDERS__HTTP__GW__HEADERS__X_API_KEY", "12345"),
            ("SMSBATCH__PROVIDERS__HTTP__GW__TIMEOUT_MS", "750"),
            (
                "SMSBATCH__PROVIDERS__HTTP__SINK__URL",
                "http://127.0.0.1:9/sms",
            ),
            ("SMSBATCH__PROVIDERS__HTTP__SINK__ID_FIELD", "/data/id"),
        ])),
    )
    .expect("loads");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(s.providers.default, "gw");
    let gateways = gateways(&s);
    let gw = &gateways["gw"];
    assert_eq!(gw.url.expose(), "https://sms.example/send?key=k3y");
    assert_eq!(gw.timeout_ms, 750);
    assert_eq!(gw.id_field, "id");
    assert_eq!(gw.headers["Authorization"].expose(), "Bearer file");
    // Environment variables are lower-cased (and `_` stays `_`) by the config crate.
    assert_eq!(gw.headers["x_api_key"].expose(), "12345");
    let sink = &gateways["sink"];
    assert_eq!(sink.timeout_ms, 5000);
    assert_eq!(sink.id_field, "/data/id");
    let printed = format!("{s:?}");
    for secret in ["k3y", "Bearer file", "12345"] {
        assert!(!printed.contains(secret), "{secret} printed: {printed}");
    }
}

#[test]
fn bad_http_providers_name_their_key() {
    let url = (
        "SMSBATCH__PROVIDERS__HTTP__GW__URL",
        "http://127.0.0.1:9/sms",
    );
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("SMSBATCH__PROVIDERS__HTTP__GW__TIMEOUT_MS", "5")],
            "providers.http.gw.url",
        ),
        (
            &[("SMSBATCH__PROVIDERS__HTTP__GW__URL", "ftp://x/y")],
            "providers.http.gw.url",
        ),
        (
            &[("SMSBATCH__PROVIDERS__HTTP__GW__URL", "not a url")],
            "providers.http.gw.url",
        ),
        (
            &[url, ("SMSBATCH__PROVIDERS__HTTP__GW__TIMEOUT_MS", "0")],
            "providers.http.gw.timeout_ms",
        ),
        (
            &[url, ("SMSBATCH__PROVIDERS__HTTP__GW__ID_FIELD", "")],
            "providers.http.gw.id_field",
        ),
        (
            &[
                url,
                ("SMSBATCH__PROVIDERS__HTTP__GW__HEADERS__BAD HEADER", "x"),
            ],
            "providers.http.gw.headers.bad header",
        ),
        (
            &[
                url,
                (
                    "SMSBATCH__PROVIDERS__HTTP__GW__HEADERS__IDEMPOTENCY-KEY",
                    "x",
                ),
            ],
            "providers.http.gw.headers.idempotency-key",
        ),
        (&[url, ("SMSBATCH__PROVIDERS__HTTP__GW__WAT", "1")], "wat"),
        (
            &[("SMSBATCH__PROVIDERS__HTTP__SIMULATOR__URL", "http://x/")],
            "providers.http.simulator",
        ),
        (
            &[url, ("SMSBATCH__PROVIDERS__DEFAULT", "other")],
            "providers.default",
        ),
    ];
    for (pairs, key) in cases {
        let err = Settings::load_from(&empty_dir(), None, Some(vars(pairs)))
            .expect_err(key)
            .to_string();
        assert!(err.contains(key), "{pairs:?}: `{err}` does not name {key}");
    }
    // A header value that is not valid is refused without being quoted.
    let err = Settings::load_from(
        &empty_dir(),
        None,
        Some(vars(&[
            url,
            (
                "SMSBATCH__PROVIDERS__HTTP__GW__HEADERS__AUTHORIZATION",
                "s3cret\n",
            ),
        ])),
    )
    .expect_err("bad value")
    .to_string();
    assert!(
        err.contains("providers.http.gw.headers.authorization"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
    // A default that names a configured gateway is fine.
    Settings::load_from(
        &empty_dir(),
        None,
        Some(vars(&[url, ("SMSBATCH__PROVIDERS__DEFAULT", "gw")])),
    )
    .expect("default names the http provider");
}

#[test]
fn unknown_keys_are_rejected() {
    let dir = empty_dir();
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("default.yaml"), "smsbatch:\n  wrker_count: 3\n").expect("write");
    let err = Settings::load_from(&dir, None, Some(vars(&[])))
        .expect_err("typo is an error")
        .to_string();
    assert!(err.contains("wrker_count"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
