//! The production transport: delivery tasks are published, persistent, on a confirm-mode
//! channel to a durable queue; every instance consumes with manual acks and a prefetch equal to
//! its worker pool's capacity, hands each task to its pool with `send().await`, and acks only
//! after the task's outcomes are committed. A redelivered task sends nothing twice: the worker's
//! claim is conditional.
//!
//! One link actor per process owns the connection: it connects with backoff, declares the
//! queue, publishes the publisher channel to the dispatchers through a `watch`, runs the
//! consumer, and starts over when the connection drops. No batch fails because the broker is
//! away: dispatch waits for the link to come back.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::watch;
use tracing::Instrument as _;

use super::{DeliveryTask, InProcess, TaskReport, Transport, TransportError};
use crate::config::TransportSettings;
use crate::secret::redact_url;
use crate::telemetry::Metrics;
use crate::telemetry::trace::TraceContext;

/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the consumer looks at its connection's state. A connection the broker closed does
/// not always end the consumer's stream or fail the promises waiting on it; its state does say.
const WATCHDOG: Duration = Duration::from_secs(1);
/// How long an ack, a nack or a publisher confirmation may take before the link gives up on it
/// (the broker hands an unacked task out again; a task whose confirmation is lost is published
/// again, and its claims make the second run a no-op for what was done).
const BROKER_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The highest task priority (`DeliveryTask::priority`), the queue's `x-max-priority`.
const MAX_PRIORITY: u8 = 1;
/// How long a task that failed waits before it goes back to the queue.
const FAILED_TASK_PAUSE: Duration = Duration::from_millis(500);
/// `BrokerLink::queued` when the queue's depth is not known.
const QUEUED_UNKNOWN: u32 = u32::MAX;

/// The state of the broker link, shared by the link actor, the dispatchers and `/readyz`.
pub struct BrokerLink {
    url: String,
    queue: String,
    queue_expires_ms: u64,
    publish_window: usize,
    /// Places for tasks published and not yet confirmed, `publish_window` for the whole link:
    /// thousands of batches publishing at once wait here, not in the connection's buffers.
    window: tokio::sync::Semaphore,
    prefetch: u16,
    instance: String,
    channel: watch::Sender<Option<Channel>>,
    up: AtomicBool,
    /// Tasks ready in the queue at the last look (`QUEUED_UNKNOWN` while not connected).
    queued: AtomicU32,
    /// Notified at each look that found the queue empty (`Transport::held_tasks_gone`).
    drained: tokio::sync::Notify,
    last_error: Mutex<String>,
    metrics: Metrics,
    /// Set at shutdown: stop consuming, finish what is in flight, do not reconnect.
    stop: watch::Sender<bool>,
}

impl BrokerLink {
    /// A link (not yet connected) for this instance, consuming with `prefetch` tasks in flight.
    pub fn new(
        settings: &TransportSettings,
        prefetch: usize,
        instance: &str,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(BrokerLink {
            url: settings.amqp_url.expose().to_string(),
            queue: settings.queue.clone(),
            queue_expires_ms: settings.queue_expires_ms,
            publish_window: settings.publish_window,
            window: tokio::sync::Semaphore::new(settings.publish_window.max(1)),
            prefetch: u16::try_from(prefetch).unwrap_or(u16::MAX),
            instance: instance.to_string(),
            channel: watch::channel(None).0,
            up: AtomicBool::new(false),
            queued: AtomicU32::new(QUEUED_UNKNOWN),
            drained: tokio::sync::Notify::new(),
            last_error: Mutex::new("not connected yet".into()),
            metrics,
            stop: watch::Sender::new(false),
        })
    }

    /// `Ok` while connected, else the last connection error (for `/readyz`).
    pub fn check(&self) -> Result<(), String> {
        if self.up.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone())
        }
    }

    /// Stops consuming: tasks in flight finish and are settled, then the link closes. Resolves
    /// when it has.
    pub async fn shut_down(&self) {
        let mut stopped = self.stop.subscribe();
        self.stop.send_replace(true);
        // The link loop marks itself down once it has settled its tasks and left.
        while self.up.load(Ordering::Acquire) {
            if stopped.changed().await.is_err() {
                return;
            }
        }
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn set_down(&self, error: String) {
        self.up.store(false, Ordering::Release);
        self.queued.store(QUEUED_UNKNOWN, Ordering::Release);
        self.channel.send_replace(None);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        // Transactional tasks (priority 1) are delivered before marketing ones (0).
        args.insert(
            "x-max-priority".into(),
            AMQPValue::ShortShortUInt(MAX_PRIORITY),
        );
        if self.queue_expires_ms > 0 {
            // The broker deletes the queue once it has had no consumer for this long.
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(self.queue_expires_ms).unwrap_or(i64::MAX)),
            );
        }
        args
    }

    /// Connects, declares the queue, opens the confirm-mode publisher channel and the consumer.
    async fn connect(&self) -> Result<(Connection, lapin::Consumer), lapin::Error> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("smsbatch-{}", self.instance).into());
        let conn = Connection::connect(&self.url, props).await?;
        let mut publisher = conn.create_channel().await?;
        let declared = publisher
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(),
            )
            .await;
        if let Err(e) = declared {
            if !e.is_amqp_soft_error() {
                return Err(e);
            }
            // A queue declared by an earlier version, without priorities: the broker refuses
            // other arguments for it. Keep using it as it is (on a new channel: the refusal
            // closed this one); tasks then go in order, whatever their priority.
            tracing::warn!(queue = %self.queue, error = %e, "The queue exists without x-max-priority; transactional tasks are not put first. Delete the queue while no task is in it to enable priorities.");
            publisher = conn.create_channel().await?;
            self.declare_passively(&publisher).await?;
        }
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer_channel = conn.create_channel().await?;
        consumer_channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consumer_channel
            .basic_consume(
                self.queue.as_str().into(),
                format!("smsbatch-{}", self.instance).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.channel.send_replace(Some(publisher));
        self.up.store(true, Ordering::Release);
        Ok((conn, consumer))
    }

    /// Declares the queue passively: it must exist, whatever its arguments.
    async fn declare_passively(&self, channel: &Channel) -> Result<lapin::Queue, lapin::Error> {
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// Reads how many tasks wait in the queue (a passive declare on a channel of its own, since
    /// a refused one closes its channel), for `Transport::may_hold_tasks`: once a second for the
    /// whole instance.
    async fn look_at_queue(&self, conn: &Connection, probe: &mut Option<Channel>) {
        let queued = tokio::time::timeout(WATCHDOG, async {
            let channel = match probe.take().filter(|c| c.status().connected()) {
                Some(channel) => channel,
                None => conn.create_channel().await?,
            };
            let declared = self.declare_passively(&channel).await?;
            *probe = Some(channel);
            Ok::<_, lapin::Error>(declared.message_count())
        })
        .await;
        let queued = match queued {
            Ok(Ok(n)) => n,
            // The queue is gone (deleted, or expired): nothing waits in it.
            Ok(Err(e)) if e.is_amqp_soft_error() => 0,
            _ => QUEUED_UNKNOWN,
        };
        self.queued.store(queued, Ordering::Release);
        if queued == 0 {
            self.drained.notify_waiters();
        }
    }

    /// Publishes one task and waits for the broker's confirmation, retrying (with backoff, across
    /// reconnections) until the broker has it.
    async fn publish(&self, task: DeliveryTask) -> Result<TaskReport, TransportError> {
        let payload = serde_json::to_vec(&task).map_err(|e| TransportError::Task(e.to_string()))?;
        let _place = self
            .window
            .acquire()
            .await
            .map_err(|e| TransportError::Closed(e.to_string()))?;
        let events = &self.metrics.amqp_tasks;
        let mut backoff = Duration::from_millis(50);
        let mut rx = self.channel.subscribe();
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(task.priority.min(MAX_PRIORITY))
            .with_content_type("application/json".into());
        // The publish span's trace context, for the consumer's task span (nothing while traces
        // are off).
        let trace = TraceContext::current().headers();
        if !trace.is_empty() {
            let mut headers = FieldTable::default();
            for (name, value) in trace {
                headers.insert(name.into(), AMQPValue::LongString(value.into()));
            }
            properties = properties.with_headers(headers);
        }
        loop {
            let channel = match rx.wait_for(|c| c.is_some()).await {
                Ok(c) => c.clone(),
                Err(_) => return Err(TransportError::Closed("broker link stopped".into())),
            };
            let Some(channel) = channel else { continue };
            let confirmed = tokio::time::timeout(BROKER_ANSWER_TIMEOUT, async {
                channel
                    .basic_publish(
                        "".into(),
                        self.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &payload,
                        properties.clone(),
                    )
                    .await?
                    .await
            })
            .await;
            events.with_label_values(&["published"]).inc();
            match confirmed {
                Ok(Ok(Confirmation::Ack(_))) => {
                    events.with_label_values(&["confirmed"]).inc();
                    // Counted in the queue until the next look says how many are left.
                    let _ = self
                        .queued
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n != QUEUED_UNKNOWN)
                                .then(|| n.saturating_add(1).min(QUEUED_UNKNOWN - 1))
                        });
                    return Ok(TaskReport::default());
                }
                Ok(Ok(other)) => {
                    events.with_label_values(&["nacked"]).inc();
                    tracing::warn!(batch_id = task.batch_id, confirmation = ?other, "Broker did not confirm a task; publishing it again.");
                }
                Ok(Err(e)) => {
                    tracing::warn!(batch_id = task.batch_id, error = %e, "Publishing a task failed; publishing it again.");
                }
                Err(_) => {
                    tracing::warn!(batch_id = task.batch_id, timeout = ?BROKER_ANSWER_TIMEOUT, "No confirmation from the broker; publishing the task again.");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// The `Transport` face of the link: what the Delivery step publishes through.
pub struct RabbitTransport(pub Arc<BrokerLink>);

impl Transport for RabbitTransport {
    fn dispatch(
        &self,
        task: DeliveryTask,
    ) -> BoxFuture<'static, Result<TaskReport, TransportError>> {
        let link = self.0.clone();
        // Started within the Delivery step's span, so its child; the task's span, wherever the
        // task is consumed, is this one's.
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            messaging.system = "rabbitmq",
            messaging.operation.type = "send",
            messaging.destination.name = %link.queue,
            batch = task.batch_id,
            partition = task.partition,
            first_id = task.first_id,
            last_id = task.last_id,
        );
        Box::pin(async move { link.publish(task).await }.instrument(span))
    }

    fn capacity(&self) -> usize {
        self.0.publish_window
    }

    fn may_hold_tasks(&self) -> bool {
        self.0.queued.load(Ordering::Acquire) != 0
    }

    fn held_tasks_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            loop {
                // Registered before the check, so that a look in between is not missed.
                let drained = self.0.drained.notified();
                if !self.may_hold_tasks() {
                    return;
                }
                drained.await;
            }
        })
    }

    fn backlog(&self) -> Option<usize> {
        let queued = self.0.queued.load(Ordering::Acquire);
        (queued != QUEUED_UNKNOWN).then_some(queued as usize)
    }
}

/// Owns the broker connection and this instance's consumer; restarts both when the connection
/// drops.
pub struct LinkActor {
    link: Arc<BrokerLink>,
    pool: Arc<InProcess>,
}

impl LinkActor {
    /// A link actor handing consumed tasks to `pool`.
    pub fn new(link: Arc<BrokerLink>, pool: Arc<InProcess>) -> Self {
        LinkActor { link, pool }
    }
}

impl Actor for LinkActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The loop is owned by this actor: it stops with it.
        ctx.spawn(run_link(self.link.clone(), self.pool.clone()).into_actor(self));
    }
}

async fn run_link(link: Arc<BrokerLink>, pool: Arc<InProcess>) {
    let mut backoff = Duration::from_millis(100);
    while !link.stopping() {
        match link.connect().await {
            Ok((conn, consumer)) => {
                tracing::info!(broker = %redact_url(&link.url), queue = %link.queue, "Broker connected.");
                backoff = Duration::from_millis(100);
                let reason = consume(&link, &pool, &conn, consumer).await;
                if link.stopping() {
                    let _ = conn.close(200, "shutting down".into()).await;
                    link.set_down("shut down".into());
                    link.stop.send_modify(|_| {});
                    tracing::info!("Broker link closed.");
                    return;
                }
                link.set_down(reason.clone());
                tracing::warn!(error = %reason, "Broker connection lost; reconnecting.");
                drop(conn);
            }
            Err(e) => {
                link.set_down(e.to_string());
                tracing::warn!(broker = %redact_url(&link.url), error = %e, ?backoff, "Broker unavailable; retrying.");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Consumes until the consumer ends; returns why. Tasks run concurrently (the prefetch bounds
/// them); each is acked after the worker recorded its outcomes, or nacked back to the queue if
/// the worker could not carry it out.
async fn consume(
    link: &BrokerLink,
    pool: &InProcess,
    conn: &Connection,
    mut consumer: lapin::Consumer,
) -> String {
    let events = &link.metrics.amqp_tasks;
    let in_flight_gauge = &link.metrics.amqp_prefetch_in_flight;
    let mut in_flight = FuturesUnordered::new();
    let mut stop = link.stop.subscribe();
    // Once a second: is the connection still open, and how many tasks wait in the queue. It
    // runs beside the consumer, which a slow answer of the broker's must not hold up.
    let watch = async {
        let mut watchdog = tokio::time::interval(WATCHDOG);
        let mut probe = None;
        loop {
            watchdog.tick().await;
            if !conn.status().connected() {
                return "the broker connection is no longer open".to_string();
            }
            link.look_at_queue(conn, &mut probe).await;
        }
    };
    tokio::pin!(watch);
    let reason = loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break "shutting down".to_string(),
            reason = &mut watch => break reason,
            delivery = consumer.next() => {
                let delivery = match delivery {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break e.to_string(),
                    None => break "consumer cancelled".to_string(),
                };
                events.with_label_values(&["consumed"]).inc();
                if delivery.redelivered {
                    events.with_label_values(&["redelivered"]).inc();
                }
                let task: DeliveryTask = match serde_json::from_slice(&delivery.data) {
                    Ok(task) => task,
                    Err(e) => {
                        tracing::error!(error = %e, "Dropping an unreadable task.");
                        ack(&delivery).await;
                        continue;
                    }
                };
                in_flight_gauge.inc();
                let trace = TraceContext::from_headers(|name| header(&delivery.properties, name));
                in_flight.push(async move {
                    let result = pool.dispatch_traced(task, trace).await;
                    if result.is_err() {
                        // A short pause before the task goes back to the queue, so that a
                        // database outage does not spin it around; the other tasks go on.
                        tokio::time::sleep(FAILED_TASK_PAUSE).await;
                    }
                    (delivery, task, result)
                });
            }
            Some((delivery, task, result)) = in_flight.next(), if !in_flight.is_empty() => {
                in_flight_gauge.dec();
                settle(events, delivery, task, result).await;
            }
        }
    };
    // What is still running finishes. On a connection still open (a shutdown) each task is
    // settled; on one that is gone there is nobody to answer, and the broker hands the unacked
    // tasks out again by itself (their claims make the second run a no-op for what was done).
    let open = conn.status().connected();
    while let Some((delivery, task, result)) = in_flight.next().await {
        in_flight_gauge.dec();
        if open {
            settle(events, delivery, task, result).await;
        }
    }
    reason
}

async fn settle(
    events: &prometheus::IntCounterVec,
    delivery: lapin::message::Delivery,
    task: DeliveryTask,
    result: Result<TaskReport, TransportError>,
) {
    match result {
        Ok(report) if report.released > 0 => {
            // The worker stopped mid-task (shutdown, or a pause): the rest of the task goes back
            // to the queue for whoever runs next; its claims skip what was done.
            requeue(&delivery).await;
        }
        Ok(_) => {
            if ack(&delivery).await {
                events.with_label_values(&["acked"]).inc();
            }
        }
        Err(e) => {
            tracing::warn!(batch_id = task.batch_id, error = %e, "Task failed; returning it to the queue.");
            requeue(&delivery).await;
        }
    }
}

/// A text header of a consumed message (the publisher's trace context).
fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Acks a task; true when the broker took the ack in time.
async fn ack(delivery: &lapin::message::Delivery) -> bool {
    let ack = delivery.acker.ack(BasicAckOptions::default());
    matches!(
        tokio::time::timeout(BROKER_ANSWER_TIMEOUT, ack).await,
        Ok(Ok(_))
    )
}

/// Hands a task back to the queue (if the channel is gone, the broker does so by itself).
async fn requeue(delivery: &lapin::message::Delivery) {
    let nack = delivery.acker.nack(BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    });
    let _ = tokio::time::timeout(BROKER_ANSWER_TIMEOUT, nack).await;
}
