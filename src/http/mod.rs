//! The admin API (API.md): batches, lifecycle actions, recipients upload, messages, probes and
//! metrics. Handlers turn requests into domain types at the edge and call the store or the
//! registry; they build no SQL.

pub mod csv;
pub mod error;
pub mod openapi;
pub mod views;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::actors::registry::{BatchRegistry, Command};
use crate::config::Settings;
use crate::domain::batch::{BatchName, MessageStatus, MessageType, PartitionCount};
use crate::domain::lifecycle::Action;
use crate::domain::sms;
use crate::domain::state::BatchState;
use crate::domain::template::Template;
use crate::provider::Providers;
use crate::store::Store;
use crate::store::models::NewBatch;
use crate::telemetry::Metrics;
pub use error::ApiError;
use error::ErrorBody;
use openapi::{Health, Readiness, ReadinessChecks};
use views::{BatchPage, BatchView, MessagePage, MessageView, UploadResult};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The broker link, with the `rabbitmq` transport.
    pub broker: Option<Arc<crate::transport::rabbitmq::BrokerLink>>,
    /// The database.
    pub store: Store,
    /// The batch registry.
    pub registry: Addr<BatchRegistry>,
    /// The metrics.
    pub metrics: Metrics,
    /// The configuration.
    pub settings: Arc<Settings>,
    /// The providers.
    pub providers: Providers,
}

/// A resource whose other methods answer 405 with the error body and an `Allow` header (actix
/// would answer an empty 405).
fn resource(path: &str, allow: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move || async move {
        Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow))
    }))
}

/// Mounts every route. The OpenAPI document (`openapi::ApiDoc`) lists the same ones.
pub fn routes(cfg: &mut web::ServiceConfig, state: AppState) {
    let json_limit = state.settings.http.max_json_bytes;
    cfg.app_data(web::Data::new(state))
        .app_data(
            web::JsonConfig::default()
                .limit(json_limit)
                .error_handler(|err, _req| json_error(err).into()),
        )
        .app_data(web::QueryConfig::default().error_handler(|err, _req| {
            ApiError::BadRequest(format!("bad query parameters: {err}")).into()
        }))
        .app_data(
            web::PathConfig::default()
                .error_handler(|err, _req| ApiError::BadRequest(format!("bad path: {err}")).into()),
        )
        .service(resource("/healthz", "GET").route(web::get().to(healthz)))
        .service(resource("/readyz", "GET").route(web::get().to(readyz)))
        .service(resource("/metrics", "GET").route(web::get().to(metrics)))
        .service(resource("/openapi.json", "GET").route(web::get().to(openapi::openapi_json)))
        .service(
            web::scope("/v1")
                .wrap(from_fn(require_token))
                .service(
                    resource("/batches", "GET, POST")
                        .route(web::post().to(create_batch))
                        .route(web::get().to(list_batches)),
                )
                .service(resource("/batches/{id}", "GET").route(web::get().to(get_batch)))
                .service(
                    resource("/batches/{id}/recipients", "POST")
                        .route(web::post().to(upload_recipients)),
                )
                .service(
                    resource("/batches/{id}/messages", "GET").route(web::get().to(list_messages)),
                )
                .service(resource("/batches/{id}/start", "POST").route(web::post().to(start_batch)))
                .service(resource("/batches/{id}/pause", "POST").route(web::post().to(pause_batch)))
                .service(
                    resource("/batches/{id}/resume", "POST").route(web::post().to(resume_batch)),
                )
                .service(
                    resource("/batches/{id}/cancel", "POST").route(web::post().to(cancel_batch)),
                )
                .service(resource("/batches/{id}/retry", "POST").route(web::post().to(retry_batch)))
                .default_service(web::to(no_route)),
        )
        .default_service(web::to(no_route));
}

async fn no_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}

fn json_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => {
            ApiError::TooLarge(format!("body over {limit} bytes (http.max_json_bytes)"))
        }
        E::ContentType => ApiError::BadRequest("expected Content-Type: application/json".into()),
        other => ApiError::BadRequest(format!("malformed JSON: {other}")),
    }
}

/// With `admin.token` set, every `/v1/` request needs `Authorization: Bearer <token>`; anything
/// else is answered 401 before routing, so nothing of the request is done. The token is never
/// logged: neither the header nor the setting appear in any log line or error message.
async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let expected = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.settings.admin.token.clone())
        .unwrap_or_default();
    if !expected.is_empty() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
            return Err(ApiError::Unauthorized.into());
        }
    }
    next.call(req).await
}

/// The credentials of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110, 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_matches(' '))
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= usize::from(x ^ a.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// Liveness: touches no dependency.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process is alive", body = Health)),
)]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: the database and, with RabbitMQ, the broker link.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Every dependency answers", body = Readiness),
        (status = 503, description = "A dependency is down; its check holds the error", body = Readiness),
    ),
)]
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let database = match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timeout".to_string(),
    };
    let queue = match &state.broker {
        None => "ok".to_string(),
        Some(link) => match link.check() {
            Ok(()) => "ok".to_string(),
            Err(e) => e,
        },
    };
    let healthy = database == "ok" && queue == "ok";
    let body = Readiness {
        status: if healthy { "healthy" } else { "unhealthy" },
        timestamp: Utc::now(),
        checks: ReadinessChecks { database, queue },
    };
    if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus metrics, text exposition format 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
    ),
)]
async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // The batches gauge is read from the database, so every instance reports the same truth.
    if let Ok(counts) = state.store.count_batches_by_state().await {
        let counts: HashMap<String, i64> = counts.into_iter().collect();
        for s in BatchState::ALL {
            state
                .metrics
                .batches
                .with_label_values(&[s.as_str()])
                .set(counts.get(s.as_str()).copied().unwrap_or(0));
        }
    }
    let text = state
        .metrics
        .render()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}

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
    let text = template
        .render(|name| Some(if name == "url" { url.unwrap_or("") } else { "" }))
        .map_err(|e| ApiError::Invalid(format!("content: {e}")))?;
    let parts = sms::analyze(&text);
    if parts.segments > max {
        return Err(ApiError::Invalid(format!(
            "content: its text without vars is {} {} units, {} SMS segments; at most {max} \
             segments are allowed (http.max_segments)",
            parts.units, parts.encoding, parts.segments
        )));
    }
    Ok(parts)
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
async fn create_batch(
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

/// Batch ids are UUIDs; anything else cannot name a batch.
fn batch_id(raw: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::NotFound(format!("no batch {raw}")))
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
async fn get_batch(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = batch_id(&path)?;
    let record = state
        .store
        .find_batch(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
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
async fn list_batches(
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

/// Applies a lifecycle action and answers the batch as it is after it.
async fn act(
    state: web::Data<AppState>,
    path: web::Path<String>,
    action: Action,
) -> Result<HttpResponse, ApiError> {
    let id = batch_id(&path)?;
    state
        .registry
        .send(Command {
            public_id: id.clone(),
            action,
            resent: false,
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))??;
    let record = state
        .store
        .find_batch(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
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
        async fn $handler(
            state: web::Data<AppState>,
            path: web::Path<String>,
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
async fn upload_recipients(
    state: web::Data<AppState>,
    request: HttpRequest,
    path: web::Path<String>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = batch_id(&path)?;
    let max_bytes = state.settings.http.max_csv_bytes;
    let too_large = || {
        ApiError::TooLarge(format!(
            "upload over {max_bytes} bytes (http.max_csv_bytes)"
        ))
    };
    // A declared length over the limit is refused before a byte is read.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_bytes) {
        return Err(too_large());
    }
    let batch = state
        .store
        .find_batch(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?
        .batch;
    if batch.state != BatchState::Initial {
        return Err(ApiError::InvalidTransition(format!(
            "recipients can be added only in state initial, not {}",
            batch.state
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let import = state.store.import_recipients(batch.id, rx);
    // The parser feeds the importing transaction through a small channel: the upload is never
    // held whole in memory, and a slow database slows the reading of the body. Any error is
    // sent down the channel, and the transaction rolls back everything sent before it.
    let feed = async move {
        let mut reader = csv::CsvRecords::new();
        let mut rows = Vec::with_capacity(UPLOAD_CHUNK);
        let mut received = 0u64;
        let result: Result<(), ApiError> = async {
            while let Some(bytes) = payload.next().await {
                let bytes =
                    bytes.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
                received += bytes.len() as u64;
                if received > max_bytes {
                    return Err(too_large());
                }
                reader
                    .feed(&bytes, &mut |row| rows.push(row))
                    .map_err(|e| ApiError::BadCsv(e.to_string()))?;
                if rows.len() >= UPLOAD_CHUNK {
                    let chunk = std::mem::replace(&mut rows, Vec::with_capacity(UPLOAD_CHUNK));
                    if tx.send(Ok(Some(chunk))).await.is_err() {
                        return Ok(());
                    }
                }
            }
            reader
                .finish(&mut |row| rows.push(row))
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
    };
    let (imported, ()) = tokio::join!(import, feed);
    crate::memory::release_freed_memory();
    let (accepted, total) = imported?;
    tracing::info!(batch_id = %id, accepted, total, "Recipients uploaded.");
    Ok(HttpResponse::Ok().json(UploadResult { accepted, total }))
}

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

/// A batch's messages in id order, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/batches/{id}/messages",
    tag = "batches",
    operation_id = "listMessages",
    params(("id" = uuid::Uuid, Path, description = "The batch's id"), MessagesQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of messages", body = MessagePage),
        (status = 400, description = "Bad query parameters", body = ErrorBody),
        (status = 401, description = "Token required and missing or wrong", body = ErrorBody),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
)]
async fn list_messages(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = batch_id(&path)?;
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
    let batch = state
        .store
        .find_batch(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?
        .batch;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secret!", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

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
