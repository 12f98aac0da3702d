//! Messages: a batch's messages, a page at a time, or all of them as CSV (`export`).

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::path::BatchPath;
use super::views::{MessagePage, MessageView};
use crate::domain::batch::MessageStatus;

/// `GET /v1/batches/{id}/messages` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MessagesQuery {
    /// Only messages with this status.
    #[param(value_type = Option<MessageStatus>)]
    status: Option<String>,
    /// Page size, 1–1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    #[param(pattern = "^[0-9]+$")]
    after: Option<String>,
}

/// A batch's messages in id order, a page at a time; with `Accept: text/csv`, every message
/// of the batch (of `status`, if given; `limit` and `after` do not apply) as one streamed CSV.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/messages",
    tag = "batches",
    operation_id = "listMessages",
    params(("id" = uuid::Uuid, Path, description = "The batch's id"), MessagesQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of messages (JSON); with `Accept: text/csv`, every message as CSV with the header `phone,status,segments,attempts,provider_message_id,error,updated_at,delivered_at`",
            content((MessagePage = "application/json"), (String = "text/csv"))),
        (status = 400, description = "Bad query parameters", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn list_messages(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: BatchPath,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let status = q
        .status
        .as_deref()
        .map(|s| {
            s.parse::<MessageStatus>()
                .map_err(|_| ApiError::BadRequest(format!("unknown message status `{s}`")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 1000".into(),
        ));
    }
    let after = match q.after.as_deref() {
        Some(c) => c
            .parse::<i64>()
            .map_err(|_| ApiError::BadRequest(format!("bad cursor `{c}`")))?,
        None => 0,
    };
    let batch = path.find(&state.store).await?.batch;
    if super::export::wants_csv(&req) {
        return super::export::export(state.store.clone(), batch.id, &batch.public_id, status)
            .await;
    }
    let rows = state
        .store
        .list_messages(batch.id, status, after, limit)
        .await?;
    let next = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|m| m.id.to_string()))
        .flatten();
    Ok(HttpResponse::Ok().json(MessagePage {
        items: rows.into_iter().map(MessageView::from).collect(),
        next,
    }))
}
