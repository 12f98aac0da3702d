//! Harness of the store conformance suite: one fresh database per test (a SQLite file in a
//! temporary folder, or a PostgreSQL database, both named by a UUID), migrated, and a `Store` on
//! it handed to the scenario inside a multi-thread tokio runtime. The database is removed when the
//! test ends, also when it fails.

use std::future::Future;
use std::time::Duration;

use smsbatch::store::Store;

#[path = "../common/db.rs"]
mod db;
pub use db::{Backend, TestDb};

/// Creates a fresh database of `backend`, migrates it, and runs `scenario` on a store connected
/// to it inside a multi-thread runtime. The database is dropped afterwards, also on panic.
pub fn run<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    run_with_url(backend, |store, _| scenario(store));
}

/// `run`, for a scenario that also opens connections of its own to the database (its URL).
pub fn run_with_url<F, Fut>(backend: Backend, scenario: F)
where
    F: FnOnce(Store, String) -> Fut,
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
        scenario(store, db.url().to_owned()).await;
    });
    drop(rt);
    drop(db);
}
