//! The database: the source of truth for batches, recipients, messages, partitions and
//! checkpoints. One set of diesel queries serves PostgreSQL (diesel-async, tokio-postgres) and
//! SQLite (diesel-async's `SyncConnectionWrapper`); backend-specific SQL sits in clearly named
//! functions.

mod batches;
mod bulk;
mod cached;
mod chunk_pg;
mod copy;
mod exports;
mod leases;
mod messages;
pub mod models;
mod opt_outs;
mod outcomes;
mod preparation;
mod rates;
mod receipts;
mod recipients;
mod records;
mod resend;
pub mod schema;
mod types;
mod watch;

use std::path::Path;
use std::time::Duration;

use diesel::SqliteConnection;
use diesel::prelude::*;
use diesel_async::AsyncPgConnection;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, SimpleAsyncConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use futures_util::FutureExt;

pub use leases::before;
pub use opt_outs::{OptOut, OptOutChunk};
pub use preparation::COPY_FROM_ROWS;
pub use receipts::{PENDING_RECEIPT_TRIES, ReceiptTimeouts, ReceiptsApplied};
pub use records::*;
pub use resend::ResendError;
pub use watch::Changes;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The SQLite connection type, pooled like the PostgreSQL one.
pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A query failed.
    #[error("database query failed: {0}")]
    Query(#[source] diesel::result::Error),
    /// No connection could be had.
    #[error("database unavailable: {0}")]
    Pool(String),
    /// Migrations could not run.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// The row changed since it was read (optimistic version check).
    #[error("batch {0} was changed concurrently")]
    Conflict(String),
    /// A stored value could not be read back.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// A newer run of the batch's preparation started (after a pause, a restart or a take-over
    /// by another instance): this run's chunk was not written, and it must stop.
    #[error("a newer preparation run of batch {0} started")]
    Superseded(i64),
}

impl StoreError {
    /// True when the database could not be reached (no connection, a connection lost, a server
    /// shutting down or starting up, SQLite locked past its busy timeout): the work should wait
    /// for it and go on, not fail, and a request may be retried (503).
    pub fn is_unavailable(&self) -> bool {
        use diesel::result::{DatabaseErrorKind, Error};
        match self {
            StoreError::Pool(_) => true,
            StoreError::Query(Error::DatabaseError(
                DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection,
                _,
            )) => true,
            // diesel keeps no SQLSTATE: these are PostgreSQL's messages for 57P01
            // (admin_shutdown), 57P02 (crash_shutdown) and 57P03 (cannot_connect_now), and
            // SQLite's for a write lock still held when the busy timeout ran out (SQLITE_BUSY).
            StoreError::Query(Error::DatabaseError(_, info)) => {
                let message = info.message();
                [
                    "terminating connection due to administrator command",
                    "terminating connection because of crash of another server process",
                    "the database system is",
                    "database is locked",
                ]
                .iter()
                .any(|m| message.contains(m))
            }
            _ => false,
        }
    }
}

impl From<diesel::result::Error> for StoreError {
    /// A value that does not read back as its type (a state no state has, steps that are no
    /// JSON of steps) is a corrupt row, not a failed query.
    fn from(e: diesel::result::Error) -> Self {
        match e {
            diesel::result::Error::DeserializationError(cause) => {
                StoreError::Corrupt(cause.to_string())
            }
            e => StoreError::Query(e),
        }
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for StoreError {
    fn from(e: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        StoreError::Pool(e.to_string())
    }
}

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `postgres://…`
    Postgres,
    /// `sqlite://path`
    Sqlite,
}

impl Backend {
    /// The backend of a URL, if it is one we know.
    pub fn of(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite://") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

/// The file path of a `sqlite://` URL (`sqlite://data/x.db` is relative, `sqlite:///tmp/x.db`
/// absolute).
fn sqlite_path(url: &str) -> &str {
    url.strip_prefix("sqlite://").unwrap_or(url)
}

/// Runs the embedded migrations of the URL's backend. Synchronous: call it before the actor
/// system starts, or from a blocking thread.
pub fn migrate(url: &str) -> Result<(), StoreError> {
    match Backend::of(url) {
        Some(Backend::Sqlite) => {
            let path = sqlite_path(url);
            if let Some(dir) = Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
            {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Migration(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            let mut conn = SqliteConnection::establish(path)
                .map_err(|e| StoreError::Migration(e.to_string()))?;
            diesel::connection::SimpleConnection::batch_execute(&mut conn, SQLITE_PRAGMAS)?;
            conn.run_pending_migrations(SQLITE_MIGRATIONS)
                .map_err(|e| StoreError::Migration(e.to_string()))?;
            Ok(())
        }
        Some(Backend::Postgres) => {
            use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
            let mut conn =
                <AsyncConnectionWrapper<AsyncPgConnection> as diesel::Connection>::establish(url)
                    .map_err(|e| StoreError::Migration(e.to_string()))?;
            conn.run_pending_migrations(PG_MIGRATIONS)
                .map_err(|e| StoreError::Migration(e.to_string()))?;
            Ok(())
        }
        None => Err(StoreError::Migration("unsupported database URL".into())),
    }
}

/// Set on every SQLite connection: the busy timeout makes statements wait for a lock instead of
/// failing, WAL lets readers run beside the writer, NORMAL sync is safe under WAL. The timeout
/// comes first: `journal_mode` reads the database, and a new connection opened while another
/// one writes (the pool growing at start-up) failed at once with "database is locked".
const SQLITE_PRAGMAS: &str = "PRAGMA busy_timeout=60000; PRAGMA journal_mode=WAL; \
     PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;";

/// The connection pools, one arm per backend.
#[derive(Clone)]
pub(crate) enum Pools {
    Pg(Pool<AsyncPgConnection>),
    Sqlite(Pool<SqliteConn>),
}

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) pools: Pools,
    /// The database URL, for the work that needs a connection of its own (an upload's `COPY`).
    url: std::sync::Arc<str>,
    /// PostgreSQL only: the connections preparation writes its chunks on, by `COPY`.
    copy: Option<copy::CopyPool>,
}

/// Runs `$body` with `$conn` bound to a pooled connection of whichever backend is live. The body
/// is compiled once per backend, so one diesel query serves both.
macro_rules! with_conn {
    ($store:expr, |$conn:ident| $body:expr) => {
        match &$store.pools {
            $crate::store::Pools::Pg(pool) => {
                let mut obj = pool.get().await?;
                let $conn: &mut diesel_async::AsyncPgConnection = &mut obj;
                $body
            }
            $crate::store::Pools::Sqlite(pool) => {
                let mut obj = pool.get().await?;
                let $conn: &mut $crate::store::SqliteConn = &mut obj;
                $body
            }
        }
    };
}

/// Like `with_conn!`, inside a write transaction (`BEGIN IMMEDIATE` on SQLite, so that writers
/// queue on the busy timeout instead of failing to upgrade a read lock).
macro_rules! with_tx {
    ($store:expr, |$conn:ident| $body:expr) => {
        $crate::store::with_tx!($store, $crate::store::StoreError, |$conn| $body)
    };
    ($store:expr, $err:ty, |$conn:ident| $body:expr) => {
        match &$store.pools {
            $crate::store::Pools::Pg(pool) => {
                use diesel_async::AsyncConnection as _;
                let mut obj = pool.get().await?;
                let c: &mut diesel_async::AsyncPgConnection = &mut obj;
                c.transaction::<_, $err, _>(async |$conn| $body).await
            }
            $crate::store::Pools::Sqlite(pool) => {
                let mut obj = pool.get().await?;
                let c: &mut $crate::store::SqliteConn = &mut obj;
                c.immediate_transaction::<_, $err, _>(async |$conn| $body)
                    .await
            }
        }
    };
}
pub(crate) use {with_conn, with_tx};

impl Store {
    /// Opens a pool on the URL's backend. Does not touch the database until first use.
    pub fn connect(
        url: &str,
        pool_size: usize,
        acquire_timeout: Duration,
    ) -> Result<Store, StoreError> {
        let timeouts = deadpool::managed::Timeouts {
            wait: Some(acquire_timeout),
            create: Some(acquire_timeout),
            recycle: Some(acquire_timeout),
        };
        let pools = match Backend::of(url) {
            Some(Backend::Postgres) => {
                // No test query each time a connection leaves the pool (`Verified` doubled the
                // round trips of delivery's one-statement claims and records): a connection the
                // server closed is still dropped, being seen as broken, and a query on one that
                // died silently fails like any other database error, which every caller handles.
                let mut config = ManagerConfig::<AsyncPgConnection>::default();
                config.recycling_method = RecyclingMethod::Fast;
                let manager =
                    AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
                Pools::Pg(
                    Pool::builder(manager)
                        .max_size(pool_size)
                        .timeouts(timeouts)
                        .runtime(deadpool::Runtime::Tokio1)
                        .build()
                        .map_err(|e| StoreError::Pool(e.to_string()))?,
                )
            }
            Some(Backend::Sqlite) => {
                let mut config = ManagerConfig::<SqliteConn>::default();
                config.custom_setup = Box::new(|url| {
                    async move {
                        let mut conn = SqliteConn::establish(sqlite_path(url)).await?;
                        conn.batch_execute(SQLITE_PRAGMAS)
                            .await
                            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    }
                    .boxed()
                });
                let manager =
                    AsyncDieselConnectionManager::<SqliteConn>::new_with_config(url, config);
                Pools::Sqlite(
                    Pool::builder(manager)
                        .max_size(pool_size)
                        .timeouts(timeouts)
                        .runtime(deadpool::Runtime::Tokio1)
                        .build()
                        .map_err(|e| StoreError::Pool(e.to_string()))?,
                )
            }
            None => return Err(StoreError::Pool("unsupported database URL".into())),
        };
        let copy = match pools {
            Pools::Pg(_) => Some(copy::copy_pool(url, acquire_timeout)?),
            Pools::Sqlite(_) => None,
        };
        Ok(Store {
            pools,
            url: url.into(),
            copy,
        })
    }

    /// Which backend this store talks to.
    pub fn backend(&self) -> Backend {
        match self.pools {
            Pools::Pg(_) => Backend::Postgres,
            Pools::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// A trivial query, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        with_conn!(self, |conn| {
            conn.batch_execute("SELECT 1").await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error};

    fn db_error(kind: DatabaseErrorKind, message: &str) -> StoreError {
        StoreError::Query(Error::DatabaseError(kind, Box::new(message.to_string())))
    }

    #[test]
    fn an_outage_is_told_apart_from_a_bad_query() {
        let outages = [
            StoreError::Pool("error connecting to server: Connection refused".into()),
            db_error(DatabaseErrorKind::UnableToSendCommand, "connection closed"),
            db_error(
                DatabaseErrorKind::ClosedConnection,
                "server closed the connection",
            ),
            db_error(
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
            ),
            db_error(
                DatabaseErrorKind::Unknown,
                "the database system is shutting down",
            ),
            db_error(
                DatabaseErrorKind::Unknown,
                "the database system is starting up",
            ),
            db_error(DatabaseErrorKind::Unknown, "database is locked"),
        ];
        for e in &outages {
            assert!(e.is_unavailable(), "{e}");
        }
        let faults = [
            db_error(
                DatabaseErrorKind::UniqueViolation,
                "duplicate key value violates unique constraint",
            ),
            db_error(
                DatabaseErrorKind::Unknown,
                "relation \"messages\" does not exist",
            ),
            StoreError::Query(Error::NotFound),
            StoreError::Conflict("b".into()),
            StoreError::Corrupt("steps".into()),
        ];
        for e in &faults {
            assert!(!e.is_unavailable(), "{e}");
        }
    }
}
