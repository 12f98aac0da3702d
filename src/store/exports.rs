//! Exports: a batch's messages read a page at a time by id, for a stream of any length.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use super::models::MessageRow;
use super::schema::messages;
use super::{Store, StoreError, with_conn};
use crate::domain::batch::MessageStatus;

impl Store {
    /// The lowest and highest message id of a batch, `None` while it has none: the span an
    /// export walks (two probes of the partitions' index per partition).
    pub async fn message_id_span(&self, batch_id: i64) -> Result<Option<(i64, i64)>, StoreError> {
        let bounds = self.message_id_bounds(batch_id).await?;
        Ok(bounds
            .into_iter()
            .flatten()
            .reduce(|(low, high), (l, h)| (low.min(l), high.max(h))))
    }

    /// Up to `limit` messages of a batch with ids in `after + 1 ..= last`, in id order,
    /// optionally of one status: one page of an export.
    ///
    /// The span's end bounds the walk: a page past the batch's last message would otherwise
    /// read the messages of every later batch looking for more, and a status few messages have
    /// would read them on every page.
    pub async fn export_page(
        &self,
        batch_id: i64,
        status: Option<MessageStatus>,
        after: i64,
        last: i64,
        limit: i64,
    ) -> Result<Vec<MessageRow>, StoreError> {
        with_conn!(self, |conn| {
            let mut query = messages::table
                .filter(messages::id.gt(after))
                .filter(messages::id.le(last))
                .filter(messages::batch_id.eq(batch_id))
                .select(MessageRow::as_select())
                .into_boxed();
            if let Some(status) = status {
                query = query.filter(messages::status.eq(status.as_i16()));
            }
            Ok(query.order(messages::id).limit(limit).load(conn).await?)
        })
    }
}
