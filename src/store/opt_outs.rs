//! Opt-outs: numbers that said stop (E.164). Preparation drops them; the API lists, adds and
//! removes them.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures_util::future::BoxFuture;

use super::records::{ImportError, now};
use super::schema::opt_outs;
use super::{Store, StoreError, with_conn, with_tx};

/// Numbers inserted per statement (three binds each, well under SQLite's limit).
const INSERT_CHUNK: usize = 500;

/// Inserting numbers not listed yet, per backend: one statement per chunk on PostgreSQL, a row
/// at a time on SQLite (whose diesel has no multi-row insert with `ON CONFLICT`; in one
/// transaction, rows cost microseconds there).
trait InsertOptOuts {
    /// Inserts `phones` (sorted, no duplicates) with their source; returns how many were new.
    fn insert_opt_outs<'a>(
        &'a mut self,
        phones: Vec<&'a String>,
        source: &'a str,
        at: NaiveDateTime,
    ) -> BoxFuture<'a, QueryResult<usize>>;
}

impl InsertOptOuts for diesel_async::AsyncPgConnection {
    fn insert_opt_outs<'a>(
        &'a mut self,
        phones: Vec<&'a String>,
        source: &'a str,
        at: NaiveDateTime,
    ) -> BoxFuture<'a, QueryResult<usize>> {
        let rows: Vec<_> = phones
            .into_iter()
            .map(|p| {
                (
                    opt_outs::phone.eq(p),
                    opt_outs::source.eq(source),
                    opt_outs::created_at.eq(at),
                )
            })
            .collect();
        Box::pin(async move {
            diesel::insert_into(opt_outs::table)
                .values(rows)
                .on_conflict_do_nothing()
                .execute(self)
                .await
        })
    }
}

impl InsertOptOuts for super::SqliteConn {
    fn insert_opt_outs<'a>(
        &'a mut self,
        phones: Vec<&'a String>,
        source: &'a str,
        at: NaiveDateTime,
    ) -> BoxFuture<'a, QueryResult<usize>> {
        Box::pin(async move {
            let mut added = 0;
            for phone in phones {
                added += diesel::insert_into(opt_outs::table)
                    .values((
                        opt_outs::phone.eq(phone),
                        opt_outs::source.eq(source),
                        opt_outs::created_at.eq(at),
                    ))
                    .on_conflict_do_nothing()
                    .execute(self)
                    .await?;
            }
            Ok(added)
        })
    }
}

/// Inserts numbers not listed yet, in number order (two imports that share numbers then wait
/// for each other in the same order, which cannot deadlock); duplicates count once.
async fn insert<C: InsertOptOuts + Send>(
    conn: &mut C,
    phones: &[String],
    source: &str,
    at: NaiveDateTime,
) -> QueryResult<usize> {
    let mut sorted: Vec<&String> = phones.iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    conn.insert_opt_outs(sorted, source, at).await
}

/// One number on the list.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = opt_outs)]
pub struct OptOut {
    /// E.164.
    pub phone: String,
    /// `api`, `csv` or `inbound`.
    pub source: String,
    /// When it was added.
    pub created_at: NaiveDateTime,
}

/// One message of an opt-out import's feed: numbers (E.164), the end (`None`), or why the input
/// is bad.
pub type OptOutChunk<E> = Result<Option<Vec<String>>, E>;

impl Store {
    /// Adds numbers (E.164) to the list, in one transaction, with their `source`; returns how
    /// many were new. A number already listed keeps its first source and time.
    pub async fn add_opt_outs(&self, phones: &[String], source: &str) -> Result<usize, StoreError> {
        let at = now();
        with_tx!(self, |conn| {
            let mut added = 0;
            for chunk in phones.chunks(INSERT_CHUNK) {
                added += insert(conn, chunk, source, at).await?;
            }
            Ok(added)
        })
    }

    /// Adds the numbers of a streamed import in one transaction: input that turns out bad, or a
    /// feed that ends without its closing `None`, stores nothing. Returns how many were new.
    pub async fn import_opt_outs<E: Send>(
        &self,
        mut rx: tokio::sync::mpsc::Receiver<OptOutChunk<E>>,
        source: &str,
    ) -> Result<usize, ImportError<E>> {
        let at = now();
        with_tx!(self, ImportError<E>, |conn| {
            let mut added = 0;
            loop {
                match rx.recv().await {
                    Some(Ok(Some(phones))) => {
                        for chunk in phones.chunks(INSERT_CHUNK) {
                            added += insert(conn, chunk, source, at).await?;
                        }
                    }
                    Some(Ok(None)) => break,
                    Some(Err(e)) => return Err(ImportError::Input(e)),
                    None => return Err(ImportError::Incomplete),
                }
            }
            Ok(added)
        })
    }

    /// Up to `limit` numbers after `after`, in order.
    pub async fn list_opt_outs(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OptOut>, StoreError> {
        with_conn!(self, |conn| {
            let mut query = opt_outs::table
                .select(OptOut::as_select())
                .order(opt_outs::phone)
                .limit(limit)
                .into_boxed();
            if let Some(after) = after {
                query = query.filter(opt_outs::phone.gt(after.to_owned()));
            }
            Ok(query.load(conn).await?)
        })
    }

    /// The number's entry, if it is listed.
    pub async fn find_opt_out(&self, phone: &str) -> Result<Option<OptOut>, StoreError> {
        with_conn!(self, |conn| {
            Ok(opt_outs::table
                .find(phone)
                .select(OptOut::as_select())
                .first(conn)
                .await
                .optional()?)
        })
    }

    /// Takes the number off the list; false when it was not on it.
    pub async fn remove_opt_out(&self, phone: &str) -> Result<bool, StoreError> {
        with_conn!(self, |conn| {
            let removed = diesel::delete(opt_outs::table.find(phone))
                .execute(conn)
                .await?;
            Ok(removed > 0)
        })
    }
}
