//! The dashboard's door: with `admin.token` set, every `/ui/` page but the login form and the
//! assets needs a session; every state-changing request must come from the dashboard's own
//! origin; and every answer carries headers that keep the pages in their own origin.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};

use super::views::encode;
use crate::http::ApiError;
use crate::http::session::{Sessions, is_safe, same_origin};

/// The pages load their script and stylesheet from their own origin only, run no inline
/// script, post forms only to themselves and cannot be framed by another site.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Paths anyone may fetch: the login form and the assets it needs.
fn is_open(path: &str) -> bool {
    path == "/ui/login" || path.starts_with("/ui/assets/")
}

/// The middleware of the `/ui` scope.
pub(super) async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if !is_safe(req.method()) && !same_origin(req.request()) {
        return Err(ApiError::Forbidden(
            "a state-changing request must come from the dashboard's own origin".into(),
        )
        .into());
    }
    let needs_session = req
        .app_data::<web::Data<Sessions>>()
        .is_some_and(|s| s.required() && !s.valid_in(req.request()));
    if needs_session && !is_open(req.path()) {
        // The script asks for fragments with `X-Fragment`: it is told, and sends the person to
        // the login form itself; a page is answered with the form's address.
        if req.headers().contains_key("x-fragment") || !is_safe(req.method()) {
            return Err(ApiError::Unauthorized.into());
        }
        let back = req
            .uri()
            .path_and_query()
            .map_or("/ui/", |p| p.as_str())
            .to_owned();
        let login = format!("/ui/login?next={}", encode(&back));
        let response = HttpResponse::SeeOther()
            .insert_header((header::LOCATION, login))
            .finish();
        return Ok(req.into_response(response).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    Ok(res.map_into_left_body())
}
