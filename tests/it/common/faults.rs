//! Helpers of the fault-injection suite (`tests/it/faults.rs`): a replayable seed, the
//! 100,000-recipient CSV together with the counts it must produce, private PostgreSQL and
//! RabbitMQ instances that a test may stop and start without touching the shared ones other tests
//! use, and the audit that ends every scenario by comparing the API's counts, every message's
//! status and the gateway stand-in's own records (`Sink`).
//!
//! The audit is what the suite proves: exact counts per API.md's counting rules, one message per
//! valid recipient, every message the service calls `sent` accepted by the sink (once, under
//! at-most-once), nothing the sink accepted reported otherwise except as `unknown_outcome`, no
//! unexpected failure, and what a crash left uncertain bounded by what could be in flight.
#![allow(dead_code)]

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use uuid::Uuid;

use super::sink::{Answer, Received, Sink};
use super::{TestDb, TestServer, canonical, eventually, mobile, national, num, text};

/// Only stops a stuck test; never an assertion about speed.
pub const DEADLINE: Duration = Duration::from_secs(600);
/// Recipients of every scenario's batch.
pub const ROWS: u64 = 100_000;
/// The `http` provider's name in the server's configuration.
pub const PROVIDER: &str = "sink";
/// Partition workers of the server (`smsbatch.worker_count`).
pub const WORKERS: u64 = 4;
/// Provider calls in flight per worker (`smsbatch.send_concurrency`).
pub const SEND_CONCURRENCY: u64 = 8;
/// Messages a worker claims at once (`smsbatch.claim_size`): with `WORKERS`, the most a crash
/// can leave uncertain.
pub const CLAIM_SIZE: u64 = 64;
/// Retries of a transient failure in the gateway scenarios: enough that a message caught by
/// every outage of a scenario still goes out (the backoff doubles from `RETRY_BACKOFF_MS`).
/// `smsbatch.retry_count` is also how many times a failing step is restarted, so the other
/// scenarios keep the harness's settings (3 restarts, 50 ms doubling: 350 ms in all), which a
/// dependency's outage outlasts many times over — the batch must wait for it, not outlive it
/// on restarts.
pub const GATEWAY_RETRIES: &[(&str, &str)] = &[
    ("SMSBATCH__SMSBATCH__RETRY_COUNT", "8"),
    ("SMSBATCH__SMSBATCH__RETRY_BACKOFF_MS", "100"),
];
/// The environment variable that replays a run's random choices.
pub const SEED_VAR: &str = "SMSBATCH_FAULT_SEED";

const CONTENT: &str = "Hi {{name}}, your code is ready: {{url}}";
const URL: &str = "https://shop.example/f";

// ---------------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------------

/// A xorshift64* generator seeded from `SMSBATCH_FAULT_SEED`, or from the clock when unset;
/// the seed is printed first, so that a failure can be replayed.
pub struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    /// The generator of test `test` of the fault suite; prints its seed and how to replay it.
    pub fn for_test(test: &str) -> Self {
        Self::for_test_in("faults", test)
    }

    /// The generator of test `test` of the module `module` of the test binary (`tests/it/`);
    /// prints its seed and how to replay it.
    pub fn for_test_in(module: &str, test: &str) -> Self {
        let seed = match std::env::var(SEED_VAR) {
            Ok(value) => value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{SEED_VAR}={value:?} is not an unsigned integer")),
            Err(_) => {
                let nanos = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("the clock is after 1970")
                    .as_nanos() as u64;
                (nanos ^ (u64::from(std::process::id()) << 40)) % 1_000_000_000_000
            }
        };
        eprintln!(
            "{test}: seed {seed} (replay: {SEED_VAR}={seed} cargo nextest run \
             -E 'test(={module}::{test})')"
        );
        // splitmix64 of the seed: a zero or small seed still starts from a well-mixed state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            seed,
            state: z.max(1),
        }
    }

    /// The seed this generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi, "{lo}..{hi} is empty");
        lo + self.next_u64() % (hi - lo)
    }

    /// `of` × a random fraction in `lo_pct..hi_pct` percent.
    pub fn share(&mut self, of: u64, lo_pct: u64, hi_pct: u64) -> u64 {
        of * self.between(lo_pct * 100, hi_pct * 100) / 10_000
    }
}

// ---------------------------------------------------------------------------------------------
// Recipients
// ---------------------------------------------------------------------------------------------

/// A `phone,name` CSV and what preparation must make of it, worked out independently of how the
/// rows were generated.
pub struct Recipients {
    /// The CSV body.
    pub csv: String,
    /// Data rows.
    pub rows: u64,
    /// Rows no phone parser takes for a valid CN number.
    pub invalid: u64,
    /// Rows repeating an earlier row's number (exactly, or in national format).
    pub duplicates: u64,
    /// E.164 of every distinct valid number → the text it must receive (its first row's name).
    pub texts: HashMap<String, String>,
}

impl Recipients {
    /// `rows` rows: one in 200 an invalid number (the documented examples and `bad-…`), one in
    /// 100 a duplicate of the row before it (every other one written in national format), the
    /// rest distinct valid numbers.
    pub fn generate(rows: u64) -> Self {
        let phone = |i: u64| -> String {
            match i {
                _ if i % 200 == 7 => match (i / 200) % 5 {
                    0 => String::new(),
                    1 => "not-a-phone".into(),
                    2 => "12345".into(),
                    3 => "+86123".into(),
                    _ => format!("bad-{i}"),
                },
                _ if i % 200 == 50 => national(&mobile(10_000_000 + i - 1)),
                _ if i % 100 == 50 => mobile(10_000_000 + i - 1),
                _ => mobile(10_000_000 + i),
            }
        };
        let mut csv = String::with_capacity(rows as usize * 36 + 16);
        csv.push_str("phone,name\n");
        let mut texts = HashMap::with_capacity(rows as usize);
        let (mut invalid, mut duplicates) = (0, 0);
        for i in 0..rows {
            let phone = phone(i);
            let _ = writeln!(csv, "{phone},Customer {i}");
            match canonical(&phone) {
                None => invalid += 1,
                Some(e164) => match texts.entry(e164) {
                    Entry::Occupied(_) => duplicates += 1,
                    Entry::Vacant(first) => {
                        first.insert(format!("Hi Customer {i}, your code is ready: {URL}"));
                    }
                },
            }
        }
        assert_eq!(
            (invalid, duplicates),
            (rows / 200, rows / 100),
            "the generator's mix"
        );
        Self {
            csv,
            rows,
            invalid,
            duplicates,
            texts,
        }
    }

    /// Distinct valid numbers: one message each.
    pub fn valid(&self) -> u64 {
        self.texts.len() as u64
    }

    /// Valid numbers ending with one of `suffixes`.
    pub fn ending(&self, suffixes: &[&str]) -> u64 {
        self.texts
            .keys()
            .filter(|p| suffixes.iter().any(|s| p.ends_with(s)))
            .count() as u64
    }
}

// ---------------------------------------------------------------------------------------------
// The server and the batch
// ---------------------------------------------------------------------------------------------

/// Starts the server on `db` sending through `sink` as provider `sink`, with the suite's
/// settings (explicit workers and claim size, so that the in-flight bounds hold), then
/// `extra_env`, which wins.
pub fn start_server(db: &TestDb, sink: &Sink, extra_env: &[(&str, &str)]) -> TestServer {
    let url = sink.url();
    let workers = WORKERS.to_string();
    let concurrency = SEND_CONCURRENCY.to_string();
    let claim = CLAIM_SIZE.to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("SMSBATCH__PROVIDERS__HTTP__SINK__URL", url.as_str()),
        ("SMSBATCH__PROVIDERS__HTTP__SINK__TIMEOUT_MS", "5000"),
        ("SMSBATCH__SMSBATCH__WORKER_COUNT", workers.as_str()),
        ("SMSBATCH__SMSBATCH__SEND_CONCURRENCY", concurrency.as_str()),
        ("SMSBATCH__SMSBATCH__CLAIM_SIZE", claim.as_str()),
        // Without progress for this long, delivery re-plans what is pending (tasks a broker
        // lost with its connection) and settles the claims of dead instances: soon, here.
        ("SMSBATCH__SMSBATCH__REPLAN_AFTER_MS", "5000"),
    ];
    env.extend_from_slice(extra_env);
    TestServer::start(db, &env)
}

/// Creates a marketing batch through the sink (the default failure threshold), uploads
/// `recipients` as CSV and starts it; returns its id.
pub fn start_batch(server: &TestServer, name: &str, recipients: &Recipients) -> String {
    let id = server.create_batch(&json!({
        "name": name, "content": CONTENT, "url": URL, "provider": PROVIDER,
        "message_type": "marketing",
    }));
    let (status, answer) = server.upload_csv(&id, recipients.csv.as_str());
    assert_eq!(status, 200, "upload answered {status}: {answer:#}");
    assert_eq!(
        (num(&answer, "/accepted"), num(&answer, "/total")),
        (recipients.rows, recipients.rows),
        "{answer:#}"
    );
    server.action_ok(&id, "start", "preparing");
    id
}

/// Recipients the preparation step has processed.
pub fn prepared(batch: &Value) -> u64 {
    batch
        .pointer("/steps/preparation/progress/processed")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Messages the delivery step has finished (sent or failed).
pub fn delivered(batch: &Value) -> u64 {
    batch
        .pointer("/steps/delivery/progress/processed")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// The batch's state.
pub fn state(batch: &Value) -> &str {
    batch["state"].as_str().unwrap_or("?")
}

/// Polls the batch until `done`; fails at once if it reaches another final state or pauses
/// itself (no scenario pauses a batch: a pause would be the failure threshold tripping).
pub fn wait_for(server: &TestServer, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    server.wait_until(id, what, DEADLINE, |batch| {
        assert_ne!(
            state(batch),
            "paused",
            "batch {id} paused itself while waiting for {what}: {batch:#}"
        );
        done(batch)
    })
}

/// Waits for `completed` (see `wait_for`).
pub fn wait_completed(server: &TestServer, id: &str) -> Value {
    wait_for(server, id, "completed", |b| state(b) == "completed")
}

/// Waits until `GET /readyz` answers `status`; returns its body.
pub fn wait_ready_status(server: &TestServer, status: u16) -> Value {
    eventually(
        &format!("/readyz answering {status}"),
        DEADLINE,
        || match server.get_json("/readyz") {
            (got, body) if got == status => Ok(body),
            (got, body) => Err(format!("{got}: {body}")),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Instances and leases (PostgreSQL)
// ---------------------------------------------------------------------------------------------

/// The instance ids of the servers started on a PostgreSQL test database, learnt one start at a
/// time from the `instances` table (a server's heartbeat row exists before it listens).
pub struct Instances {
    known: HashSet<String>,
}

impl Instances {
    /// None known yet: for a fresh database, before the first server starts (and creates the
    /// table).
    pub fn new() -> Self {
        Self {
            known: HashSet::new(),
        }
    }

    fn all(db: &TestDb) -> HashSet<String> {
        db.query_column("SELECT id FROM instances")
            .into_iter()
            .flatten()
            .collect()
    }

    /// The id of the one server started since the last call.
    pub fn newest(&mut self, db: &TestDb) -> String {
        let all = Self::all(db);
        let new: Vec<&String> = all.difference(&self.known).collect();
        assert_eq!(new.len(), 1, "one new instance row: {new:?}");
        let id = new[0].clone();
        self.known = all;
        id
    }
}

/// The instance holding the unexpired lease of batch `public_id` (its supervisor), if any.
pub fn lease_owner(db: &TestDb, public_id: &str) -> Option<String> {
    assert!(
        public_id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'),
        "a UUID: {public_id}"
    );
    db.query_column(&format!(
        "SELECT l.owner FROM leases l JOIN batches b ON b.id = l.batch_id \
         WHERE b.public_id = '{public_id}' AND l.expires_at > (now() AT TIME ZONE 'utc')"
    ))
    .into_iter()
    .flatten()
    .next()
}

// ---------------------------------------------------------------------------------------------
// Private PostgreSQL and RabbitMQ
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1 (free when asked; taken by the caller right after).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

/// True when something accepts connections on `127.0.0.1:port`.
pub fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)).is_ok()
}

fn run(what: &str, cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
    })
}

/// The file of a private instance's folder naming the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// A temporary folder for a private instance of `kind`, owned by `user` (when running as root)
/// and naming this test process as its owner; removed by the instance's guard.
fn private_dir(kind: &str, user: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("smsbatch-{kind}-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("create the private instance's folder");
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
        .expect("write the owner file");
    if is_root() {
        run(
            "chown the private instance's folder",
            Command::new("chown").arg("-R").arg(user).arg(&dir),
        );
    }
    dir
}

/// Stops (with `stop`) and removes the private instances of `kind` whose test process is gone:
/// one killed outright (a SIGKILL, a Ctrl-C) never ran its guard.
fn sweep_abandoned(kind: &str, stop: impl Fn(&Path)) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let prefix = format!("smsbatch-{kind}-");
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let dir = entry.path();
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER_FILE)) else {
            continue;
        };
        let owner = owner.trim();
        if owner.is_empty() || Path::new("/proc").join(owner).exists() {
            continue;
        }
        eprintln!(
            "removing the abandoned private {kind} instance in {}",
            dir.display()
        );
        stop(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Kills the process whose id is the first line of `pid_file`, if it still runs.
fn kill_pid_file(pid_file: &Path) {
    let Ok(pid) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let pid = pid.lines().next().unwrap_or("").trim();
    if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// PostgreSQL 15 binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL server of the test's own (its own data folder and port, trust auth), which the
/// test may stop and start; stopped and removed when dropped, also when the test panics.
pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
}

/// A PostgreSQL tool, run as the `postgres` user when running as root (initdb and pg_ctl
/// refuse root).
fn pg_tool(tool: &str) -> Command {
    let path = Path::new(PG_BIN).join(tool);
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    }
}

/// Stops the PostgreSQL server of a private folder at once.
fn pg_stop_immediately(dir: &Path) {
    let _ = pg_tool("pg_ctl")
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-m", "immediate", "-w", "stop"])
        .output();
}

impl PrivatePostgres {
    /// `initdb` and start on a free port.
    pub fn start() -> Self {
        sweep_abandoned("pg", pg_stop_immediately);
        let dir = private_dir("pg", "postgres");
        let port = free_port();
        let pg = Self { dir, port };
        run(
            "initdb",
            pg_tool("initdb").arg("-D").arg(pg.data()).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]),
        );
        pg.start_again();
        eprintln!(
            "private PostgreSQL on 127.0.0.1:{port} in {}",
            pg.dir.display()
        );
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// `postgres://postgres@127.0.0.1:PORT`, for `TestDb::on_postgres_server`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Stops the server (fast shutdown: sessions are cut, as in a real restart).
    pub fn stop(&self) {
        run(
            "pg_ctl stop",
            pg_tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-m", "fast", "-w", "stop"]),
        );
        assert!(!accepts(self.port), "PostgreSQL stopped");
    }

    /// Starts the (stopped) server again on the same port.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.display()
        );
        run(
            "pg_ctl start",
            pg_tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "120", "-o", &options, "start"]),
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        pg_stop_immediately(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A RabbitMQ node of the test's own (its own node name, ports, configuration, database and
/// logs in a temporary folder; the shared epmd), which the test may stop and start; stopped and
/// removed when dropped, also when the test panics.
pub struct PrivateRabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
}

impl PrivateRabbit {
    /// Starts the node (`rabbitmq-server -detached`) and waits for its AMQP listener.
    pub fn start() -> Self {
        sweep_abandoned("rabbitmq", |dir| kill_pid_file(&dir.join("pid")));
        let dir = private_dir("rabbitmq", "rabbitmq");
        let (port, dist_port) = (free_port(), free_port());
        let node = format!("smsbatch-{}@localhost", Uuid::now_v7().simple());
        // Our own files: /etc/rabbitmq/rabbitmq.conf fixes the listener to 5672 and
        // /etc/rabbitmq/rabbitmq-env.conf names the shared node, so neither is read.
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("write rabbitmq.conf");
        std::fs::write(
            dir.join("rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS=127.0.0.1\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n",
        )
        .expect("write rabbitmq-env.conf");
        std::fs::write(dir.join("enabled_plugins"), "").expect("write enabled_plugins");
        if is_root() {
            run(
                "chown the node's files",
                Command::new("chown").arg("-R").arg("rabbitmq").arg(&dir),
            );
        }
        let rabbit = Self {
            dir,
            node,
            port,
            dist_port,
        };
        run(
            "rabbitmq-server -detached",
            rabbit.command("rabbitmq-server").arg("-detached"),
        );
        rabbit.wait_listening();
        eprintln!("private RabbitMQ node {} on 127.0.0.1:{port}", rabbit.node);
        rabbit
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        let path = |name: &str| self.dir.join(name);
        cmd.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_PID_FILE", path("pid"));
        cmd
    }

    fn ctl(&self, what: &str, args: &[&str]) {
        run(
            what,
            self.command("rabbitmqctl")
                .args(["-n", &self.node])
                .args(args),
        );
    }

    fn wait_listening(&self) {
        eventually(
            &format!("RabbitMQ node {} listening", self.node),
            Duration::from_secs(120),
            || {
                if accepts(self.port) {
                    Ok(())
                } else {
                    Err(self.log_tail())
                }
            },
        );
    }

    fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.node));
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the broker (`rabbitmqctl stop_app`): connections close, the listener goes away;
    /// durable queues and persistent messages stay on disk.
    pub fn stop_app(&self) {
        self.ctl("rabbitmqctl stop_app", &["stop_app"]);
        assert!(!accepts(self.port), "RabbitMQ stopped listening");
    }

    /// Starts the broker again and waits for its listener.
    pub fn start_app(&self) {
        self.ctl("rabbitmqctl start_app", &["start_app"]);
        self.wait_listening();
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        let _ = self
            .command("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
        // If the node did not stop through rabbitmqctl, end it by its own pid.
        kill_pid_file(&self.dir.join("pid"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// The audit
// ---------------------------------------------------------------------------------------------

/// What a message `sending` at a crash becomes (`smsbatch.redelivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redelivery {
    /// Failed with `unknown_outcome`: never sent twice.
    AtMostOnce,
    /// Sent again with the same idempotency key.
    AtLeastOnce,
}

/// What a scenario allows.
#[derive(Debug, Clone)]
pub struct Expect {
    /// The server's `smsbatch.redelivery`.
    pub redelivery: Redelivery,
    /// Suffixes of the numbers the sink refuses with `refused_status` (permanent failures).
    pub refused: Vec<&'static str>,
    /// The 4xx the sink refuses them with.
    pub refused_status: u16,
    /// The sink answers some requests with a transient failure (5xx, 429, a hang): retries
    /// are expected.
    pub transient: bool,
    /// Times the server process was stopped (SIGKILL or SIGTERM) and started again.
    pub stops: u64,
    /// Most messages a crash may have left uncertain: failed `unknown_outcome` under
    /// at-most-once, sent again under at-least-once. 0: none may be.
    pub in_flight_bound: u64,
}

impl Expect {
    /// No refusals, no process stop, at-most-once: everything sent exactly once.
    pub fn clean() -> Self {
        Self {
            redelivery: Redelivery::AtMostOnce,
            refused: Vec::new(),
            refused_status: 0,
            transient: false,
            stops: 0,
            in_flight_bound: 0,
        }
    }

    fn is_refused(&self, phone: &str) -> bool {
        self.refused.iter().any(|s| phone.ends_with(s))
    }
}

/// The figures of a scenario, as printed in its `RESULT` line and RELIABILITY.md.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Messages `sent`.
    pub sent: u64,
    /// Messages `failed` (refused ones and `unknown_outcome` ones).
    pub failed: u64,
    /// Of those, failed with `unknown_outcome`.
    pub unknown_outcome: u64,
    /// Requests the sink received.
    pub requests: u64,
    /// Message ids the sink received more than once (retries after a transient answer, and
    /// resends after a crash).
    pub received_twice: u64,
    /// Message ids the sink accepted more than once: SMS sent twice.
    pub accepted_twice: u64,
    /// Message ids the sink received again after accepting them (at-least-once resends).
    pub resent_after_acceptance: u64,
    /// Messages failed `unknown_outcome` that the sink had accepted: the crash came between
    /// the gateway's answer and the outcome's commit.
    pub accepted_but_unknown: u64,
}

/// True for an answer the provider must retry: 408, 429, a 5xx, or none (a hang).
fn is_transient(answer: Answer) -> bool {
    match answer {
        Answer::Refused(status) => status == 408 || status == 429 || status >= 500,
        Answer::Hung => true,
        Answer::Accepted(_) | Answer::Malformed => false,
    }
}

/// One message as the API lists it.
struct Listed {
    phone: String,
    status: String,
    error: String,
    attempts: u64,
    provider_message_id: Option<String>,
}

/// Ends a scenario: the batch is `completed` and everything adds up (see the module's doc).
/// Prints a `RESULT` line with the figures and returns them.
pub fn audit(
    scenario: &str,
    server: &TestServer,
    id: &str,
    recipients: &Recipients,
    sink: &Sink,
    expect: &Expect,
) -> Tally {
    let batch = server.batch(id);
    assert_eq!(state(&batch), "completed", "{batch:#}");
    for step in ["preparation", "delivery"] {
        assert_eq!(
            text(&batch, &format!("/steps/{step}/status")),
            "completed",
            "{step} step: {:#}",
            batch["steps"]
        );
    }

    // API.md's counting rules, against what the test generated.
    let r = |k: &str| num(&batch, &format!("/results/{k}"));
    let got: BTreeMap<&str, u64> = [
        "recipients",
        "valid",
        "invalid",
        "duplicates",
        "opted_out",
        "delivered",
        "cancelled",
    ]
    .into_iter()
    .map(|k| (k, r(k)))
    .collect();
    let wanted = BTreeMap::from([
        ("recipients", recipients.rows),
        ("valid", recipients.valid()),
        ("invalid", recipients.invalid),
        ("duplicates", recipients.duplicates),
        ("opted_out", 0),
        ("delivered", 0),
        ("cancelled", 0),
    ]);
    assert_eq!(got, wanted, "results: {:#}", batch["results"]);
    assert_eq!(
        r("recipients"),
        r("valid") + r("invalid") + r("duplicates") + r("opted_out"),
        "recipients = valid + invalid + duplicates + opted_out: {:#}",
        batch["results"]
    );
    assert_eq!(
        r("valid"),
        r("sent") + r("delivered") + r("failed") + r("cancelled"),
        "valid = sent + delivered + failed + cancelled: {:#}",
        batch["results"]
    );

    // Every message, as the API lists it: one per distinct valid number.
    let mut listed: HashMap<i64, Listed> = HashMap::with_capacity(recipients.texts.len());
    let mut phones = HashSet::with_capacity(recipients.texts.len());
    server.for_each_message(id, None, |m| {
        let message_id: i64 = text(m, "/id")
            .parse()
            .unwrap_or_else(|_| panic!("a numeric message id: {m:#}"));
        let phone = text(m, "/phone").to_owned();
        assert!(
            recipients.texts.contains_key(&phone),
            "a message for {phone}, which is no valid recipient: {m:#}"
        );
        assert!(phones.insert(phone.clone()), "two messages for {phone}");
        let message = Listed {
            phone,
            status: text(m, "/status").to_owned(),
            error: m["error"].as_str().unwrap_or("").to_owned(),
            attempts: num(m, "/attempts"),
            provider_message_id: m["provider_message_id"].as_str().map(str::to_owned),
        };
        assert!(
            listed.insert(message_id, message).is_none(),
            "message id {message_id} listed twice"
        );
    });
    assert_eq!(
        listed.len() as u64,
        recipients.valid(),
        "one message per distinct valid recipient"
    );

    // What the sink received, by message id.
    let received = sink.received();
    let report = sink.report();
    assert_eq!(report.malformed, 0, "the provider always sends its JSON");
    assert_eq!(
        report.key_mismatches, 0,
        "every request carries its message id as Idempotency-Key"
    );
    let mut by_id: HashMap<i64, Vec<&Received>> = HashMap::new();
    for request in &received {
        by_id.entry(request.id).or_default().push(request);
    }
    for (message_id, requests) in &by_id {
        let message = listed.get(message_id).unwrap_or_else(|| {
            panic!("the sink received id {message_id}, no message of the batch: {requests:?}")
        });
        let text = &recipients.texts[&message.phone];
        for request in requests {
            assert_eq!(request.to, message.phone, "request {request:?}");
            assert_eq!(&request.body, text, "request {request:?}");
            assert!(request.attempt >= 1, "attempts count from 1: {request:?}");
        }
    }

    let mut tally = Tally {
        requests: report.total as u64,
        received_twice: report.duplicates.len() as u64,
        accepted_twice: report.accepted_twice.len() as u64,
        ..Tally::default()
    };
    let mut unexpected = Vec::new();
    let no_requests: Vec<&Received> = Vec::new();
    for (message_id, m) in &listed {
        let requests = by_id.get(message_id).unwrap_or(&no_requests);
        let accepted: Vec<&&Received> =
            requests.iter().filter(|q| q.answer.is_accepted()).collect();
        let first_acceptance = requests.iter().position(|q| q.answer.is_accepted());
        if first_acceptance.is_some_and(|at| at + 1 < requests.len()) {
            tally.resent_after_acceptance += 1;
        }
        assert!(
            requests.len() as u64 <= m.attempts,
            "{}: {} requests but {} attempts counted: {requests:?}",
            m.phone,
            requests.len(),
            m.attempts
        );
        if expect.stops == 0 {
            // Without a process stop every claim is a call: attempts 1, 2, 3… reach the gateway.
            let attempts: Vec<i64> = requests.iter().map(|q| q.attempt).collect();
            let numbered: Vec<i64> = (1..=requests.len() as i64).collect();
            assert_eq!(attempts, numbered, "{}: {requests:?}", m.phone);
            assert_eq!(
                requests.len() as u64,
                m.attempts,
                "{}: attempts = requests the gateway saw: {requests:?}",
                m.phone
            );
        }
        match (m.status.as_str(), m.error.as_str()) {
            ("sent", _) => {
                tally.sent += 1;
                assert!(
                    !accepted.is_empty(),
                    "{} is sent but the sink never accepted it: {requests:?}",
                    m.phone
                );
                let gateway_ids: Vec<String> =
                    accepted.iter().map(|q| format!("sink-{}", q.seq)).collect();
                assert!(
                    m.provider_message_id
                        .as_ref()
                        .is_some_and(|pid| gateway_ids.contains(pid)),
                    "{}: provider_message_id {:?} is one of the sink's ids {gateway_ids:?}",
                    m.phone,
                    m.provider_message_id
                );
                if expect.is_refused(&m.phone) {
                    unexpected.push(format!("{} was refused yet is sent", m.phone));
                }
            }
            ("failed", "unknown_outcome") => {
                tally.failed += 1;
                tally.unknown_outcome += 1;
                tally.accepted_but_unknown += u64::from(!accepted.is_empty());
            }
            ("failed", error) => {
                tally.failed += 1;
                let refused = Answer::Refused(expect.refused_status);
                if !expect.is_refused(&m.phone)
                    || !accepted.is_empty()
                    || requests.last().map(|q| q.answer) != Some(refused)
                    || !error.contains(&expect.refused_status.to_string())
                {
                    unexpected.push(format!(
                        "{} failed with {error:?} after {requests:?}",
                        m.phone
                    ));
                }
            }
            (status, error) => unexpected.push(format!(
                "{} ended {status} ({error:?}) after {requests:?}",
                m.phone
            )),
        }
        if expect.redelivery == Redelivery::AtMostOnce {
            // Only a transient answer is followed by another request.
            let before_last = &requests[..requests.len().saturating_sub(1)];
            assert!(
                before_last.iter().all(|q| is_transient(q.answer)),
                "at most once: {} reached the sink again after a final answer: {requests:?}",
                m.phone
            );
        }
    }
    assert!(
        unexpected.is_empty(),
        "{} messages ended unexpectedly, e.g. {:#?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(10)]
    );
    assert_eq!(tally.sent, r("sent"), "listed sent = results.sent");
    assert_eq!(tally.failed, r("failed"), "listed failed = results.failed");

    // Exact outcomes: refused numbers failed, every other number sent, except what a crash left
    // with an unknown outcome, bounded by what was in flight.
    let refused = recipients.ending(&expect.refused);
    match expect.redelivery {
        Redelivery::AtMostOnce => {
            assert!(
                report.accepted_twice.is_empty(),
                "at most once: the sink accepted {} messages twice, e.g. {:?}",
                report.accepted_twice.len(),
                &report.accepted_twice[..report.accepted_twice.len().min(10)]
            );
            assert!(
                tally.unknown_outcome <= expect.in_flight_bound,
                "unknown_outcome {} > the most that could be in flight at the crashes, {}",
                tally.unknown_outcome,
                expect.in_flight_bound
            );
            if !expect.transient {
                assert_eq!(
                    tally.received_twice, 0,
                    "at most once and no transient answer: no message reaches the sink twice"
                );
            }
        }
        Redelivery::AtLeastOnce => {
            assert_eq!(
                tally.unknown_outcome, 0,
                "at least once leaves no unknown outcome"
            );
            let resent = if expect.transient {
                tally.resent_after_acceptance
            } else {
                tally.received_twice
            };
            assert!(
                resent <= expect.in_flight_bound,
                "{resent} messages reached the sink again > the most that could be in flight at \
                 the crashes, {}",
                expect.in_flight_bound
            );
            for duplicate in &report.duplicates {
                assert!(
                    duplicate.keys_match,
                    "same key on each resend: {duplicate:?}"
                );
            }
        }
    }
    if expect.in_flight_bound == 0 {
        assert_eq!(tally.unknown_outcome, 0, "no crash, no unknown outcome");
        assert_eq!(
            tally.resent_after_acceptance, 0,
            "no crash: nothing reaches the sink again after it was accepted"
        );
    }
    let refused_failed = tally.failed - tally.unknown_outcome;
    let refused_unknown = listed
        .values()
        .filter(|m| expect.is_refused(&m.phone) && m.error == "unknown_outcome")
        .count() as u64;
    assert_eq!(
        refused_failed + refused_unknown,
        refused,
        "every refused number failed"
    );
    // The sink's side of the same story: what it accepted is what the API calls sent, plus
    // messages whose acceptance a crash kept from being recorded (unknown_outcome).
    assert_eq!(
        report.accepted_ids as u64,
        tally.sent + tally.accepted_but_unknown,
        "distinct messages the sink accepted = sent + unknown_outcome ones it had accepted"
    );

    eprintln!(
        "RESULT {scenario}: sent={} failed={} unknown_outcome={} requests={} received_twice={} \
         accepted_twice={} resent_after_acceptance={} accepted_but_unknown={} (valid={}, \
         refused numbers={refused})",
        tally.sent,
        tally.failed,
        tally.unknown_outcome,
        tally.requests,
        tally.received_twice,
        tally.accepted_twice,
        tally.resent_after_acceptance,
        tally.accepted_but_unknown,
        recipients.valid()
    );
    tally
}
