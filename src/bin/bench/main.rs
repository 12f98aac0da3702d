//! The end-to-end benchmark: generates a realistic CSV, starts the real server as its own
//! process, uploads, starts, pauses and resumes, waits for `completed`, and prints one line per
//! figure — next to the ceiling of this machine measured in the same run (raw `COPY` of as many
//! message rows, and raw `UPDATE` passes over them in chunks of the task size).
//!
//! ```sh
//! cargo run --release --bin bench -- --recipients 1000000 --store postgres --transport rabbitmq
//! ```
//!
//! `--provider smpp` sends the batch through an SMPP account on a local SMSC (node-smpp's server,
//! `tests/smsc/`) that sends a receipt for every message, and reports receipts too, beside the
//! SMSC's own ceiling measured in the same run:
//!
//! ```sh
//! cargo run --release --bin bench -- --recipients 100000 --provider smpp --pauses 0
//! ```
//!
//! `--batches N` selects the many-batches mode instead (see `many.rs`): N small batches created
//! and started by concurrent clients, against one or more instances. `--export` selects the
//! export mode (`export.rs`): one batch delivered, then its messages exported as CSV while the
//! server's memory is sampled.

mod api;
mod ceiling;
mod cost;
mod export;
mod many;
mod mixed;
mod paused;
mod server;
mod smpp;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};

use ceiling::measure_ceiling;
use server::{Server, pg_execute};

#[derive(Debug, Parser)]
#[command(about = "smsbatch end-to-end benchmark")]
struct Args {
    /// Recipients in the generated CSV.
    #[arg(long, default_value_t = 100_000)]
    recipients: usize,
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "postgres")]
    store: String,
    /// `in_process` or `rabbitmq`.
    #[arg(long, default_value = "in_process")]
    transport: String,
    /// PostgreSQL server (without database) where the benchmark creates its database.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg: String,
    /// Simulated provider latency per message, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Pause/resume cycles during delivery (each gives one pause-latency sample).
    #[arg(long, default_value_t = 5)]
    pauses: usize,
    /// `simulator`, or `smpp`: an account on a local SMSC (node-smpp's server, with receipts).
    #[arg(long, default_value = "simulator")]
    provider: String,
    /// With `--provider smpp`: sessions per instance.
    #[arg(long, default_value_t = 2)]
    binds: usize,
    /// With `--provider smpp`: unanswered submits per session.
    #[arg(long, default_value_t = 50)]
    window: usize,
    /// Skip measuring the machine's ceiling.
    #[arg(long)]
    no_ceiling: bool,
    /// Many-batches mode: create and start this many small batches (0: the one-batch benchmark).
    #[arg(long, default_value_t = 0)]
    batches: usize,
    /// Many-batches mode: inline recipients per batch (all valid, distinct numbers).
    #[arg(long, default_value_t = 10)]
    recipients_per_batch: usize,
    /// Many-batches mode: client threads calling the API.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Many-batches mode: server processes on the same database and queue; the clients spread
    /// their calls over them round-robin.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Many-batches mode: seconds from the first create after which the benchmark stops
    /// submitting and waiting, and reports how far the batches got.
    #[arg(long, default_value_t = 600)]
    deadline_s: u64,
    /// Many-batches mode: above 0, first time one marketing batch of this many CSV recipients
    /// alone, then submit the small batches while a second one is delivering.
    #[arg(long, default_value_t = 0)]
    mixed_recipients: usize,
    /// Mixed mode: how the small batches are watched. `timestamps`: only the large batch is
    /// polled, and each small batch's time is read afterwards from its own `started_at` and
    /// `finished_at`. `lists`: every non-final batch is listed every 200 ms, and a small batch's
    /// time runs from its start answer to the round that saw it final (what the figures before
    /// 2026-12-07's third session measured; the lists cost the server while it is measured).
    #[arg(long, default_value = "timestamps", value_parser = ["timestamps", "lists"])]
    mixed_watch: String,
    /// Mixed mode: mixed runs, each followed by a large batch alone (the growth of each is
    /// against the mean of the runs alone before and after it; above 1, their median too).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    mixed_rounds: u32,
    /// Many-batches mode: `message_type` of the small batches.
    #[arg(long, default_value = "transactional")]
    message_type: String,
    /// Export mode: deliver one batch of `--recipients`, then export its messages as CSV
    /// (all, the failed, and all again by a slow reader) while sampling the server's RSS.
    #[arg(long)]
    export: bool,
    /// Internal: run the server in this process (the benchmark starts itself this way).
    #[arg(long, hide = true)]
    serve: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve {
        smsbatch::memory::tune_allocator();
        let settings = smsbatch::config::Settings::load()?;
        let traces = smsbatch::telemetry::init_tracing(&settings.log)?;
        smsbatch::store::migrate(settings.database.url.expose())?;
        let served = actix::System::new().block_on(smsbatch::server::serve(settings));
        traces.shut_down(std::time::Duration::from_secs(5));
        return served;
    }
    run(args)
}

fn run(args: Args) -> anyhow::Result<()> {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let work = std::env::temp_dir().join(format!("smsbatch-bench-{tag}"));
    std::fs::create_dir_all(&work)?;
    let (db_url, pg_db) = match args.store.as_str() {
        "sqlite" => (
            format!("sqlite://{}", work.join("bench.db").display()),
            None,
        ),
        "postgres" => {
            let name = format!("smsbatch_bench_{tag}");
            pg_execute(
                &format!("{}/postgres", args.pg),
                &format!("CREATE DATABASE {name}"),
            )?;
            (format!("{}/{name}", args.pg), Some(name))
        }
        other => bail!("--store must be sqlite or postgres, not {other}"),
    };
    let result = if args.export {
        export::run(&args, &work, &db_url, &tag)
    } else if args.batches > 0 {
        many::run(&args, &work, &db_url, pg_db.as_deref(), &tag)
    } else {
        bench(&args, &work, &db_url, &tag)
    };
    if let Some(name) = pg_db {
        let _ = pg_execute(
            &format!("{}/postgres", args.pg),
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn bench(args: &Args, work: &std::path::Path, db_url: &str, tag: &str) -> anyhow::Result<()> {
    let n = args.recipients;
    let csv = work.join("recipients.csv");
    let generated = generate_csv(&csv, n)?;
    println!(
        "machine: {} cores, store {}, transport {}",
        num_cpus(),
        args.store,
        args.transport
    );
    println!(
        "recipients: {n} ({} invalid, {} duplicates, {} UCS-2)",
        generated.invalid, generated.duplicates, generated.ucs2
    );

    // The ceiling first, on the quiet database: measured after the run it would share the
    // machine with the autovacuum of the run's million updated rows, and read lower.
    let ceiling = if !args.no_ceiling && args.store == "postgres" {
        smsbatch::store::migrate(db_url)?;
        Some(measure_ceiling(db_url, n, 500)?)
    } else {
        None
    };
    // With SMPP, the SMSC's own ceiling first (on an SMSC of its own), then the SMSC the
    // server sends to.
    let smsc = match args.provider.as_str() {
        "simulator" => None,
        "smpp" => {
            if !args.no_ceiling {
                let alone = smpp::Smsc::start()?;
                let c = alone.ceiling(n, args.binds, args.window)?;
                let rate = |count: &str, secs: &str| {
                    c[count].as_f64().unwrap_or(0.0) / c[secs].as_f64().unwrap_or(f64::MAX)
                };
                println!(
                    "smsc_ceiling: {:.0} submits/s, {:.0} receipts/s ({n} messages, {} sessions \
                     of window {}, node-smpp's client alone)",
                    rate("submits", "submit_seconds"),
                    rate("receipts", "receipt_seconds"),
                    args.binds,
                    args.window
                );
            }
            Some(smpp::Smsc::start()?)
        }
        other => bail!("--provider must be simulator or smpp, not {other}"),
    };
    let env = smsc
        .as_ref()
        .map(|s| s.env(args.binds, args.window))
        .unwrap_or_default();
    let mut server = Server::start(args, db_url, tag, usize::MAX, &env)?;
    let idle_rss = server.rss_kb("VmRSS:");
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .new_agent();
    let base = server.base.clone();

    let provider = if smsc.is_some() { "bench" } else { "simulator" };
    let body = json!({
        "name": "bench",
        "content": "Hi {{name}}, your order from {{city}} ships today: {{url}}",
        "url": "https://shop.example/o",
        "message_type": "marketing",
        "provider": provider,
    });
    let created: Value = http
        .post(&format!("{base}/v1/batches"))
        .send_json(&body)?
        .body_mut()
        .read_json()?;
    let id = created["id"].as_str().context("batch id")?.to_string();

    let t0 = Instant::now();
    let upload = http
        .post(&format!("{base}/v1/batches/{id}/recipients"))
        .header("Content-Type", "text/csv")
        .send(File::open(&csv)?)?;
    if upload.status() != 200 {
        bail!("upload answered {}", upload.status());
    }
    let upload_s = t0.elapsed().as_secs_f64();
    // Each figure is printed as soon as it is known, so that a run cut short still reports.
    println!("upload_seconds: {upload_s:.2}");

    let t_start = Instant::now();
    post(&http, &format!("{base}/v1/batches/{id}/start"))?;
    let mut get_ms: Vec<f64> = Vec::new();
    let mut pause_ms: Vec<f64> = Vec::new();
    let mut paused_for = Duration::ZERO;
    let mut peak_rss = 0;
    let mut prepared_at = None;
    let mut pauses_left = args.pauses;
    let batch = loop {
        let t = Instant::now();
        let batch: Value = http
            .get(&format!("{base}/v1/batches/{id}"))
            .call()?
            .body_mut()
            .read_json()?;
        get_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        peak_rss = peak_rss.max(server.rss_kb("VmRSS:"));
        let state = batch["state"].as_str().unwrap_or("");
        if prepared_at.is_none() && state == "delivering" {
            let prep_s = t_start.elapsed().as_secs_f64();
            println!("preparation_rows_per_second: {:.0}", n as f64 / prep_s);
            prepared_at = Some(prep_s);
        }
        if matches!(state, "completed" | "failed" | "cancelled") {
            break batch;
        }
        let valid = batch["results"]["valid"].as_f64().unwrap_or(0.0);
        let sent = batch["results"]["sent"].as_f64().unwrap_or(0.0);
        // Pause at evenly spread points of the delivery, measure, resume.
        if state == "delivering"
            && pauses_left > 0
            && sent > valid * (args.pauses + 1 - pauses_left) as f64 / (args.pauses + 2) as f64
        {
            pauses_left -= 1;
            let paused = Instant::now();
            pause_ms.push(measure_pause(&http, &base, &id)?);
            post(&http, &format!("{base}/v1/batches/{id}/resume"))?;
            paused_for += paused.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let end_to_end = t0.elapsed().as_secs_f64();
    let total = t_start.elapsed().as_secs_f64();
    // With receipts: until none is awaited (every `sent` message delivered or failed).
    let batch = match &smsc {
        Some(_) => wait_for_receipts(&http, &base, &id, batch)?,
        None => batch,
    };
    let receipts_done = t_start.elapsed().as_secs_f64();
    peak_rss = peak_rss.max(server.rss_kb("VmHWM:"));
    let metrics = http
        .get(&format!("{base}/metrics"))
        .call()?
        .body_mut()
        .read_to_string()?;
    server.stop();

    let results = &batch["results"];
    let valid = results["valid"].as_f64().unwrap_or(0.0);
    let prep_s = prepared_at.unwrap_or(total);
    // Delivery time excludes the pauses the benchmark itself made.
    let paused_s = paused_for.as_secs_f64();
    let delivery_s = (total - prep_s - paused_s).max(f64::EPSILON);
    println!("state: {} results: {}", batch["state"], results);
    println!("delivery_messages_per_second: {:.0}", valid / delivery_s);
    if smsc.is_some() {
        let settled = results["delivered"].as_f64().unwrap_or(0.0)
            + results["failed"].as_f64().unwrap_or(0.0);
        println!(
            "receipts: {settled:.0} settled, the last {:.2} s after `completed`; \
             receipt_messages_per_second: {:.0} (from the start of delivery to the last receipt)",
            receipts_done - total,
            settled / (receipts_done - prep_s - paused_s).max(f64::EPSILON)
        );
        // What the receipts did on arrival: `kept` ones came before their message's id was
        // stored, and were applied later.
        let by = |outcome: &str| {
            metric(
                &metrics,
                &format!("smsbatch_receipts_total{{outcome=\"{outcome}\"}}"),
            )
        };
        println!(
            "receipts_by_outcome: delivered {:.0}, failed {:.0}, kept {:.0}, repeated {:.0}",
            by("delivered"),
            by("failed"),
            by("kept"),
            by("repeated")
        );
    }
    println!(
        "end_to_end_seconds: {end_to_end:.2} (of which {paused_s:.1} s paused by the benchmark)"
    );
    println!("server_idle_rss_mb: {:.1}", idle_rss as f64 / 1024.0);
    println!("server_peak_rss_mb: {:.1}", peak_rss as f64 / 1024.0);
    println!(
        "get_batch_ms: p50 {:.1} p99 {:.1} max {:.1} ({} samples)",
        percentile(&mut get_ms, 50.0),
        percentile(&mut get_ms, 99.0),
        percentile(&mut get_ms, 100.0),
        get_ms.len()
    );
    let stage = |name: &str| {
        metric(
            &metrics,
            &format!("smsbatch_preparation_seconds_total{{stage=\"{name}\"}}"),
        )
    };
    println!(
        "preparation_stages: reading {:.1} s, preparing {:.1} s, writing {:.1} s (summed over \
         the writers) in {prep_s:.1} s",
        stage("reading"),
        stage("preparing"),
        stage("writing")
    );
    if !pause_ms.is_empty() {
        println!(
            "pause_to_last_send_ms: p50 {:.0} p99 {:.0} ({} pauses)",
            percentile(&mut pause_ms, 50.0),
            percentile(&mut pause_ms, 99.0),
            pause_ms.len()
        );
    }
    if let Some(ceiling) = ceiling {
        println!(
            "ceiling_copy_rows_per_second: {:.0} (raw COPY of {n} message rows)",
            ceiling.copy_rows_per_s
        );
        println!(
            "ceiling_update_rows_per_second: {:.0} (raw UPDATE passes in chunks of 500)",
            ceiling.update_rows_per_s
        );
        println!(
            "ratio_preparation_to_copy: {:.2}",
            (n as f64 / prep_s) / ceiling.copy_rows_per_s
        );
        println!(
            "ratio_delivery_to_update: {:.2}",
            (valid / delivery_s) / ceiling.update_rows_per_s
        );
    }
    Ok(())
}

/// Polls the batch until no message waits for its receipt (`results.sent` is 0), ten minutes at
/// most; returns it as it then is.
fn wait_for_receipts(
    http: &ureq::Agent,
    base: &str,
    id: &str,
    mut batch: Value,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while batch["results"]["sent"].as_u64().unwrap_or(0) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        batch = http
            .get(&format!("{base}/v1/batches/{id}"))
            .call()?
            .body_mut()
            .read_json()?;
    }
    Ok(batch)
}

/// Pauses, then watches the sent count: the time from the pause answer until it last moved is
/// the time until the last provider call of the batch (give or take one poll).
fn measure_pause(http: &ureq::Agent, base: &str, id: &str) -> anyhow::Result<f64> {
    post(http, &format!("{base}/v1/batches/{id}/pause"))?;
    let answered = Instant::now();
    let mut last = sent_of(http, base, id)?;
    let mut last_change = answered;
    while last_change.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
        let now = sent_of(http, base, id)?;
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    Ok((last_change - answered).as_secs_f64() * 1000.0)
}

/// The value of one series in a Prometheus text exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn sent_of(http: &ureq::Agent, base: &str, id: &str) -> anyhow::Result<f64> {
    let batch: Value = http
        .get(&format!("{base}/v1/batches/{id}"))
        .call()?
        .body_mut()
        .read_json()?;
    let r = &batch["results"];
    Ok(r["sent"].as_f64().unwrap_or(0.0) + r["failed"].as_f64().unwrap_or(0.0))
}

fn post(http: &ureq::Agent, url: &str) -> anyhow::Result<()> {
    let answer = http.post(url).send_empty()?;
    if answer.status().as_u16() >= 300 {
        bail!("POST {url} answered {}", answer.status());
    }
    Ok(())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

struct Generated {
    invalid: usize,
    duplicates: usize,
    ucs2: usize,
}

/// 1% invalid numbers, 1% duplicates, half the names in Chinese (their messages are UCS-2).
fn generate_csv(path: &PathBuf, n: usize) -> anyhow::Result<Generated> {
    let mut out = BufWriter::new(File::create(path)?);
    writeln!(out, "phone,name,city")?;
    let cities = ["Shanghai", "Beijing", "Shenzhen", "Chengdu"];
    let names_zh = ["王芳", "李娜", "张伟", "刘洋"];
    let names_en = ["Ann", "Bo", "Cy", "Di"];
    let mut g = Generated {
        invalid: 0,
        duplicates: 0,
        ucs2: 0,
    };
    for i in 0..n {
        let phone = if i % 100 == 50 {
            g.invalid += 1;
            format!("12{i}")
        } else if i % 100 == 99 {
            g.duplicates += 1;
            format!("+86138{:08}", 10_000_000 + i - 1)
        } else {
            format!("+86138{:08}", 10_000_000 + i)
        };
        let name = if i % 2 == 0 {
            g.ucs2 += 1;
            names_zh[i % 4]
        } else {
            names_en[i % 4]
        };
        writeln!(out, "{phone},{name},{}", cities[i % 4])?;
    }
    out.flush()?;
    Ok(g)
}
