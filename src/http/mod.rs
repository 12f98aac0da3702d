//! The admin API (API.md): batches, lifecycle actions, recipients upload, messages, probes and
//! metrics. Handlers turn requests into domain types at the edge and call the store or the
//! registry; they build no SQL.

pub mod csv;
pub mod error;
pub mod views;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::actors::registry::{BatchRegistry, Command};
use crate::actors::supervisor::Action;
use crate::config::Settings;
use crate::domain::batch::{BatchName, MessageStatus, MessageType, PartitionCount};
use crate::domain::state::BatchState;
use crate::domain::template::Template;
use crate::provider::Providers;
use crate::store::Store;
use crate::store::models::NewBatch;
use crate::telemetry::Metrics;
pub use error::ApiError;
use views::{BatchPage, BatchView, MessagePage, MessageView};

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

/// Mounts every route.
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
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .service(
            web::scope("/v1")
                .wrap(from_fn(require_token))
                .route("/batches", web::post().to(create_batch))
                .route("/batches", web::get().to(list_batches))
                .route("/batches/{id}", web::get().to(get_batch))
                .route(
                    "/batches/{id}/recipients",
                    web::post().to(upload_recipients),
                )
                .route("/batches/{id}/messages", web::get().to(list_messages))
                .route("/batches/{id}/{action}", web::post().to(act)),
        )
        .default_service(web::to(|| async {
            Err::<HttpResponse, _>(ApiError::NotFound("no such route".into()))
        }));
}

fn json_error(err: actix_web::error::JsonPayloadError) -> ApiError {
    use actix_web::error::JsonPayloadError as E;
    match err {
        E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => {
            ApiError::TooLarge(format!("body over {limit} bytes"))
        }
        E::ContentType => ApiError::BadRequest("expected Content-Type: application/json".into()),
        other => ApiError::BadRequest(format!("malformed JSON: {other}")),
    }
}

/// With `admin.token` set, every `/v1/` request needs `Authorization: Bearer <token>`.
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
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), expected.expose().as_bytes()) {
            return Err(ApiError::Unauthorized.into());
        }
    }
    next.call(req).await
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &x) in b.iter().enumerate() {
        diff |= usize::from(x ^ a.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

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
    let body = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "timestamp": Utc::now(),
        "checks": {"database": database, "queue": queue},
    });
    if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

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
#[derive(Debug, Deserialize)]
pub struct CreateBatch {
    name: String,
    campaign_id: Option<String>,
    content: String,
    url: Option<String>,
    provider: Option<String>,
    message_type: Option<MessageType>,
    schedule_at: Option<DateTime<Utc>>,
    partition_count: Option<i64>,
    recipients: Option<Vec<InlineRecipient>>,
}

/// One inline recipient.
#[derive(Debug, Deserialize)]
pub struct InlineRecipient {
    phone: String,
    #[serde(default)]
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

async fn create_batch(
    state: web::Data<AppState>,
    body: web::Json<CreateBatch>,
) -> Result<HttpResponse, ApiError> {
    let req = body.into_inner();
    let invalid = |e: &dyn std::fmt::Display| ApiError::Invalid(e.to_string());
    let name = BatchName::parse(&req.name).map_err(|e| invalid(&e))?;
    Template::parse(&req.content).map_err(|e| invalid(&format!("content: {e}")))?;
    let partitions = match req.partition_count {
        Some(n) => PartitionCount::new(n).map_err(|e| invalid(&e))?,
        None => state.settings.partition_count(),
    };
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
            "{} inline recipients, at most {max} allowed; upload a CSV instead",
            recipients.len()
        )));
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
    };
    let inline = recipients
        .into_iter()
        .map(|r| (r.phone, vars_json(r.vars)))
        .collect();
    let record = state.store.create_batch(new, inline).await?;
    tracing::info!(batch_id = %record.batch.public_id, recipients = record.batch.recipients, "Batch created.");
    Ok(HttpResponse::Created().json(BatchView::new(&record)))
}

/// Batch ids are UUIDs; anything else cannot name a batch.
fn batch_id(raw: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| ApiError::NotFound(format!("no batch {raw}")))
}

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
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

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
    let after = q.after.as_deref().map(batch_id).transpose()?;
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

async fn act(
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (raw, action) = path.into_inner();
    let action = match action.as_str() {
        "start" => Action::Start,
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "cancel" => Action::Cancel,
        "retry" => Action::Retry,
        other => return Err(ApiError::NotFound(format!("no action `{other}`"))),
    };
    let id = batch_id(&raw)?;
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

/// Recipients per chunk handed from the parser to the store.
const UPLOAD_CHUNK: usize = 1000;

async fn upload_recipients(
    state: web::Data<AppState>,
    path: web::Path<String>,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = batch_id(&path)?;
    let batch = state
        .store
        .find_batch(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?
        .batch;
    if batch.state != BatchState::Initial.as_str() {
        return Err(ApiError::InvalidTransition(format!(
            "recipients can be added only in state initial, not {}",
            batch.state
        )));
    }
    let max_bytes = state.settings.http.max_csv_bytes;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let import = state.store.import_recipients(batch.id, rx);
    // The parser feeds the importing transaction through a small channel: the upload is never
    // held whole in memory, and a slow database slows the reading of the body.
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
                    return Err(ApiError::TooLarge(format!("upload over {max_bytes} bytes")));
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
    let (accepted, total) = imported?;
    tracing::info!(batch_id = %id, accepted, total, "Recipients uploaded.");
    Ok(HttpResponse::Ok().json(json!({"accepted": accepted, "total": total})))
}

/// `GET /v1/batches/{id}/messages` query.
#[derive(Debug, Deserialize)]
pub struct MessagesQuery {
    status: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
}

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
    fn vars_become_text() {
        let vars: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"name":"Ann","n":3,"ok":true,"gone":null}"#).expect("json");
        assert_eq!(
            vars_json(vars).as_deref(),
            Some(r#"{"n":"3","name":"Ann","ok":"true"}"#)
        );
    }
}
