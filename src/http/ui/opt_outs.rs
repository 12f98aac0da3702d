//! The opt-outs page: search the list by number (whole, or the start of its international
//! form), page through it, and export it as CSV. Adding, removing and importing go through
//! `/v1/opt-outs` from the page's script.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use bytes::Bytes;
use serde::Deserialize;

use super::views::{Chrome, UiError, encode, html, when};
use crate::domain::phone::E164Phone;
use crate::http::{ApiError, AppState};
use crate::store::{OptOut, Store};

/// Numbers on one page of the list.
const PAGE: i64 = 50;
/// Numbers read from the store at once while exporting.
const EXPORT_PAGE: i64 = 1000;

/// `?q=&after=` of the page.
#[derive(Debug, Deserialize)]
pub struct OptOutsQuery {
    q: Option<String>,
    after: Option<String>,
}

/// One number's row.
pub struct Row {
    phone: String,
    source: String,
    since: String,
}

/// The list (or what the search found): a fragment of the page.
#[derive(Template)]
#[template(path = "ui/opt_out_rows.html")]
pub struct Rows {
    rows: Vec<Row>,
    searched: String,
    next_url: Option<String>,
}

#[derive(Template)]
#[template(path = "ui/opt_outs.html")]
struct OptOutsPage {
    chrome: Chrome,
    q: String,
    src: String,
    rows: Rows,
}

fn row(o: OptOut) -> Row {
    Row {
        since: when(&o.created_at.and_utc()),
        phone: o.phone,
        source: o.source,
    }
}

/// The E.164 prefix a search names: digits with an optional leading `+` (spaces, dashes and
/// brackets ignored); `None` when it has anything else.
fn prefix_of(q: &str) -> Option<String> {
    let kept: String = q
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
        .collect();
    let digits = kept.strip_prefix('+').unwrap_or(&kept);
    (!digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("+{digits}"))
}

async fn load(state: &AppState, query: &OptOutsQuery) -> Result<Rows, UiError> {
    let q = query.q.as_deref().map(str::trim).unwrap_or("");
    let after = query.after.as_deref().filter(|a| !a.is_empty());
    if after.is_some_and(|a| prefix_of(a).as_deref() != Some(a)) {
        return Err(UiError(ApiError::BadRequest(
            "bad cursor: not an E.164 number".into(),
        )));
    }
    let region = state
        .settings
        .region()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let next_of = |rows: &[OptOut], full: bool| {
        full.then(|| rows.last())
            .flatten()
            .map(|o| format!("/ui/opt-outs?q={}&after={}", encode(q), encode(&o.phone)))
    };
    if q.is_empty() {
        let found = state.store.list_opt_outs(after, PAGE).await?;
        let next_url = next_of(&found, found.len() as i64 == PAGE);
        return Ok(Rows {
            rows: found.into_iter().map(row).collect(),
            searched: String::new(),
            next_url,
        });
    }
    // A whole number in any form (national too) is looked up as itself.
    if after.is_none()
        && let Ok(phone) = E164Phone::parse(q, region)
    {
        let found = state.store.find_opt_out(phone.as_str()).await?;
        return Ok(Rows {
            rows: found.into_iter().map(row).collect(),
            searched: q.to_owned(),
            next_url: None,
        });
    }
    // Else the start of the international form: the list is in number order, so the matches
    // are the rows after the prefix itself, up to the first that does not start with it.
    let Some(prefix) = prefix_of(q) else {
        return Ok(Rows {
            rows: Vec::new(),
            searched: q.to_owned(),
            next_url: None,
        });
    };
    let from = after.unwrap_or(&prefix);
    let found = state.store.list_opt_outs(Some(from), PAGE).await?;
    let full = found.len() as i64 == PAGE;
    let matching: Vec<OptOut> = found
        .into_iter()
        .take_while(|o| o.phone.starts_with(&prefix))
        .collect();
    let next_url = next_of(&matching, full && matching.len() as i64 == PAGE);
    Ok(Rows {
        rows: matching.into_iter().map(row).collect(),
        searched: q.to_owned(),
        next_url,
    })
}

/// `GET /ui/opt-outs`.
pub(super) async fn page(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<OptOutsQuery>,
) -> Result<HttpResponse, UiError> {
    let rows = load(&state, &query).await?;
    let q = query.q.clone().unwrap_or_default();
    let src = format!(
        "/ui/opt-outs/rows?q={}&after={}",
        encode(&q),
        encode(query.after.as_deref().unwrap_or(""))
    );
    html(&OptOutsPage {
        chrome: Chrome::new(&req, "opt-outs"),
        q,
        src,
        rows,
    })
}

/// `GET /ui/opt-outs/rows`: the list alone, for the script to refresh after a change.
pub(super) async fn rows(
    state: web::Data<AppState>,
    query: web::Query<OptOutsQuery>,
) -> Result<HttpResponse, UiError> {
    html(&load(&state, &query).await?)
}

/// Where an export has got to.
enum Cursor {
    Start,
    After(String),
    Done,
}

/// One piece of the export: the rows of `page` as CSV lines (with the header first when
/// `header`), and where to go on from.
fn csv_piece(page: &[OptOut], header: bool) -> (Bytes, Cursor) {
    let mut out = String::with_capacity(page.len() * 48 + 32);
    if header {
        out.push_str("phone,source,created_at\n");
    }
    for o in page {
        // Numbers are `+` and digits, sources plain words, times RFC 3339: nothing to quote.
        out.push_str(&format!(
            "{},{},{}\n",
            o.phone,
            o.source,
            o.created_at
                .and_utc()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        ));
    }
    let next = match page.last() {
        Some(last) if page.len() as i64 == EXPORT_PAGE => Cursor::After(last.phone.clone()),
        _ => Cursor::Done,
    };
    (Bytes::from(out), next)
}

/// `GET /ui/opt-outs.csv`: the whole list, streamed a store page at a time, so memory does not
/// grow with the list.
pub(super) async fn export(state: web::Data<AppState>) -> HttpResponse {
    let store: Store = state.store.clone();
    let body = futures_util::stream::unfold(Cursor::Start, move |cursor| {
        let store = store.clone();
        async move {
            let (after, header) = match cursor {
                Cursor::Done => return None,
                Cursor::Start => (None, true),
                Cursor::After(phone) => (Some(phone), false),
            };
            match store.list_opt_outs(after.as_deref(), EXPORT_PAGE).await {
                Ok(page) => {
                    let (bytes, next) = csv_piece(&page, header);
                    Some((Ok::<_, actix_web::Error>(bytes), next))
                }
                Err(e) => {
                    // The answer has begun: the only way left to say so is to cut it short.
                    tracing::error!(error = %e, "Opt-out export cut short.");
                    Some((Err(ApiError::from(e).into()), Cursor::Done))
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/csv; charset=utf-8")
        .insert_header((
            header::CONTENT_DISPOSITION,
            "attachment; filename=\"opt-outs.csv\"",
        ))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .streaming(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_prefix_is_digits_with_a_plus() {
        assert_eq!(prefix_of("+86 138").as_deref(), Some("+86138"));
        assert_eq!(prefix_of("86138").as_deref(), Some("+86138"));
        assert_eq!(prefix_of("(86) 138-00").as_deref(), Some("+8613800"));
        assert_eq!(prefix_of("abc"), None);
        assert_eq!(prefix_of("+"), None);
    }
}
