//! Bulk inserts, the one place where the backends part. PostgreSQL takes one array per column
//! and unnests them (one statement of a fixed shape per chunk). diesel-async cannot send a
//! multi-row INSERT to SQLite, so on SQLite the rows go one by one inside a single blocking call
//! on the same connection (and transaction) — cheap in-process, with a cached prepared statement.

use diesel::prelude::*;
use diesel::result::QueryResult;
use diesel::sql_types;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures_util::future::BoxFuture;

use super::SqliteConn;
use super::cached::Cached;
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
    /// Lets the current transaction's commit return before its WAL reaches the disk, for writes
    /// that are safe to lose whole in a crash (they are redone after it); no-op where commits do
    /// not wait for the disk anyway (SQLite in WAL mode with `synchronous=NORMAL`).
    fn commit_unflushed(&mut self) -> BoxFuture<'_, QueryResult<()>>;
}

/// Messages go to PostgreSQL as one array per column, unnested by the server: one statement of
/// a fixed shape (prepared once per connection) whatever the number of rows, instead of a
/// multi-row VALUES list with a bind per field that is parsed and planned anew each time.
const INSERT_MESSAGES_PG: &str = "\
    INSERT INTO messages \
        (batch_id, partition, recipient_id, phone, body, encoding, segments, updated_at) \
    SELECT $1, v.partition, v.recipient_id, v.phone, v.body, v.encoding, v.segments, $2 \
    FROM unnest($3::int[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::int[]) \
        AS v(partition, recipient_id, phone, body, encoding, segments) \
    ON CONFLICT (batch_id, phone) DO NOTHING \
    RETURNING partition, segments";

/// Recipients, the same way.
const INSERT_RECIPIENTS_PG: &str = "\
    INSERT INTO recipients (batch_id, phone, vars) \
    SELECT $1, v.phone, v.vars FROM unnest($2::text[], $3::text[]) AS v(phone, vars)";

/// What the message insert returns for each row it inserted.
#[derive(QueryableByName)]
struct Inserted {
    #[diesel(sql_type = sql_types::Integer)]
    partition: i32,
    #[diesel(sql_type = sql_types::Integer)]
    segments: i32,
}

impl BulkInsert for AsyncPgConnection {
    fn insert_recipients(&mut self, rows: Vec<NewRecipient>) -> BoxFuture<'_, QueryResult<usize>> {
        Box::pin(async move {
            let Some(batch_id) = <[_]>::first(&rows).map(|r| r.batch_id) else {
                return Ok(0);
            };
            let (phones, vars): (Vec<String>, Vec<Option<String>>) =
                rows.into_iter().map(|r| (r.phone, r.vars)).unzip();
            diesel::sql_query(INSERT_RECIPIENTS_PG)
                .bind::<sql_types::BigInt, _>(batch_id)
                .bind::<sql_types::Array<sql_types::Text>, _>(phones)
                .bind::<sql_types::Array<sql_types::Nullable<sql_types::Text>>, _>(vars)
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
        mut rows: Vec<NewMessage>,
    ) -> BoxFuture<'_, QueryResult<Vec<(i32, i32)>>> {
        // In number order: two chunks written side by side that share numbers then wait for
        // each other's numbers in the same order, which cannot deadlock.
        rows.sort_unstable_by(|a, b| a.phone.cmp(&b.phone));
        Box::pin(async move {
            let Some(first) = <[_]>::first(&rows) else {
                return Ok(Vec::new());
            };
            let (batch_id, at) = (first.batch_id, first.updated_at);
            let n = rows.len();
            let mut partition = Vec::with_capacity(n);
            let mut recipient = Vec::with_capacity(n);
            let mut phone = Vec::with_capacity(n);
            let mut body = Vec::with_capacity(n);
            let mut encoding = Vec::with_capacity(n);
            let mut segments = Vec::with_capacity(n);
            for row in rows {
                partition.push(row.partition);
                recipient.push(row.recipient_id);
                phone.push(row.phone);
                body.push(row.body);
                encoding.push(row.encoding);
                segments.push(row.segments);
            }
            let insert = diesel::sql_query(INSERT_MESSAGES_PG)
                .bind::<sql_types::BigInt, _>(batch_id)
                .bind::<sql_types::Timestamp, _>(at)
                .bind::<sql_types::Array<sql_types::Integer>, _>(partition)
                .bind::<sql_types::Array<sql_types::BigInt>, _>(recipient)
                .bind::<sql_types::Array<sql_types::Text>, _>(phone)
                .bind::<sql_types::Array<sql_types::Text>, _>(body)
                .bind::<sql_types::Array<sql_types::Text>, _>(encoding)
                .bind::<sql_types::Array<sql_types::Integer>, _>(segments);
            let inserted: Vec<Inserted> = Cached(insert).load(self).await?;
            Ok(inserted
                .into_iter()
                .map(|r| (r.partition, r.segments))
                .collect())
        })
    }

    fn commit_unflushed(&mut self) -> BoxFuture<'_, QueryResult<()>> {
        Box::pin(async move {
            // One simple-protocol round trip: nothing to parse, plan or bind.
            self.batch_execute("SET LOCAL synchronous_commit = off")
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

    fn commit_unflushed(&mut self) -> BoxFuture<'_, QueryResult<()>> {
        Box::pin(async { Ok(()) })
    }
}
