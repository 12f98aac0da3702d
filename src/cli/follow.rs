//! Following a batch until it ends (`watch`, `send --follow`), with its progress on stderr: a
//! bar on a terminal, a plain line per change otherwise (at most one every few seconds while
//! the state stays the same); and the one-line summaries of a batch.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::client::{CliError, Client};
use super::{EXIT_BATCH_DID_NOT_COMPLETE, Output};

/// How often a followed batch is read.
const POLL: Duration = Duration::from_millis(500);
/// How long following goes on through a server that does not answer.
const OUTAGE: Duration = Duration::from_secs(60);
/// Plain lines about the same state come at most this often.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// The states a batch does not leave.
const FINAL: [&str; 3] = ["completed", "failed", "cancelled"];

/// The number at `pointer`, 0 when absent.
pub fn count(batch: &Value, pointer: &str) -> i64 {
    batch.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// The string at `pointer`, `""` when absent.
pub fn text<'a>(batch: &'a Value, pointer: &str) -> &'a str {
    batch.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

/// `delivering 400/985 (40.6%): 398 sent, 0 delivered, 2 failed, 0 cancelled`.
pub fn progress_line(batch: &Value) -> String {
    let state = text(batch, "/state");
    let step = match text(batch, "/current_step") {
        "" if state == "initial" => "preparation",
        "" => "delivery",
        step => step,
    };
    let p = |f: &str| count(batch, &format!("/steps/{step}/progress/{f}"));
    let percentage = batch
        .pointer(&format!("/steps/{step}/progress/percentage"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    format!(
        "{state} {}/{} ({percentage:.1}%): {}",
        p("processed"),
        p("total"),
        results_line(batch)
    )
}

/// `985 valid, 398 sent, 0 delivered, 2 failed, 0 cancelled`.
pub fn results_line(batch: &Value) -> String {
    let r = |f: &str| count(batch, &format!("/results/{f}"));
    format!(
        "{} valid, {} sent, {} delivered, {} failed, {} cancelled",
        r("valid"),
        r("sent"),
        r("delivered"),
        r("failed"),
        r("cancelled")
    )
}

/// Where progress goes.
enum Display {
    Bar(ProgressBar),
    Lines {
        last: String,
        last_state: String,
        at: Instant,
    },
}

impl Display {
    fn new() -> Display {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix:>10} [{bar:40.cyan/blue}] {pos}/{len} {percent:>3}% {msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            Display::Bar(bar)
        } else {
            Display::Lines {
                last: String::new(),
                last_state: String::new(),
                at: Instant::now(),
            }
        }
    }

    fn show(&mut self, id: &str, batch: &Value) {
        match self {
            Display::Bar(bar) => {
                let step = match text(batch, "/current_step") {
                    "" => "delivery",
                    step => step,
                };
                let p = |f: &str| count(batch, &format!("/steps/{step}/progress/{f}")).max(0);
                bar.set_prefix(text(batch, "/state").to_owned());
                bar.set_length(p("total") as u64);
                bar.set_position(p("processed") as u64);
                bar.set_message(results_line(batch));
            }
            Display::Lines {
                last,
                last_state,
                at,
            } => {
                let line = progress_line(batch);
                let state = text(batch, "/state");
                let due = state != last_state.as_str() || at.elapsed() >= LINE_EVERY;
                if line != *last && (due || FINAL.contains(&state)) {
                    eprintln!("batch {id}: {line}");
                    *last = line;
                    *last_state = state.to_owned();
                    *at = Instant::now();
                }
            }
        }
    }

    fn finish(self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Reads the batch every half second, showing its progress, until it is final; returns it. A
/// server that cannot be reached or answers 503 (restarting, its database away) is asked again
/// for up to `OUTAGE` once the batch has been read, so that following a long batch outlives a
/// restart (a wrong URL still fails at once).
pub fn follow(client: &Client, id: &str) -> Result<Value, CliError> {
    let mut display = Display::new();
    let path = format!("/v1/batches/{id}");
    let mut failing_since: Option<Instant> = None;
    let mut seen = false;
    let batch = loop {
        let batch = match client.get(&path) {
            Ok(batch) => batch,
            Err(e)
                if seen
                    && e.is_transient()
                    && failing_since.is_none_or(|t| t.elapsed() < OUTAGE) =>
            {
                failing_since.get_or_insert_with(Instant::now);
                std::thread::sleep(POLL);
                continue;
            }
            Err(e) => return Err(e),
        };
        (seen, failing_since) = (true, None);
        display.show(id, &batch);
        if FINAL.contains(&text(&batch, "/state")) {
            break batch;
        }
        std::thread::sleep(POLL);
    };
    display.finish();
    Ok(batch)
}

/// Prints how a followed batch ended; its exit status: 0 when it completed, else 1.
pub fn ended(output: Output, id: &str, batch: &Value) -> u8 {
    let state = text(batch, "/state");
    match output {
        Output::Json => println!("{batch}"),
        Output::Text => {
            let error = match text(batch, "/error") {
                "" => String::new(),
                e => format!(" ({e})"),
            };
            println!("batch {id} {state}: {}{error}", results_line(batch));
        }
    }
    if state == "completed" {
        0
    } else {
        EXIT_BATCH_DID_NOT_COMPLETE
    }
}

/// `smsbatch watch ID`.
pub fn watch(client: &Client, output: Output, id: &str) -> Result<u8, CliError> {
    let batch = follow(client, id)?;
    Ok(ended(output, id, &batch))
}
