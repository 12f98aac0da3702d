//! Batches: creating one, reading one, listing them.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::path::BatchPath;
use super::views::{BatchPage, BatchView};
use crate::domain::batch::{BatchName, MessageType, PartitionCount};
use crate::domain::sms;
use crate::domain::state::BatchState;
use crate::domain::template::Template;
use crate::store::models::NewBatch;

/// `POST /v1/batches` body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({
    "name": "black-friday",
    "campaign_id": "cmp-42",
    "content": "Hi {{name}}, 30% off today: {{url}}",
    "url": "https://shop.example/bf",
    "provider": "simulator",
    "message_type": "marketing",
    "schedule_at": null,
    "partition_count": 4,
    "recipients": [{"phone": "+8613800001234", "vars": {"name": "Ann"}}]
}))]
pub struct CreateBatch {
    /// 1–200 characters.
    #[schema(min_length = 1, max_length = 200)]
    name: String,
    /// The caller's campaign reference.
    campaign_id: Option<String>,
    /// The message template: `{{var}}` is replaced by the recipient's var, `{{url}}` by `url`.
    /// Its text without the vars may take at most `http.max_segments` SMS segments.
    #[schema(min_length = 1)]
    content: String,
    /// What `{{url}}` is replaced with.
    url: Option<String>,
    /// A provider name from the configuration; default: the configured default provider.
    provider: Option<String>,
    /// Default `transactional`.
    #[schema(value_type = Option<MessageType>)]
    message_type: Option<MessageType>,
    /// Start preparing at this time when started before it.
    schedule_at: Option<DateTime<Utc>>,
    /// 1–256; default from the configuration.
    #[schema(minimum = 1, maximum = 256)]
    partition_count: Option<i64>,
    /// Inline recipients, up to `http.max_inline_recipients`.
    recipients: Option<Vec<InlineRecipient>>,
    /// 0–1: the batch pauses itself, with condition `Paused` reason `FailureThresholdExceeded`,
    /// when more than this share of its last `smsbatch.failure_window` final outcomes failed;
    /// 1 never pauses. Default `smsbatch.failure_threshold` (0.1).
    #[schema(minimum = 0, maximum = 1)]
    failure_threshold: Option<f64>,
}

/// One inline recipient.
#[derive(Debug, Deserialize, ToSchema)]
pub struct InlineRecipient {
    /// The number as given; validated at preparation (invalid numbers are counted, not refused).
    phone: String,
    /// Template vars; numbers and booleans are used as JSON writes them, nulls are dropped.
    #[serde(default)]
    #[schema(value_type = Object)]
    vars: serde_json::Map<String, serde_json::Value>,
}

/// Template vars are text: numbers and booleans are written as JSON writes them, nulls dropped.
fn vars_json(vars: serde_json::Map<String, serde_json::Value>) -> Option<String> {
    if vars.is_empty() {
        return None;
    }
    let map: serde_json::Map<String, serde_json::Value> = vars
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, serde_json::Value::String(text))
        })
        .collect();
    Some(serde_json::Value::Object(map).to_string())
}

/// Text with a NUL character cannot be stored (PostgreSQL refuses it in `TEXT`): refusing it
/// here answers 422 rather than a database error.
fn no_nul(field: &str, value: &str) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::Invalid(format!(
            "{field}: must not contain NUL characters"
        )));
    }
    Ok(())
}

/// Refuses content whose text takes more than `max` SMS segments.
///
/// At creation only the template's static text is known: every placeholder counts as empty, but
/// `{{url}}` as the batch's `url`. The real messages are at least that long (vars only add text,
/// and a var outside GSM-7 makes the message UCS-2, which takes more segments, not fewer), so
/// this check refuses only content that no recipient could make short enough; a message that
/// the vars push over the limit is only known at preparation.
fn check_segments(
    template: &Template,
    url: Option<&str>,
    max: u32,
) -> Result<sms::SmsParts, ApiError> {
    let parts = template_parts(template, url)?;
    if parts.segments > max {
        return Err(ApiError::Invalid(format!(
            "content: its text without vars is {} {} units, {} SMS segments; at most {max} \
             segments are allowed (http.max_segments)",
            parts.units, parts.encoding, parts.segments
        )));
    }
    Ok(parts)
}

/// The encoding and SMS count of a template's static text: every var empty, `{{url}}` as the
/// batch's `url`. Creation checks it against `http.max_segments` (`check_segments`); the
/// dashboard's preview shows it as the content is typed.
pub(super) fn static_parts(content: &str, url: Option<&str>) -> Result<sms::SmsParts, ApiError> {
    let template =
        Template::parse(content).map_err(|e| ApiError::Invalid(format!("content: {e}")))?;
    template_parts(&template, url)
}

fn template_parts(template: &Template, url: Option<&str>) -> Result<sms::SmsParts, ApiError> {
    let text = template
        .render(|name| Some(if name == "url" { url.unwrap_or("") } else { "" }))
        .map_err(|e| ApiError::Invalid(format!("content: {e}")))?;
    Ok(sms::analyze(&text))
}

/// Creates a batch in state `initial`, with its inline recipients.
#[utoipa::path(
    post,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "createBatch",
    request_body = CreateBatch,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created, state `initial`", body = BatchView,
            links(
                ("getBatch" = (operation_id = "getBatch", parameters(("id" = "$response.body#/id")))),
                ("uploadRecipients" = (operation_id = "uploadRecipients", parameters(("id" = "$response.body#/id")))),
                ("listMessages" = (operation_id = "listMessages", parameters(("id" = "$response.body#/id")))),
                ("startBatch" = (operation_id = "startBatch", parameters(("id" = "$response.body#/id")))),
                ("cancelBatch" = (operation_id = "cancelBatch", parameters(("id" = "$response.body#/id")))),
            )),
        (status = 400, description = "Malformed JSON or a field of the wrong type", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 413, description = "Body over `http.max_json_bytes`, or more inline recipients than `http.max_inline_recipients`", body = ErrorBody),
        (status = 422, description = "Invalid values: empty name or content, partition_count out of range, unknown provider, content over `http.max_segments`, failure_threshold outside 0–1", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn create_batch(
    state: web::Data<AppState>,
    body: web::Json<CreateBatch>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let invalid = |e: &dyn std::fmt::Display| ApiError::Invalid(e.to_string());
    for (field, value) in [
        ("name", Some(&req.name)),
        ("campaign_id", req.campaign_id.as_ref()),
        ("content", Some(&req.content)),
        ("url", req.url.as_ref()),
        ("provider", req.provider.as_ref()),
    ] {
        no_nul(field, value.map_or("", String::as_str))?;
    }
    let name = BatchName::parse(&req.name).map_err(|e| invalid(&e))?;
    let template = Template::parse(&req.content).map_err(|e| invalid(&format!("content: {e}")))?;
    check_segments(
        &template,
        req.url.as_deref(),
        state.settings.http.max_segments,
    )?;
    let partitions = match req.partition_count {
        Some(n) => PartitionCount::new(n).map_err(|e| invalid(&e))?,
        None => state.settings.partition_count(),
    };
    let failure_threshold = req
        .failure_threshold
        .unwrap_or(state.settings.smsbatch.failure_threshold);
    if !(0.0..=1.0).contains(&failure_threshold) {
        return Err(invalid(&"failure_threshold: must be between 0 and 1"));
    }
    let provider = req
        .provider
        .unwrap_or_else(|| state.providers.default_name().to_string());
    if state.providers.get(&provider).is_none() {
        return Err(ApiError::Invalid(format!(
            "provider: unknown provider `{provider}`"
        )));
    }
    let recipients = req.recipients.unwrap_or_default();
    let max = state.settings.http.max_inline_recipients;
    if recipients.len() > max {
        return Err(ApiError::TooLarge(format!(
            "{} inline recipients, at most {max} allowed (http.max_inline_recipients); upload a \
             CSV instead",
            recipients.len()
        )));
    }
    for (i, r) in recipients.iter().enumerate() {
        no_nul(&format!("recipients[{i}].phone"), &r.phone)?;
        for (k, v) in &r.vars {
            no_nul(&format!("recipients[{i}].vars"), k)?;
            if let serde_json::Value::String(v) = v {
                no_nul(&format!("recipients[{i}].vars.{k}"), v)?;
            }
        }
    }
    let now = Utc::now().naive_utc();
    let new = NewBatch {
        public_id: uuid::Uuid::now_v7().to_string(),
        name: name.into_string(),
        campaign_id: req.campaign_id,
        content: req.content,
        url: req.url,
        provider,
        message_type: req.message_type.unwrap_or_default().as_str().to_string(),
        schedule_at: req.schedule_at.map(|t| t.naive_utc()),
        partition_count: i32::from(partitions.get()),
        state: BatchState::Initial.as_str().to_string(),
        created_at: now,
        updated_at: now,
        failure_threshold,
        parent_id: None,
    };
    let inline = recipients
        .into_iter()
        .map(|r| (r.phone, vars_json(r.vars)))
        .collect();
    let record = state.store.create_batch(new, inline).await?;
    tracing::info!(batch_id = %record.batch.public_id, recipients = record.batch.recipients, "Batch created.");
    Ok(HttpResponse::Created()
        .insert_header((
            header::LOCATION,
            format!("/v1/batches/{}", record.batch.public_id),
        ))
        .json(BatchView::new(&record)))
}

/// One batch, with its steps, counts, partitions and conditions.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}",
    tag = "batches",
    operation_id = "getBatch",
    params(("id" = uuid::Uuid, Path, description = "The batch's id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The batch", body = BatchView),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn get_batch(
    state: web::Data<AppState>,
    path: BatchPath,
) -> Result<HttpResponse, ApiError> {
    let record = path.find(&state.store).await?;
    Ok(HttpResponse::Ok().json(BatchView::new(&record)))
}

/// `GET /v1/batches` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only batches in this state.
    #[param(value_type = Option<BatchState>)]
    state: Option<String>,
    /// Page size, 1–500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// The `next` of the previous page: batches older than this one.
    #[param(value_type = Option<uuid::Uuid>)]
    after: Option<String>,
}

/// Batches, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/batches",
    tag = "batches",
    operation_id = "listBatches",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of batches", body = BatchPage),
        (status = 400, description = "Bad query parameters", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
pub(super) async fn list_batches(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let q = query.into_inner();
    let filter = q
        .state
        .as_deref()
        .map(|s| {
            s.parse::<BatchState>()
                .map_err(|_| ApiError::BadRequest(format!("unknown state `{s}`")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 500".into(),
        ));
    }
    let after = q
        .after
        .as_deref()
        .map(|a| {
            uuid::Uuid::parse_str(a)
                .map(|u| u.to_string())
                .map_err(|_| ApiError::BadRequest(format!("bad cursor `{a}`: not a batch id")))
        })
        .transpose()?;
    let records = state
        .store
        .list_batches(filter.map(BatchState::as_str), after.as_deref(), limit)
        .await?;
    let next = (records.len() as i64 == limit)
        .then(|| records.last().map(|r| r.batch.public_id.clone()))
        .flatten();
    Ok(HttpResponse::Ok().json(BatchPage {
        items: records.iter().map(BatchView::new).collect(),
        next,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(content: &str) -> Template {
        Template::parse(content).expect("template")
    }

    #[test]
    fn segments_count_the_static_text_and_the_url() {
        let long = "x".repeat(153 * 3);
        assert!(check_segments(&template(&long), None, 3).is_ok());
        assert!(check_segments(&template(&format!("{long}y")), None, 3).is_err());
        // Vars count as empty, the url as itself.
        assert!(check_segments(&template(&format!("{long}{{{{name}}}}")), None, 3).is_ok());
        let with_url = format!("{long}{{{{url}}}}");
        assert!(check_segments(&template(&with_url), Some("https://x.io"), 3).is_err());
        // UCS-2: 70 units in one SMS, 67 a part after that.
        assert!(check_segments(&template(&"好".repeat(70)), None, 1).is_ok());
        assert!(check_segments(&template(&"好".repeat(71)), None, 1).is_err());
        let err = check_segments(&template(&"好".repeat(135)), None, 2).expect_err("3 segments");
        assert_eq!(err.code(), "invalid");
        assert!(err.to_string().contains("http.max_segments"), "{err}");
    }

    #[test]
    fn nul_characters_are_refused() {
        assert!(no_nul("name", "a\0b").is_err());
        assert!(no_nul("name", "ab").is_ok());
    }

    #[test]
    fn vars_become_text() {
        let vars: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"name":"Ann","n":3,"ok":true,"gone":null}"#).expect("json");
        assert_eq!(
            vars_json(vars).as_deref(),
            Some(r#"{"n":"3","name":"Ann","ok":"true"}"#)
        );
    }
}
