//! PostgreSQL's `COPY … FROM STDIN (FORMAT binary)`, for an upload's recipients and for
//! preparation's messages. diesel-async has no COPY (STACK.md, trap 10), so both run on
//! tokio-postgres connections of their own: an upload on one opened for its length and closed
//! after it; preparation's chunks on a small pool of their own (`CopyPool`). `COPY` takes a row
//! for a fraction of what the same row costs as an `INSERT … SELECT unnest(…)`, and both are
//! bound by PostgreSQL's work per row.

use std::collections::HashSet;
use std::pin::pin;
use std::time::Duration;

use deadpool::managed::{Manager, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use futures_util::future::{Either, select};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use super::StoreError;
use super::bulk::RECORD_CHUNK_PG;
use super::records::{
    ChunkWritten, ImportError, PreparedChunk, UploadChunk, in_number_order, now, tally_inserted,
};
use crate::domain::state::BatchState;

const COPY_RECIPIENTS: &str = "COPY recipients (batch_id, phone, vars) FROM STDIN (FORMAT binary)";

/// Adds the upload to the batch's count, if the batch is still `initial`; answers the new total.
const COUNT_UPLOAD: &str = "\
    UPDATE batches SET recipients = recipients + $1, version = version + 1, \
        updated_at = $2::text::timestamp \
    WHERE id = $3 AND state = $4 RETURNING recipients";

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
        .query_opt(
            COUNT_UPLOAD,
            &[&accepted, &at, &batch_id, &BatchState::Initial.as_str()],
        )
        .await
        .map_err(store)?
        .ok_or(ImportError::NotInitial)?
        .try_get(0)
        .map_err(store)?;
    client.batch_execute("COMMIT").await.map_err(store)?;
    Ok((accepted, total))
}

/// Connections that write prepared chunks by `COPY`: a chunk's writers side by side, for a batch
/// or two preparing at once. A writer finding every connection taken waits for one, as for the
/// main pool.
const COPY_POOL_SIZE: usize = 4;

/// The numbers of a chunk that opted out (`true`, of all its numbers, `$2`) or that the batch
/// already has (`false`, of those that may repeat one, `$3`): the rows `ON CONFLICT` would have
/// dropped, found before the `COPY`, which has no such clause.
const LOOKUP_NUMBERS: &str = "\
    SELECT phone, true FROM opt_outs WHERE phone = ANY($2) \
    UNION ALL \
    SELECT phone, false FROM messages WHERE batch_id = $1 AND phone = ANY($3)";

const COPY_MESSAGES: &str = "\
    COPY messages (batch_id, partition, recipient_id, phone, body, encoding, segments, \
        updated_at) FROM STDIN (FORMAT binary)";

/// The pool of `COPY` connections for preparation's chunks.
pub(super) type CopyPool = Pool<CopyManager>;

/// Opens the `COPY` pool on `url`; no connection is made before the first chunk.
pub(super) fn copy_pool(url: &str, timeout: Duration) -> Result<CopyPool, StoreError> {
    Pool::builder(CopyManager { url: url.into() })
        .max_size(COPY_POOL_SIZE)
        .timeouts(deadpool::managed::Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        })
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))
}

/// A `COPY` connection with its two statements prepared.
pub(super) struct CopyConn {
    client: tokio_postgres::Client,
    lookup: tokio_postgres::Statement,
    record: tokio_postgres::Statement,
    /// Set from `BEGIN` to its end: a connection given back inside a transaction (its writer
    /// dropped half-way) is closed, not handed to the next writer.
    in_transaction: bool,
}

/// Makes and checks the `COPY` connections.
pub(super) struct CopyManager {
    url: String,
}

impl Manager for CopyManager {
    type Type = CopyConn;
    type Error = tokio_postgres::Error;

    async fn create(&self) -> Result<CopyConn, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await?;
        // Driven beside its client, as diesel-async drives the main pool's connections: the
        // task ends when the client is dropped (the pool closing the connection) or the server
        // closes it, and the client's next query then fails as unavailable.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "COPY connection closed");
            }
        });
        let lookup = client
            .prepare_typed(
                LOOKUP_NUMBERS,
                &[Type::INT8, Type::TEXT_ARRAY, Type::TEXT_ARRAY],
            )
            .await?;
        let int8 = Type::INT8;
        let record = client
            .prepare_typed(
                RECORD_CHUNK_PG,
                &[
                    int8.clone(),
                    Type::INT4_ARRAY,
                    Type::INT8_ARRAY,
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    int8.clone(),
                    Type::TIMESTAMP,
                    int8,
                ],
            )
            .await?;
        Ok(CopyConn {
            client,
            lookup,
            record,
            in_transaction: false,
        })
    }

    async fn recycle(
        &self,
        conn: &mut CopyConn,
        _: &Metrics,
    ) -> RecycleResult<tokio_postgres::Error> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("the connection is closed"));
        }
        if conn.in_transaction {
            return Err(RecycleError::message("given back inside a transaction"));
        }
        Ok(())
    }
}

impl From<PoolError<tokio_postgres::Error>> for StoreError {
    fn from(e: PoolError<tokio_postgres::Error>) -> Self {
        StoreError::Pool(e.to_string())
    }
}

/// `Store::write_prepared_chunk_beside` on PostgreSQL, by `COPY`: in one transaction, the
/// chunk's numbers looked up (opted out, or already in the batch), the rest copied in, and the
/// chunk recorded (`RECORD_CHUNK_PG`). `StoreError::Superseded`, with nothing written, when a newer run than `run` has
/// started. `Ok(None)` when the `COPY` met a number already stored:
/// one that another writer committed after the lookup, or one that `chunk.repeats` wrongly left
/// out. Nothing is written then, and the caller writes the chunk again with `ON CONFLICT`,
/// which waits for such rows and drops them.
pub(super) async fn write_chunk(
    pool: &CopyPool,
    batch_id: i64,
    chunk: &mut PreparedChunk,
    run: i64,
    ahead: Option<(i64, i64)>,
    done_up_to: i64,
) -> Result<Option<ChunkWritten>, StoreError> {
    let mut conn = Taken(Some(pool.get().await?));
    in_number_order(&mut chunk.messages);
    let mut phones: Vec<&str> = chunk.messages.iter().map(|m| m.phone.as_str()).collect();
    phones.dedup();
    let repeats: Option<Vec<&str>> = chunk.repeats.as_ref().map(|repeats| {
        phones
            .iter()
            .copied()
            .filter(|p| repeats.contains(*p))
            .collect()
    });

    conn.in_transaction = true;
    // A chunk and its checkpoint commit together: the commit need not wait for the disk (see
    // `chunk_pg::WRITE_CHUNK_PG`).
    conn.client
        .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
        .await?;
    let found = conn
        .client
        .query(
            &conn.lookup,
            &[&batch_id, &phones, repeats.as_ref().unwrap_or(&phones)],
        )
        .await;
    let found = match found {
        Ok(rows) => rows,
        Err(e) => return Err(rollback(conn, e).await),
    };
    let (mut opted, mut taken) = (HashSet::new(), HashSet::new());
    for row in &found {
        let phone: &str = row.try_get(0)?;
        if row.try_get(1)? {
            opted.insert(phone);
        } else {
            taken.insert(phone);
        }
    }
    let mut rows = Vec::with_capacity(chunk.messages.len());
    let mut opted_out = 0i64;
    let mut previous: Option<&str> = None;
    for m in &chunk.messages {
        if opted.contains(m.phone.as_str()) {
            opted_out += 1;
        } else if previous != Some(m.phone.as_str()) && !taken.contains(m.phone.as_str()) {
            rows.push(m);
        }
        previous = Some(m.phone.as_str());
    }
    let kept = chunk.messages.len() as i64 - opted_out;
    let copied = copy_messages(&conn.client, &rows).await;
    match copied {
        Ok(()) => {}
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            tracing::debug!(
                batch_id,
                "a chunk's number was committed by another writer meanwhile"
            );
            conn.end("ROLLBACK").await?;
            return Ok(None);
        }
        Err(e) => return Err(rollback(conn, e).await),
    }

    let (per_partition, segments) = tally_inserted(rows.iter().map(|m| (m.partition, m.segments)));
    let inserted = rows.len() as i64;
    let duplicates = kept - inserted;
    let (idx, counts): (Vec<i32>, Vec<i64>) = per_partition.into_iter().unzip();
    let (first, last) = ahead.unzip();
    let last = last.unwrap_or(done_up_to);
    let recorded = conn
        .client
        .query_one(
            &conn.record,
            &[
                &batch_id,
                &idx,
                &counts,
                &chunk.processed,
                &inserted,
                &chunk.invalid,
                &duplicates,
                &opted_out,
                &segments,
                &first,
                &last,
                &done_up_to,
                &now(),
                &run,
            ],
        )
        .await
        .and_then(|row| row.try_get::<_, i64>(0));
    match recorded {
        Ok(1) => {}
        Ok(_) => {
            conn.end("ROLLBACK").await?;
            return Err(StoreError::Superseded(batch_id));
        }
        Err(e) => return Err(rollback(conn, e).await),
    }
    conn.end("COMMIT").await?;
    Ok(Some(ChunkWritten {
        inserted,
        duplicates,
        opted_out,
    }))
}

/// Copies the rows in, in binary form.
async fn copy_messages(
    client: &tokio_postgres::Client,
    rows: &[&super::models::NewMessage],
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let sink = client.copy_in(COPY_MESSAGES).await?;
    let mut writer = pin!(BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT8,
            Type::INT4,
            Type::INT8,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::TIMESTAMP,
        ]
    ));
    for m in rows {
        writer
            .as_mut()
            .write(&[
                &m.batch_id,
                &m.partition,
                &m.recipient_id,
                &m.phone,
                &m.body,
                &m.encoding,
                &m.segments,
                &m.updated_at,
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(())
}

/// Ends a failed chunk's transaction and answers its error; a connection that cannot even roll
/// back stays marked inside its transaction, and `Taken` closes it.
async fn rollback(mut conn: Taken, e: tokio_postgres::Error) -> StoreError {
    let _ = conn.end("ROLLBACK").await;
    e.into()
}

/// A `COPY` connection taken for one chunk. Let go of inside its transaction (an error that
/// could not be rolled back, or its writer dropped half-way, as when a pause stops preparation),
/// it is closed there and then rather than given back: the server rolls the transaction back and
/// releases its locks at once, not when the pool next hands the connection out, which would be
/// after the pause they could hold up.
struct Taken(Option<Object<CopyManager>>);

impl Taken {
    /// Ends the chunk's transaction with `COMMIT` or `ROLLBACK`; until that succeeds the
    /// connection stays marked inside it.
    async fn end(&mut self, how: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(how).await?;
        self.in_transaction = false;
        Ok(())
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take().filter(|c| c.in_transaction) {
            drop(Object::take(conn));
        }
    }
}

impl std::ops::Deref for Taken {
    type Target = CopyConn;

    fn deref(&self) -> &CopyConn {
        self.0.as_ref().expect("taken until dropped")
    }
}

impl std::ops::DerefMut for Taken {
    fn deref_mut(&mut self) -> &mut CopyConn {
        self.0.as_mut().expect("taken until dropped")
    }
}
