//! Layered configuration: `config/default.yaml`, then `config/$SMSBATCH_ENV.yaml`, then
//! `SMSBATCH__SECTION__KEY` environment variables. Every key has a default that serves the
//! embedded case, so an empty or missing `default.yaml` still starts the service.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::batch::PartitionCount;
use crate::domain::phone::Region;
use crate::provider::ProviderSettings;
use crate::provider::SettingError;
use crate::secret::{Secret, redact_url};

/// Why the configuration could not be loaded; the message always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value has the right type but is out of range.
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<SettingError> for ConfigError {
    fn from(e: SettingError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            reason: e.reason,
        }
    }
}

/// The whole configuration tree.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The admin HTTP server.
    pub http: HttpSettings,
    /// The store.
    pub database: DatabaseSettings,
    /// How delivery tasks reach the workers.
    pub transport: TransportSettings,
    /// Access to the admin API.
    pub admin: AdminSettings,
    /// The orchestration knobs of the original service's `smsbatch` section.
    pub smsbatch: BatchSettings,
    /// SMS providers and their limits.
    pub providers: ProviderSettings,
    /// Logging.
    pub log: LogSettings,
    /// The words of inbound messages that opt a number out and back in.
    pub opt_out: OptOutSettings,
}

/// `opt_out.*`: an inbound message whose whole text (trimmed, case-folded) is one of
/// `stop_words` opts its sender out; one of `start_words` opts it back in. In the environment,
/// a list is written with commas (`SMSBATCH__OPT_OUT__STOP_WORDS=STOP,ARRET`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptOutSettings {
    /// Words that opt out.
    pub stop_words: Vec<String>,
    /// Words that opt back in.
    pub start_words: Vec<String>,
}

impl Default for OptOutSettings {
    fn default() -> Self {
        let owned = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect();
        Self {
            stop_words: owned(&crate::domain::receipt::STOP_WORDS),
            start_words: owned(&crate::domain::receipt::START_WORDS),
        }
    }
}

/// `http.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Address to listen on; port 0 picks a free port (the chosen one is printed).
    pub bind: String,
    /// Largest JSON request body, in bytes.
    pub max_json_bytes: usize,
    /// Largest CSV upload, in bytes (the upload is streamed; this only caps it).
    pub max_csv_bytes: u64,
    /// Most recipients accepted inline in `POST /v1/batches`.
    pub max_inline_recipients: usize,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Most SMS segments a batch's content may take (422 above). Checked when the batch is
    /// created, on the template's static text: what each recipient's vars add is only known
    /// at preparation.
    pub max_segments: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            max_json_bytes: 16 * 1024 * 1024,
            max_csv_bytes: 2 * 1024 * 1024 * 1024,
            max_inline_recipients: 100_000,
            workers: 0,
            max_segments: 10,
        }
    }
}

/// `database.*`
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` (folder and file are created) or `postgres://user@host/db`.
    pub url: Secret,
    /// Connections in the pool of the background work (supervisors, steps, workers).
    pub pool_size: usize,
    /// Connections kept apart for API requests (and the actions they carry), so that background
    /// work cannot leave a request waiting for one.
    pub api_pool_size: usize,
    /// How long a request waits for a pooled connection, in milliseconds.
    pub acquire_timeout_ms: u64,
}

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(self.url.expose()))
            .field("pool_size", &self.pool_size)
            .field("api_pool_size", &self.api_pool_size)
            .finish()
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: Secret::new("sqlite://data/smsbatch.db"),
            pool_size: 8,
            api_pool_size: 4,
            acquire_timeout_ms: 30_000,
        }
    }
}

/// Which transport carries delivery tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Tasks go straight into this process's worker mailboxes.
    InProcess,
    /// Tasks go through a durable RabbitMQ queue.
    Rabbitmq,
}

/// `transport.*`
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    /// `in_process` or `rabbitmq`.
    pub kind: TransportKind,
    /// The broker URL, used with `rabbitmq`.
    pub amqp_url: Secret,
    /// The durable queue delivery tasks go through.
    pub queue: String,
    /// Tasks published and not yet confirmed by the broker, at most.
    pub publish_window: usize,
    /// When above 0, the broker deletes the queue after it has had no consumer for this many
    /// milliseconds (`x-expires`; for tests and short-lived set-ups).
    pub queue_expires_ms: u64,
}

impl fmt::Debug for TransportSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportSettings")
            .field("kind", &self.kind)
            .field("amqp_url", &redact_url(self.amqp_url.expose()))
            .field("queue", &self.queue)
            .field("publish_window", &self.publish_window)
            .field("queue_expires_ms", &self.queue_expires_ms)
            .finish()
    }
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            kind: TransportKind::InProcess,
            amqp_url: Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f"),
            queue: "smsbatch.delivery".into(),
            publish_window: 64,
            queue_expires_ms: 0,
        }
    }
}

/// `admin.*`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Bearer token required on every `/v1/` route, and taken by the dashboard's login; empty
    /// means none is needed.
    pub token: Secret,
}

/// What happens to a message that was `sending` when its process died.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redelivery {
    /// Mark it failed with `unknown_outcome`: nobody gets the SMS twice.
    AtMostOnce,
    /// Send it again with the same idempotency key (the message id).
    AtLeastOnce,
}

/// `smsbatch.*`: the orchestration knobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSettings {
    /// Partitions of a batch when its request does not say (1–256).
    pub partition_count: i64,
    /// Partition workers in this process.
    pub worker_count: usize,
    /// Provider calls in flight per worker.
    pub send_concurrency: usize,
    /// Recipients per preparation chunk (one transaction and checkpoint each).
    pub batch_size: usize,
    /// Messages per delivery task.
    pub task_size: usize,
    /// Messages a worker claims at once within a task: the most a crash can leave with an
    /// unknown outcome per worker.
    pub claim_size: usize,
    /// Attempts after a transient provider error, and restarts of a failed step.
    pub retry_count: u32,
    /// First retry delay in milliseconds; doubles with each attempt.
    pub retry_backoff_ms: u64,
    /// Provider call timeout in milliseconds.
    pub timeout_ms: u64,
    /// Capacity of each partition worker's mailbox (tasks).
    pub worker_mailbox: usize,
    /// How long an instance holds a batch's lease without renewing it (ms): another instance
    /// takes over the batches of an instance that stopped renewing after this long.
    pub lease_ms: u64,
    /// How often the instance's watch looks, in one statement for all its batches, for actions
    /// taken through another instance and for progress other instances made (ms).
    pub poll_ms: u64,
    /// Re-plan a batch's pending messages when its delivery made no progress for this long
    /// (milliseconds): a task lost outside the broker's guarantees is sent again, and this
    /// instance's own claims that none of its workers holds (a claim whose answer was lost) are
    /// settled.
    pub replan_after_ms: u64,
    /// Capacity of each supervisor's and of the registry's mailbox.
    pub supervisor_mailbox: usize,
    /// Steps (a batch's preparation, or a round of its delivery planning) this instance runs at
    /// once; the others wait their turn, transactional batches first. Waiting costs a batch
    /// nothing but its place in line, where thousands of steps at once would only queue for the
    /// pool's connections until their wait timed out.
    pub active_steps: usize,
    /// How long a stop (SIGTERM, Ctrl-C) waits in all for work in flight to finish or
    /// checkpoint (ms): a step still busy then is left to continue after the next start.
    pub shutdown_timeout_ms: u64,
    /// `at_most_once` or `at_least_once`.
    pub redelivery: Redelivery,
    /// Region for numbers written without `+` (ISO 3166 code).
    pub default_region: String,
    /// The failure rate (0–1) over the last `failure_window` outcomes above which a batch pauses
    /// itself, for batches whose request does not set `failure_threshold`.
    pub failure_threshold: f64,
    /// Final outcomes (sent or failed) the failure rate is measured over; a batch's delivery
    /// pauses only after this many outcomes in one run.
    pub failure_window: u64,
}

impl BatchSettings {
    /// How often the registry renews its leases and takes over unsupervised batches.
    pub fn upkeep_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lease_ms / 3)
    }

    /// How far ahead a scheduled batch needs a supervisor: two rounds of upkeep, so that one
    /// round always starts its supervisor before it is due. A batch scheduled later holds
    /// nothing but its row until then.
    pub fn schedule_horizon(&self) -> std::time::Duration {
        self.upkeep_every() * 2
    }
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            partition_count: 4,
            worker_count: 4,
            send_concurrency: 8,
            batch_size: 1000,
            task_size: 500,
            claim_size: 64,
            retry_count: 3,
            retry_backoff_ms: 1000,
            timeout_ms: 10_000,
            worker_mailbox: 4,
            replan_after_ms: 30_000,
            lease_ms: 15_000,
            poll_ms: 250,
            supervisor_mailbox: 64,
            active_steps: 8,
            shutdown_timeout_ms: 20_000,
            redelivery: Redelivery::AtMostOnce,
            default_region: "CN".into(),
            failure_threshold: 0.1,
            failure_window: 1000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable, for development.
    Pretty,
    /// One JSON object a line, for production.
    Json,
}

/// `log.*`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `pretty` or `json`.
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info` or `smsbatch=debug,info`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Loads the layers from `SMSBATCH_CONFIG_DIR` (default `./config`), `SMSBATCH_ENV` and the
    /// process environment, then checks every value.
    pub fn load() -> Result<Self, ConfigError> {
        let dir = std::env::var_os("SMSBATCH_CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        let env = std::env::var("SMSBATCH_ENV").ok();
        Self::load_from(&dir, env.as_deref(), None)
    }

    /// Loads from a given folder and environment name; `vars` replaces the process environment
    /// (for tests).
    pub fn load_from(
        dir: &Path,
        env: Option<&str>,
        vars: Option<config::Map<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from(dir.join("default.yaml")).required(false));
        if let Some(env) = env.filter(|e| !e.is_empty()) {
            builder = builder.add_source(config::File::from(dir.join(format!("{env}.yaml"))));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("SMSBATCH")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("opt_out.stop_words")
                    .with_list_parse_key("opt_out.start_words")
                    .source(vars),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        fn positive(key: &'static str, v: u64) -> Result<(), ConfigError> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    reason: "must be at least 1".into(),
                });
            }
            Ok(())
        }
        self.http
            .bind
            .parse::<std::net::SocketAddr>()
            .map_err(|e| ConfigError::Invalid {
                key: "http.bind".into(),
                reason: format!("`{}` is not an address:port ({e})", self.http.bind),
            })?;
        positive("http.max_json_bytes", self.http.max_json_bytes as u64)?;
        positive(
            "http.max_inline_recipients",
            self.http.max_inline_recipients as u64,
        )?;
        positive("http.max_segments", u64::from(self.http.max_segments))?;
        let url = self.database.url.expose();
        if !(url.starts_with("sqlite://")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::Invalid {
                key: "database.url".into(),
                reason: format!(
                    "`{}` must start with sqlite:// or postgres://",
                    redact_url(url)
                ),
            });
        }
        positive("database.pool_size", self.database.pool_size as u64)?;
        positive("database.api_pool_size", self.database.api_pool_size as u64)?;
        positive(
            "transport.publish_window",
            self.transport.publish_window as u64,
        )?;
        positive("smsbatch.replan_after_ms", self.smsbatch.replan_after_ms)?;
        positive("smsbatch.poll_ms", self.smsbatch.poll_ms)?;
        positive(
            "smsbatch.shutdown_timeout_ms",
            self.smsbatch.shutdown_timeout_ms,
        )?;
        positive("smsbatch.failure_window", self.smsbatch.failure_window)?;
        if !(0.0..=1.0).contains(&self.smsbatch.failure_threshold) {
            return Err(ConfigError::Invalid {
                key: "smsbatch.failure_threshold".into(),
                reason: "must be between 0 and 1 (1 never pauses)".into(),
            });
        }
        if self.smsbatch.lease_ms < 1000 {
            return Err(ConfigError::Invalid {
                key: "smsbatch.lease_ms".into(),
                reason: "must be at least 1000".into(),
            });
        }
        if self.transport.queue.is_empty() {
            return Err(ConfigError::Invalid {
                key: "transport.queue".into(),
                reason: "must not be empty".into(),
            });
        }
        PartitionCount::new(self.smsbatch.partition_count).map_err(|e| ConfigError::Invalid {
            key: "smsbatch.partition_count".into(),
            reason: e.to_string(),
        })?;
        positive("smsbatch.worker_count", self.smsbatch.worker_count as u64)?;
        positive(
            "smsbatch.send_concurrency",
            self.smsbatch.send_concurrency as u64,
        )?;
        positive("smsbatch.batch_size", self.smsbatch.batch_size as u64)?;
        positive("smsbatch.task_size", self.smsbatch.task_size as u64)?;
        positive("smsbatch.claim_size", self.smsbatch.claim_size as u64)?;
        if self.smsbatch.claim_size > 10_000 {
            return Err(ConfigError::Invalid {
                key: "smsbatch.claim_size".into(),
                reason: "must be at most 10000 (one statement binds every claimed id)".into(),
            });
        }
        positive("smsbatch.timeout_ms", self.smsbatch.timeout_ms)?;
        positive(
            "smsbatch.worker_mailbox",
            self.smsbatch.worker_mailbox as u64,
        )?;
        positive(
            "smsbatch.supervisor_mailbox",
            self.smsbatch.supervisor_mailbox as u64,
        )?;
        positive("smsbatch.active_steps", self.smsbatch.active_steps as u64)?;
        self.region()?;
        let words = crate::domain::receipt::Keywords::new(&self.opt_out.stop_words, &[]);
        for (key, list) in [
            ("opt_out.stop_words", &self.opt_out.stop_words),
            ("opt_out.start_words", &self.opt_out.start_words),
        ] {
            if let Some(blank) = list.iter().find(|w| w.trim().is_empty()) {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    reason: format!("`{blank}`: a word must not be blank"),
                });
            }
        }
        if let Some(both) = self
            .opt_out
            .start_words
            .iter()
            .find(|w| words.classify(w) == crate::domain::receipt::Keyword::Stop)
        {
            return Err(ConfigError::Invalid {
                key: "opt_out.start_words".into(),
                reason: format!("`{both}` is a stop word too"),
            });
        }
        crate::provider::configure(&self.providers)?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::Invalid {
                key: "log.level".into(),
                reason: e.to_string(),
            }
        })?;
        Ok(())
    }

    /// The default region, parsed.
    pub fn region(&self) -> Result<Region, ConfigError> {
        self.smsbatch
            .default_region
            .parse()
            .map_err(
                |e: crate::domain::state::UnknownValue| ConfigError::Invalid {
                    key: "smsbatch.default_region".into(),
                    reason: e.to_string(),
                },
            )
    }

    /// The default partition count, parsed.
    pub fn partition_count(&self) -> PartitionCount {
        PartitionCount::new(self.smsbatch.partition_count).unwrap_or_else(|_| {
            // validate() rejected anything out of range already.
            PartitionCount::new(4).unwrap_or_else(|_| unreachable!("4 is in range"))
        })
    }
}

#[cfg(test)]
mod tests;
