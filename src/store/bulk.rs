//! Multi-row inserts, the one place where the backends part: diesel-async cannot send a
//! multi-row INSERT to SQLite, so on SQLite the rows go one by one inside a single blocking call
//! on the same connection (and transaction) — cheap in-process, with a cached prepared statement.

use diesel::prelude::*;
use diesel::result::QueryResult;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::BoxFuture;

use super::SqliteConn;
use super::models::{NewMessage, NewRecipient};
use super::schema::{messages, partitions, recipients};

/// Bulk writes on a connection of either backend.
pub(crate) trait BulkInsert {
    /// Inserts recipients.
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>>;
    /// Inserts the partition rows of a new batch.
    fn insert_partitions(&mut self, batch_id: i64, count: i32)
    -> BoxFuture<'_, QueryResult<usize>>;
    /// Inserts messages, skipping numbers the batch already has; returns (partition, segments)
    /// of each inserted row.
    fn insert_messages(
        &mut self,
        rows: Vec<NewMessage>,
    ) -> BoxFuture<'_, QueryResult<Vec<(i32, i32)>>>;
}

impl BulkInsert for AsyncPgConnection {
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>> {
        Box::pin(async move {
            diesel::insert_into(recipients::table)
                .values(rows)
                .execute(self)
                .await
        })
    }

    fn insert_partitions(
        &mut self,
        batch_id: i64,
        count: i32,
    ) -> BoxFuture<'_, QueryResult<usize>> {
        let rows: Vec<_> = (0..count)
            .map(|i| (partitions::batch_id.eq(batch_id), partitions::idx.eq(i)))
            .collect();
        Box::pin(async move {
            diesel::insert_into(partitions::table)
                .values(rows)
                .execute(self)
                .await
        })
    }

    fn insert_messages(
        &mut self,
        rows: Vec<NewMessage>,
    ) -> BoxFuture<'_, QueryResult<Vec<(i32, i32)>>> {
        Box::pin(async move {
            diesel::insert_into(messages::table)
                .values(rows)
                .on_conflict((messages::batch_id, messages::phone))
                .do_nothing()
                .returning((messages::partition, messages::segments))
                .get_results(self)
                .await
        })
    }
}

impl BulkInsert for SqliteConn {
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>> {
        self.spawn_blocking(move |conn| {
            let mut n = 0;
            for row in &rows {
                n += diesel::RunQueryDsl::execute(
                    diesel::insert_into(recipients::table).values(row),
                    conn,
                )?;
            }
            Ok(n)
        })
    }

    fn insert_partitions(
        &mut self,
        batch_id: i64,
        count: i32,
    ) -> BoxFuture<'_, QueryResult<usize>> {
        self.spawn_blocking(move |conn| {
            let mut n = 0;
            for i in 0..count {
                n += diesel::RunQueryDsl::execute(
                    diesel::insert_into(partitions::table)
                        .values((partitions::batch_id.eq(batch_id), partitions::idx.eq(i))),
                    conn,
                )?;
            }
            Ok(n)
        })
    }

    fn insert_messages(
        &mut self,
        rows: Vec<NewMessage>,
    ) -> BoxFuture<'_, QueryResult<Vec<(i32, i32)>>> {
        self.spawn_blocking(move |conn| {
            let mut inserted = Vec::with_capacity(rows.len());
            for row in &rows {
                let n = diesel::RunQueryDsl::execute(
                    diesel::insert_into(messages::table)
                        .values(row)
                        .on_conflict((messages::batch_id, messages::phone))
                        .do_nothing(),
                    conn,
                )?;
                if n > 0 {
                    inserted.push((row.partition, row.segments));
                }
            }
            Ok(inserted)
        })
    }
}
