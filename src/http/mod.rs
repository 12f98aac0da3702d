//! The admin API (docs/api.md), a file per resource: `batches`, lifecycle `actions`,
//! `recipients` (the CSV upload), `messages` (and their CSV `export`), `resend`, `opt_outs`, `probes`
//! and metrics, and the `auth` middleware;
//! `path` reads a route's batch id, `error` is every error answer, `views` the JSON bodies. Handlers
//! turn requests into domain types at the edge and call the store or the registry; they build no
//! SQL. `ui` is the operator dashboard under `/ui/`, and `session` its login cookie and
//! same-origin rule, which `auth` also honours on `/v1/`.

mod actions;
mod auth;
mod batches;
pub mod csv;
pub mod error;
mod export;
mod messages;
pub mod openapi;
mod opt_outs;
mod path;
mod probes;
mod recipients;
pub mod request_span;
mod resend;
pub mod session;
pub mod ui;
pub mod views;
mod webhooks;

use std::sync::Arc;

use actix::Addr;
use actix_web::middleware::from_fn;
use actix_web::{HttpResponse, web};

use crate::actors::registry::BatchRegistry;
use crate::config::Settings;
use crate::provider::{IncomingSink, Providers};
use crate::store::Store;
use crate::telemetry::Metrics;
pub use error::ApiError;

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
    /// Where the webhooks hand receipts and inbound messages (the instance's desk).
    pub incoming: IncomingSink,
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
    let sessions = session::Sessions::new(&state.settings.admin.token);
    let dashboard = ui::UiConfig::new(&state);
    cfg.app_data(web::Data::new(state))
        .app_data(web::Data::new(sessions))
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
        .service(resource("/healthz", "GET").route(web::get().to(probes::healthz)))
        .service(resource("/readyz", "GET").route(web::get().to(probes::readyz)))
        .service(resource("/metrics", "GET").route(web::get().to(probes::metrics)))
        .service(resource("/openapi.json", "GET").route(web::get().to(openapi::openapi_json)))
        // The gateways' webhooks take their provider's token, not the admin token: a scope of
        // their own, before `/v1`'s.
        .service(
            web::scope("/v1/providers")
                .service(
                    resource("/{name}/receipts", "POST")
                        .route(web::post().to(webhooks::post_receipts)),
                )
                .service(
                    resource("/{name}/inbound", "POST")
                        .route(web::post().to(webhooks::post_inbound)),
                )
                .default_service(web::to(no_route)),
        )
        .service(
            web::scope("/v1")
                .wrap(from_fn(auth::require_token))
                .service(
                    resource("/batches", "GET, POST")
                        .route(web::post().to(batches::create_batch))
                        .route(web::get().to(batches::list_batches)),
                )
                .service(resource("/batches/{id}", "GET").route(web::get().to(batches::get_batch)))
                .service(
                    resource("/batches/{id}/recipients", "POST")
                        .route(web::post().to(recipients::upload_recipients)),
                )
                .service(
                    resource("/batches/{id}/messages", "GET")
                        .route(web::get().to(messages::list_messages)),
                )
                .service(
                    resource("/batches/{id}/resend", "POST")
                        .route(web::post().to(resend::resend_batch)),
                )
                .service(
                    resource("/batches/{id}/start", "POST")
                        .route(web::post().to(actions::start_batch)),
                )
                .service(
                    resource("/batches/{id}/pause", "POST")
                        .route(web::post().to(actions::pause_batch)),
                )
                .service(
                    resource("/batches/{id}/resume", "POST")
                        .route(web::post().to(actions::resume_batch)),
                )
                .service(
                    resource("/batches/{id}/cancel", "POST")
                        .route(web::post().to(actions::cancel_batch)),
                )
                .service(
                    resource("/batches/{id}/retry", "POST")
                        .route(web::post().to(actions::retry_batch)),
                )
                .service(
                    resource("/opt-outs", "GET, POST")
                        .route(web::get().to(opt_outs::list_opt_outs))
                        .route(web::post().to(opt_outs::add_opt_outs)),
                )
                .service(
                    resource("/opt-outs/{phone}", "GET, DELETE")
                        .route(web::get().to(opt_outs::get_opt_out))
                        .route(web::delete().to(opt_outs::delete_opt_out)),
                )
                .default_service(web::to(no_route)),
        )
        .configure(|cfg| ui::routes(cfg, dashboard))
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
