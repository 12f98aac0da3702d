//! The many-batches mode (`--batches N`): K instances of the server on one database and one
//! queue; C client threads create N small batches of M inline recipients each and start them;
//! the benchmark waits until every batch is final (or the deadline), checks every batch's exact
//! counts, and prints the submit rate, the time to final, the API latency and each instance's
//! memory. On PostgreSQL it then measures the database's transaction rate with N more batches
//! `scheduled`, then `paused` (`paused.rs`). `--mixed-recipients R` times small batches submitted
//! while a large one is delivering instead (`mixed.rs`). Last, it stops the instances with
//! SIGTERM and times their exit.
//!
//! ```sh
//! cargo run --release --bin bench -- --batches 1000 --store postgres --transport rabbitmq
//! ```

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::api::Api;
use crate::cost::{Cpu, Statements};
use crate::server::{Server, Shutdown, rss_kb, shutdown_all};
use crate::{Args, num_cpus, percentile};

/// Lines of each instance's log copied to stderr (thousands of batches can mean thousands of
/// lines); the rest are only counted.
const LOG_LINES: usize = 10;

/// How often the benchmark looks at the batches while it waits.
pub(crate) const POLL: Duration = Duration::from_millis(200);

pub(crate) fn run(
    args: &Args,
    work: &std::path::Path,
    db_url: &str,
    pg_db: Option<&str>,
    tag: &str,
) -> anyhow::Result<()> {
    if args.clients == 0 || args.instances == 0 || args.recipients_per_batch == 0 {
        bail!("--clients, --instances and --recipients-per-batch must be above 0");
    }
    println!(
        "machine: {} cores, store {}, transport {}, {} instance(s), {} clients",
        num_cpus(),
        args.store,
        args.transport,
        args.instances,
        args.clients
    );
    println!(
        "batches: {} x {} recipients ({})",
        args.batches, args.recipients_per_batch, args.message_type
    );
    // One after the other: each runs the migrations before it listens.
    let mut servers = Vec::new();
    for _ in 0..args.instances {
        servers.push(Server::start(args, db_url, tag, LOG_LINES, &[])?);
    }
    println!(
        "idle_rss_mb: {}",
        per_instance(&servers, |s| mb(s.rss_kb("VmRSS:")))
    );
    let sampler = RssSampler::start(servers.iter().map(Server::pid).collect());
    let api = Api::new(servers.iter().map(|s| s.base.clone()).collect());

    let exact = if args.mixed_recipients > 0 {
        crate::mixed::run(args, work, &api)?
    } else {
        let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
        let exact = phases(args, &api, &pids, pg_db.map(|_| db_url))?;
        print_rss(&servers, &sampler);
        match pg_db {
            Some(db) if exact => {
                crate::paused::run(args, &api, db, &servers)?;
            }
            Some(_) => println!("paused_phase: skipped (not every batch completed exactly)"),
            None => println!("paused_phase: skipped (PostgreSQL only)"),
        }
        exact
    };
    if args.mixed_recipients > 0 {
        print_rss(&servers, &sampler);
    }
    drop(sampler);

    let figures: Vec<String> = shutdown_all(&mut servers, Duration::from_secs(60))
        .into_iter()
        .map(|s| match s {
            Shutdown::Exited(d, status) if status.success() => format!("{:.2}", d.as_secs_f64()),
            Shutdown::Exited(d, status) => format!("{:.2} ({status})", d.as_secs_f64()),
            Shutdown::Killed(d) => format!("killed after {:.0} s", d.as_secs_f64()),
        })
        .collect();
    println!("shutdown_seconds: {}", figures.join(", "));
    // Give the log readers a moment to count the last lines.
    std::thread::sleep(Duration::from_millis(100));
    println!(
        "server_log_lines: {} (warn/error/all per instance; the first {LOG_LINES} of each on stderr)",
        per_instance(&servers, |s| {
            let l = s.log();
            format!(
                "{}/{}/{}",
                l.warn.load(Ordering::Relaxed),
                l.error.load(Ordering::Relaxed),
                l.lines.load(Ordering::Relaxed)
            )
        })
    );
    for (i, s) in servers.iter().enumerate() {
        if let Ok(kinds) = s.log().kinds.lock() {
            for (kind, k) in kinds.iter() {
                println!("server_log_kind: instance {i}: {k} x {kind}");
            }
        }
    }
    if !exact {
        bail!("not every batch completed with exact counts");
    }
    Ok(())
}

/// Phases 1 and 2: submit, wait until every batch is final, verify; then the API latency, and
/// what submitting and delivering cost per batch (`cost.rs`; the statements on PostgreSQL,
/// `pg_db_url`).
fn phases(
    args: &Args,
    api: &Api,
    servers: &[u32],
    pg_db_url: Option<&str>,
) -> anyhow::Result<bool> {
    let n = args.batches;
    let statements = pg_db_url.and_then(Statements::connect);
    let mark = statements.as_ref().and_then(Statements::mark);
    let cpu = Cpu::now(servers);
    let deadline = Instant::now() + Duration::from_secs(args.deadline_s);
    let sub = submit(args, api, n, 0, None, deadline, &|_, _| {});
    sub.print("", n);

    let mut poll = api.fork();
    let mut final_at = None;
    if let Some(last) = sub.last_start {
        while Instant::now() < deadline {
            let round = Instant::now();
            if let Ok(false) = poll.any_non_final() {
                final_at = Some(Instant::now());
                break;
            }
            std::thread::sleep(POLL.saturating_sub(round.elapsed()));
        }
        if final_at.is_some() {
            Cpu::print_since(cpu, servers, n);
            if let Some(statements) = &statements {
                statements.print_since(mark, n);
            }
        }
        match final_at {
            Some(t) => println!("final_seconds: {:.2}", (t - last).as_secs_f64()),
            None => println!(
                "final_seconds: not reached ({} s deadline from the first create)",
                args.deadline_s
            ),
        }
    }
    let exact = verify(&mut poll, &sub.ids(), args.recipients_per_batch, n)?;
    let mut latencies = sub.latencies_ms;
    latencies.extend(&poll.latencies_ms);
    print_latency("api_latency_ms", &mut latencies, sub.errors + poll.errors);
    Ok(exact)
}

/// The `i`-th phone number of the run: `+8613800000000` and up, skipping the numbers whose last
/// four digits the simulator answers with a failure (`0001` permanent, `0002` transient), so
/// that every message is sent on its first attempt.
pub(crate) fn phone(i: u64) -> String {
    let r = i % 9998;
    let k = (i / 9998) * 10_000 + if r == 0 { 0 } else { r + 2 };
    format!("+86{}", 13_800_000_000 + k)
}

/// The body of small batch `i`, its recipients numbered from `first_phone + i * M`.
fn batch_body(args: &Args, i: usize, first_phone: u64, schedule_at: Option<&str>) -> Value {
    let m = args.recipients_per_batch;
    let recipients: Vec<Value> = (0..m)
        .map(|j| {
            json!({
                "phone": phone(first_phone + (i * m + j) as u64),
                "vars": {"name": "Ann", "code": format!("{:04}", j % 10_000)},
            })
        })
        .collect();
    let mut body = json!({
        "name": format!("many-{i}"),
        "content": "Hi {{name}}, your code is {{code}}",
        "message_type": args.message_type,
        "recipients": recipients,
    });
    if let Some(at) = schedule_at {
        body["schedule_at"] = json!(at);
    }
    body
}

/// What a submit phase did.
#[derive(Default)]
pub(crate) struct Submitted {
    /// Every batch whose start was answered 202: its id and when the answer came.
    pub(crate) started: Vec<(String, Instant)>,
    pub(crate) first_create: Option<Instant>,
    pub(crate) last_start: Option<Instant>,
    /// Created but not started (the start call failed).
    pub(crate) start_failed: usize,
    /// The states the start answers showed.
    pub(crate) start_states: BTreeMap<String, usize>,
    pub(crate) latencies_ms: Vec<f64>,
    pub(crate) errors: usize,
}

impl Submitted {
    pub(crate) fn ids(&self) -> HashSet<String> {
        self.started.iter().map(|(id, _)| id.clone()).collect()
    }

    /// `submitted`, `submit_seconds` and `batches_per_second`, each key after `prefix`.
    pub(crate) fn print(&self, prefix: &str, n: usize) {
        println!(
            "{prefix}submitted: {} of {n} (start answered: {}{})",
            self.started.len(),
            counts(&self.start_states),
            if self.start_failed > 0 {
                format!("; {} created but not started", self.start_failed)
            } else {
                String::new()
            }
        );
        if let (Some(first), Some(last)) = (self.first_create, self.last_start) {
            let s = (last - first).as_secs_f64();
            println!("{prefix}submit_seconds: {s:.2}");
            println!(
                "{prefix}batches_per_second: {:.1}",
                self.started.len() as f64 / s.max(f64::EPSILON)
            );
        }
    }
}

/// `args.clients` threads create and start `count` batches, taking their numbers from a shared
/// counter, until all are submitted or `deadline` passes. `on_started` is called with each
/// batch's id as soon as its start is answered.
pub(crate) fn submit(
    args: &Args,
    api: &Api,
    count: usize,
    first_phone: u64,
    schedule_at: Option<&str>,
    deadline: Instant,
    on_started: &(dyn Fn(&str, Instant) + Sync),
) -> Submitted {
    let counter = AtomicUsize::new(0);
    let parts: Vec<Submitted> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..args.clients)
            .map(|_| {
                let counter = &counter;
                s.spawn(move || {
                    let mut api = api.fork();
                    let mut out = Submitted::default();
                    while Instant::now() < deadline {
                        let i = counter.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break;
                        }
                        let body = batch_body(args, i, first_phone, schedule_at);
                        let t = Instant::now();
                        out.first_create = Some(out.first_create.map_or(t, |f| f.min(t)));
                        let Ok(id) = api.create(&body) else { continue };
                        match api.action(&id, "start") {
                            Ok(batch) => {
                                let answered = Instant::now();
                                on_started(&id, answered);
                                let state = batch["state"].as_str().unwrap_or("?").to_string();
                                *out.start_states.entry(state).or_default() += 1;
                                out.last_start = Some(answered);
                                out.started.push((id, answered));
                            }
                            Err(_) => out.start_failed += 1,
                        }
                    }
                    out.latencies_ms = std::mem::take(&mut api.latencies_ms);
                    out.errors = api.errors;
                    out
                })
            })
            .collect();
        workers.into_iter().filter_map(|w| w.join().ok()).collect()
    });
    let mut all = Submitted::default();
    for p in parts {
        all.started.extend(p.started);
        all.first_create = match (all.first_create, p.first_create) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        all.last_start = all.last_start.max(p.last_start);
        all.start_failed += p.start_failed;
        for (state, k) in p.start_states {
            *all.start_states.entry(state).or_default() += k;
        }
        all.latencies_ms.extend(p.latencies_ms);
        all.errors += p.errors;
    }
    all
}

/// `args.clients` threads send `action` to every batch of `ids`: the states the answers
/// showed, the calls' latencies and the failed calls.
pub(crate) fn act_all(
    args: &Args,
    api: &Api,
    ids: &[String],
    action: &str,
) -> (BTreeMap<String, usize>, Vec<f64>, usize) {
    let counter = AtomicUsize::new(0);
    let states = Mutex::new(BTreeMap::new());
    let latencies = Mutex::new(Vec::new());
    let errors = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..args.clients {
            s.spawn(|| {
                let mut api = api.fork();
                let mut mine = BTreeMap::<String, usize>::new();
                loop {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = ids.get(i) else { break };
                    if let Ok(batch) = api.action(id, action) {
                        let state = batch["state"].as_str().unwrap_or("?").to_string();
                        *mine.entry(state).or_default() += 1;
                    }
                }
                if let Ok(mut all) = states.lock() {
                    for (state, k) in mine {
                        *all.entry(state).or_default() += k;
                    }
                }
                if let Ok(mut all) = latencies.lock() {
                    all.extend(&api.latencies_ms);
                }
                errors.fetch_add(api.errors, Ordering::Relaxed);
            });
        }
    });
    (
        states.into_inner().unwrap_or_default(),
        latencies.into_inner().unwrap_or_default(),
        errors.into_inner(),
    )
}

/// Pages through every batch and checks those of `ids`: each must be `completed` with `m`
/// valid and `m` sent. Prints `completed`, `exact_counts` and, unless all completed, the counts
/// by state (`n` is how many batches were meant; those never started count as not submitted).
pub(crate) fn verify(
    api: &mut Api,
    ids: &HashSet<String>,
    m: usize,
    n: usize,
) -> anyhow::Result<bool> {
    let mut by_state = BTreeMap::<String, usize>::new();
    let (mut completed, mut exact, mut seen) = (0, 0, 0);
    for b in api.list_all(None)? {
        if !b["id"].as_str().is_some_and(|id| ids.contains(id)) {
            continue;
        }
        seen += 1;
        let state = b["state"].as_str().unwrap_or("?");
        *by_state.entry(state.to_string()).or_default() += 1;
        if state == "completed" {
            completed += 1;
            let r = &b["results"];
            if r["sent"].as_u64() == Some(m as u64) && r["valid"].as_u64() == Some(m as u64) {
                exact += 1;
            }
        }
    }
    println!("completed: {completed} of {n}");
    println!("exact_counts: {exact} of {n}");
    if completed < n {
        if seen < n {
            by_state.insert("not submitted".into(), n - seen);
        }
        println!("states: {}", counts(&by_state));
    }
    Ok(exact == n)
}

/// `preparing 3, delivering 5`.
pub(crate) fn counts(map: &BTreeMap<String, usize>) -> String {
    let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

pub(crate) fn print_latency(key: &str, samples: &mut [f64], errors: usize) {
    println!(
        "{key}: p50 {:.1} p99 {:.1} max {:.1} ({} calls, {errors} failed)",
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        percentile(samples, 100.0),
        samples.len()
    );
}

pub(crate) fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// One figure per instance, space-separated.
pub(crate) fn per_instance(servers: &[Server], f: impl Fn(&Server) -> String) -> String {
    servers.iter().map(f).collect::<Vec<_>>().join(" ")
}

fn print_rss(servers: &[Server], sampler: &RssSampler) {
    println!(
        "peak_rss_mb: {} (VmHWM per instance)",
        per_instance(servers, |s| mb(s.rss_kb("VmHWM:")))
    );
    println!(
        "sampled_rss_max_mb: {} (VmRSS every 200 ms)",
        sampler
            .max_kb()
            .into_iter()
            .map(mb)
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// Reads each instance's `VmRSS` every 200 ms and keeps the largest.
struct RssSampler {
    stop: Arc<AtomicBool>,
    max: Arc<Vec<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
        let thread = {
            let (stop, max) = (stop.clone(), max.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (pid, m) in pids.iter().zip(max.iter()) {
                        m.fetch_max(rss_kb(*pid, "VmRSS:"), Ordering::Relaxed);
                    }
                    std::thread::sleep(POLL);
                }
            })
        };
        RssSampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn max_kb(&self) -> Vec<u64> {
        self.max.iter().map(|m| m.load(Ordering::Relaxed)).collect()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
