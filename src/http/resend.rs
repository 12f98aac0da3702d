//! Resending what failed: `POST /v1/batches/{id}/resend` makes a new batch, in state `initial`,
//! of an ended batch's messages of some statuses.

use std::borrow::Cow;

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::Utc;
use serde::Deserialize;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::path::BatchPath;
use super::views::BatchView;
use crate::domain::batch::{BatchName, MessageStatus};
use crate::domain::state::BatchState;
use crate::store::ResendError;
use crate::store::models::{Batch, NewBatch};

/// The statuses whose messages can be resent: failed, cancelled, and sent without a receipt
/// (a delivered message has its receipt).
pub const RESENDABLE: [MessageStatus; 3] = [
    MessageStatus::Failed,
    MessageStatus::Cancelled,
    MessageStatus::Sent,
];

/// What is added to the original's name when the request gives none.
const NAME_SUFFIX: &str = " (resent)";

/// `POST /v1/batches/{id}/resend` body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"statuses": ["failed"], "name": "black-friday, second try"}))]
pub struct ResendBody {
    /// The statuses of the messages to send again: `failed`, `cancelled`, `sent` (no receipt
    /// yet); at least one.
    #[schema(value_type = Vec<ResendStatus>, min_items = 1)]
    statuses: Vec<String>,
    /// The new batch's name, 1–200 characters; default: the original's name followed by
    /// ` (resent)`.
    #[schema(min_length = 1, max_length = 200)]
    name: Option<String>,
}

/// A status `statuses` may name (documents [`RESENDABLE`]).
pub struct ResendStatus;

impl PartialSchema for ResendStatus {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .description(Some("A status of messages that can be resent."))
            .enum_values(Some(RESENDABLE.iter().map(|s| s.as_str())))
            .into()
    }
}

impl ToSchema for ResendStatus {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ResendStatus")
    }
}

impl From<ResendError> for ApiError {
    fn from(e: ResendError) -> Self {
        match e {
            ResendError::NotFinal(_) => ApiError::InvalidTransition(e.to_string()),
            ResendError::NothingMatched(_) => ApiError::Invalid(e.to_string()),
            ResendError::Store(s) => s.into(),
        }
    }
}

/// The statuses of a request, each once: an unknown name is 400 (as an unknown enum value is
/// anywhere), a status that cannot be resent or an empty list 422.
fn parse_statuses(names: &[String]) -> Result<Vec<MessageStatus>, ApiError> {
    let mut statuses = Vec::new();
    for name in names {
        let status = name
            .parse::<MessageStatus>()
            .map_err(|_| ApiError::BadRequest(format!("statuses: unknown status `{name}`")))?;
        if !RESENDABLE.contains(&status) {
            return Err(ApiError::Invalid(format!(
                "statuses: messages {status} cannot be resent; only failed, cancelled and sent"
            )));
        }
        if !statuses.contains(&status) {
            statuses.push(status);
        }
    }
    if statuses.is_empty() {
        return Err(ApiError::Invalid(
            "statuses: name at least one of failed, cancelled, sent".into(),
        ));
    }
    Ok(statuses)
}

/// The new batch's name: the one given, or the original's with ` (resent)`, shortened to fit.
fn new_name(given: Option<&str>, original: &str) -> Result<String, ApiError> {
    let name = match given {
        Some(name) => name.to_owned(),
        None => {
            let room = BatchName::MAX_CHARS - NAME_SUFFIX.chars().count();
            original.chars().take(room).collect::<String>() + NAME_SUFFIX
        }
    };
    if name.contains('\0') {
        return Err(ApiError::Invalid(
            "name: must not contain NUL characters".into(),
        ));
    }
    BatchName::parse(&name)
        .map(BatchName::into_string)
        .map_err(|e| ApiError::Invalid(e.to_string()))
}

/// A new batch with the original's content, url, provider, type, partitions and failure
/// threshold, in state `initial`, not scheduled.
fn copy_of(original: &Batch, name: String) -> NewBatch {
    let now = Utc::now().naive_utc();
    NewBatch {
        public_id: uuid::Uuid::now_v7().to_string(),
        name,
        campaign_id: original.campaign_id.clone(),
        content: original.content.clone(),
        url: original.url.clone(),
        provider: original.provider.clone(),
        message_type: original.message_type.as_str().to_owned(),
        schedule_at: None,
        partition_count: original.partition_count,
        state: BatchState::Initial.as_str().to_owned(),
        created_at: now,
        updated_at: now,
        failure_threshold: original.failure_threshold,
        parent_id: Some(original.public_id.clone()),
    }
}

/// Makes a new batch, in state `initial`, of an ended batch's messages of the given statuses:
/// their numbers with their recipients' vars.
#[utoipa::path(
    post,
    path = "/v1/batches/{id}/resend",
    tag = "batches",
    operation_id = "resendBatch",
    params(("id" = uuid::Uuid, Path, description = "The original batch's id")),
    request_body = ResendBody,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created, state `initial`, `parent_id` the original's id", body = BatchView,
            links(
                ("getBatch" = (operation_id = "getBatch", parameters(("id" = "$response.body#/id")))),
                ("startBatch" = (operation_id = "startBatch", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 400, description = "Malformed JSON, or an unknown status", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "The original batch is not completed, failed or cancelled", body = ErrorBody),
        (status = 413, description = "Body over `http.max_json_bytes`", body = ErrorBody),
        (status = 422, description = "No status, a status that cannot be resent, a bad name, a provider no longer configured, or no message with these statuses", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn resend_batch(
    state: web::Data<AppState>,
    path: BatchPath,
    body: web::Json<ResendBody>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let statuses = parse_statuses(&req.statuses)?;
    let original = path.find(&state.store).await?.batch;
    if !original.state.is_final() {
        return Err(ResendError::NotFinal(original.state).into());
    }
    let name = new_name(req.name.as_deref(), &original.name)?;
    if state.providers.get(&original.provider).is_none() {
        return Err(ApiError::Invalid(format!(
            "provider: the batch's provider `{}` is no longer configured",
            original.provider
        )));
    }
    let record = state
        .store
        .resend(original.id, &statuses, copy_of(&original, name))
        .await?;
    tracing::info!(batch_id = %record.batch.public_id, parent_id = %original.public_id,
        recipients = record.batch.recipients, "Batch resent.");
    Ok(HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            format!("/v1/batches/{}", record.batch.public_id),
        ))
        .json(BatchView::new(&record)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn statuses_are_checked_and_kept_once() {
        assert_eq!(
            parse_statuses(&names(&["failed", "sent", "failed"])).expect("ok"),
            [MessageStatus::Failed, MessageStatus::Sent]
        );
        assert_eq!(
            parse_statuses(&names(&["spam"]))
                .expect_err("unknown")
                .code(),
            "bad_request"
        );
        for refused in [
            &[][..],
            &["delivered"],
            &["pending"],
            &["failed", "sending"],
        ] {
            assert_eq!(
                parse_statuses(&names(refused)).expect_err("refused").code(),
                "invalid",
                "{refused:?}"
            );
        }
    }

    #[test]
    fn the_default_name_fits() {
        assert_eq!(new_name(None, "bf").expect("ok"), "bf (resent)");
        let long = "n".repeat(BatchName::MAX_CHARS);
        let name = new_name(None, &long).expect("ok");
        assert_eq!(name.chars().count(), BatchName::MAX_CHARS);
        assert!(name.ends_with(NAME_SUFFIX));
        assert_eq!(new_name(Some("again"), "bf").expect("ok"), "again");
        assert_eq!(
            new_name(Some(" "), "bf").expect_err("blank").code(),
            "invalid"
        );
        assert_eq!(
            new_name(Some("a\0"), "bf").expect_err("nul").code(),
            "invalid"
        );
    }
}
