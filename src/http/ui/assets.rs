//! The dashboard's stylesheet and script, compiled into the binary: nothing is read from disk or
//! fetched from elsewhere at run time.

use actix_web::http::header;
use actix_web::{HttpResponse, web};

use super::views::UiError;
use crate::http::ApiError;

/// Each asset: its name under `/ui/assets/`, its content type and its bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("assets/app.css"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("assets/icon.svg")),
];

/// `GET /ui/assets/{name}`. Cached for a short while only: a new release's assets reach the
/// browser within minutes without versioned names.
pub(super) async fn asset(name: web::Path<String>) -> Result<HttpResponse, UiError> {
    let (_, content_type, body) = ASSETS
        .iter()
        .find(|(n, _, _)| *n == name.as_str())
        .ok_or_else(|| UiError(ApiError::NotFound(format!("no asset {name}"))))?;
    Ok(HttpResponse::Ok()
        .content_type(*content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .body(*body))
}
