//! The mixed mode of the many-batches benchmark (`--mixed-recipients R`): one marketing batch of
//! R CSV recipients timed alone, then a second one, and while it is `delivering` the N small
//! transactional batches: how long each small batch takes from its start to `completed` while
//! the large one delivers, and how much the small ones slow the large one down. Only the large
//! batch is polled while it runs, and the small batches' times are the server's own stamps
//! (`--mixed-watch lists` instead lists every non-final batch every 200 ms, which the server pays
//! for in the middle of what is measured). A third
//! large batch, alone again afterwards, shows how much of the difference is the database having
//! grown; the machine's busy CPU time during each large batch shows what the small ones cost.
//! `--mixed-rounds K` repeats the mixed run K times, each followed by a large batch alone, and
//! prints each run's growth against the mean of the runs alone on either side, and the median.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};

use crate::api::Api;
use crate::many::{POLL, print_latency, submit, verify};
use crate::{Args, generate_csv, percentile};

/// Runs the mode; whether every small batch completed with exact counts.
pub(crate) fn run(args: &Args, work: &std::path::Path, api: &Api) -> anyhow::Result<bool> {
    let r = args.mixed_recipients;
    let csv = work.join("large.csv");
    let generated = generate_csv(&csv, r)?;
    println!(
        "large_recipients: {r} ({} invalid, {} duplicates)",
        generated.invalid, generated.duplicates
    );
    // The large batches' calls are not part of the API latency figure.
    let mut ctl = api.fork();
    let limit = Duration::from_secs(args.deadline_s);

    // Each mixed run between two runs alone: its growth is against their mean, so that a
    // machine whose speed drifts over the minutes of a round weighs on both sides.
    let mut before = large_alone(&mut ctl, &csv, "large_alone", limit)?;
    let (mut growths, mut exact) = (Vec::new(), true);
    for round in 1..=args.mixed_rounds {
        if args.mixed_rounds > 1 {
            println!("mixed_round: {round} of {}", args.mixed_rounds);
        }
        let (mixed, all_exact) = mixed_round(args, api, &mut ctl, &csv, limit)?;
        exact &= all_exact;
        let after = large_alone(&mut ctl, &csv, "large_alone_again", limit)?;
        if let Some(mixed) = mixed {
            let growth = (mixed / ((before + after) / 2.0) - 1.0) * 100.0;
            println!(
                "large_growth_percent: {growth:+.1} (against the mean of the runs alone before \
                 and after; {:+.1} against the one before)",
                (mixed / before - 1.0) * 100.0
            );
            growths.push(growth);
        }
        before = after;
    }
    if growths.len() > 1 {
        let all: Vec<String> = growths.iter().map(|g| format!("{g:+.1}")).collect();
        growths.sort_by(f64::total_cmp);
        let mid = growths.len() / 2;
        let median = if growths.len() % 2 == 1 {
            growths[mid]
        } else {
            (growths[mid - 1] + growths[mid]) / 2.0
        };
        println!(
            "large_growth_percent_median: {median:+.1} ({})",
            all.join(", ")
        );
    }
    Ok(exact)
}

/// One large batch delivering while the small ones are submitted and run: its seconds from
/// start to final (`None` if not final by the deadline), and whether every small batch
/// completed with exact counts.
fn mixed_round(
    args: &Args,
    api: &Api,
    ctl: &mut Api,
    csv: &std::path::Path,
    limit: Duration,
) -> anyhow::Result<(Option<f64>, bool)> {
    let n = args.batches;
    let large = large_batch(ctl, csv, "large-mixed")?;
    ctl.action(&large, "start")?;
    let large_started = Instant::now();
    let cpu_at_start = machine_busy_seconds();
    let batch = wait_for(ctl, &large, large_started + limit, &mut Vec::new(), |s| {
        s == "delivering" || is_final(s)
    })?;
    if batch["state"] != "delivering" {
        bail!(
            "the second large batch went {} before it was seen delivering",
            batch["state"]
        );
    }
    println!(
        "large_mixed_delivering_after_seconds: {:.2}",
        large_started.elapsed().as_secs_f64()
    );

    let deadline = Instant::now() + limit;
    let lists = args.mixed_watch == "lists";
    let registered = Mutex::new(vec![(large.clone(), large_started)]);
    let submitted = AtomicBool::new(false);
    let (sub, tracked) = std::thread::scope(|s| {
        let tracker = s.spawn(|| {
            if lists {
                track(
                    api.fork(),
                    &registered,
                    &submitted,
                    &large,
                    deadline,
                    cpu_at_start,
                )
            } else {
                track_large(
                    api.fork(),
                    &submitted,
                    (&large, large_started),
                    deadline,
                    cpu_at_start,
                )
            }
        });
        let sub = submit(args, api, n, 0, None, deadline, &|id, t| {
            if let Ok(mut r) = registered.lock() {
                r.push((id.to_string(), t));
            }
        });
        submitted.store(true, Ordering::SeqCst);
        sub.print("", n);
        (sub, tracker.join())
    });
    let Ok(mut tracked) = tracked else {
        bail!("the tracker panicked")
    };

    let large_final = ctl.get(&large)?;
    println!(
        "large_mixed_state: {} (results {})",
        large_final["state"], large_final["results"]
    );
    let (mut small_ms, last_start_to_final) = if lists {
        let mut small_ms: Vec<f64> = Vec::new();
        let mut final_at = None::<Instant>;
        for (id, started) in &sub.started {
            if let Some(d) = tracked.finished.get(id) {
                small_ms.push(d.as_secs_f64() * 1000.0);
                final_at = final_at.max(Some(*started + *d));
            }
        }
        let span = final_at
            .zip(sub.last_start)
            .map(|(f, last)| (f - last).as_secs_f64());
        (small_ms, span)
    } else {
        let times = server_times(&mut tracked.api, &sub.ids())?;
        if let Some(window) = times.window {
            print_large_rates(&tracked.progress, window);
        }
        (times.small_ms, times.last_start_to_final)
    };
    match last_start_to_final {
        Some(span) if small_ms.len() == sub.started.len() => {
            println!("final_seconds: {span:.2}")
        }
        _ => println!(
            "final_seconds: not reached ({} of {} small batches seen final within {} s)",
            small_ms.len(),
            sub.started.len(),
            args.deadline_s
        ),
    }
    let over = small_ms.iter().filter(|&&ms| ms > 10_000.0).count();
    println!(
        "small_start_to_completed_ms: p50 {:.0} p99 {:.0} max {:.0} ({} batches)",
        percentile(&mut small_ms, 50.0),
        percentile(&mut small_ms, 99.0),
        percentile(&mut small_ms, 100.0),
        small_ms.len()
    );
    println!("small_over_10s: {over} of {}", sub.started.len());
    println!(
        "poll_round_ms: p50 {:.1} max {:.1} ({} rounds)",
        percentile(&mut tracked.rounds_ms, 50.0),
        percentile(&mut tracked.rounds_ms, 100.0),
        tracked.rounds_ms.len()
    );

    let mut check = tracked.api.fork();
    let exact = verify(&mut check, &sub.ids(), args.recipients_per_batch, n)?;
    let mut latencies = sub.latencies_ms;
    latencies.extend(&tracked.api.latencies_ms);
    latencies.extend(&check.latencies_ms);
    print_latency(
        "api_latency_ms",
        &mut latencies,
        sub.errors + tracked.api.errors + check.errors,
    );
    Ok((tracked.large_seconds, exact))
}

/// The small batches as the server stamped them (`started_at`, `finished_at`).
struct ServerTimes {
    /// Each final one's time from its start to its end, in ms.
    small_ms: Vec<f64>,
    /// Seconds from the last start to the last end.
    last_start_to_final: Option<f64>,
    /// From the first start to the last end.
    window: Option<(Stamp, Stamp)>,
}

type Stamp = chrono::DateTime<chrono::Utc>;

/// Each final small batch's time from its start to its end as the server stamped them.
fn server_times(api: &mut Api, ids: &HashSet<String>) -> anyhow::Result<ServerTimes> {
    let at = |b: &Value, key: &str| {
        b[key]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&chrono::Utc))
    };
    let (mut small_ms, mut last_start, mut last_end) = (Vec::new(), None, None);
    let mut first_start: Option<Stamp> = None;
    for b in api.list_all(None)? {
        if !b["id"].as_str().is_some_and(|id| ids.contains(id)) {
            continue;
        }
        let Some(started) = at(&b, "started_at") else {
            continue;
        };
        last_start = last_start.max(Some(started));
        first_start = Some(first_start.map_or(started, |f| f.min(started)));
        if let Some(finished) =
            at(&b, "finished_at").filter(|_| is_final(b["state"].as_str().unwrap_or("")))
        {
            small_ms.push((finished - started).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            last_end = last_end.max(Some(finished));
        }
    }
    let span = last_end
        .zip(last_start)
        .map(|(end, start)| (end - start).num_microseconds().unwrap_or(0) as f64 / 1e6);
    Ok(ServerTimes {
        small_ms,
        last_start_to_final: span,
        window: first_start.zip(last_end),
    })
}

/// The large batch's messages done (sent, delivered, failed) per second while the small batches
/// ran (from the first one's start to the last one's end), after, and over its whole delivery,
/// from the benchmark's polls of it: whether it slowed down in proportion to the machine's CPU
/// they took, or stalled.
fn print_large_rates(progress: &[(Stamp, i64)], (from, to): (Stamp, Stamp)) {
    // The last poll at or before `t` (the first poll if none was).
    let at = |t: Stamp| {
        progress
            .iter()
            .rev()
            .find(|(when, _)| *when <= t)
            .or(progress.first())
            .copied()
    };
    let rate = |a: Option<(Stamp, i64)>, b: Option<(Stamp, i64)>| match (a, b) {
        (Some(a), Some(b)) => pace(a, b),
        _ => "-".to_string(),
    };
    println!(
        "large_mixed_done_per_second: while the small batches ran {} ({:.1} s), after {}, \
         from the first message done to the end {}",
        rate(at(from), at(to)),
        (to - from).num_milliseconds() as f64 / 1000.0,
        rate(at(to), progress.last().copied()),
        delivery_rate(progress)
    );
}

/// Messages done per second from the first poll that saw one done to the last poll.
fn delivery_rate(progress: &[(Stamp, i64)]) -> String {
    match (progress.iter().find(|(_, done)| *done > 0), progress.last()) {
        (Some(&a), Some(&b)) => pace(a, b),
        _ => "-".to_string(),
    }
}

/// Messages done per second between two polls ("-" unless the second is later).
fn pace((ta, da): (Stamp, i64), (tb, db): (Stamp, i64)) -> String {
    if tb <= ta {
        return "-".to_string();
    }
    let seconds = (tb - ta).num_milliseconds() as f64 / 1000.0;
    format!("{:.0}", (db - da) as f64 / seconds)
}

/// The messages a batch has done (sent, delivered, failed), as its answer counts them.
fn done(batch: &Value) -> i64 {
    ["sent", "delivered", "failed"]
        .iter()
        .map(|k| batch["results"][k].as_i64().unwrap_or(0))
        .sum()
}

/// Polls the large batch every 200 ms until it is final, printing `large_mixed_seconds` then;
/// once submitting is over and the large batch is final, polls until no batch is left in a
/// non-final state (one `limit=1` list per state), or until the deadline.
fn track_large(
    mut api: Api,
    submitted: &AtomicBool,
    (large, large_started): (&str, Instant),
    deadline: Instant,
    cpu_at_start: Option<f64>,
) -> Tracked {
    let mut rounds_ms = Vec::new();
    let mut large_seconds = None;
    let mut progress = Vec::new();
    loop {
        let all_submitted = submitted.load(Ordering::SeqCst);
        let round = Instant::now();
        let seen = large_seconds
            .is_none()
            .then(|| api.get(large).ok())
            .flatten();
        if let Some(b) = &seen {
            progress.push((chrono::Utc::now(), done(b)));
        }
        if let Some(b) = seen
            && is_final(b["state"].as_str().unwrap_or(""))
        {
            let seconds = large_started.elapsed().as_secs_f64();
            large_seconds = Some(seconds);
            println!("large_mixed_seconds: {seconds:.2}");
            if let (Some(start), Some(end)) = (cpu_at_start, machine_busy_seconds()) {
                println!("large_mixed_machine_cpu_seconds: {:.1}", end - start);
            }
        }
        let done =
            large_seconds.is_some() && all_submitted && matches!(api.any_non_final(), Ok(false));
        rounds_ms.push(round.elapsed().as_secs_f64() * 1000.0);
        if done || Instant::now() >= deadline {
            if large_seconds.is_none() {
                println!("large_mixed_seconds: not reached (still running at the deadline)");
            }
            return Tracked {
                finished: HashMap::new(),
                rounds_ms,
                api,
                large_seconds,
                progress,
            };
        }
        std::thread::sleep(POLL.saturating_sub(round.elapsed()));
    }
}

/// Creates, uploads and starts a large batch with nothing else running, and prints
/// `<label>_seconds` from its start until it is final, with the machine's busy CPU time; the
/// seconds.
fn large_alone(
    api: &mut Api,
    csv: &std::path::Path,
    label: &str,
    limit: Duration,
) -> anyhow::Result<f64> {
    let id = large_batch(api, csv, &label.replace('_', "-"))?;
    api.action(&id, "start")?;
    let started = Instant::now();
    let cpu_at_start = machine_busy_seconds();
    let mut progress = Vec::new();
    let batch = wait_for(api, &id, started + limit, &mut progress, is_final)?;
    let state = batch["state"].as_str().unwrap_or("?");
    if !is_final(state) {
        bail!(
            "{label}: the large batch was still {state} after {} s",
            limit.as_secs()
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{label}_seconds: {seconds:.2} ({state}, results {})",
        batch["results"]
    );
    if let (Some(start), Some(end)) = (cpu_at_start, machine_busy_seconds()) {
        println!("{label}_machine_cpu_seconds: {:.1}", end - start);
    }
    println!(
        "{label}_done_per_second: {} (from the first message done to the end)",
        delivery_rate(&progress)
    );
    Ok(seconds)
}

/// The machine's busy CPU time so far, all cores and processes (the benchmark, the servers,
/// the database and the broker share them): `/proc/stat`'s first line without idle and iowait.
/// Its unit is USER_HZ, which Linux fixes at 100 for this file whatever the kernel's own tick.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let busy: u64 = fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy as f64 / 100.0)
}

fn is_final(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "cancelled")
}

/// Creates a marketing batch and uploads the CSV to it; its id.
fn large_batch(api: &mut Api, csv: &std::path::Path, name: &str) -> anyhow::Result<String> {
    let id = api.create(&json!({
        "name": name,
        "content": "Hi {{name}}, your order from {{city}} ships today: {{url}}",
        "url": "https://shop.example/o",
        "message_type": "marketing",
    }))?;
    api.upload(&id, csv)?;
    Ok(id)
}

/// Polls the batch every 200 ms, noting its messages done, until `until` holds for its state or
/// `deadline` passes; the batch last seen.
fn wait_for(
    api: &mut Api,
    id: &str,
    deadline: Instant,
    progress: &mut Vec<(Stamp, i64)>,
    until: impl Fn(&str) -> bool,
) -> anyhow::Result<Value> {
    loop {
        let batch = api.get(id)?;
        progress.push((chrono::Utc::now(), done(&batch)));
        if until(batch["state"].as_str().unwrap_or("")) || Instant::now() >= deadline {
            return Ok(batch);
        }
        std::thread::sleep(POLL);
    }
}

struct Tracked {
    /// The large batch's seconds from its start until it was seen final.
    large_seconds: Option<f64>,
    /// The large batch's messages done at each poll (`track_large` only).
    progress: Vec<(Stamp, i64)>,
    /// Per batch seen final: from its start answer until the round that saw it final ended.
    finished: HashMap<String, Duration>,
    rounds_ms: Vec<f64>,
    api: Api,
}

/// About every 200 ms, lists the ids of every batch in a non-final state; a batch registered
/// (its start answered) before the round began and absent from the lists is final. Prints
/// `large_mixed_seconds` when the large batch is seen final. Ends when submitting is over and
/// every registered batch is final, or at the deadline.
fn track(
    mut api: Api,
    registered: &Mutex<Vec<(String, Instant)>>,
    submitted: &AtomicBool,
    large: &str,
    deadline: Instant,
    cpu_at_start: Option<f64>,
) -> Tracked {
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut finished = HashMap::new();
    let mut rounds_ms = Vec::new();
    let mut large_seconds = None;
    loop {
        // Read before draining: once it is set, every batch has been registered.
        let all_registered = submitted.load(Ordering::SeqCst);
        if let Ok(mut r) = registered.lock() {
            pending.extend(r.drain(..));
        }
        let round = Instant::now();
        let non_final: HashSet<String> = match api.non_final_ids() {
            Ok(ids) => ids,
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        let seen = Instant::now();
        rounds_ms.push((seen - round).as_secs_f64() * 1000.0);
        pending.retain(|id, started| {
            if non_final.contains(id) {
                return true;
            }
            if id == large {
                let seconds = (seen - *started).as_secs_f64();
                large_seconds = Some(seconds);
                println!("large_mixed_seconds: {seconds:.2}");
                if let (Some(start), Some(end)) = (cpu_at_start, machine_busy_seconds()) {
                    println!("large_mixed_machine_cpu_seconds: {:.1}", end - start);
                }
            }
            finished.insert(id.clone(), seen - *started);
            false
        });
        if (all_registered && pending.is_empty()) || Instant::now() >= deadline {
            if pending.contains_key(large) {
                println!("large_mixed_seconds: not reached (still running at the deadline)");
            }
            finished.remove(large);
            return Tracked {
                finished,
                rounds_ms,
                api,
                large_seconds,
                progress: Vec::new(),
            };
        }
        std::thread::sleep(POLL.saturating_sub(round.elapsed()));
    }
}
