//! PostgreSQL's `COPY … FROM STDIN (FORMAT binary)` for an upload's recipients. diesel-async has
//! no COPY (STACK.md, trap 10), so the upload runs on a connection of its own, opened with
//! tokio-postgres for the length of the upload and closed after it: one connection beyond the
//! pool per upload in progress. `COPY` takes a row for a fraction of what the same row costs as
//! an `INSERT … SELECT unnest(…)`, and the upload is bound by PostgreSQL's work per row.

use std::pin::pin;

use futures_util::future::{Either, select};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::StoreError;
use super::queries::{ImportError, UploadChunk, now};

const COPY_RECIPIENTS: &str = "COPY recipients (batch_id, phone, vars) FROM STDIN (FORMAT binary)";

/// Adds the upload to the batch's count, if the batch is still `initial`; answers the new total.
const COUNT_UPLOAD: &str = "\
    UPDATE batches SET recipients = recipients + $1, version = version + 1, \
        updated_at = $2::text::timestamp \
    WHERE id = $3 AND state = 'initial' RETURNING recipients";

/// The error diesel-async makes of the same tokio-postgres error (no SQLSTATE: the command never
/// reached the server; else the server's message), so that `StoreError::is_unavailable` tells an
/// outage apart the same way on this connection as on the pool's.
impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        let (kind, message) = match e.as_db_error() {
            Some(db) => (DatabaseErrorKind::Unknown, db.message().to_string()),
            None => (DatabaseErrorKind::UnableToSendCommand, e.to_string()),
        };
        StoreError::Query(Error::DatabaseError(kind, Box::new(message)))
    }
}

/// `Store::import_recipients` on PostgreSQL: one transaction, the rows streamed in by `COPY`.
/// A bad chunk, a feed closed early, an error or a batch no longer `initial` ends it without a
/// commit, and closing the connection rolls it back: nothing of the upload is stored.
pub(super) async fn import_recipients<E: Send>(
    url: &str,
    batch_id: i64,
    rx: tokio::sync::mpsc::Receiver<UploadChunk<E>>,
) -> Result<(i64, i64), ImportError<E>> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(StoreError::from)?;
    // The connection is driven here, beside the work, not spawned: when the work ends, either
    // way, the connection is dropped and closed with it.
    let work = pin!(copy_in(&client, batch_id, rx));
    match select(work, pin!(connection)).await {
        Either::Left((result, _)) => result,
        Either::Right((closed, _)) => Err(ImportError::Store(match closed {
            Err(e) => e.into(),
            Ok(()) => StoreError::Pool("the connection closed during the upload".into()),
        })),
    }
}

async fn copy_in<E: Send>(
    client: &tokio_postgres::Client,
    batch_id: i64,
    mut rx: tokio::sync::mpsc::Receiver<UploadChunk<E>>,
) -> Result<(i64, i64), ImportError<E>> {
    let store = |e: tokio_postgres::Error| ImportError::Store(e.into());
    client.batch_execute("BEGIN").await.map_err(store)?;
    let sink = client.copy_in(COPY_RECIPIENTS).await.map_err(store)?;
    let mut writer = pin!(BinaryCopyInWriter::new(
        sink,
        &[Type::INT8, Type::TEXT, Type::TEXT]
    ));
    let mut accepted = 0i64;
    loop {
        match rx.recv().await {
            Some(Ok(Some(chunk))) => {
                accepted += chunk.len() as i64;
                for (phone, vars) in &chunk {
                    writer
                        .as_mut()
                        .write(&[&batch_id, phone, vars])
                        .await
                        .map_err(store)?;
                }
            }
            Some(Ok(None)) => break,
            Some(Err(e)) => return Err(ImportError::Input(e)),
            None => return Err(ImportError::Incomplete),
        }
    }
    writer.finish().await.map_err(store)?;
    let at = now().format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    let total: i64 = client
        .query_opt(COUNT_UPLOAD, &[&accepted, &at, &batch_id])
        .await
        .map_err(store)?
        .ok_or(ImportError::NotInitial)?
        .try_get(0)
        .map_err(store)?;
    client.batch_execute("COMMIT").await.map_err(store)?;
    Ok((accepted, total))
}
