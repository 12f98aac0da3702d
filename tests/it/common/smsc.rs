//! A real SMSC for tests: node-smpp's server (npm `smpp`, pinned in `tests/smsc/package.json`),
//! run by `tests/smsc/smsc.js` as a child process on a loopback port. It is told how to behave
//! by a JSON config and reports every bind, submit, receipt, MO and unbind as a JSON line, which
//! a thread here collects: counting at the SMSC, outside the service, is how a test proves what
//! was sent. Mobile-originated messages are asked of it on its stdin ([`Smsc::mo`]).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The SMSC's folder.
fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/smsc")
}

/// Installs the SMSC's npm packages once per machine.
fn install() {
    super::npm_ci(&folder(), "smpp");
}

/// A running SMSC.
pub struct Smsc {
    child: Child,
    /// Its stdin, where mobile-originated messages are written.
    stdin: Mutex<ChildStdin>,
    port: u16,
    config: Value,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Smsc {
    /// Starts an SMSC with `config` (see `tests/smsc/smsc.js`) on a free port.
    pub fn start(config: Value) -> Self {
        Self::spawn(config, Arc::default())
    }

    fn spawn(config: Value, events: Arc<Mutex<Vec<Value>>>) -> Self {
        install();
        let mut child = Command::new("node")
            .arg(folder().join("smsc.js"))
            .env("SMSC_CONFIG", config.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node tests/smsc/smsc.js");
        let stdin = Mutex::new(child.stdin.take().unwrap());
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines
            .next()
            .expect("the SMSC prints its port")
            .expect("read the SMSC's output");
        let port: u16 = first
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the SMSC: {first}"));
        let sink = events.clone();
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line) {
                    sink.lock().unwrap().push(event);
                }
            }
        });
        Smsc {
            child,
            stdin,
            port,
            config,
            events,
        }
    }

    /// Kills the SMSC (SIGKILL: its sessions drop with no unbind) and starts it again on the
    /// same port with the same config once `down` has passed; its events go on in the same list.
    pub fn restart_after(&mut self, down: Duration) {
        self.restart_with(down, serde_json::json!({}));
    }

    /// `restart_after`, the config's fields changed by those of `patch` (an account whose
    /// password the SMSC's operator changed).
    pub fn restart_with(&mut self, down: Duration, patch: Value) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.events
            .lock()
            .unwrap()
            .push(serde_json::json!({"event": "killed"}));
        thread::sleep(down);
        let mut config = self.config.clone();
        config["port"] = self.port.into();
        if let (Some(config), Some(patch)) = (config.as_object_mut(), patch.as_object()) {
            config.extend(patch.clone());
        }
        let next = Self::spawn(config, self.events.clone());
        // The old child is already reaped: dropping it signals nothing.
        drop(std::mem::replace(self, next));
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The service's environment for an account `name` on this SMSC, with `extra` settings
    /// (`("WINDOW", "3")`) as `SMSBATCH__PROVIDERS__SMPP__<NAME>__<KEY>`.
    pub fn env(&self, name: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let prefix = format!("SMSBATCH__PROVIDERS__SMPP__{}__", name.to_uppercase());
        let text = |key: &str| self.config[key].as_str().unwrap_or("x").to_owned();
        let mut env = vec![
            (format!("{prefix}HOST"), "127.0.0.1".to_owned()),
            (format!("{prefix}PORT"), self.port.to_string()),
            (format!("{prefix}SYSTEM_ID"), text("system_id")),
            (format!("{prefix}PASSWORD"), text("password")),
            (format!("{prefix}SOURCE_ADDR"), "Shop".to_owned()),
        ];
        env.extend(
            extra
                .iter()
                .map(|(k, v)| (format!("{prefix}{k}"), (*v).to_owned())),
        );
        env
    }

    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// The events of one kind (`bind`, `submit`, `receipt`, `mo`, `unbind`).
    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// The submits it accepted (status 0).
    pub fn accepted(&self) -> Vec<Value> {
        self.events_of("submit")
            .into_iter()
            .filter(|e| e["status"] == 0)
            .collect()
    }

    /// Sends a mobile-originated message from `from` (E.164) to `to` on the most recently bound
    /// session; its `mo` event tells how the service answered.
    pub fn mo(&self, from: &str, to: &str, text: &str) {
        let line = serde_json::json!({"mo": {"from": from, "to": to, "text": text}});
        let mut stdin = self.stdin.lock().unwrap();
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .expect("write to the SMSC's stdin");
    }

    /// The receipts the service acknowledged as stored (`deliver_sm_resp` with status 0).
    pub fn receipts_acked(&self) -> Vec<Value> {
        self.events_of("receipt")
            .into_iter()
            .filter(|e| e["status"] == 0)
            .collect()
    }

    /// Waits until `done` holds for the events, or panics after `deadline` with them.
    pub fn wait_for(&self, deadline: Duration, what: &str, done: impl Fn(&[Value]) -> bool) {
        let start = Instant::now();
        loop {
            if done(&self.events()) {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "the SMSC never saw {what}; it saw: {:#?}",
                self.events()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Smsc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
