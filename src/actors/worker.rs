//! The partition worker: claims a task's messages, sends them through the batch's provider under
//! its rate limit, and records the outcomes in bulk. One task at a time per worker
//! (`AtomicResponse`), so the bounded mailbox is the backpressure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use tracing::Instrument as _;

use super::Core;
use super::gates::{Gate, GateState};
use crate::config::Redelivery;
use crate::domain::receipt::receipt_key;
use crate::domain::state::BatchState;
use crate::provider::{Accepted, OutgoingSms, ProviderError};
use crate::store::UNKNOWN_OUTCOME;
use crate::store::models::ClaimedMessage;
use crate::store::{Outcomes, StoreError};
use crate::transport::{Assignment, DeliveryTask, TaskReport, TransportError};

/// How long a message the provider could not take waits before it is due again.
const DEFER: chrono::Duration = chrono::Duration::seconds(1);

/// A pool member. Stateless between tasks: everything it needs is in the task and the store.
pub struct PartitionWorker {
    core: Core,
}

impl PartitionWorker {
    /// A worker over the shared dependencies.
    pub fn new(core: Core) -> Self {
        PartitionWorker { core }
    }
}

impl Actor for PartitionWorker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.core.settings.smsbatch.worker_mailbox);
    }
}

impl Handler<Assignment> for PartitionWorker {
    type Result = AtomicResponse<Self, Result<TaskReport, TransportError>>;

    fn handle(&mut self, msg: Assignment, _ctx: &mut Self::Context) -> Self::Result {
        self.core
            .metrics
            .mailbox_depth
            .with_label_values(&["partition_worker"])
            .dec();
        let core = self.core.clone();
        let Assignment { task, trace } = msg;
        // The task's span, a child of the span that handed it over (here, or in another
        // instance through the broker's headers) when traces are on.
        let span = tracing::info_span!(
            "task",
            batch_id = task.batch_id,
            partition = task.partition,
            first_id = task.first_id,
            last_id = task.last_id
        );
        trace.adopt(&span);
        AtomicResponse::new(Box::pin(
            async move { process_task(&core, task).await }
                .instrument(span)
                .into_actor(self),
        ))
    }
}

/// The gate of a task's batch: this process's if it supervises the batch, else one built from
/// the stored state (a task that outlived its batch's run, or one from another instance).
async fn gate_for(core: &Core, batch_id: i64) -> Result<Arc<Gate>, TransportError> {
    if let Some(gate) = core.gates.get(batch_id) {
        return Ok(gate);
    }
    let batch = core.store.batch(batch_id).await.map_err(task_error)?;
    let state = match batch.state {
        BatchState::Delivering => GateState::Open,
        BatchState::Cancelled => GateState::Cancelled,
        _ => GateState::Held,
    };
    Ok(Arc::new(Gate::new(state, batch.provider)))
}

/// A store error as the task's error, keeping whether the database was out of reach.
fn task_error(e: StoreError) -> TransportError {
    if e.is_unavailable() {
        TransportError::Unavailable(e.to_string())
    } else {
        TransportError::Task(e.to_string())
    }
}

/// Carries out one task; returns what happened to its messages. The task's range is claimed in
/// slices of `claim_size`, each sent and recorded before the next is claimed: a crash leaves at
/// most one slice per worker with an unknown outcome. A slice sent whole is recorded together
/// with the claim of the next one (one commit for both, on PostgreSQL). Its span, `task`, is made
/// by the worker that calls it.
pub async fn process_task(core: &Core, task: DeliveryTask) -> Result<TaskReport, TransportError> {
    let claim_size = core.settings.smsbatch.claim_size as i64;
    let store = &core.store;
    let _working = core.gates.working_on(task.batch_id);
    let mut report = TaskReport::default();
    // Looked up before every claim: a batch supervised by another instance is paused through
    // the database, and this is how its tasks here see it.
    let claim_from = async |from| {
        store
            .claim_in(
                task.batch_id,
                task.partition,
                task.across,
                from,
                task.last_id,
                claim_size,
                &core.instance,
            )
            .await
            .map_err(task_error)
    };
    let mut gate = gate_for(core, task.batch_id).await?;
    let mut claimed = Vec::new();
    if may_send(core, &gate) {
        claimed = claim_from(task.first_id).await?;
    }
    while let Some(last) = claimed.last().map(|m| m.id) {
        let from = last + 1;
        report.claimed += claimed.len();
        // Across partitions, each message's partition: its outcome is counted there.
        let partition_of: HashMap<i64, i32> = if task.across {
            claimed.iter().map(|m| (m.id, m.partition)).collect()
        } else {
            HashMap::new()
        };
        let record = async |outcomes: &Outcomes| {
            record_with_retry(core, &task, &partition_of, outcomes).await
        };
        let outcomes = send_slice(core, &gate, claimed).await;
        report.sent += outcomes.sent.len();
        report.failed += outcomes.failed.len();
        report.retried += outcomes.retry.len();
        report.released += outcomes.released.len() + outcomes.deferred.len();
        report.cancelled += outcomes.cancelled.len() + outcomes.opted_out.len();
        // Whether to claim more, asked before the outcomes are recorded so that the two can
        // share a commit; the outcomes are recorded whatever the answer.
        let next_gate = if from <= task.last_id && !core.gates.stopping() {
            match gate_for(core, task.batch_id).await {
                Ok(next) => Some(next).filter(|g| may_send(core, g)),
                Err(e) => {
                    record(&outcomes).await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        let Some(next_gate) = next_gate else {
            record(&outcomes).await;
            break;
        };
        gate = next_gate;
        if task.across {
            // Recorded per partition, then the next slice claimed.
            record(&outcomes).await;
            claimed = claim_from(from).await?;
            continue;
        }
        let together = store
            .record_sent_and_claim(
                task.batch_id,
                task.partition,
                &outcomes,
                from,
                task.last_id,
                claim_size,
                &core.instance,
            )
            .await;
        claimed = match together {
            Ok(Some(next)) => next,
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, batch_id = task.batch_id, "Recording outcomes with the next claim failed; recording them alone.");
                }
                // A failed statement changed nothing. If only its answer was lost, recording
                // again changes nothing (only `sending` messages are recorded), and the slice it
                // claimed stays `sending`, as after a plain claim whose answer was lost.
                record(&outcomes).await;
                claim_from(from).await?
            }
        };
    }
    core.metrics.tasks.inc();
    if let Some(gate) = core.gates.get(task.batch_id) {
        // The batch's delivery here sleeps until its counters move.
        gate.nudge();
    }
    Ok(report)
}

/// True when messages of the gate's batch may be claimed: the gate is open, the process is not
/// stopping, and the batch's provider is not known to take nothing now (an SMPP account whose
/// binds are refused): the rest of a task's range stays `pending`, planned again once the
/// provider is back, instead of being claimed and put back slice after slice.
fn may_send(core: &Core, gate: &Gate) -> bool {
    gate.is_open()
        && !core.gates.stopping()
        && core
            .providers
            .get(&gate.provider)
            .is_none_or(|p| p.gateway.unavailable().is_none())
}

/// Sends claimed messages through the batch's provider, `send_concurrency` at a time, looking at
/// the gate before each call.
async fn send_slice(core: &Core, gate: &Gate, claimed: Vec<ClaimedMessage>) -> Outcomes {
    let settings = &core.settings.smsbatch;
    let provider = core.providers.get(&gate.provider);
    let timeout = Duration::from_millis(settings.timeout_ms);
    let results: Vec<(i64, i32, SendResult)> = futures_util::stream::iter(claimed)
        .map(|m| {
            let provider = provider.clone();
            async move {
                let state = if core.gates.stopping() {
                    GateState::Held
                } else {
                    gate.state()
                };
                let result = match state {
                    // Cancelled whatever the gate says: it must never be sent, and it is not
                    // waiting for anything.
                    _ if m.opted_out => SendResult::OptedOut,
                    GateState::Held => SendResult::Released,
                    GateState::Cancelled => SendResult::Cancelled,
                    GateState::Open => match provider {
                        None => SendResult::Failed(ProviderError::Permanent(format!(
                            "unknown provider `{}`",
                            gate.provider
                        ))),
                        Some(provider) => {
                            let sms = OutgoingSms {
                                message_id: m.id,
                                phone: &m.phone,
                                body: &m.body,
                                attempt: m.attempts,
                            };
                            provider.limiter.acquire(provider.gateway.cost(&sms)).await;
                            // The limiter may have waited: look at the gate again.
                            if !gate.is_open() || core.gates.stopping() {
                                SendResult::Released
                            } else {
                                let started = Instant::now();
                                let answer =
                                    tokio::time::timeout(timeout, provider.gateway.send(&sms))
                                        .await;
                                core.metrics
                                    .provider_seconds
                                    .with_label_values(&[provider.name.as_str()])
                                    .observe(started.elapsed().as_secs_f64());
                                match answer {
                                    Ok(Ok(accepted)) => SendResult::Sent(accepted),
                                    Ok(Err(e)) => SendResult::Failed(e),
                                    Err(_) => SendResult::Failed(ProviderError::Transient(
                                        "provider timeout".into(),
                                    )),
                                }
                            }
                        }
                    },
                };
                (m.id, m.attempts, result)
            }
        })
        .buffer_unordered(settings.send_concurrency)
        .collect()
        .await;

    let mut outcomes = Outcomes::default();
    let now = chrono::Utc::now().naive_utc();
    for (id, attempts, result) in results {
        let outcome = match result {
            SendResult::Sent(accepted) => {
                outcomes.receipt_keys.extend(
                    accepted
                        .receipt_ids
                        .iter()
                        .map(|rid| (id, receipt_key(&gate.provider, rid))),
                );
                outcomes.sent.push((id, accepted.provider_message_id));
                "sent"
            }
            // The provider may have it: sending again could deliver it twice, so only
            // `at_least_once` tries again, and `at_most_once` settles it as a crash would.
            SendResult::Failed(ProviderError::Unknown(why))
                if settings.redelivery == Redelivery::AtMostOnce =>
            {
                tracing::warn!(message_id = id, reason = %why, "Provider outcome unknown; settled as unknown_outcome.");
                outcomes.failed.push((id, UNKNOWN_OUTCOME.to_owned()));
                "failed"
            }
            // The provider took nothing (no session bound): the message waits for it without
            // using an attempt, and the batch's delivery waits for the provider too.
            SendResult::Failed(ProviderError::Unavailable(why)) => {
                outcomes.deferred.push((id, now + DEFER, why));
                "deferred"
            }
            // Under `at_least_once`, an unknown outcome is retried like a transient error.
            SendResult::Failed(e)
                if (e.is_transient() || matches!(e, ProviderError::Unknown(_)))
                    && attempts <= settings.retry_count as i32 =>
            {
                let backoff = retry_delay(settings.retry_backoff_ms, attempts);
                outcomes.retry.push((id, now + backoff, e.to_string()));
                "retried"
            }
            SendResult::Failed(e) => {
                outcomes.failed.push((id, e.to_string()));
                "failed"
            }
            SendResult::Released => {
                outcomes.released.push(id);
                continue;
            }
            SendResult::Cancelled => {
                outcomes.cancelled.push(id);
                continue;
            }
            SendResult::OptedOut => {
                outcomes.opted_out.push(id);
                "opted_out"
            }
        };
        core.metrics
            .messages
            .with_label_values(&[gate.provider.as_str(), outcome])
            .inc();
    }
    outcomes
}

/// What happened to one message.
enum SendResult {
    Sent(Accepted),
    Failed(ProviderError),
    Released,
    Cancelled,
    OptedOut,
}

/// Exponential backoff: `base`, 2·`base`, 4·`base`… capped at five minutes.
fn retry_delay(base_ms: u64, attempt: i32) -> chrono::Duration {
    let exp = u32::try_from(attempt.saturating_sub(1))
        .unwrap_or(0)
        .min(16);
    let ms = base_ms.saturating_mul(1u64 << exp).min(300_000);
    chrono::Duration::milliseconds(i64::try_from(ms).unwrap_or(300_000))
}

/// Outcomes of messages that reached a provider must not be lost to a database blip: keep
/// trying, with backoff, until the store takes them. The worker's mailbox fills meanwhile,
/// which stops the producers. A task across partitions records each message's outcome in its
/// partition (`partition_of`, from the claim).
async fn record_with_retry(
    core: &Core,
    task: &DeliveryTask,
    partition_of: &HashMap<i64, i32>,
    outcomes: &Outcomes,
) {
    let mut delay = Duration::from_millis(100);
    let store = &core.store;
    loop {
        let recorded = if task.across {
            let of = |id| partition_of.get(&id).copied().unwrap_or(task.partition);
            store
                .record_outcomes_across(task.batch_id, task.partition, outcomes, of)
                .await
        } else {
            store
                .record_outcomes(task.batch_id, task.partition, outcomes)
                .await
        };
        match recorded {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, batch_id = task.batch_id, "Recording outcomes failed; retrying.");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        assert_eq!(retry_delay(100, 1), chrono::Duration::milliseconds(100));
        assert_eq!(retry_delay(100, 2), chrono::Duration::milliseconds(200));
        assert_eq!(retry_delay(100, 4), chrono::Duration::milliseconds(800));
        assert_eq!(
            retry_delay(100, 40),
            chrono::Duration::milliseconds(300_000)
        );
    }
}
