//! Test databases: a fresh SQLite file in a temporary folder or a fresh PostgreSQL database on
//! the local server, both named by a UUID, removed when the test ends (also when it fails).
//! Shared by the HTTP harness (`tests/it/common`) and the store conformance suite.
#![allow(dead_code)]

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use uuid::Uuid;

/// Admin URL of the PostgreSQL server the tests create their databases in (no database part);
/// `SMSBATCH_TEST_POSTGRES_URL` overrides it.
const DEFAULT_PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432";

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a fresh temporary folder.
    Sqlite,
    /// A fresh database on the local PostgreSQL server.
    Postgres,
    /// The production stack: a fresh PostgreSQL database, and the `rabbitmq` transport on the
    /// local RabbitMQ with a queue of the test's own (see `TestDb::server_env`).
    PostgresRabbitmq,
}

/// A database that exists for one test and is removed when dropped.
pub struct TestDb {
    backend: Backend,
    url: String,
    sqlite_dir: Option<PathBuf>,
    /// (admin URL without database, database name)
    pg: Option<(String, String)>,
}

impl TestDb {
    /// Creates an empty database (the server creates its tables when it starts).
    pub fn new(backend: Backend) -> Self {
        let id = Uuid::now_v7().simple().to_string();
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("smsbatch-test-{id}"));
                std::fs::create_dir_all(&dir).expect("create the test's temporary folder");
                let file = dir.join(format!("{id}.db"));
                let url = format!("sqlite://{}", file.display());
                Self {
                    backend,
                    url,
                    sqlite_dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres | Backend::PostgresRabbitmq => {
                let admin = std::env::var("SMSBATCH_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| DEFAULT_PG_ADMIN.to_owned());
                Self::on_postgres_server(backend, &admin)
            }
        }
    }

    /// Creates an empty database on the PostgreSQL server at `admin` (a URL without database
    /// part), e.g. a private server that a test stops and starts.
    pub fn on_postgres_server(backend: Backend, admin: &str) -> Self {
        assert_ne!(backend, Backend::Sqlite, "a PostgreSQL backend");
        let id = Uuid::now_v7().simple().to_string();
        let admin = admin.trim_end_matches('/').to_owned();
        let name = format!("smsbatch_t_{id}");
        let maintenance = format!("{admin}/postgres");
        // Concurrent CREATE DATABASE can collide on template1; a retry settles it.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match pg_exec(&maintenance, &format!("CREATE DATABASE \"{name}\"")) {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    eprintln!("CREATE DATABASE {name} failed (attempt {attempt}): {e:#}");
                    thread::sleep(Duration::from_millis(300 * attempt));
                }
                Err(e) => panic!(
                    "cannot create test database {name} via {maintenance}: {e:#} \
                     (is PostgreSQL running? set SMSBATCH_TEST_POSTGRES_URL to override)"
                ),
            }
        }
        Self {
            backend,
            url: format!("{admin}/{name}"),
            sqlite_dir: None,
            pg: Some((admin, name)),
        }
    }

    /// Environment for a server on this test's stack: with RabbitMQ, the transport and a queue
    /// named after the database, which the broker deletes a while after its last consumer left.
    pub fn server_env(&self) -> Vec<(String, String)> {
        match (&self.backend, &self.pg) {
            (Backend::PostgresRabbitmq, Some((_, name))) => vec![
                ("SMSBATCH__TRANSPORT__KIND".into(), "rabbitmq".into()),
                (
                    "SMSBATCH__TRANSPORT__QUEUE".into(),
                    format!("{name}.delivery"),
                ),
                (
                    "SMSBATCH__TRANSPORT__QUEUE_EXPIRES_MS".into(),
                    "60000".into(),
                ),
            ],
            _ => Vec::new(),
        }
    }

    /// The value for `SMSBATCH__DATABASE__URL`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The store this database lives in.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs SQL straight on the database, behind the server's back: how a test injects a fault
    /// (a corrupt row) that no API request can cause.
    pub fn execute(&self, sql: &str) {
        match self.backend {
            Backend::Postgres | Backend::PostgresRabbitmq => {
                pg_exec(&self.url, sql).expect("run SQL on the test database")
            }
            Backend::Sqlite => {
                use diesel::Connection as _;
                use diesel::connection::SimpleConnection as _;
                let path = self.url.trim_start_matches("sqlite://");
                let mut conn =
                    diesel::SqliteConnection::establish(path).expect("open the SQLite file");
                conn.batch_execute(&format!("PRAGMA busy_timeout=10000; {sql}"))
                    .expect("run SQL on the test database");
            }
        }
    }
}

impl TestDb {
    /// Runs SQL on the PostgreSQL server's maintenance database (`postgres`), outside the test's
    /// own: how a test makes its database refuse connections (`ALLOW_CONNECTIONS`) and take them
    /// back, without stopping the server other tests use.
    pub fn execute_on_server(&self, sql: &str) {
        let (admin, _) = self
            .pg
            .as_ref()
            .expect("execute_on_server is for PostgreSQL");
        pg_exec(&format!("{admin}/postgres"), sql).expect("run SQL on the maintenance database");
    }

    /// Runs a query straight on the PostgreSQL database and returns the first column of every
    /// row as text (NULL as `None`): how a test looks at what the API does not show, such as
    /// which instance holds a batch's lease.
    pub fn query_column(&self, sql: &str) -> Vec<Option<String>> {
        assert_ne!(
            self.backend,
            Backend::Sqlite,
            "query_column is for PostgreSQL"
        );
        pg_query_column(&self.url, sql)
            .unwrap_or_else(|e| panic!("query {sql:?} on the test database: {e:#}"))
    }
}

/// A lock the test holds on its database behind the server's back, until released or dropped:
/// on PostgreSQL `LOCK TABLE messages IN SHARE MODE` (every write of a message waits), on
/// SQLite the database's write lock (`BEGIN IMMEDIATE`: every writer waits). How a test makes a
/// step stuck without stopping the database.
pub struct HeldLock {
    release: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<thread::JoinHandle<()>>,
}

impl TestDb {
    /// Takes the lock of `HeldLock` and returns once it is held.
    pub fn hold_write_lock(&self) -> HeldLock {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, is_held) = std::sync::mpsc::channel::<()>();
        let url = self.url.clone();
        let backend = self.backend;
        let holder = thread::spawn(move || match backend {
            Backend::Sqlite => {
                use diesel::Connection as _;
                use diesel::connection::SimpleConnection as _;
                let mut conn =
                    diesel::SqliteConnection::establish(url.trim_start_matches("sqlite://"))
                        .expect("open the SQLite file");
                conn.batch_execute("PRAGMA busy_timeout=60000; BEGIN IMMEDIATE")
                    .expect("take SQLite's write lock");
                let _ = held.send(());
                let _ = released.recv();
                conn.batch_execute("COMMIT")
                    .expect("release the write lock");
            }
            Backend::Postgres | Backend::PostgresRabbitmq => {
                with_pg_client(&url, async |client| {
                    client
                        .batch_execute("BEGIN; LOCK TABLE messages IN SHARE MODE")
                        .await?;
                    let _ = held.send(());
                    // Waits on a blocking thread, so that the connection stays driven.
                    let _ = tokio::task::spawn_blocking(move || released.recv()).await;
                    client.batch_execute("COMMIT").await
                })
                .expect("hold the messages table");
            }
        });
        is_held.recv().expect("the lock is taken");
        HeldLock {
            release: Some(release),
            holder: Some(holder),
        }
    }
}

impl HeldLock {
    /// Lets go of the lock and waits until it is released.
    pub fn release(mut self) {
        self.let_go();
    }

    fn let_go(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        self.let_go();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(dir) = &self.sqlite_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some((admin, name)) = &self.pg {
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            if let Err(e) = pg_exec(&format!("{admin}/postgres"), &sql) {
                eprintln!("warning: could not drop test database {name}: {e:#}");
            }
        }
    }
}

/// Runs `f` with a client connected to a PostgreSQL database, on a short-lived current-thread
/// runtime (the tests themselves are synchronous).
fn with_pg_client<T>(
    url: &str,
    f: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, tokio_postgres::Error>,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let result = f(&client).await;
        drop(client);
        let _ = driver.await;
        Ok(result?)
    })
}

/// Runs SQL on a PostgreSQL database.
fn pg_exec(url: &str, sql: &str) -> anyhow::Result<()> {
    with_pg_client(url, async |client| client.batch_execute(sql).await)
}

/// Runs a query on a PostgreSQL database; returns the first column of its rows as text.
fn pg_query_column(url: &str, sql: &str) -> anyhow::Result<Vec<Option<String>>> {
    let messages = with_pg_client(url, async |client| client.simple_query(sql).await)?;
    Ok(messages
        .iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
            _ => None,
        })
        .collect())
}
