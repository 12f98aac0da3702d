//! `--provider smpp`: the one-batch benchmark sent through an SMPP account on node-smpp's server
//! (`tests/smsc/smsc.js`, the SMSC the integration tests run), which answers every submit and
//! sends a delivery receipt for it; and the SMSC's own ceiling, node-smpp's client alone
//! (`tests/smsc/blast.js`), measured first in the same run on an SMSC of its own.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};
use serde_json::{Value, json};

const SYSTEM_ID: &str = "bench";
const PASSWORD: &str = "bench";

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/smsc")
}

/// Installs node-smpp (pinned by `tests/smsc/package-lock.json`) when it is not there yet.
fn install() -> anyhow::Result<()> {
    if folder().join("node_modules/smpp").is_dir() {
        return Ok(());
    }
    let status = Command::new("npm")
        .args(["ci", "--silent", "--no-audit", "--no-fund"])
        .current_dir(folder())
        .status()
        .context("running npm ci in tests/smsc (Node.js and npm are needed)")?;
    if !status.success() {
        bail!("npm ci in tests/smsc failed: {status}");
    }
    Ok(())
}

/// A running SMSC, killed when dropped.
pub(crate) struct Smsc {
    child: Child,
    port: u16,
}

impl Smsc {
    /// Starts one on a free loopback port, sending a receipt for every submit, printing nothing
    /// per message.
    pub(crate) fn start() -> anyhow::Result<Self> {
        install()?;
        let config = json!({
            "system_id": SYSTEM_ID, "password": PASSWORD, "receipts": "text", "quiet": true,
        });
        let mut child = Command::new("node")
            .arg(folder().join("smsc.js"))
            .env("SMSC_CONFIG", config.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting node tests/smsc/smsc.js")?;
        let stdout = child.stdout.take().context("the SMSC's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("the SMSC did not start: {line:?}"))?;
        Ok(Smsc { child, port })
    }

    /// The server's settings for an account `bench` on this SMSC.
    pub(crate) fn env(&self, binds: usize, window: usize) -> Vec<(String, String)> {
        let key = |k: &str| format!("SMSBATCH__PROVIDERS__SMPP__BENCH__{k}");
        vec![
            (key("HOST"), "127.0.0.1".into()),
            (key("PORT"), self.port.to_string()),
            (key("SYSTEM_ID"), SYSTEM_ID.into()),
            (key("PASSWORD"), PASSWORD.into()),
            (key("SOURCE_ADDR"), "Bench".into()),
            (key("BINDS"), binds.to_string()),
            (key("WINDOW"), window.to_string()),
        ]
    }

    /// node-smpp's client alone against this SMSC: `count` submits over `binds` sessions of
    /// `window`, until the last receipt.
    pub(crate) fn ceiling(
        &self,
        count: usize,
        binds: usize,
        window: usize,
    ) -> anyhow::Result<Value> {
        let config = json!({
            "port": self.port, "system_id": SYSTEM_ID, "password": PASSWORD,
            "count": count, "binds": binds, "window": window,
        });
        let out = Command::new("node")
            .arg(folder().join("blast.js"))
            .env("BLAST_CONFIG", config.to_string())
            .stderr(Stdio::inherit())
            .output()
            .context("running node tests/smsc/blast.js")?;
        if !out.status.success() {
            bail!("blast.js failed: {}", out.status);
        }
        serde_json::from_slice(&out.stdout).context("blast.js's answer")
    }
}

impl Drop for Smsc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
