//! The dashboard's session: with `admin.token` set, `/ui/login` exchanges the token for a signed
//! cookie, which opens `/ui/` and `/v1/` to the dashboard's own calls; and the same-origin rule
//! that every state-changing request carrying that cookie must pass.
//!
//! The cookie holds no secret and nothing that lives in one instance: `v1.<expires>.<nonce>.<tag>`,
//! where the tag is an HMAC-SHA256 over the rest under a key derived from the admin token. Any
//! instance with the same token checks it, so it works behind a load balancer; changing the
//! token ends every session. The raw token is never in the cookie.

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use actix_web::http::{Method, header};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::secret::Secret;

/// The cookie's name.
pub const COOKIE: &str = "smsbatch_session";
/// How long a session lasts, in seconds (12 hours: a working day, then log in again).
pub const TTL_SECS: u64 = 12 * 3600;
/// What the signing key is derived for: a key for this purpose only, never the token itself.
const KEY_PURPOSE: &[u8] = b"smsbatch dashboard session v1";

/// Issues and checks session cookies; one per instance, built from `admin.token`.
#[derive(Clone)]
pub struct Sessions {
    /// `None` without an admin token: the dashboard is then open, like the API.
    key: Option<hmac::Key>,
}

impl Sessions {
    /// The sessions of an instance whose admin token is `token` (empty: none needed).
    pub fn new(token: &Secret) -> Self {
        let key = (!token.is_empty()).then(|| {
            let root = hmac::Key::new(hmac::HMAC_SHA256, token.expose().as_bytes());
            let derived = hmac::sign(&root, KEY_PURPOSE);
            hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
        });
        Sessions { key }
    }

    /// True when a session is needed (an admin token is set).
    pub fn required(&self) -> bool {
        self.key.is_some()
    }

    /// A new session value valid until `now + TTL_SECS`; `None` without a token, or when the
    /// system gives no random bytes.
    pub fn issue(&self, now: u64) -> Option<String> {
        let key = self.key.as_ref()?;
        let mut nonce = [0u8; 16];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let body = format!("v1.{}.{}", now + TTL_SECS, hex(&nonce));
        let tag = hmac::sign(key, body.as_bytes());
        Some(format!("{body}.{}", hex(tag.as_ref())))
    }

    /// True when `value` is a session this token signed that has not expired at `now`. The tag
    /// is checked in constant time.
    pub fn verify(&self, value: &str, now: u64) -> bool {
        let Some(key) = &self.key else {
            return false;
        };
        let Some((body, tag)) = value.rsplit_once('.') else {
            return false;
        };
        let Some(tag) = unhex(tag) else {
            return false;
        };
        if hmac::verify(key, body.as_bytes(), &tag).is_err() {
            return false;
        }
        let mut parts = body.split('.');
        match (parts.next(), parts.next().map(str::parse::<u64>)) {
            (Some("v1"), Some(Ok(expires))) => now < expires,
            _ => false,
        }
    }

    /// True when the request carries a valid session cookie.
    pub fn valid_in(&self, req: &HttpRequest) -> bool {
        let now = unix_now();
        cookies(req, COOKIE).any(|value| self.verify(value, now))
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The values of every cookie named `name` in the request's `Cookie` headers.
fn cookies<'a>(req: &'a HttpRequest, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(move |pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value.trim_matches('"'))
        })
}

/// The `Set-Cookie` value of a session: `HttpOnly` (no script reads it), `SameSite=Strict` (no
/// other site's page sends it), `Path=/` (it opens `/v1/` to the dashboard too), `Secure` when
/// the request came over HTTPS.
pub fn set_cookie(req: &HttpRequest, value: &str) -> String {
    let secure = if req.connection_info().scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={TTL_SECS}{secure}")
}

/// The `Set-Cookie` value that ends a session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// GET, HEAD and OPTIONS change nothing; every other method is state-changing.
pub fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// True when the request comes from a page of this server's own origin. A browser says so in
/// `Sec-Fetch-Site` (every current one sends it); without it, `Origin` must name this host. A
/// request with neither is refused: every browser sends `Origin` on a state-changing request,
/// so only a client that is not a browser omits both, and such a client uses the bearer token.
pub fn same_origin(req: &HttpRequest) -> bool {
    let headers = req.headers();
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin";
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // The scheme is not compared: behind a proxy that ends TLS, the server sees `http` while the
    // page's origin is `https`. The host and port are what another site cannot borrow.
    let Some((_, host)) = origin.split_once("://") else {
        return false;
    };
    host.eq_ignore_ascii_case(req.connection_info().host())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn sessions(token: &str) -> Sessions {
        Sessions::new(&Secret::new(token))
    }

    #[test]
    fn a_session_verifies_until_it_expires() {
        let s = sessions("tok");
        let value = s.issue(1_000).expect("issued");
        assert!(s.verify(&value, 1_000));
        assert!(s.verify(&value, 1_000 + TTL_SECS - 1));
        assert!(!s.verify(&value, 1_000 + TTL_SECS));
        assert!(!value.contains("tok"), "the token is not in the cookie");
    }

    #[test]
    fn a_forged_or_foreign_session_does_not_verify() {
        let s = sessions("tok");
        let value = s.issue(1_000).expect("issued");
        assert!(!sessions("other").verify(&value, 1_000), "another token");
        assert!(!sessions("").verify(&value, 1_000), "no token: no sessions");
        assert!(sessions("").issue(1_000).is_none());
        // A later expiry with the old tag.
        let (body, tag) = value.rsplit_once('.').expect("tag");
        let mut parts: Vec<&str> = body.split('.').collect();
        let later = (1_000 + 10 * TTL_SECS).to_string();
        parts[1] = &later;
        assert!(!s.verify(&format!("{}.{tag}", parts.join(".")), 1_000));
        for junk in ["", "v1", "tok", "v1.99999999999.00.zz", &format!("{body}.")] {
            assert!(!s.verify(junk, 1_000), "{junk:?}");
        }
    }

    #[test]
    fn same_origin_reads_fetch_metadata_then_origin() {
        let req = |headers: &[(&str, &str)]| {
            let mut r = TestRequest::post().insert_header(("host", "127.0.0.1:8080"));
            for (k, v) in headers {
                r = r.insert_header((*k, *v));
            }
            r.to_http_request()
        };
        assert!(same_origin(&req(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&req(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&req(&[("sec-fetch-site", "same-site")])));
        assert!(!same_origin(&req(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "http://127.0.0.1:8080")
        ])));
        assert!(same_origin(&req(&[("origin", "http://127.0.0.1:8080")])));
        assert!(same_origin(&req(&[("origin", "https://127.0.0.1:8080")])));
        assert!(!same_origin(&req(&[("origin", "http://evil.example")])));
        assert!(!same_origin(&req(&[("origin", "null")])));
        assert!(!same_origin(&req(&[])));
    }

    #[test]
    fn cookies_are_read_by_name() {
        let req = TestRequest::get()
            .insert_header(("cookie", "a=1; smsbatch_session=xyz; b=2"))
            .to_http_request();
        assert_eq!(cookies(&req, COOKIE).collect::<Vec<_>>(), ["xyz"]);
    }
}
