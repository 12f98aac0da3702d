//! Logging in and out: the admin token for a session cookie, and back.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::views::{UiError, html};
use crate::http::AppState;
use crate::http::session::{Sessions, clear_cookie, set_cookie, unix_now};

#[derive(Template)]
#[template(path = "ui/login.html")]
struct LoginPage {
    next: String,
    error: Option<&'static str>,
}

/// `?next=` of the form: where to go once logged in.
#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

/// The form's fields.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

/// Where a login may send the person: a dashboard page, never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.contains("//") && !n.contains('\\') => n.into(),
        _ => "/ui/".into(),
    }
}

fn see_other(to: &str) -> actix_web::HttpResponseBuilder {
    let mut builder = HttpResponse::SeeOther();
    builder.insert_header((header::LOCATION, to.to_owned()));
    builder
}

/// `GET /ui/login`: the form (without an admin token there is nothing to log in to).
pub(super) async fn form(
    sessions: web::Data<Sessions>,
    query: web::Query<NextQuery>,
) -> Result<HttpResponse, UiError> {
    let next = safe_next(query.next.as_deref());
    if !sessions.required() {
        return Ok(see_other(&next).finish());
    }
    html(&LoginPage { next, error: None })
}

/// `POST /ui/login`: the right token gets a session cookie and goes on; a wrong one gets the
/// form again with 401.
pub(super) async fn submit(
    req: HttpRequest,
    state: web::Data<AppState>,
    sessions: web::Data<Sessions>,
    form: web::Form<LoginForm>,
) -> Result<HttpResponse, UiError> {
    let next = safe_next(form.next.as_deref());
    if !sessions.required() {
        return Ok(see_other(&next).finish());
    }
    let session = state
        .settings
        .admin
        .token
        .matches(&form.token)
        .then(|| sessions.issue(unix_now()))
        .flatten();
    match session {
        Some(value) => {
            tracing::info!("Dashboard login.");
            Ok(see_other(&next)
                .insert_header((header::SET_COOKIE, set_cookie(&req, &value)))
                .finish())
        }
        None => {
            tracing::warn!("Dashboard login refused: wrong token.");
            let mut res = html(&LoginPage {
                next,
                error: Some("That is not the admin token."),
            })?;
            *res.status_mut() = actix_web::http::StatusCode::UNAUTHORIZED;
            Ok(res)
        }
    }
}

/// `POST /ui/logout`: the browser forgets the session.
pub(super) async fn logout() -> HttpResponse {
    see_other("/ui/login")
        .insert_header((header::SET_COOKIE, clear_cookie()))
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_in_the_dashboard() {
        assert_eq!(safe_next(Some("/ui/batches/x?a=1")), "/ui/batches/x?a=1");
        for bad in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/ui//evil",
            "/v1/batches",
            "/ui\\x",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }
}
