//! The admin token: with `admin.token` set, every `/v1/` request carries it as a bearer token,
//! or, for the dashboard's own calls, the session cookie that `/ui/login` gave for it.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::web;

use super::AppState;
use super::error::ApiError;
use super::session::{Sessions, is_safe, same_origin};

/// With `admin.token` set, every `/v1/` request needs `Authorization: Bearer <token>`, or no
/// `Authorization` header and a valid dashboard session cookie; anything else is answered 401
/// before routing, so nothing of the request is done. A state-changing request that relies on
/// the cookie must come from the dashboard's own origin, else it is 403 (the bearer token needs
/// no such check: no other site's page can attach it). The token is never logged: neither the
/// header nor the setting appear in any log line or error message.
pub(super) async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let expected = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.settings.admin.token.clone())
        .unwrap_or_default();
    if !expected.is_empty() {
        match req.headers().get(header::AUTHORIZATION) {
            Some(value) => {
                let given = value.to_str().ok().and_then(bearer_token).unwrap_or("");
                if !expected.matches(given) {
                    return Err(ApiError::Unauthorized.into());
                }
            }
            None => {
                let session = req
                    .app_data::<web::Data<Sessions>>()
                    .is_some_and(|s| s.valid_in(req.request()));
                if !session {
                    return Err(ApiError::Unauthorized.into());
                }
                if !is_safe(req.method()) && !same_origin(req.request()) {
                    return Err(ApiError::Forbidden(
                        "a state-changing request with the dashboard's session must come from \
                         the dashboard's own origin"
                            .into(),
                    )
                    .into());
                }
            }
        }
    }
    next.call(req).await
}

/// The credentials of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110, 11.1).
pub(super) fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }
}
