//! The batch pages: the list (filterable by state, its rows a live fragment), one batch (its
//! live part, details and messages), the new batch form, and the form's encoding preview.

use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::UiConfig;
use super::views::{BatchCard, Chrome, UiError, encode, html, maybe_when, when};
use crate::domain::batch::MessageStatus;
use crate::domain::sms::SmsParts;
use crate::domain::state::BatchState;
use crate::http::batches::static_parts;
use crate::http::views::{BatchView, MessageView};
use crate::http::{ApiError, AppState};

/// Batches on one page of the list.
const BATCH_PAGE: i64 = 25;
/// Messages on one page of a batch's table.
const MESSAGE_PAGE: i64 = 50;

/// `?state=&after=` of the list.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    state: Option<String>,
    after: Option<String>,
}

impl ListQuery {
    /// The state filter, checked; empty for all.
    fn state(&self) -> Result<Option<BatchState>, UiError> {
        match self.state.as_deref().filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| UiError(ApiError::BadRequest(format!("unknown state `{s}`")))),
        }
    }

    /// The cursor, checked: a batch id.
    fn after(&self) -> Result<Option<String>, UiError> {
        self.after
            .as_deref()
            .filter(|a| !a.is_empty())
            .map(|a| {
                uuid::Uuid::parse_str(a)
                    .map(|u| u.to_string())
                    .map_err(|_| UiError(ApiError::BadRequest(format!("bad cursor `{a}`"))))
            })
            .transpose()
    }
}

/// The list's rows: a fragment of the list page, polled.
#[derive(Template)]
#[template(path = "ui/batch_rows.html")]
pub struct BatchRows {
    cards: Vec<BatchCard>,
    state: String,
    next_url: Option<String>,
}

#[derive(Template)]
#[template(path = "ui/batches.html")]
struct BatchesPage {
    chrome: Chrome,
    states: Vec<&'static str>,
    state: String,
    live_url: String,
    rows: BatchRows,
}

async fn load_rows(state: &AppState, query: &ListQuery) -> Result<BatchRows, UiError> {
    let filter = query.state()?;
    let after = query.after()?;
    let records = state
        .store
        .list_batches(filter.map(BatchState::as_str), after.as_deref(), BATCH_PAGE)
        .await?;
    let state_name = filter.map_or("", BatchState::as_str);
    let next_url = (records.len() as i64 == BATCH_PAGE)
        .then(|| records.last())
        .flatten()
        .map(|r| {
            format!(
                "/ui/?state={state_name}&after={}",
                encode(&r.batch.public_id)
            )
        });
    Ok(BatchRows {
        cards: records
            .iter()
            .map(|r| BatchCard::new(BatchView::new(r)))
            .collect(),
        state: state_name.to_owned(),
        next_url,
    })
}

/// `GET /ui/`: the batches, newest first, each with its live bar and actions.
pub(super) async fn batches(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, UiError> {
    let rows = load_rows(&state, &query).await?;
    let after = query.after()?.unwrap_or_default();
    html(&BatchesPage {
        chrome: Chrome::new(&req, "batches"),
        states: BatchState::ALL.iter().map(|s| s.as_str()).collect(),
        live_url: format!(
            "/ui/batches/rows?state={}&after={}",
            rows.state,
            encode(&after)
        ),
        state: rows.state.clone(),
        rows,
    })
}

/// `GET /ui/batches/rows`: the list's rows alone.
pub(super) async fn batch_rows(
    state: web::Data<AppState>,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, UiError> {
    html(&load_rows(&state, &query).await?)
}

/// The live part of a batch's page: state, actions, bar, steps, results, partitions,
/// conditions.
#[derive(Template)]
#[template(path = "ui/batch_live.html")]
pub struct BatchLive {
    c: BatchCard,
}

impl BatchLive {
    fn step_rows(&self) -> [(&'static str, &crate::http::views::StepView); 2] {
        let steps = &self.c.view.steps;
        [
            ("Preparation", &steps.preparation),
            ("Delivery", &steps.delivery),
        ]
    }
}

/// A page of a batch's messages.
#[derive(Template)]
#[template(path = "ui/messages.html")]
pub struct MessagesTable {
    items: Vec<MessageView>,
    next_url: Option<String>,
    first_url: Option<String>,
}

#[derive(Template)]
#[template(path = "ui/batch.html")]
struct BatchPage {
    chrome: Chrome,
    id: String,
    name: String,
    parent: Option<String>,
    initial: bool,
    details: Vec<(&'static str, String)>,
    live: BatchLive,
    statuses: Vec<&'static str>,
    status: String,
    export_url: String,
    messages: MessagesTable,
}

/// `?status=&after=` of a batch's messages.
#[derive(Debug, Deserialize)]
pub struct MessagesQuery {
    status: Option<String>,
    after: Option<String>,
}

impl MessagesQuery {
    /// The status filter, checked; empty for all.
    fn status(&self) -> Result<Option<MessageStatus>, UiError> {
        match self.status.as_deref().filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => s.parse().map(Some).map_err(|_| {
                UiError(ApiError::BadRequest(format!(
                    "unknown message status `{s}`"
                )))
            }),
        }
    }
}

async fn find(state: &AppState, raw: &str) -> Result<crate::store::BatchRecord, UiError> {
    let missing = || UiError(ApiError::NotFound(format!("no batch {raw}")));
    let id = uuid::Uuid::parse_str(raw).map_err(|_| missing())?;
    state
        .store
        .find_batch(&id.to_string())
        .await?
        .ok_or_else(missing)
}

/// `GET /ui/batches/{id}`: one batch, live, with a page of its messages.
pub(super) async fn batch(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, UiError> {
    let record = find(&state, &path).await?;
    let status = query.status()?;
    let after = match query.after.as_deref().filter(|s| !s.is_empty()) {
        None => 0,
        Some(c) => c
            .parse::<i64>()
            .map_err(|_| UiError(ApiError::BadRequest(format!("bad cursor `{c}`"))))?,
    };
    let rows = state
        .store
        .list_messages(record.batch.id, status, after, MESSAGE_PAGE)
        .await?;
    let view = BatchView::new(&record);
    let id = view.id.clone();
    let status_name = status.map_or("", MessageStatus::as_str);
    let page_url = |after: Option<String>| {
        let mut url = format!("/ui/batches/{id}?status={status_name}");
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        url + "#messages"
    };
    let next_url = (rows.len() as i64 == MESSAGE_PAGE)
        .then(|| rows.last().map(|m| page_url(Some(m.id.to_string()))))
        .flatten();
    let first_url = (after > 0).then(|| page_url(None));
    let export_url = format!("/ui/batches/{id}/messages.csv?status={status_name}");
    let details = vec![
        ("Id", view.id.clone()),
        ("Content", view.content.clone()),
        (
            "Link ({{url}})",
            view.url.clone().unwrap_or_else(|| "–".into()),
        ),
        ("Provider", view.provider.clone()),
        ("Type", view.message_type.clone()),
        ("Scheduled for", maybe_when(&view.schedule_at)),
        ("Partitions", view.partition_count.to_string()),
        (
            "Campaign",
            view.campaign_id.clone().unwrap_or_else(|| "–".into()),
        ),
        ("Created", when(&view.created_at)),
        ("Started", maybe_when(&view.started_at)),
        ("Finished", maybe_when(&view.finished_at)),
    ];
    html(&BatchPage {
        chrome: Chrome::new(&req, "batches"),
        parent: view.parent_id.clone(),
        name: view.name.clone(),
        initial: view.state == "initial",
        details,
        id,
        live: BatchLive {
            c: BatchCard::new(view),
        },
        statuses: MessageStatus::ALL.iter().map(|s| s.as_str()).collect(),
        status: status_name.to_owned(),
        export_url,
        messages: MessagesTable {
            items: rows.into_iter().map(MessageView::from).collect(),
            next_url,
            first_url,
        },
    })
}

/// `GET /ui/batches/{id}/messages.csv`: the batch's messages (of `?status=`) as the API's CSV
/// export streams them, from the same function, so that a plain link in the page saves it.
pub(super) async fn export(
    state: web::Data<AppState>,
    path: web::Path<String>,
    query: web::Query<MessagesQuery>,
) -> Result<HttpResponse, UiError> {
    let status = query.status()?;
    let batch = find(&state, &path).await?.batch;
    Ok(
        crate::http::export::export(state.store.clone(), batch.id, &batch.public_id, status)
            .await?,
    )
}

/// `GET /ui/batches/{id}/live`: the batch page's live part alone.
pub(super) async fn batch_live(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, UiError> {
    let record = find(&state, &path).await?;
    html(&BatchLive {
        c: BatchCard::new(BatchView::new(&record)),
    })
}

/// What the encoding preview shows.
#[derive(Template)]
#[template(path = "ui/preview.html")]
pub struct Preview {
    parts: Option<SmsParts>,
    error: Option<String>,
    max_segments: u32,
}

impl Preview {
    fn encoding(&self) -> &'static str {
        match self.parts.map(|p| p.encoding) {
            Some(crate::domain::sms::Encoding::Ucs2) => "UCS-2",
            _ => "GSM-7",
        }
    }
}

#[derive(Template)]
#[template(path = "ui/new.html")]
struct NewBatchPage {
    chrome: Chrome,
    providers: Vec<String>,
    default_provider: String,
    preview: Preview,
}

/// `GET /ui/batches/new`: the new batch form.
pub(super) async fn new_batch(
    req: HttpRequest,
    state: web::Data<AppState>,
    config: web::Data<UiConfig>,
) -> Result<HttpResponse, UiError> {
    html(&NewBatchPage {
        chrome: Chrome::new(&req, "new"),
        providers: config.providers.clone(),
        default_provider: config.default_provider.clone(),
        preview: preview_of(&state, "", None),
    })
}

/// The preview's form: the content as typed, and the batch's link.
#[derive(Debug, Deserialize)]
pub struct PreviewForm {
    content: String,
    url: Option<String>,
}

/// `POST /ui/preview`: the content's encoding and SMS count as creation counts them (the
/// template's static text, `{{url}}` as the link), from the same function the API checks with.
pub(super) async fn preview(
    state: web::Data<AppState>,
    form: web::Form<PreviewForm>,
) -> Result<HttpResponse, UiError> {
    let url = form.url.as_deref().filter(|u| !u.is_empty());
    html(&preview_of(&state, &form.content, url))
}

fn preview_of(state: &AppState, content: &str, url: Option<&str>) -> Preview {
    let (parts, error) = match static_parts(content, url) {
        _ if content.is_empty() => (None, None),
        Ok(parts) => (Some(parts), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Preview {
        parts,
        error,
        max_segments: state.settings.http.max_segments,
    }
}
