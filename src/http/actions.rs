//! Lifecycle actions: start, pause, resume, cancel, retry.

use actix_web::{HttpResponse, web};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::path::BatchPath;
use super::views::BatchView;
use crate::actors::registry::Command;
use crate::domain::lifecycle::Action;
use crate::store::BatchRecord;
use crate::store::models::Partition;
use crate::telemetry::trace::TraceContext;

/// Applies a lifecycle action and answers the batch as the action saved it, with its partitions'
/// counters as they are now (or, for a batch with nothing prepared yet, as they were then).
async fn act(
    state: web::Data<AppState>,
    path: BatchPath,
    action: Action,
) -> Result<HttpResponse, ApiError> {
    let batch = state
        .registry
        .send(Command {
            public_id: path.id().to_owned(),
            action,
            resent: false,
            trace: TraceContext::current(),
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))??;
    // Nothing prepared yet when the action saved the row (a chunk adds to `processed` and to
    // its partitions' totals in one transaction): every counter was zero then, as a batch's
    // are when it is started, and they are not read.
    let partitions = if batch.processed == 0 {
        Partition::zeroed(batch.id, batch.partition_count)
    } else {
        state.store.partitions(batch.id).await?
    };
    let record = BatchRecord { batch, partitions };
    Ok(HttpResponse::Accepted().json(BatchView::new(&record)))
}

/// One lifecycle action: its handler and its operation in the OpenAPI document.
macro_rules! lifecycle_action {
    ($(#[doc = $doc:tt])* $handler:ident, $action:expr, $path:tt, $operation:tt) => {
        $(#[doc = $doc])*
        #[utoipa::path(
            post,
            path = $path,
            tag = "batches",
            operation_id = $operation,
            params(("id" = uuid::Uuid, Path, description = "The batch's id")),
            security(("bearer" = [])),
            responses(
                (status = 202, description = "Accepted; the batch as it is now", body = BatchView,
                    links(
                        ("getBatch" = (operation_id = "getBatch", parameters(("id" = "$response.body#/id")))),
                        ("listMessages" = (operation_id = "listMessages", parameters(("id" = "$response.body#/id")))),
                        ("pauseBatch" = (operation_id = "pauseBatch", parameters(("id" = "$response.body#/id")))),
                        ("resumeBatch" = (operation_id = "resumeBatch", parameters(("id" = "$response.body#/id")))),
                        ("cancelBatch" = (operation_id = "cancelBatch", parameters(("id" = "$response.body#/id")))),
                        ("retryBatch" = (operation_id = "retryBatch", parameters(("id" = "$response.body#/id")))),
                    )),
                (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
                (status = 404, description = "No such batch", body = ErrorBody),
                (status = 409, description = "Not allowed in the batch's state", body = ErrorBody),
                (status = 503, description = "The database or the supervisor is unavailable", body = ErrorBody),
            ),
        )]
        pub(super) async fn $handler(
            state: web::Data<AppState>,
            path: BatchPath,
        ) -> Result<HttpResponse, ApiError> {
            act(state, path, $action).await
        }
    };
}

lifecycle_action!(
    /// Starts a batch in `initial`: `scheduled` when `schedule_at` is in the future, else
    /// `preparing`.
    start_batch, Action::Start, "/v1/batches/{id}/start", "startBatch"
);
lifecycle_action!(
    /// Pauses a `scheduled`, `preparing` or `delivering` batch.
    pause_batch, Action::Pause, "/v1/batches/{id}/pause", "pauseBatch"
);
lifecycle_action!(
    /// Resumes a `paused` batch where it stopped.
    resume_batch, Action::Resume, "/v1/batches/{id}/resume", "resumeBatch"
);
lifecycle_action!(
    /// Cancels a batch that is not final; messages not yet sent become `cancelled`.
    cancel_batch, Action::Cancel, "/v1/batches/{id}/cancel", "cancelBatch"
);
lifecycle_action!(
    /// Retries a `failed` batch from the step that failed.
    retry_batch, Action::Retry, "/v1/batches/{id}/retry", "retryBatch"
);
