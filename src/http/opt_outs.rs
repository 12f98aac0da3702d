//! The opt-out list: numbers that said stop. Listed a page at a time, looked up in any form
//! that normalises to E.164, added by JSON or by a streamed CSV import, removed one at a time.
//! Preparation leaves listed numbers out of every batch prepared after they are added.

use std::cell::Cell;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::recipients::{check_declared_length, feed_csv};
use super::views::{OptOutPage, OptOutView, OptOutsAdded};
use super::webhooks::read_json;
use crate::domain::phone::{E164Phone, Region};

/// `GET /v1/opt-outs` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OptOutsQuery {
    /// Page size, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    #[param(pattern = r"^\+[0-9]{1,15}$")]
    after: Option<String>,
}

/// `POST /v1/opt-outs` as JSON.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"phones": ["+8613800001234", "138 0000 1235"]}))]
pub struct AddOptOuts {
    /// Numbers in any form that normalises to E.164 (national numbers in
    /// `smsbatch.default_region`).
    phones: Vec<String>,
}

/// The opt-out list in number order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/opt-outs",
    tag = "opt-outs",
    operation_id = "listOptOuts",
    params(OptOutsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the list", body = OptOutPage),
        (status = 400, description = "Bad query parameters", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn list_opt_outs(
    state: web::Data<AppState>,
    query: web::Query<OptOutsQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    if let Some(after) = q.after.as_deref() {
        let digits = after.strip_prefix('+').unwrap_or("");
        if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::BadRequest(format!(
                "bad cursor `{after}`: not an E.164 number"
            )));
        }
    }
    let rows = state.store.list_opt_outs(q.after.as_deref(), limit).await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|o| o.phone.clone()))
        .flatten();
    Ok(HttpResponse::Ok().json(OptOutPage {
        items: rows.into_iter().map(OptOutView::from).collect(),
        next,
    }))
}

/// One number's entry on the list.
#[utoipa::path(
    get,
    path = "/v1/opt-outs/{phone}",
    tag = "opt-outs",
    operation_id = "getOptOut",
    params(("phone" = String, Path, description = "The number, in any form that normalises to E.164")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The number is on the list", body = OptOutView),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "Not on the list (or not a phone number)", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn get_opt_out(
    state: web::Data<AppState>,
    phone: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let phone = listed_phone(&state, &phone)?;
    match state.store.find_opt_out(&phone).await? {
        Some(entry) => Ok(HttpResponse::Ok().json(OptOutView::from(entry))),
        None => Err(ApiError::NotFound(format!(
            "{phone} is not on the opt-out list"
        ))),
    }
}

/// Takes a number off the list: batches prepared from now on message it again.
#[utoipa::path(
    delete,
    path = "/v1/opt-outs/{phone}",
    tag = "opt-outs",
    operation_id = "deleteOptOut",
    params(("phone" = String, Path, description = "The number, in any form that normalises to E.164")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "Not on the list (or not a phone number)", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn delete_opt_out(
    state: web::Data<AppState>,
    phone: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let phone = listed_phone(&state, &phone)?;
    if state.store.remove_opt_out(&phone).await? {
        tracing::info!(phone = %phone, "Opt-out removed.");
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(ApiError::NotFound(format!(
            "{phone} is not on the opt-out list"
        )))
    }
}

/// Adds numbers to the list: a JSON body of `phones`, or a CSV file with a `phone` column
/// (other columns ignored), streamed and stored in one transaction. Entries that are not phone
/// numbers are counted as `invalid` and skipped; a malformed CSV stores nothing.
#[utoipa::path(
    post,
    path = "/v1/opt-outs",
    tag = "opt-outs",
    operation_id = "addOptOuts",
    request_body(content(
        (AddOptOuts = "application/json"),
        (String = "text/csv", example = json!("phone\n+8613800001234\n13800001235\n")),
    )),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Stored", body = OptOutsAdded),
        (status = 400, description = "Malformed JSON or CSV (`bad_csv`, naming the line), or another content type", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 413, description = "Body over `http.max_json_bytes` (JSON) or `http.max_csv_bytes` (CSV)", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn add_opt_outs(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let region = region(&state)?;
    let media = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let (added, source) = match media.as_deref() {
        Some("text/csv") => (
            add_from_csv(&state, &request, payload, region).await?,
            "csv",
        ),
        Some("application/json") => (add_from_json(&state, payload, region).await?, "api"),
        _ => {
            return Err(ApiError::BadRequest(
                "expected Content-Type: application/json or text/csv".into(),
            ));
        }
    };
    tracing::info!(
        added = added.added,
        already = added.already,
        invalid = added.invalid,
        "Opt-outs added."
    );
    state
        .metrics
        .opt_outs
        .with_label_values(&[source])
        .inc_by(added.added);
    Ok(HttpResponse::Ok().json(added))
}

async fn add_from_json(
    state: &AppState,
    payload: web::Payload,
    region: Region,
) -> Result<OptOutsAdded, ApiError> {
    let request: AddOptOuts = read_json(state, payload).await?;
    let mut invalid = 0u64;
    let phones: Vec<String> = request
        .phones
        .iter()
        .filter_map(|raw| {
            let phone = E164Phone::parse(raw, region).ok();
            invalid += u64::from(phone.is_none());
            phone.map(E164Phone::into_string)
        })
        .collect();
    let added = state.store.add_opt_outs(&phones, "api").await? as u64;
    Ok(OptOutsAdded {
        added,
        already: phones.len() as u64 - added,
        invalid,
    })
}

async fn add_from_csv(
    state: &AppState,
    request: &HttpRequest,
    payload: web::Payload,
    region: Region,
) -> Result<OptOutsAdded, ApiError> {
    let max_bytes = state.settings.http.max_csv_bytes;
    check_declared_length(request, max_bytes)?;
    let valid = Cell::new(0u64);
    let invalid = Cell::new(0u64);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let import = state.store.import_opt_outs(rx, "csv");
    let feed = feed_csv(
        payload,
        max_bytes,
        tx,
        |(raw, _vars)| match E164Phone::parse(&raw, region) {
            Ok(phone) => {
                valid.set(valid.get() + 1);
                Some(phone.into_string())
            }
            Err(_) => {
                invalid.set(invalid.get() + 1);
                None
            }
        },
    );
    let (imported, ()) = tokio::join!(import, feed);
    let added = imported? as u64;
    Ok(OptOutsAdded {
        added,
        already: valid.get() - added,
        invalid: invalid.get(),
    })
}

/// The E.164 form of a number in a path; one that is not a phone number cannot be listed.
fn listed_phone(state: &AppState, raw: &str) -> Result<String, ApiError> {
    E164Phone::parse(raw, region(state)?)
        .map(E164Phone::into_string)
        .map_err(|e| ApiError::NotFound(format!("`{raw}` is not on the opt-out list ({e})")))
}

fn region(state: &AppState) -> Result<Region, ApiError> {
    // Checked at start-up: an error here would be a bug, not a request's fault.
    state
        .settings
        .region()
        .map_err(|e| ApiError::Internal(e.to_string()))
}
