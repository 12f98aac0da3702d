//! The export mode (`--export`): one batch of `--recipients` generated recipients prepared and
//! delivered, then `GET /v1/batches/{id}/messages` with `Accept: text/csv` read to its end while
//! the server's resident memory is sampled every 10 ms; then the same with `status=failed`, and
//! once more by a client that reads slowly (which must not make the server buffer). It prints
//! the rows, bytes, time and rate of each export and the server's RSS before, during (by
//! quarter of the bytes read, and the peak) and after.
//!
//! ```sh
//! cargo run --release --bin bench -- --export --recipients 1000000 --store postgres
//! ```

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::server::{Server, rss_kb};
use crate::{Args, generate_csv, num_cpus};

/// How often the server's RSS is read during an export.
const SAMPLE: Duration = Duration::from_millis(10);

pub(crate) fn run(
    args: &Args,
    work: &std::path::Path,
    db_url: &str,
    tag: &str,
) -> anyhow::Result<()> {
    let n = args.recipients;
    let csv = work.join("recipients.csv");
    generate_csv(&csv, n)?;
    println!(
        "machine: {} cores, store {}, transport {}; export of a batch of {n} recipients",
        num_cpus(),
        args.store,
        args.transport
    );
    let mut server = Server::start(args, db_url, tag, usize::MAX)?;
    let http = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3600)))
        .build()
        .new_agent();
    let base = server.base.clone();
    let created: Value = http
        .post(&format!("{base}/v1/batches"))
        .send_json(json!({
            "name": "bench-export",
            "content": "Hi {{name}}, your order from {{city}} ships today: {{url}}",
            "url": "https://shop.example/o",
            "message_type": "marketing",
            "failure_threshold": 1,
        }))?
        .body_mut()
        .read_json()?;
    let id = created["id"].as_str().context("batch id")?.to_string();
    let upload = http
        .post(&format!("{base}/v1/batches/{id}/recipients"))
        .header("Content-Type", "text/csv")
        .send(std::fs::File::open(&csv)?)?;
    if upload.status() != 200 {
        bail!("upload answered {}", upload.status());
    }
    let started = Instant::now();
    let answer = http
        .post(&format!("{base}/v1/batches/{id}/start"))
        .send_empty()?;
    if answer.status() != 202 {
        bail!("start answered {}", answer.status());
    }
    let batch = loop {
        let batch: Value = http
            .get(&format!("{base}/v1/batches/{id}"))
            .call()?
            .body_mut()
            .read_json()?;
        match batch["state"].as_str() {
            Some("completed") => break batch,
            Some("failed" | "cancelled") => bail!("the batch ended {}", batch["state"]),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let results = &batch["results"];
    println!(
        "batch delivered in {:.1} s: {} messages ({} sent, {} failed)",
        started.elapsed().as_secs_f64(),
        results["valid"],
        results["sent"],
        results["failed"]
    );
    // Let the allocator settle after delivery before the baseline is read.
    std::thread::sleep(Duration::from_secs(2));
    let pid = server.pid();
    let expected = results["valid"].as_u64().unwrap_or(0);
    let failed = results["failed"].as_u64().unwrap_or(0);
    println!(
        "server_rss_before_export_mb: {:.1}",
        rss_kb(pid, "VmRSS:") as f64 / 1024.0
    );
    let path = format!("{base}/v1/batches/{id}/messages");
    export(&http, pid, "all", &path, expected, None)?;
    export(
        &http,
        pid,
        "failed",
        &format!("{path}?status=failed"),
        failed,
        None,
    )?;
    // A client that reads at about 4 MB/s, far below what the server can send.
    export(
        &http,
        pid,
        "slow_reader",
        &path,
        expected,
        Some(4 * 1024 * 1024),
    )?;
    println!(
        "server_rss_after_exports_mb: {:.1} (peak since start, VmHWM: {:.1})",
        rss_kb(pid, "VmRSS:") as f64 / 1024.0,
        rss_kb(pid, "VmHWM:") as f64 / 1024.0
    );
    server.stop();
    Ok(())
}

/// Reads one export to its end on a thread (at most `bytes_per_s` when given) while this one
/// samples the server's RSS; checks the row count and prints the figures.
fn export(
    http: &ureq::Agent,
    pid: u32,
    label: &str,
    url: &str,
    expected_rows: u64,
    bytes_per_s: Option<u64>,
) -> anyhow::Result<()> {
    let before = rss_kb(pid, "VmRSS:");
    let read = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let mut response = http.get(url).header("Accept", "text/csv").call()?;
    if response.status() != 200 {
        bail!("export {label} answered {}", response.status());
    }
    let mut body = response.body_mut().with_config().reader();
    let outcome = {
        let (read, done) = (&read, &done);
        std::thread::scope(|scope| -> anyhow::Result<(u64, Vec<(u64, u64)>)> {
            let reading = scope.spawn(move || -> anyhow::Result<u64> {
                let mut buf = vec![0u8; 64 * 1024];
                let mut lines = 0u64;
                loop {
                    let got = body.read(&mut buf)?;
                    if got == 0 {
                        break;
                    }
                    lines += buf[..got].iter().filter(|&&b| b == b'\n').count() as u64;
                    let total = read.fetch_add(got as u64, Ordering::Relaxed) + got as u64;
                    if let Some(rate) = bytes_per_s {
                        let due = Duration::from_secs_f64(total as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
                done.store(true, Ordering::Relaxed);
                Ok(lines)
            });
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) && !reading.is_finished() {
                samples.push((read.load(Ordering::Relaxed), rss_kb(pid, "VmRSS:")));
                std::thread::sleep(SAMPLE);
            }
            let lines = reading
                .join()
                .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
            Ok((lines, samples))
        })
    };
    let (lines, samples) = outcome?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = read.load(Ordering::Relaxed);
    let rows = lines.saturating_sub(1);
    if rows != expected_rows {
        bail!("export {label}: {rows} rows, expected {expected_rows}");
    }
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(before);
    let at = |quarter: u64| {
        samples
            .iter()
            .find(|s| s.0 >= bytes * quarter / 4)
            .or(samples.last())
            .map_or(before as f64 / 1024.0, |s| s.1 as f64 / 1024.0)
    };
    println!(
        "export_{label}: {rows} rows, {:.1} MB in {seconds:.2} s ({:.0} rows/s, {:.1} MB/s)",
        bytes as f64 / 1e6,
        rows as f64 / seconds,
        bytes as f64 / 1e6 / seconds
    );
    println!(
        "export_{label}_server_rss_mb: before {:.1}, at 25/50/75/100% of the bytes {:.1} / {:.1} / \
         {:.1} / {:.1}, peak {:.1} ({} samples)",
        before as f64 / 1024.0,
        at(1),
        at(2),
        at(3),
        at(4),
        peak as f64 / 1024.0,
        samples.len()
    );
    Ok(())
}
