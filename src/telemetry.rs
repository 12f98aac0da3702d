//! Logs (tracing) and metrics (Prometheus). Metric names are namespaced `smsbatch_*`; labels are
//! low-cardinality: never a batch id or a phone number.

use std::time::Duration;

use opentelemetry_sdk::trace::SdkTracerProvider;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, registry::Registry as Spans};

use crate::config::{LogFormat, LogSettings};

pub mod otlp;
pub mod trace;

/// Installs the global tracing subscriber: logs as JSON lines or pretty text on stderr
/// (`RUST_LOG` overrides `log.level`), and, when the `OTEL_*` variables name an endpoint, the
/// service's spans (`smsbatch`'s, at info and above, whatever the log level) exported over
/// OTLP/HTTP. A bad `OTEL_*` variable is an error naming it.
pub fn init_tracing(settings: &LogSettings) -> Result<Traces, otlp::OtlpError> {
    let otlp = otlp::OtlpConfig::from_env(|key| std::env::var(key).ok())?;
    let provider = otlp.as_ref().map(otlp::OtlpConfig::provider).transpose()?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Each layer has its own filter: the log level does not decide which spans are exported.
    let logs = match settings.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Spans> + Send + Sync>> = vec![logs];
    if let Some(provider) = &provider {
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(otlp::tracer(provider))
                .with_filter(Targets::new().with_target("smsbatch", tracing::Level::INFO))
                .boxed(),
        );
    }
    // A second init (tests) keeps the first subscriber.
    let installed = tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok();
    if let (true, Some(otlp)) = (installed, &otlp) {
        tracing::info!(
            endpoint = %crate::secret::redact_url(&otlp.endpoint),
            protocol = ?otlp.protocol,
            "Exporting traces over OTLP."
        );
    }
    Ok(Traces { provider })
}

/// The trace export of the installed subscriber, if any: flushed at exit.
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Exports the spans still queued and stops the exporter, waiting at most `timeout` (a
    /// collector that does not answer costs the exit no more than that).
    pub fn shut_down(self, timeout: Duration) {
        if let Some(provider) = &self.provider
            && let Err(e) = otlp::shut_down(provider, timeout)
        {
            tracing::warn!(error = %e, "Spans not exported at exit.");
        }
    }
}

/// The service's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `smsbatch_batches{state}`: batches by state (set from the database at each scrape).
    pub batches: IntGaugeVec,
    /// `smsbatch_messages_total{provider,outcome}`: provider outcomes.
    pub messages: IntCounterVec,
    /// `smsbatch_provider_request_seconds{provider}`: provider call latency.
    pub provider_seconds: HistogramVec,
    /// `smsbatch_preparation_rows_total{outcome}`: recipients prepared, by outcome.
    pub preparation_rows: IntCounterVec,
    /// `smsbatch_preparation_seconds_total{stage}`: time spent by preparation's stages —
    /// `reading` recipients, `preparing` them (numbers, rendering) and `writing` chunks (summed
    /// over the writers running side by side).
    pub preparation_seconds: CounterVec,
    /// `smsbatch_mailbox_depth{actor}`: messages waiting in actor mailboxes.
    pub mailbox_depth: IntGaugeVec,
    /// `smsbatch_tasks_in_flight`: delivery tasks dispatched and not yet finished.
    pub tasks_in_flight: IntGauge,
    /// `smsbatch_tasks_total`: delivery tasks finished by workers of this process.
    pub tasks: IntCounter,
    /// `smsbatch_step_restarts_total{step}`: steps restarted after a crash or error.
    pub step_restarts: IntCounterVec,
    /// `smsbatch_amqp_tasks_total{event}`: tasks published, confirmed, nacked, consumed, acked,
    /// redelivered.
    pub amqp_tasks: IntCounterVec,
    /// `smsbatch_amqp_prefetch_in_flight`: consumed tasks not yet acked.
    pub amqp_prefetch_in_flight: IntGauge,
    /// `smsbatch_supervised_batches`: batches this instance runs a supervisor for (paused,
    /// finished and far-scheduled batches have none).
    pub supervised: IntGauge,
    /// `smsbatch_steps_waiting`: steps waiting for one of the instance's `active_steps` places.
    pub steps_waiting: IntGauge,
    /// `smsbatch_smpp_sessions{provider,state}`: this instance's SMPP sessions by state (set
    /// at each scrape).
    pub smpp_sessions: IntGaugeVec,
    /// `smsbatch_smpp_window_in_use{provider}`: `submit_sm` written and unanswered, over the
    /// instance's sessions of the account (set at each scrape).
    pub smpp_window_in_use: IntGaugeVec,
    /// `smsbatch_receipts_total{outcome}`: receipts stored by this instance, by what they did:
    /// `delivered`, `failed` (a message settled), `part` (a part of a message still waiting
    /// for its others), `repeated` (its message already settled), `kept` (no message yet),
    /// `dropped` (kept too long), `late` (after its provider's `receipt_timeout_ms`).
    pub receipts: IntCounterVec,
    /// `smsbatch_receipt_latency_seconds`: from a message's submit to the receipt that settled
    /// it.
    pub receipt_latency: Histogram,
    /// `smsbatch_inbound_messages_total{provider,action}`: mobile-originated messages, by what
    /// they asked (`stop`, `start`, `none`).
    pub inbound: IntCounterVec,
    /// `smsbatch_opt_outs_total{source}`: numbers added to the opt-out list (`api`, `csv`,
    /// `inbound`).
    pub opt_outs: IntCounterVec,
    /// `smsbatch_ready{check}`: 1 while the instance's `/readyz` check (`database`, `queue`)
    /// passes, else 0 (set at each scrape).
    pub ready: IntGaugeVec,
    /// `smsbatch_failure_threshold_pauses_total`: batches this instance paused because more than
    /// their `failure_threshold` of their recent outcomes failed.
    pub failure_threshold_pauses: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let batches = IntGaugeVec::new(
            Opts::new("smsbatch_batches", "Batches by state."),
            &["state"],
        )?;
        let messages = IntCounterVec::new(
            Opts::new(
                "smsbatch_messages_total",
                "Messages handed to providers, by provider and outcome.",
            ),
            &["provider", "outcome"],
        )?;
        let provider_seconds = HistogramVec::new(
            HistogramOpts::new(
                "smsbatch_provider_request_seconds",
                "Provider call latency in seconds.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["provider"],
        )?;
        let preparation_rows = IntCounterVec::new(
            Opts::new(
                "smsbatch_preparation_rows_total",
                "Recipients prepared, by outcome.",
            ),
            &["outcome"],
        )?;
        let preparation_seconds = CounterVec::new(
            Opts::new(
                "smsbatch_preparation_seconds_total",
                "Time spent by preparation's stages (writers side by side add up).",
            ),
            &["stage"],
        )?;
        let mailbox_depth = IntGaugeVec::new(
            Opts::new(
                "smsbatch_mailbox_depth",
                "Messages waiting in actor mailboxes, by actor kind.",
            ),
            &["actor"],
        )?;
        let smpp_sessions = IntGaugeVec::new(
            Opts::new(
                "smsbatch_smpp_sessions",
                "SMPP sessions of this instance, by account and state.",
            ),
            &["provider", "state"],
        )?;
        let smpp_window_in_use = IntGaugeVec::new(
            Opts::new(
                "smsbatch_smpp_window_in_use",
                "SMPP submit_sm written and not yet answered, by account.",
            ),
            &["provider"],
        )?;
        let receipts = IntCounterVec::new(
            Opts::new(
                "smsbatch_receipts_total",
                "Delivery receipts stored by this instance, by what they did.",
            ),
            &["outcome"],
        )?;
        let receipt_latency = Histogram::with_opts(
            HistogramOpts::new(
                "smsbatch_receipt_latency_seconds",
                "Seconds from a message's submit to the receipt that settled it.",
            )
            .buckets(vec![
                0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0,
            ]),
        )?;
        let inbound = IntCounterVec::new(
            Opts::new(
                "smsbatch_inbound_messages_total",
                "Mobile-originated messages, by provider and what they asked.",
            ),
            &["provider", "action"],
        )?;
        let opt_outs = IntCounterVec::new(
            Opts::new(
                "smsbatch_opt_outs_total",
                "Numbers added to the opt-out list, by source.",
            ),
            &["source"],
        )?;
        let ready = IntGaugeVec::new(
            Opts::new(
                "smsbatch_ready",
                "1 while the instance's readiness check passes, by check (database, queue).",
            ),
            &["check"],
        )?;
        let failure_threshold_pauses = IntCounter::new(
            "smsbatch_failure_threshold_pauses_total",
            "Batches this instance paused because too many of their recent outcomes failed.",
        )?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(failure_threshold_pauses.clone()))?;
        registry.register(Box::new(receipts.clone()))?;
        registry.register(Box::new(receipt_latency.clone()))?;
        registry.register(Box::new(inbound.clone()))?;
        registry.register(Box::new(opt_outs.clone()))?;
        for outcome in ["delivered", "failed", "part", "repeated", "kept", "dropped"] {
            receipts.with_label_values(&[outcome]);
        }
        for source in ["api", "csv", "inbound"] {
            opt_outs.with_label_values(&[source]);
        }
        let tasks_in_flight = IntGauge::new(
            "smsbatch_tasks_in_flight",
            "Delivery tasks dispatched and not yet finished.",
        )?;
        let tasks = IntCounter::new(
            "smsbatch_tasks_total",
            "Delivery tasks finished by this process's workers.",
        )?;
        let step_restarts = IntCounterVec::new(
            Opts::new(
                "smsbatch_step_restarts_total",
                "Steps restarted after a crash or an error.",
            ),
            &["step"],
        )?;
        let amqp_tasks = IntCounterVec::new(
            Opts::new(
                "smsbatch_amqp_tasks_total",
                "Delivery tasks through the broker, by event.",
            ),
            &["event"],
        )?;
        let amqp_prefetch_in_flight = IntGauge::new(
            "smsbatch_amqp_prefetch_in_flight",
            "Tasks consumed from the broker and not yet acked.",
        )?;
        let supervised = IntGauge::new(
            "smsbatch_supervised_batches",
            "Batches this instance runs a supervisor for.",
        )?;
        registry.register(Box::new(supervised.clone()))?;
        let steps_waiting = IntGauge::new(
            "smsbatch_steps_waiting",
            "Steps waiting for one of the instance's places to run (smsbatch.active_steps).",
        )?;
        registry.register(Box::new(steps_waiting.clone()))?;
        registry.register(Box::new(amqp_tasks.clone()))?;
        registry.register(Box::new(amqp_prefetch_in_flight.clone()))?;
        registry.register(Box::new(batches.clone()))?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(provider_seconds.clone()))?;
        registry.register(Box::new(preparation_rows.clone()))?;
        registry.register(Box::new(preparation_seconds.clone()))?;
        registry.register(Box::new(mailbox_depth.clone()))?;
        registry.register(Box::new(smpp_sessions.clone()))?;
        registry.register(Box::new(smpp_window_in_use.clone()))?;
        registry.register(Box::new(tasks_in_flight.clone()))?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(step_restarts.clone()))?;
        // Expose the series from the start, so dashboards see zeros rather than nothing.
        for actor in ["partition_worker", "registry"] {
            mailbox_depth.with_label_values(&[actor]).set(0);
        }
        for outcome in ["valid", "invalid", "duplicate", "opted_out"] {
            preparation_rows.with_label_values(&[outcome]);
        }
        for stage in ["reading", "preparing", "writing"] {
            preparation_seconds.with_label_values(&[stage]);
        }
        for step in ["preparation", "delivery"] {
            step_restarts.with_label_values(&[step]);
        }
        for event in [
            "published",
            "confirmed",
            "nacked",
            "consumed",
            "acked",
            "redelivered",
        ] {
            amqp_tasks.with_label_values(&[event]);
        }
        Ok(Metrics {
            registry,
            batches,
            messages,
            provider_seconds,
            preparation_rows,
            preparation_seconds,
            mailbox_depth,
            tasks_in_flight,
            tasks,
            step_restarts,
            amqp_tasks,
            amqp_prefetch_in_flight,
            supervised,
            steps_waiting,
            smpp_sessions,
            smpp_window_in_use,
            receipts,
            receipt_latency,
            inbound,
            opt_outs,
            ready,
            failure_threshold_pauses,
        })
    }

    /// Creates a provider's series at zero: Prometheus takes a series that appears above zero
    /// as its start, so without them the first messages sent through a provider after a start
    /// would never show in a rate.
    pub fn expose_provider(&self, provider: &str) {
        for outcome in ["sent", "retried", "failed", "opted_out"] {
            self.messages.with_label_values(&[provider, outcome]);
        }
        self.provider_seconds.with_label_values(&[provider]);
    }

    /// The text exposition (format 0.0.4).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
