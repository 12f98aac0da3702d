//! Recipients: a CSV upload, streamed into one transaction.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;

use super::error::{ApiError, ErrorBody};
use super::path::BatchPath;
use super::views::UploadResult;
use super::{AppState, csv};
use crate::domain::state::BatchState;

/// Recipients per chunk handed from the parser to the store.
const UPLOAD_CHUNK: usize = 1000;

/// Adds recipients from a CSV upload, streamed, in one transaction: a malformed file stores
/// nothing.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/recipients",
    tag = "batches",
    operation_id = "uploadRecipients",
    params(("id" = uuid::Uuid, Path, description = "The batch's id")),
    request_body(
        content = String,
        content_type = "text/csv",
        description = "A header row with a `phone` column; every other column is a template var",
        example = json!("phone,name\n+8613800001236,Cy\n+8613800000001,Di\n"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Stored", body = UploadResult),
        (status = 400, description = "Malformed CSV (`bad_csv`, naming the line)", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "The batch is no longer `initial`", body = ErrorBody),
        (status = 413, description = "Upload over `http.max_csv_bytes`", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn upload_recipients(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: BatchPath,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let max_bytes = state.settings.http.max_csv_bytes;
    // A declared length over the limit is refused before a byte is read.
    check_declared_length(&request, max_bytes)?;
    let batch = path.find(&state.store).await?.batch;
    if batch.state != BatchState::Initial {
        return Err(ApiError::InvalidTransition(format!(
            "recipients can be added only in state initial, not {}",
            batch.state
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let import = state.store.import_recipients(batch.id, rx);
    let feed = feed_csv(payload, max_bytes, tx, Some);
    let (imported, ()) = tokio::join!(import, feed);
    crate::memory::release_freed_memory();
    let (accepted, total) = imported?;
    tracing::info!(batch_id = %path.id(), accepted, total, "Recipients uploaded.");
    Ok(HttpResponse::Ok().json(UploadResult { accepted, total }))
}

/// Reads a CSV upload (a header row with a `phone` column) as it arrives and feeds what `keep`
/// makes of its rows, in chunks, to an importing transaction through `tx`: the upload is never
/// held whole in memory, and a slow database slows the reading of the body. Any error (a
/// malformed file, a body over `max_bytes`) is sent down the channel, and the transaction rolls
/// back everything sent before it; the end of the file is marked by `None`.
pub(super) async fn feed_csv<T>(
    mut payload: web::Payload,
    max_bytes: u64,
    tx: tokio::sync::mpsc::Sender<Result<Option<Vec<T>>, ApiError>>,
    mut keep: impl FnMut(csv::Row) -> Option<T>,
) {
    let mut reader = csv::CsvRecords::new();
    let mut rows = Vec::with_capacity(UPLOAD_CHUNK);
    let mut received = 0u64;
    let result: Result<(), ApiError> = async {
        while let Some(bytes) = payload.next().await {
            let bytes =
                bytes.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
            received += bytes.len() as u64;
            if received > max_bytes {
                return Err(too_large(max_bytes));
            }
            reader
                .feed(&bytes, &mut |row| rows.extend(keep(row)))
                .map_err(|e| ApiError::BadCsv(e.to_string()))?;
            if rows.len() >= UPLOAD_CHUNK {
                let chunk = std::mem::replace(&mut rows, Vec::with_capacity(UPLOAD_CHUNK));
                if tx.send(Ok(Some(chunk))).await.is_err() {
                    return Ok(());
                }
            }
        }
        reader
            .finish(&mut |row| rows.extend(keep(row)))
            .map_err(|e| ApiError::BadCsv(e.to_string()))?;
        Ok(())
    }
    .await;
    let _ = match result {
        Ok(()) => {
            if !rows.is_empty() {
                let _ = tx.send(Ok(Some(rows))).await;
            }
            tx.send(Ok(None)).await
        }
        Err(e) => tx.send(Err(e)).await,
    };
}

/// An upload over `http.max_csv_bytes`.
pub(super) fn too_large(max_bytes: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "upload over {max_bytes} bytes (http.max_csv_bytes)"
    ))
}

/// Refuses, before a byte is read, an upload whose declared length is over `max_bytes`.
pub(super) fn check_declared_length(request: &HttpRequest, max_bytes: u64) -> Result<(), ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes) {
        return Err(too_large(max_bytes));
    }
    Ok(())
}
