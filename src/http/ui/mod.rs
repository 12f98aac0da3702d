//! The operator dashboard at `/ui/`: server-rendered pages (askama templates in
//! `templates/ui/`, compiled into the binary) and the fragments their script polls for live
//! numbers, read through the same store functions as the REST handlers. The pages change
//! nothing themselves: their script calls `/v1/` with the session cookie, so the dashboard is a
//! client of the documented API like any other. `session` (beside this folder) signs the cookie
//! and holds the same-origin rule; `guard` applies both to `/ui/`.
//!
//! `pages` (batches, a batch, a new batch), `opt_outs`, `login`, `assets` (the stylesheet and
//! script, inside the binary) and `views` (what the templates show).

mod assets;
mod guard;
mod login;
mod opt_outs;
mod pages;
mod views;

use actix_web::http::header;
use actix_web::middleware::from_fn;
use actix_web::{HttpResponse, web};

use super::{ApiError, AppState};

/// How often a page's script asks for its live fragment, in milliseconds: each open page costs
/// the database one read per interval, whichever instance it reaches.
pub const POLL_MS: u64 = 2000;

/// The largest form the pages post (the preview carries the content being typed).
const FORM_LIMIT: usize = 64 * 1024;

/// What the dashboard's pages share, built once per instance.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// The configured providers' names, for the new batch form.
    pub providers: Vec<String>,
    /// The default provider's name.
    pub default_provider: String,
}

impl UiConfig {
    /// Reads the provider names from the configuration (checked at start-up already).
    pub fn new(state: &AppState) -> Self {
        let mut providers: Vec<String> = crate::provider::configure(&state.settings.providers)
            .map(|all| all.into_iter().map(|p| p.name).collect())
            .unwrap_or_default();
        providers.sort();
        UiConfig {
            providers,
            default_provider: state.providers.default_name().to_owned(),
        }
    }
}

/// Mounts `/ui` and everything under `/ui/`.
pub fn routes(cfg: &mut web::ServiceConfig, config: UiConfig) {
    cfg.app_data(web::Data::new(config))
        .service(web::resource("/ui").route(web::get().to(to_dashboard)))
        .service(
            web::scope("/ui")
                .wrap(from_fn(guard::guard))
                // The login and preview forms: a malformed or oversized one is a 400 page.
                .app_data(web::FormConfig::default().limit(FORM_LIMIT).error_handler(
                    |err, _req| {
                        views::UiError(ApiError::BadRequest(format!("bad form: {err}"))).into()
                    },
                ))
                .route("/", web::get().to(pages::batches))
                .route("/login", web::get().to(login::form))
                .route("/login", web::post().to(login::submit))
                .route("/logout", web::post().to(login::logout))
                .route("/assets/{name}", web::get().to(assets::asset))
                .route("/preview", web::post().to(pages::preview))
                .route("/batches/rows", web::get().to(pages::batch_rows))
                .route("/batches/new", web::get().to(pages::new_batch))
                .route("/batches/{id}", web::get().to(pages::batch))
                .route("/batches/{id}/live", web::get().to(pages::batch_live))
                .route("/batches/{id}/messages.csv", web::get().to(pages::export))
                .route("/opt-outs", web::get().to(opt_outs::page))
                .route("/opt-outs/rows", web::get().to(opt_outs::rows))
                .route("/opt-outs.csv", web::get().to(opt_outs::export))
                .default_service(web::to(views::not_found)),
        );
}

async fn to_dashboard() -> HttpResponse {
    HttpResponse::MovedPermanently()
        .insert_header((header::LOCATION, "/ui/"))
        .finish()
}
