//! Resending: a new batch made of an ended batch's messages of some statuses, written by the
//! database itself (`INSERT … SELECT`), so that no batch passes through the service's memory.

use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;

use super::bulk::BulkInsert;
use super::models::*;
use super::records::BatchRecord;
use super::schema::{batches, messages, partitions, recipients};
use super::{StoreError, with_tx};
use crate::domain::batch::MessageStatus;
use crate::domain::state::BatchState;

/// Why a resend stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ResendError {
    /// The original batch is not in a final state (`completed`, `failed`, `cancelled`).
    #[error("the batch is {0}: only a completed, failed or cancelled batch can be resent")]
    NotFinal(BatchState),
    /// None of the original batch's messages has one of the statuses.
    #[error("no message of the batch has status {0}")]
    NothingMatched(String),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for ResendError {
    fn from(e: diesel::result::Error) -> Self {
        ResendError::Store(e.into())
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for ResendError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        ResendError::Store(e.into())
    }
}

impl super::Store {
    /// Creates `new` (state `initial`, its `parent_id` the original's public id) with one
    /// recipient per message of batch `original` whose status is in `statuses`: the message's
    /// number (E.164) with its recipient's vars, in message order. One transaction: the new
    /// batch is stored whole, or, when the original is not final or no message matches, not at
    /// all.
    pub async fn resend(
        &self,
        original: i64,
        statuses: &[MessageStatus],
        new: NewBatch,
    ) -> Result<BatchRecord, ResendError> {
        let codes: Vec<i16> = statuses.iter().map(|s| s.as_i16()).collect();
        let names = || {
            statuses
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        };
        with_tx!(self, ResendError, |conn| {
            let state: BatchState = batches::table
                .find(original)
                .select(batches::state)
                .first(conn)
                .await?;
            if !state.is_final() {
                return Err(ResendError::NotFinal(state));
            }
            let batch: Batch = diesel::insert_into(batches::table)
                .values(&new)
                .returning(Batch::as_returning())
                .get_result(conn)
                .await?;
            conn.insert_partitions(batch.id, batch.partition_count)
                .await?;
            let from_messages = messages::table
                .inner_join(recipients::table.on(recipients::id.eq(messages::recipient_id)))
                .filter(messages::batch_id.eq(original))
                .filter(messages::status.eq_any(&codes))
                .order(messages::id)
                .select((
                    batch.id.into_sql::<BigInt>(),
                    messages::phone,
                    recipients::vars,
                ));
            let copied = diesel::insert_into(recipients::table)
                .values(from_messages)
                .into_columns((recipients::batch_id, recipients::phone, recipients::vars))
                .execute(conn)
                .await? as i64;
            if copied == 0 {
                // Rolls the new batch back.
                return Err(ResendError::NothingMatched(names()));
            }
            let batch: Batch = diesel::update(batches::table.find(batch.id))
                .set(batches::recipients.eq(copied))
                .returning(Batch::as_returning())
                .get_result(conn)
                .await?;
            let partitions = partitions::table
                .filter(partitions::batch_id.eq(batch.id))
                .order(partitions::idx)
                .select(Partition::as_select())
                .load(conn)
                .await?;
            Ok(BatchRecord { batch, partitions })
        })
    }
}
