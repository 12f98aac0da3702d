//! The messages export: `GET /v1/batches/{id}/messages` with `Accept: text/csv` answers every
//! message of the batch (of one status, if asked) as CSV, streamed a page at a time. The next
//! page is read only when the connection has taken the previous one (actix polls a body while
//! its write buffer has room), so the server's memory stays flat whatever the batch's size and
//! however slowly the client reads.

use actix_web::http::header::{self, Header as _, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use chrono::{NaiveDateTime, SecondsFormat};
use futures_util::{StreamExt, stream};
use std::future::ready;

use super::error::ApiError;
use crate::domain::batch::MessageStatus;
use crate::store::Store;
use crate::store::models::MessageRow;

/// The CSV's header line.
pub const HEADER: &str =
    "phone,status,segments,attempts,provider_message_id,error,updated_at,delivered_at\n";

/// Messages read per page (about 100 bytes of CSV each).
const PAGE: i64 = 1000;

/// The content type of the export.
pub const CSV: &str = "text/csv; charset=utf-8";

/// True when the request's `Accept` header prefers CSV to JSON: `text/csv` ranks before
/// `application/json` and the wildcards, by quality and then by order.
pub fn wants_csv(req: &HttpRequest) -> bool {
    let Ok(accept) = header::Accept::parse(req) else {
        return false;
    };
    accept
        .ranked()
        .into_iter()
        .find_map(
            |mime| match (mime.type_().as_str(), mime.subtype().as_str()) {
                ("text", "csv") => Some(true),
                ("application", "json") | ("application", "*") | ("*", "*") => Some(false),
                _ => None,
            },
        )
        .unwrap_or(false)
}

/// Where the export is: the next id to read after, the last id of the batch's span.
struct Cursor {
    store: Store,
    batch_id: i64,
    status: Option<MessageStatus>,
    after: i64,
    last: i64,
}

/// The export's answer: the header line, then the pages as they are read. The first page is
/// read before answering, so that a database that is down answers 503 rather than a cut body;
/// a later failure can only end the body early (the client sees the chunked body unfinished),
/// and is logged.
pub async fn export(
    store: Store,
    batch_id: i64,
    public_id: &str,
    status: Option<MessageStatus>,
) -> Result<HttpResponse, ApiError> {
    let (first, cursor) = match store.message_id_span(batch_id).await? {
        Some((low, last)) => {
            let mut cursor = Cursor {
                store,
                batch_id,
                status,
                after: low - 1,
                last,
            };
            let first = cursor.next_page().await?;
            (first, (cursor.after < cursor.last).then_some(cursor))
        }
        None => (None, None),
    };
    let mut head = String::from(HEADER);
    if let Some(page) = first {
        head.push_str(&page);
    }
    let rest = stream::unfold(cursor, |cursor| async move {
        let mut cursor = cursor?;
        match cursor.next_page().await {
            Ok(Some(page)) => Some((Ok(Bytes::from(page)), Some(cursor))),
            Ok(None) => None,
            Err(e) => {
                tracing::error!(batch_id = cursor.batch_id, error = %e, "Messages export cut short.");
                Some((Err(ApiError::from(e)), None))
            }
        }
    });
    let body = stream::once(ready(Ok(Bytes::from(head)))).chain(rest);
    let disposition = format!("attachment; filename=\"{public_id}-messages.csv\"");
    let mut answer = HttpResponse::Ok();
    answer.content_type(CSV);
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        answer.insert_header((header::CONTENT_DISPOSITION, value));
    }
    Ok(answer.streaming(body))
}

impl Cursor {
    /// The next page as CSV lines, `None` past the batch's last message.
    async fn next_page(&mut self) -> Result<Option<String>, crate::store::StoreError> {
        if self.after >= self.last {
            return Ok(None);
        }
        let rows = self
            .store
            .export_page(self.batch_id, self.status, self.after, self.last, PAGE)
            .await?;
        // A short page is the span's last.
        self.after = match rows.last() {
            Some(row) if rows.len() == PAGE as usize => row.id,
            _ => self.last,
        };
        if rows.is_empty() {
            return Ok(None);
        }
        let mut page = String::with_capacity(rows.len() * 100);
        for row in &rows {
            write_row(&mut page, row);
        }
        Ok(Some(page))
    }
}

/// Appends one message as a CSV line.
pub fn write_row(out: &mut String, m: &MessageRow) {
    field(out, &m.phone);
    out.push(',');
    field(out, m.status.as_str());
    out.push(',');
    out.push_str(&m.segments.to_string());
    out.push(',');
    out.push_str(&m.attempts.to_string());
    out.push(',');
    field(out, m.provider_message_id.as_deref().unwrap_or(""));
    out.push(',');
    field(out, m.error.as_deref().unwrap_or(""));
    out.push(',');
    out.push_str(&time(m.updated_at));
    out.push(',');
    if let Some(t) = m.delivered_at {
        out.push_str(&time(t));
    }
    out.push('\n');
}

/// RFC 3339 in UTC, as the JSON answers write times.
fn time(t: NaiveDateTime) -> String {
    t.and_utc().to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Appends a field, quoted (RFC 4180) when it holds a comma, a quote, a line break or
/// surrounding spaces, with its quotes doubled.
pub fn field(out: &mut String, value: &str) {
    let quote =
        value.contains([',', '"', '\n', '\r']) || value.starts_with(' ') || value.ends_with(' ');
    if !quote {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn csv(value: &str) -> String {
        let mut out = String::new();
        field(&mut out, value);
        out
    }

    #[test]
    fn fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv("+8613800001234"), "+8613800001234");
        assert_eq!(csv(""), "");
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("say \"no\""), "\"say \"\"no\"\"\"");
        assert_eq!(csv("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv("cr\r"), "\"cr\r\"");
        assert_eq!(csv(" padded"), "\" padded\"");
    }

    #[test]
    fn a_row_has_every_column() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T10:15:00.250Z")
            .map(|t| t.naive_utc())
            .expect("time");
        let row = MessageRow {
            id: 7,
            phone: "+8613800000001".into(),
            status: MessageStatus::Failed,
            segments: 2,
            attempts: 3,
            provider_message_id: None,
            error: Some("ESME_RINVDSTADR, \"bad\"".into()),
            updated_at: at,
            delivered_at: None,
        };
        let mut out = String::new();
        write_row(&mut out, &row);
        assert_eq!(
            out,
            "+8613800000001,failed,2,3,,\"ESME_RINVDSTADR, \"\"bad\"\"\",2026-12-07T10:15:00.250Z,\n"
        );
    }

    #[test]
    fn csv_is_chosen_only_when_preferred() {
        let wants = |accept: Option<&str>| {
            let mut req = TestRequest::default();
            if let Some(a) = accept {
                req = req.insert_header(("Accept", a));
            }
            wants_csv(&req.to_http_request())
        };
        assert!(wants(Some("text/csv")));
        assert!(wants(Some("text/csv, application/json;q=0.5")));
        assert!(wants(Some("application/json;q=0.1, text/csv")));
        assert!(!wants(None));
        assert!(!wants(Some("application/json")));
        assert!(!wants(Some("*/*")));
        assert!(!wants(Some("application/json, text/csv")));
        assert!(!wants(Some("text/html")));
    }
}
