//! The paused phase of the many-batches mode (PostgreSQL only): N more batches, started with a
//! `schedule_at` an hour ahead so that they wait `scheduled`, then paused. Batches that wait
//! should cost the database (almost) nothing: the phase measures the bench database's
//! transaction rate in both situations.

use std::time::{Duration, Instant};

use crate::Args;
use crate::api::Api;
use crate::many::{act_all, counts, mb, per_instance, print_latency, submit};
use crate::server::Server;

/// How long the phase lets each situation settle before it samples, and how long it samples.
/// PostgreSQL 15 counts an idle connection's transactions only when it flushes its statistics,
/// up to 10 s after its last one: a shorter settle counts the burst of starting or pausing in
/// the sample.
const SETTLE: Duration = Duration::from_secs(15);
const SAMPLE: Duration = Duration::from_secs(10);

pub(crate) fn run(args: &Args, api: &Api, db: &str, servers: &[Server]) -> anyhow::Result<()> {
    let n = args.batches;
    let at = (chrono::Utc::now() + chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let deadline = Instant::now() + Duration::from_secs(args.deadline_s);
    // Their numbers follow those of the first N batches.
    let first_phone = (n * args.recipients_per_batch) as u64;
    let sub = submit(args, api, n, first_phone, Some(&at), deadline, &|_, _| {});
    sub.print("scheduled_", n);
    let stats = PgStats::connect(&args.pg, db)?;

    std::thread::sleep(SETTLE);
    println!(
        "db_transactions_per_second_scheduled: {:.1}",
        stats.rate(SAMPLE)?
    );

    let ids: Vec<String> = sub.started.iter().map(|(id, _)| id.clone()).collect();
    let (states, mut latencies, errors) = act_all(args, api, &ids, "pause");
    println!(
        "paused: {} of {} ({})",
        states.get("paused").copied().unwrap_or(0),
        ids.len(),
        counts(&states)
    );
    print_latency("pause_latency_ms", &mut latencies, errors);
    std::thread::sleep(SETTLE);
    println!(
        "db_transactions_per_second_paused: {:.1}",
        stats.rate(SAMPLE)?
    );
    println!(
        "rss_after_paused_phase_mb: {} (VmRSS per instance; VmHWM {})",
        per_instance(servers, |s| mb(s.rss_kb("VmRSS:"))),
        per_instance(servers, |s| mb(s.rss_kb("VmHWM:")))
    );
    Ok(())
}

/// Reads `xact_commit + xact_rollback` of the bench database from `pg_stat_database`.
///
/// The sampling connection is to the `postgres` maintenance database, not the bench database:
/// its own queries are counted on `postgres`'s row, so the bench database's figure holds only
/// the servers' transactions and nothing needs subtracting. Each sample is its own (autocommit)
/// transaction, so it reads fresh statistics rather than the session's cached snapshot. Backends
/// flush their counters to the shared statistics at most once a second while busy (and within
/// 10 s once idle, PostgreSQL 15), so a 10 s window is exact to about a second's worth of
/// transactions at either end.
struct PgStats {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    db: String,
}

impl PgStats {
    fn connect(pg: &str, db: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&format!("{pg}/postgres"), tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            anyhow::Ok(client)
        })?;
        Ok(PgStats {
            rt,
            client,
            db: db.to_string(),
        })
    }

    fn transactions(&self) -> anyhow::Result<i64> {
        let row = self.rt.block_on(self.client.query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            &[&self.db],
        ))?;
        Ok(row.get(0))
    }

    /// Transactions per second of the bench database over `window`.
    fn rate(&self, window: Duration) -> anyhow::Result<f64> {
        let (t0, x0) = (Instant::now(), self.transactions()?);
        std::thread::sleep(window);
        let x1 = self.transactions()?;
        Ok((x1 - x0) as f64 / t0.elapsed().as_secs_f64())
    }
}
