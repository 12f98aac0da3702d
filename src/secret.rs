//! Values that must never reach a log: `Secret` and the redaction of URLs. Shared by the
//! configuration, the providers and the transports.

use std::fmt;

use serde::Deserialize;

/// A string that never prints: tokens and URLs with passwords.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// True when `given` is the value, compared in a time that does not tell how much of a
    /// guess matched.
    pub fn matches(&self, given: &str) -> bool {
        constant_time_eq(given.as_bytes(), self.0.as_bytes())
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= usize::from(x ^ a.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A URL with its password replaced by `***`, safe to log.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_string(),
    }
}

/// An HTTP URL safe to log: the password and the query string replaced by `***`.
pub fn redact_http_url(url: &str) -> String {
    let redacted = redact_url(url);
    match redacted.split_once('?') {
        Some((base, _)) => format!("{base}?***"),
        None => redacted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/sms"),
            "postgres://app:***@db:5432/sms"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
        assert_eq!(redact_url("sqlite://data/x.db"), "sqlite://data/x.db");
    }

    #[test]
    fn http_urls_lose_their_query_too() {
        assert_eq!(
            redact_http_url("https://u:pw@sms.example/send?key=k3y"),
            "https://u:***@sms.example/send?***"
        );
        assert_eq!(
            redact_http_url("http://sms.example/send"),
            "http://sms.example/send"
        );
        assert_eq!(format!("{:?}", Secret::new("k3y")), "Secret(***)");
    }

    #[test]
    fn secrets_compare_whole_values() {
        let secret = Secret::new("secret");
        assert!(secret.matches("secret"));
        assert!(!secret.matches("secreT"));
        assert!(!secret.matches("secre"));
        assert!(!secret.matches("secret!"));
        assert!(!secret.matches(""));
    }
}
