//! What the dashboard's templates show: a batch as a card (its bar, counts and the actions its
//! state allows), the page chrome, the HTML error page, and small formatting helpers.

use std::fmt::Write as _;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use askama::Template;
use chrono::{DateTime, Utc};

use super::POLL_MS;
use crate::http::ApiError;
use crate::http::session::Sessions;
use crate::http::views::BatchView;

/// What every page's frame needs: which menu entry is current, and whether to offer a log-out.
pub struct Chrome {
    /// `batches`, `new` or `opt-outs`.
    pub nav: &'static str,
    /// True when a session is needed (an admin token is set): the page offers to log out.
    pub logged_in: bool,
    /// The live fragments' polling interval.
    pub poll_ms: u64,
}

impl Chrome {
    /// The frame of a page under the menu entry `nav`.
    pub fn new(req: &HttpRequest, nav: &'static str) -> Self {
        Chrome {
            nav,
            logged_in: req
                .app_data::<web::Data<Sessions>>()
                .is_some_and(|s| s.required()),
            poll_ms: POLL_MS,
        }
    }
}

/// One coloured part of a progress bar, in thousandths of its width.
pub struct BarPart {
    /// `delivered`, `sent`, `failed`, `cancelled`, `queued` or `skipped` (its CSS class).
    pub kind: &'static str,
    /// Where it starts.
    pub x: i64,
    /// How wide it is.
    pub width: i64,
}

/// A lifecycle action button.
pub struct ActionButton {
    /// The path segment of the action (`pause`), or `resend` for resending the failed messages.
    pub action: &'static str,
    /// Its label.
    pub label: &'static str,
    /// True for an action that throws work away (cancel): styled as such and confirmed first.
    pub danger: bool,
}

/// A batch as the list and the batch page show it.
pub struct BatchCard {
    /// The batch's view, as `GET /v1/batches/{id}` answers it.
    pub view: BatchView,
    /// The bar's parts.
    pub bar: Vec<BarPart>,
    /// The bar in words, for screen readers.
    pub bar_label: String,
    /// Recipients processed by preparation so far.
    pub prepared: i64,
    /// `failed / (sent + delivered + failed)`, as a percentage with one decimal, or `–`.
    pub failure_rate: String,
    /// The actions the batch's state allows.
    pub actions: Vec<ActionButton>,
    /// When it was created, for people.
    pub created: String,
}

impl BatchCard {
    /// The card of a batch.
    pub fn new(view: BatchView) -> Self {
        let r = &view.results;
        let prepared = view.steps.preparation.progress.processed;
        let skipped = r.invalid + r.duplicates + r.opted_out;
        let queued = (r.valid - r.sent - r.delivered - r.failed - r.cancelled).max(0);
        let bar = bar(
            &[
                ("delivered", r.delivered),
                ("sent", r.sent),
                ("failed", r.failed),
                ("cancelled", r.cancelled),
                ("queued", queued),
                ("skipped", skipped),
            ],
            r.recipients.max(prepared),
        );
        let bar_label = format!(
            "{prepared} of {} recipients prepared; {} sent, {} delivered, {} failed",
            r.recipients, r.sent, r.delivered, r.failed
        );
        let outcomes = r.sent + r.delivered + r.failed;
        let failure_rate = if outcomes == 0 {
            "–".to_owned()
        } else {
            format!("{:.1}%", r.failed as f64 * 100.0 / outcomes as f64)
        };
        let actions = actions(&view.state, r.failed);
        let created = when(&view.created_at);
        BatchCard {
            view,
            bar,
            bar_label,
            prepared,
            failure_rate,
            actions,
            created,
        }
    }

    /// The failure threshold as a percentage.
    pub fn threshold(&self) -> String {
        format!("{:.0}%", self.view.failure_threshold * 100.0)
    }
}

/// The parts of a bar `total` wide, side by side in the given order, each at least its share
/// rounded down; never wider than the bar, whatever counters overshoot a total read earlier.
fn bar(counts: &[(&'static str, i64)], total: i64) -> Vec<BarPart> {
    let total = total.max(1);
    let mut x = 0;
    let mut parts = Vec::new();
    for &(kind, count) in counts {
        let width = (count.max(0) * 1000 / total).min(1000 - x);
        if width > 0 {
            parts.push(BarPart { kind, x, width });
            x += width;
        }
    }
    parts
}

/// The actions a batch in `state` allows (docs/api.md "Lifecycle actions"), and resending its
/// failed messages once it is final and has some.
fn actions(state: &str, failed: i64) -> Vec<ActionButton> {
    let button = |action, label, danger| ActionButton {
        action,
        label,
        danger,
    };
    let mut out = match state {
        "initial" => vec![button("start", "Start", false)],
        "scheduled" | "preparing" | "delivering" => vec![button("pause", "Pause", false)],
        "paused" => vec![button("resume", "Resume", false)],
        "failed" => vec![button("retry", "Retry", false)],
        _ => Vec::new(),
    };
    if matches!(state, "completed" | "failed" | "cancelled") && failed > 0 {
        out.push(button("resend", "Resend failed", false));
    }
    if !matches!(state, "completed" | "failed" | "cancelled") {
        out.push(button("cancel", "Cancel", true));
    }
    out
}

/// A time for people: `2026-12-05 13:02:11 UTC`.
pub fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An optional time for people, `–` when absent.
pub fn maybe_when(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map_or_else(|| "–".to_owned(), when)
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A page or fragment answered as HTML, never cached: its numbers are live.
pub fn html(page: &impl Template) -> Result<HttpResponse, UiError> {
    let body = page
        .render()
        .map_err(|e| UiError(ApiError::Internal(format!("rendering a page: {e}"))))?;
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body))
}

/// An error answered as a small HTML page (or fragment) with the API's status and message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UiError(pub ApiError);

impl<E: Into<ApiError>> From<E> for UiError {
    fn from(e: E) -> Self {
        UiError(e.into())
    }
}

#[derive(Template)]
#[template(path = "ui/error.html")]
struct ErrorPage<'a> {
    status: u16,
    message: &'a str,
}

impl ResponseError for UiError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let message = self.0.to_string();
        let page = ErrorPage {
            status: self.status_code().as_u16(),
            message: &message,
        };
        HttpResponse::build(self.status_code())
            .content_type("text/html; charset=utf-8")
            .body(page.render().unwrap_or(message))
    }
}

/// Any other path under `/ui/`.
pub async fn not_found() -> Result<HttpResponse, UiError> {
    Err(UiError(ApiError::NotFound(
        "no such page in the dashboard".into(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(state: &str, failed: i64) -> Vec<&'static str> {
        actions(state, failed).iter().map(|a| a.action).collect()
    }

    #[test]
    fn each_state_offers_its_actions() {
        assert_eq!(names("initial", 0), ["start", "cancel"]);
        assert_eq!(names("delivering", 0), ["pause", "cancel"]);
        assert_eq!(names("paused", 0), ["resume", "cancel"]);
        assert_eq!(names("failed", 3), ["retry", "resend"]);
        assert_eq!(names("completed", 0), Vec::<&str>::new());
        assert_eq!(names("completed", 1), ["resend"]);
        assert_eq!(names("cancelled", 2), ["resend"]);
    }

    #[test]
    fn a_bar_lays_its_parts_side_by_side_within_its_width() {
        let parts = bar(&[("sent", 250), ("failed", 0), ("queued", 500)], 1000);
        let laid: Vec<_> = parts.iter().map(|p| (p.kind, p.x, p.width)).collect();
        assert_eq!(laid, [("sent", 0, 250), ("queued", 250, 500)]);
        // Counters ahead of the total never push a part past the end.
        let over = bar(&[("sent", 900), ("queued", 300)], 1000);
        assert_eq!(over.iter().map(|p| p.width).sum::<i64>(), 1000);
        assert!(bar(&[("sent", 5)], 0).iter().all(|p| p.x + p.width <= 1000));
        assert!(bar(&[("sent", 0)], 0).is_empty());
    }

    #[test]
    fn encoding_keeps_only_unreserved_bytes() {
        assert_eq!(encode("+86 138"), "%2B86%20138");
        assert_eq!(encode("a-b_c.d~"), "a-b_c.d~");
    }
}
