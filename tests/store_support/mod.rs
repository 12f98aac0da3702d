//! Harness of the store conformance suite: one fresh database per test (a SQLite file in a
//! temporary folder, or a PostgreSQL database, both named by a UUID), migrated, and a `Store` on
//! it handed to the scenario inside a multi-thread tokio runtime. The database is removed when the
//! test ends, also when it fails.

use std::future::Future;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use smsbatch::store::Store;
use uuid::Uuid;

/// Admin URL of the PostgreSQL server the tests create their databases in (no database part).
const DEFAULT_PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432";

/// Which store a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a fresh temporary folder.
    Sqlite,
    /// A fresh database on the local PostgreSQL server.
    Postgres,
}

/// A database that exists for one test and is removed when dropped.
pub struct TestDb {
    url: String,
    sqlite_dir: Option<PathBuf>,
    /// (admin URL without database, database name)
    pg: Option<(String, String)>,
}

impl TestDb {
    /// Creates an empty database.
    pub fn new(backend: Backend) -> Self {
        let id = Uuid::now_v7().simple().to_string();
        match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(format!("smsbatch-store-{id}"));
                std::fs::create_dir_all(&dir).expect("create the test's temporary folder");
                let url = format!("sqlite://{}", dir.join("x.db").display());
                TestDb {
                    url,
                    sqlite_dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin = std::env::var("SMSBATCH_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| DEFAULT_PG_ADMIN.to_owned())
                    .trim_end_matches('/')
                    .to_owned();
                let name = format!("smsbatch_s_{id}");
                let maintenance = format!("{admin}/postgres");
                // Concurrent CREATE DATABASE can collide on template1; a retry settles it.
                let mut attempt = 0u64;
                loop {
                    attempt += 1;
                    match pg_exec(&maintenance, &format!("CREATE DATABASE \"{name}\"")) {
                        Ok(()) => break,
                        Err(e) if attempt < 5 => {
                            eprintln!("CREATE DATABASE {name} failed (attempt {attempt}): {e}");
                            thread::sleep(Duration::from_millis(300 * attempt));
                        }
                        Err(e) => panic!(
                            "cannot create test database {name} via {maintenance}: {e} \
                             (is PostgreSQL running? set SMSBATCH_TEST_POSTGRES_URL to override)"
                        ),
                    }
                }
                TestDb {
                    url: format!("{admin}/{name}"),
                    sqlite_dir: None,
                    pg: Some((admin, name)),
                }
            }
        }
    }

    /// The database URL the store connects to.
    pub fn url(&self) -> &str {
        &self.url
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
                eprintln!("warning: could not drop test database {name}: {e}");
            }
        }
    }
}

/// Runs SQL on a PostgreSQL database through a short-lived current-thread runtime.
fn pg_exec(url: &str, sql: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let result = client.batch_execute(sql).await;
        drop(client);
        let _ = driver.await;
        result.map_err(|e| e.to_string())
    })
}

/// Creates a fresh database of `backend`, migrates it, and runs `scenario` on a store connected
/// to it inside a multi-thread runtime. The database is dropped afterwards, also on panic.
pub fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    // Declared first, dropped last: the runtime (and the pool in it) goes before the database.
    let db = TestDb::new(backend);
    // Synchronous, blocks on a runtime of its own: before ours exists.
    smsbatch::store::migrate(db.url()).expect("the migrations run on a fresh database");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(async {
        let store = Store::connect(db.url(), 4, Duration::from_secs(10))
            .expect("a store on the fresh database");
        scenario(store).await;
    });
    drop(rt);
    drop(db);
}
