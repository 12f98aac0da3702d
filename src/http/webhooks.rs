//! What `http` gateways post back: delivery receipts and inbound messages, under
//! `/v1/providers/{name}/`. They authenticate with the provider's own `webhook_token`, not the
//! admin token; an unknown provider, a provider without a token and a wrong token are one and
//! the same 401, so that the routes tell nothing about what is configured. A 204 means stored:
//! the items go to the instance's desk (`actors::incoming`), which answers once they are
//! durable; a gateway that gets anything else sends them again.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use utoipa::ToSchema;

use super::AppState;
use super::auth::bearer_token;
use super::error::{ApiError, ErrorBody};
use crate::domain::phone::E164Phone;
use crate::domain::receipt::{Receipt, ReceiptOutcome, canonical_text, receipt_key};
use crate::provider::{Delivery, InboundSms, Incoming};

/// How long a webhook waits for its items to be stored before answering 503.
const STORE_WAIT: Duration = Duration::from_secs(10);

/// What a receipt says.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptStatus {
    /// The handset has it.
    Delivered,
    /// It will not arrive.
    Undelivered,
    /// Its validity ran out.
    Expired,
    /// The network refused it.
    Rejected,
}

/// One receipt as a gateway posts it.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"id": "gw-81723", "status": "undelivered", "error": "absent subscriber"}))]
pub struct ReceiptIn {
    /// The gateway's id for the message, as its answer to the send gave it.
    #[schema(min_length = 1)]
    id: String,
    /// What became of the message.
    status: ReceiptStatus,
    /// Why it was not delivered.
    error: Option<String>,
}

/// One receipt, or several.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Receipts {
    /// One receipt.
    One(ReceiptIn),
    /// Several.
    Many(Vec<ReceiptIn>),
}

/// A mobile-originated message as a gateway posts it.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"from": "+4915112345678", "to": "Shop", "text": "STOP"}))]
pub struct InboundIn {
    /// The sender, in any form that normalises to E.164.
    from: String,
    /// The number or name it was sent to.
    to: String,
    /// Its text.
    text: String,
}

/// Delivery receipts of an `http` provider.
#[utoipa::path(
    post,
    path = "/v1/providers/{name}/receipts",
    tag = "webhooks",
    operation_id = "postReceipts",
    params(("name" = String, Path, description = "The provider's name")),
    request_body = Receipts,
    security(("webhook" = [])),
    responses(
        (status = 204, description = "Stored: each moves its `sent` message, or waits for it"),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Not this provider's webhook token (or none is set)", body = ErrorBody),
        (status = 413, description = "Body over http.max_json_bytes", body = ErrorBody),
        (status = 503, description = "Not stored in time; post again", body = ErrorBody),
    ),
)]
pub(super) async fn post_receipts(
    state: web::Data<AppState>,
    req: HttpRequest,
    name: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &req, &name)?;
    let receipts = match read_json::<Receipts>(&state, body).await? {
        Receipts::One(one) => vec![one],
        Receipts::Many(many) => many,
    };
    let mut items = Vec::with_capacity(receipts.len());
    for r in receipts {
        if r.id.trim().is_empty() {
            return Err(ApiError::BadRequest(
                "a receipt's id must not be empty".into(),
            ));
        }
        let outcome = match (r.status, r.error.filter(|e| !e.trim().is_empty())) {
            (ReceiptStatus::Delivered, _) => ReceiptOutcome::Delivered,
            (status, error) => {
                let word = match status {
                    ReceiptStatus::Expired => "expired",
                    ReceiptStatus::Rejected => "rejected",
                    _ => "undelivered",
                };
                ReceiptOutcome::Failed(match error {
                    Some(error) => format!("{word}: {}", error.trim()),
                    None => word.to_owned(),
                })
            }
        };
        items.push(Incoming::Receipt(Receipt {
            key: receipt_key(&name, &canonical_text(&r.id)),
            outcome,
        }));
    }
    store(&state, items).await
}

/// Inbound messages of an `http` provider: STOP and START act on the opt-out list.
#[utoipa::path(
    post,
    path = "/v1/providers/{name}/inbound",
    tag = "webhooks",
    operation_id = "postInbound",
    params(("name" = String, Path, description = "The provider's name")),
    request_body = InboundIn,
    security(("webhook" = [])),
    responses(
        (status = 204, description = "Taken (a stop or start word applied to the opt-out list)"),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Not this provider's webhook token (or none is set)", body = ErrorBody),
        (status = 413, description = "Body over http.max_json_bytes", body = ErrorBody),
        (status = 422, description = "`from` is not a phone number", body = ErrorBody),
        (status = 503, description = "Not stored in time; post again", body = ErrorBody),
    ),
)]
pub(super) async fn post_inbound(
    state: web::Data<AppState>,
    req: HttpRequest,
    name: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authenticate(&state, &req, &name)?;
    let sms: InboundIn = read_json(&state, body).await?;
    let region = state
        .settings
        .region()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let from = E164Phone::parse(&sms.from, region)
        .map_err(|e| ApiError::Invalid(format!("from: {e}")))?
        .into_string();
    let item = Incoming::Inbound(InboundSms {
        provider: name.into_inner(),
        from,
        to: sms.to,
        text: sms.text,
    });
    store(&state, vec![item]).await
}

/// The provider `name`'s webhook token, or 401.
fn authenticate(state: &AppState, req: &HttpRequest, name: &str) -> Result<(), ApiError> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    match state.providers.get(name) {
        Some(provider) if !given.is_empty() && provider.gateway.webhook_accepts(given) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

/// The body as JSON, at most `http.max_json_bytes` of it.
pub(super) async fn read_json<T: DeserializeOwned>(
    state: &AppState,
    mut body: web::Payload,
) -> Result<T, ApiError> {
    let limit = state.settings.http.max_json_bytes;
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(format!(
                "body over {limit} bytes (http.max_json_bytes)"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
}

/// Hands `items` to the desk and waits until each is stored: 204, or 503.
async fn store(state: &AppState, items: Vec<Incoming>) -> Result<HttpResponse, ApiError> {
    let unavailable = || ApiError::Unavailable("not stored in time; post again".into());
    let deadline = tokio::time::Instant::now() + STORE_WAIT;
    let mut answers = Vec::with_capacity(items.len());
    for incoming in items {
        let (stored, answer) = oneshot::channel();
        let sent = state.incoming.send(Delivery { incoming, stored });
        match tokio::time::timeout_at(deadline, sent).await {
            Ok(Ok(())) => answers.push(answer),
            _ => return Err(unavailable()),
        }
    }
    for answer in answers {
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(true)) => {}
            _ => return Err(unavailable()),
        }
    }
    Ok(HttpResponse::NoContent().finish())
}
