//! Recipients: an upload's rows, and reading them back in id order for preparation.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::bulk::BulkInsert;
use super::models::*;
use super::records::{INSERT_CHUNK, ImportError, UploadChunk, now};
use super::schema::{batches, recipients};
use super::{Pools, Store, StoreError, with_conn};
use crate::domain::state::BatchState;

impl Store {
    /// Stores an upload's recipients in one transaction: chunks arrive on `rx` and `Ok(None)` ends
    /// the upload. An `Err` chunk (bad input), a channel closed early, or a batch no longer
    /// `initial` rolls the whole upload back. Returns (accepted, total).
    pub async fn import_recipients<E: Send>(
        &self,
        batch_id: i64,
        mut rx: tokio::sync::mpsc::Receiver<UploadChunk<E>>,
    ) -> Result<(i64, i64), ImportError<E>> {
        // PostgreSQL streams the rows in by COPY; SQLite inserts them in one write transaction.
        let pool = match &self.pools {
            Pools::Pg(_) => return super::copy::import_recipients(&self.url, batch_id, rx).await,
            Pools::Sqlite(pool) => pool,
        };
        let mut obj = pool.get().await?;
        let conn: &mut super::SqliteConn = &mut obj;
        conn.immediate_transaction::<_, ImportError<E>, _>(async |conn| {
            let mut accepted = 0i64;
            loop {
                match rx.recv().await {
                    Some(Ok(Some(chunk))) => {
                        accepted += chunk.len() as i64;
                        for rows in chunk.chunks(INSERT_CHUNK) {
                            let rows: Vec<NewRecipient> = rows
                                .iter()
                                .map(|(phone, vars)| NewRecipient {
                                    batch_id,
                                    phone: phone.clone(),
                                    vars: vars.clone(),
                                })
                                .collect();
                            conn.insert_recipients(rows).await?;
                        }
                    }
                    Some(Ok(None)) => break,
                    Some(Err(e)) => return Err(ImportError::Input(e)),
                    None => return Err(ImportError::Incomplete),
                }
            }
            let total: Option<i64> = diesel::update(
                batches::table
                    .filter(batches::id.eq(batch_id))
                    .filter(batches::state.eq(BatchState::Initial.as_str())),
            )
            .set((
                batches::recipients.eq(batches::recipients + accepted),
                batches::version.eq(batches::version + 1),
                batches::updated_at.eq(now()),
            ))
            .returning(batches::recipients)
            .get_result(conn)
            .await
            .optional()?;
            total
                .map(|total| (accepted, total))
                .ok_or(ImportError::NotInitial)
        })
        .await
    }

    /// Recipients of a batch after `after`, in id order.
    pub async fn recipients_after(
        &self,
        batch_id: i64,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Recipient>, StoreError> {
        with_conn!(self, |conn| {
            Ok(recipients::table
                // The batch by a range and in the ordering, so that the planner walks
                // `recipients_batch`, not the primary key (see `messages::bounds_sql`).
                .filter(recipients::batch_id.ge(batch_id))
                .filter(recipients::batch_id.le(batch_id))
                .filter(recipients::id.gt(after))
                .order((recipients::batch_id, recipients::id))
                .limit(limit)
                .select(Recipient::as_select())
                .load(conn)
                .await?)
        })
    }
}
