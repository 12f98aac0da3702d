//! The server under test, run as a child process of the benchmark (`bench --serve`), and the
//! benchmark's own PostgreSQL statements (creating and dropping its database).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::Args;

pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
    log: Arc<LogCounts>,
}

/// The server's log lines (stderr) by level.
#[derive(Default)]
pub(crate) struct LogCounts {
    pub(crate) lines: AtomicUsize,
    pub(crate) warn: AtomicUsize,
    pub(crate) error: AtomicUsize,
    /// Warning and error lines by level and message (fields left out).
    pub(crate) kinds: Mutex<BTreeMap<String, usize>>,
}

/// `WARN smsbatch::actors::x: Message text.` of a log line, without its time, colours and
/// fields (`key=value`).
fn kind(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An ANSI colour: ESC [ … m.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let words: Vec<&str> = plain
        .split_whitespace()
        .skip(1)
        .take_while(|w| !w.contains('='))
        .collect();
    words.join(" ")
}

/// How one instance ended after SIGTERM.
pub(crate) enum Shutdown {
    /// It exited this long after the signal, with this status.
    Exited(Duration, std::process::ExitStatus),
    /// It was still running at the cap and was killed.
    Killed(Duration),
}

impl Server {
    /// Starts one instance on `db_url`. Every instance started with the same `tag` shares the
    /// same queue name, so that several instances on one database form one deployment. The
    /// first `forward_lines` lines of its log are copied to stderr; all are counted by level.
    pub(crate) fn start(
        args: &Args,
        db_url: &str,
        tag: &str,
        forward_lines: usize,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("SMSBATCH__HTTP__BIND", "127.0.0.1:0")
            .env("SMSBATCH__DATABASE__URL", db_url)
            .env("SMSBATCH__TRANSPORT__KIND", &args.transport)
            .env(
                "SMSBATCH__TRANSPORT__QUEUE",
                format!("smsbatch.bench.{tag}"),
            )
            .env("SMSBATCH__TRANSPORT__QUEUE_EXPIRES_MS", "60000")
            .env(
                "SMSBATCH__PROVIDERS__SIMULATOR__LATENCY_MS",
                args.latency_ms.to_string(),
            )
            .env("SMSBATCH__LOG__LEVEL", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Arc::new(LogCounts::default());
        let stderr = child.stderr.take().context("server stderr")?;
        let counts = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let n = counts.lines.fetch_add(1, Ordering::Relaxed);
                let level = if line.contains("ERROR") {
                    &counts.error
                } else if line.contains("WARN") {
                    &counts.warn
                } else {
                    forward(n, forward_lines, &line);
                    continue;
                };
                level.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut kinds) = counts.kinds.lock() {
                    *kinds.entry(kind(&line)).or_default() += 1;
                }
                forward(n, forward_lines, &line);
            }
        });
        let stdout = child.stdout.take().context("server stdout")?;
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        stdout.read_line(&mut line)?;
        // The rest of its output is read and dropped: a closed pipe would fail its writes.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let base = line
            .trim()
            .strip_prefix("smsbatch listening on ")
            .with_context(|| format!("server did not start: {line}"))?
            .to_string();
        Ok(Server { child, base, log })
    }

    pub(crate) fn log(&self) -> &LogCounts {
        &self.log
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A `kB` figure of the process's `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), 0 if unread.
    pub(crate) fn rss_kb(&self, key: &str) -> u64 {
        rss_kb(self.pid(), key)
    }

    pub(crate) fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub(crate) fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet (so it cannot
        // have been reused); it touches no memory of this process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Whether the process has exited (reaping it if so), without waiting.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM to every instance at once, then the time each takes to exit; one still running after
/// `cap` is killed.
pub(crate) fn shutdown_all(servers: &mut [Server], cap: Duration) -> Vec<Shutdown> {
    let signalled = Instant::now();
    for s in servers.iter() {
        s.terminate();
    }
    let mut out: Vec<Option<Shutdown>> = servers.iter().map(|_| None).collect();
    while out.iter().any(Option::is_none) {
        for (s, o) in servers.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                if let Some(status) = s.exited() {
                    *o = Some(Shutdown::Exited(signalled.elapsed(), status));
                } else if signalled.elapsed() >= cap {
                    s.kill();
                    *o = Some(Shutdown::Killed(signalled.elapsed()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out.into_iter().flatten().collect()
}

/// Copies the `n`-th log line to stderr while under the limit.
fn forward(n: usize, limit: usize, line: &str) {
    if n < limit {
        eprintln!("{line}");
    }
}

pub(crate) fn rss_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

pub(crate) fn pg_execute(url: &str, sql: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(conn);
        client.batch_execute(sql).await?;
        drop(client);
        let _ = driver.await;
        Ok(())
    })
}
