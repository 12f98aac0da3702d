//! Probes and metrics: `/healthz`, `/readyz`, `/metrics`.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::{HttpResponse, web};
use chrono::Utc;

use super::AppState;
use super::error::ApiError;
use super::openapi::{Health, ProviderCheck, Readiness, ReadinessChecks, SessionCheck};
use crate::domain::state::BatchState;
use crate::provider::SessionReport;

/// Liveness: touches no dependency.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process is alive", body = Health)),
)]
pub(super) async fn healthz() -> HttpResponse {
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
pub(super) async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let checks = checks(&state).await;
    let healthy = checks.database == "ok" && checks.queue == "ok";
    // Shown, never failing the probe: the API serves whatever an SMSC does.
    let providers = state
        .providers
        .sessions()
        .into_iter()
        .map(|(name, sessions)| {
            let sessions = sessions
                .into_iter()
                .map(|s| SessionCheck {
                    state: s.state,
                    reason: s.reason,
                })
                .collect();
            (name, ProviderCheck { sessions })
        })
        .collect();
    let body = Readiness {
        status: if healthy { "healthy" } else { "unhealthy" },
        timestamp: Utc::now(),
        checks,
        providers,
    };
    if healthy {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// The readiness checks: `ok`, or the error of the database (pinged, at most 2 s) and of the
/// broker link.
async fn checks(state: &AppState) -> ReadinessChecks {
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
    ReadinessChecks { database, queue }
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
pub(super) async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
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
    // What /readyz would answer, so that an alert sees an instance that is up but not ready.
    let checks = checks(&state).await;
    for (check, result) in [("database", &checks.database), ("queue", &checks.queue)] {
        state
            .metrics
            .ready
            .with_label_values(&[check])
            .set(i64::from(result == "ok"));
    }
    for (name, sessions) in state.providers.sessions() {
        for kind in SessionReport::STATES {
            let n = sessions.iter().filter(|s| s.state == kind).count();
            state
                .metrics
                .smpp_sessions
                .with_label_values(&[name.as_str(), kind])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let in_flight: usize = sessions.iter().map(|s| s.in_flight).sum();
        state
            .metrics
            .smpp_window_in_use
            .with_label_values(&[name.as_str()])
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
    }
    let text = state
        .metrics
        .render()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}
