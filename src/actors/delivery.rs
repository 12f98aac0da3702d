//! The Delivery step: splits each partition's pending messages into tasks of about `task_size`
//! (ranges of message ids) and dispatches them through the transport, round-robin over the
//! partitions, with at most the transport's capacity in flight. It re-plans until every message
//! is in a final status, so retries and messages released by a pause are picked up again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::gates::Gate;
use super::{Deps, StepEnd};
use crate::store::models::{Batch, Partition};
use crate::store::{Store, StoreError};
use crate::transport::{DeliveryTask, TaskReport, Transport, TransportError};

/// How long delivery lets nudges gather before it looks again: a burst of outcomes is one read.
const GATHER: Duration = Duration::from_millis(20);

/// Tasks of a round a batch hands over whatever the broker's backlog: a small batch's tasks
/// never wait for a large one's to drain.
const FREE_TASKS: usize = 8;
/// The broker's backlog, in publish windows, from which a batch holds back the rest of its tasks.
const BACKLOG_ROUNDS: usize = 4;
/// How long a batch holding back its tasks waits before it looks at the backlog again (the
/// link reads the queue's depth once a second).
const BACKLOG_WAIT: Duration = Duration::from_millis(250);

/// Why delivery could not go on.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task could not be handed over.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl DeliveryError {
    /// True when delivery stopped because the database was out of reach.
    pub fn is_unavailable(&self) -> bool {
        match self {
            DeliveryError::Store(e) => e.is_unavailable(),
            DeliveryError::Transport(e) => matches!(e, TransportError::Unavailable(_)),
        }
    }
}

/// Runs (or continues) delivery of a batch until every message is final or the gate closes.
///
/// The first round plans every due pending message. Later rounds plan only messages waiting for
/// a retry, once one is due: with a broker, tasks already published are in the queue, and
/// planning them again would only double the queue's work. Between rounds the step sleeps until
/// its batch's counters move (the gate's nudge: from this process's workers, or from the
/// instance's watch when another instance's workers record outcomes), a retry falls due, or the
/// gate closes; no timer of its own reads the database. A batch that made no progress for
/// `replan_after` while the transport holds no task that could be its is re-planned whole, so a
/// task lost outside the broker's guarantees is not lost for good — and a batch whose tasks only
/// wait in the queue behind others' never is.
#[tracing::instrument(name = "delivery", skip_all, fields(batch_id = %batch.public_id, step = "delivery"), err)]
pub async fn run(deps: Deps, batch: Batch, gate: Arc<Gate>) -> Result<StepEnd, DeliveryError> {
    let store = &deps.core.store;
    let settings = &deps.core.settings.smsbatch;
    let task_size = settings.task_size as i64;
    let replan_after = Duration::from_millis(settings.replan_after_ms);
    let max_in_flight = deps.transport.capacity().max(1);
    let partitions = batch.partition_count.max(1);
    // The ids of a batch's partitions interleave (a recipient's partition is its id modulo the
    // count), so a span of this many ids holds about `task_size` messages of one partition.
    let span = task_size.saturating_mul(i64::from(partitions));
    let mut full_round = true;
    let mut first_look = true;
    let mut last_done = -1i64;
    let mut last_progress = Instant::now();
    // Retries already handed out, so that a retry waiting in a broker queue is not published
    // again each round (bounded: only messages that failed transiently, kept `replan_after`).
    // Known by the time each was due: a message retried again is a new retry.
    let mut retries_planned: HashMap<i64, (chrono::NaiveDateTime, Instant)> = HashMap::new();
    let mut failures = FailureCheck::new(FailureWindow::new(
        settings.failure_window,
        batch.failure_threshold,
    ));
    let priority = batch.message_type.priority();
    let provider = deps.core.providers.get(&batch.provider);
    let unavailable = || provider.as_ref().and_then(|p| p.gateway.unavailable());
    loop {
        if !gate.is_open() {
            return Ok(StepEnd::Stopped);
        }
        if let Some(why) = unavailable() {
            return Ok(StepEnd::ProviderUnavailable(why));
        }
        // Each partition's id range, read by the first look with the counters (one statement
        // instead of two, in the step's turn like the round's other work), or later at a full
        // round's first need.
        let (mut turn, mut bounds) = (None, None);
        let counters = if std::mem::take(&mut first_look) {
            turn = super::take_turn(&deps.core, &batch, &gate).await;
            if turn.is_none() {
                return Ok(StepEnd::Stopped);
            }
            let (counters, ranges) = store.partitions_and_bounds(batch.id).await?;
            bounds = Some(ranges);
            counters
        } else {
            store.partitions(batch.id).await?
        };
        if let Some(why) = failures.observe(&counters) {
            return Ok(StepEnd::TooManyFailures(why));
        }
        if counters.iter().all(|p| p.done() >= p.total) {
            tracing::info!(batch_id = %batch.public_id, "Delivery finished.");
            return Ok(StepEnd::Finished);
        }
        let done: i64 = counters.iter().map(|p| p.done()).sum();
        if done != last_done {
            last_done = done;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= replan_after && !deps.transport.may_hold_tasks() {
            tracing::warn!(batch_id = %batch.public_id, "No progress and no task left queued; settling dead instances' claims and planning every pending message again.");
            let lease = Duration::from_millis(settings.lease_ms);
            let resend = settings.redelivery == crate::config::Redelivery::AtLeastOnce;
            // With no task of this batch in this process's workers, its own claims older than
            // the quiet spell are stranded (a claim whose answer was lost).
            let stranded_before = (!deps.core.gates.is_working_on(batch.id))
                .then(|| crate::store::before(replan_after));
            store
                .settle_orphans(&batch, &deps.core.instance, lease, resend, stranded_before)
                .await?;
            full_round = true;
            last_progress = Instant::now();
        }
        // Retries due are planned now (those already handed out wait for their task, whose
        // outcomes nudge the gate); otherwise the step sleeps, until the next retry if one waits.
        if !full_round {
            let now = chrono::Utc::now().naive_utc();
            match store.earliest_retry(batch.id).await? {
                Some(due) if due <= now => {}
                later => {
                    let next_retry = later.and_then(|due| (due - now).to_std().ok());
                    idle(
                        &gate,
                        deps.transport.as_ref(),
                        next_retry,
                        replan_after.saturating_sub(last_progress.elapsed()),
                    )
                    .await;
                    continue;
                }
            }
        }
        // The round's work (finding each partition's ids, listing retries, publishing) runs in
        // the step's turn among the instance's steps; waits for tasks to be carried out, and
        // for the broker's backlog to drain, do not hold it.
        let retries_only = !std::mem::take(&mut full_round);
        retries_planned.retain(|_, (_, at)| at.elapsed() < replan_after);
        // One planning round: walk every partition once. A full round hands out each partition's
        // id range in spans of about `task_size` of its messages, without reading them: a task is
        // a hint, and its claim takes what is still due in it (reading the ids first cost 12% of
        // PostgreSQL's time in delivery, as much again as the claims' own walk over the same
        // rows). A round of retries lists the messages waiting for one, so that none is handed
        // out twice while it waits in a broker's queue.
        let mut cursors = vec![0i64; partitions as usize];
        // A batch whose messages fit in one task goes out as one task across its partitions:
        // one claim, one broker message and one worker run instead of one per partition.
        let batch_total: i64 = counters.iter().map(|c| c.total).sum();
        let across = !retries_only && partitions > 1 && batch_total <= task_size;
        let mut exhausted: Vec<bool> = (0..partitions)
            .map(|p| counters.iter().any(|c| c.idx == p && c.done() >= c.total))
            .collect();
        // Tasks handed over run as tasks of their own, so that they go on while the step waits
        // for its turn; dropping the set (the step ending) aborts what is left.
        let mut in_flight = tokio::task::JoinSet::new();
        let mut dispatched = 0usize;
        'round: loop {
            let mut planned = false;
            for p in 0..partitions {
                let slot = p as usize;
                if exhausted[slot] {
                    continue;
                }
                if !gate.is_open() {
                    break 'round;
                }
                let needs_database = retries_only || bounds.is_none();
                if needs_database && turn.is_none() {
                    turn = super::take_turn(&deps.core, &batch, &gate).await;
                    if turn.is_none() {
                        settle_in_flight(&mut in_flight, settings.timeout_ms).await;
                        return Ok(StepEnd::Stopped);
                    }
                }
                let (first_id, last_id) = if retries_only {
                    let mut due = store
                        .next_retries(batch.id, p, cursors[slot], task_size)
                        .await?;
                    let Some(&(page_end, _)) = due.last() else {
                        exhausted[slot] = true;
                        continue;
                    };
                    cursors[slot] = page_end;
                    due.retain(|(id, at)| retries_planned.get(id).is_none_or(|(p, _)| p != at));
                    let now = Instant::now();
                    retries_planned.extend(due.iter().map(|(id, at)| (*id, (*at, now))));
                    let (Some(&(first_id, _)), Some(&(last_id, _))) = (due.first(), due.last())
                    else {
                        planned = true;
                        continue;
                    };
                    (first_id, last_id)
                } else {
                    let ranges = match &bounds {
                        Some(ranges) => ranges,
                        None => bounds.insert(store.message_id_bounds(batch.id).await?),
                    };
                    if across {
                        exhausted.fill(true);
                        let mut all = ranges.iter().flatten();
                        let Some(&first) = all.next() else {
                            continue;
                        };
                        all.fold(first, |(low, high), &(l, h)| (low.min(l), high.max(h)))
                    } else {
                        let Some((low, high)) = ranges.get(slot).copied().flatten() else {
                            exhausted[slot] = true;
                            continue;
                        };
                        let first_id = cursors[slot].saturating_add(1).max(low);
                        if first_id > high {
                            exhausted[slot] = true;
                            continue;
                        }
                        let last_id = first_id.saturating_add(span - 1).min(high);
                        cursors[slot] = last_id;
                        (first_id, last_id)
                    }
                };
                // Past its first tasks of the round, a batch publishes only while the broker's
                // queue holds fewer than `BACKLOG_ROUNDS` windows of tasks: a 1M batch keeps its
                // workers fed without putting all of its 2,000 tasks in the queue at once.
                if dispatched >= FREE_TASKS {
                    while deps
                        .transport
                        .backlog()
                        .is_some_and(|queued| queued >= max_in_flight * BACKLOG_ROUNDS)
                    {
                        turn = None;
                        tokio::select! {
                            () = tokio::time::sleep(BACKLOG_WAIT) => {}
                            () = gate.closed() => {
                                settle_in_flight(&mut in_flight, settings.timeout_ms).await;
                                return Ok(StepEnd::Stopped);
                            }
                        }
                    }
                }
                if in_flight.len() >= max_in_flight && deps.transport.answers_when_done() {
                    // Waiting for a task to be carried out: others take the turn meanwhile.
                    turn = None;
                }
                while in_flight.len() >= max_in_flight {
                    tokio::select! {
                        Some(result) = in_flight.join_next() => {
                            let report = task_result(result)?;
                            if let Some(why) = failures.after_task(store, &batch, &report).await? {
                                return Ok(StepEnd::TooManyFailures(why));
                            }
                        }
                        () = gate.closed() => {
                            settle_in_flight(&mut in_flight, settings.timeout_ms).await;
                            return Ok(StepEnd::Stopped);
                        }
                    }
                }
                if let Some(why) = unavailable() {
                    // What is handed over already ends by itself: its workers claim no more.
                    settle_in_flight(&mut in_flight, settings.timeout_ms).await;
                    return Ok(StepEnd::ProviderUnavailable(why));
                }
                in_flight.spawn(deps.transport.dispatch(DeliveryTask {
                    batch_id: batch.id,
                    partition: p,
                    first_id,
                    last_id,
                    priority,
                    across,
                }));
                dispatched += 1;
                planned = true;
            }
            if !planned {
                break;
            }
        }
        if deps.transport.answers_when_done() {
            turn = None;
        }
        // Let what was handed over finish (or be skipped, if the gate closed) before looking again.
        loop {
            tokio::select! {
                next = in_flight.join_next() => match next {
                    Some(result) => {
                        let report = task_result(result)?;
                        if let Some(why) = failures.after_task(store, &batch, &report).await? {
                            return Ok(StepEnd::TooManyFailures(why));
                        }
                    }
                    None => break,
                },
                () = gate.closed() => {
                    settle_in_flight(&mut in_flight, settings.timeout_ms).await;
                    return Ok(StepEnd::Stopped);
                }
            }
        }
        drop(turn);
        // With a broker, the tasks just handed over wait in its queue: the counters have not
        // moved yet, so the next look waits for a nudge (one already given is kept) instead of
        // reading them, and the earliest retry, at once.
        if dispatched == 0 || !deps.transport.answers_when_done() {
            idle(
                &gate,
                deps.transport.as_ref(),
                None,
                replan_after.saturating_sub(last_progress.elapsed()),
            )
            .await;
        }
    }
}

/// Waits, without touching the database, for the batch's counters to move (a nudge), for the
/// next retry to fall due, for the time left before a re-plan may be needed (and then for the
/// transport to hold no task that may be the batch's), or for the gate to close; then lets
/// nudges gather a moment.
async fn idle(
    gate: &Gate,
    transport: &dyn Transport,
    next_retry: Option<Duration>,
    replan_in: Duration,
) {
    let retry = async {
        match next_retry {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    // A quiet spell calls for a look only once a re-plan may be needed, and none is while the
    // transport may hold the batch's tasks behind other batches'. Looking again at once instead
    // made every batch past its spell read its counters twice each 40 ms: with thousands of
    // batches queued behind each other, that polling took the instances' CPU from the workers,
    // and delivery stalled (BENCHMARKS.md, "The stall with two instances").
    let quiet = async {
        tokio::time::sleep(replan_in.max(GATHER)).await;
        transport.held_tasks_gone().await;
    };
    tokio::select! {
        () = gate.progressed() => {}
        () = retry => {}
        () = quiet => {}
        () = gate.closed() => return,
    }
    tokio::time::sleep(GATHER).await;
}

/// Paused or stopping: gives the tasks in flight the time of one provider call (plus a margin)
/// to end — in-process workers release what they claimed and answer at once — so that nothing is
/// left `sending` by a graceful stop. A dispatch still waiting for an absent broker is dropped;
/// its messages stay pending and are planned again on resume.
async fn settle_in_flight<T: 'static>(in_flight: &mut JoinSet<T>, timeout_ms: u64) {
    let limit = Duration::from_millis(timeout_ms) + Duration::from_secs(5);
    let drained = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(limit, drained).await.is_err() {
        tracing::warn!(
            left = in_flight.len(),
            "Tasks still in flight after the gate closed."
        );
    }
}

/// A handed-over task's result; a dispatch that panicked is an error of the step.
fn task_result(
    result: Result<Result<TaskReport, TransportError>, tokio::task::JoinError>,
) -> Result<TaskReport, DeliveryError> {
    match result {
        Ok(report) => Ok(report?),
        Err(e) => Err(DeliveryError::Transport(TransportError::Closed(format!(
            "dispatch task failed: {e}"
        )))),
    }
}

/// How often, at most, delivery reads its batch's counters for the failure window between the
/// reads of its planning rounds, unless a task it waited for reports failures of its own.
const FAILURE_LOOK: Duration = Duration::from_millis(100);

/// The failure window and when delivery last fed it. Read after every task, the counters were
/// read once per broker confirmation: four times for a batch of ten recipients, each within
/// milliseconds of the round's own read, and a large batch's 2,000 publishes read them 2,000
/// times. Now a task's end reads them only when the task reports failures (in-process, where
/// the answer carries the outcomes) or `FAILURE_LOOK` has passed: an auto-pause comes at most that
/// much later, and each round still begins with a read.
struct FailureCheck {
    window: FailureWindow,
    looked: Instant,
}

impl FailureCheck {
    fn new(window: FailureWindow) -> Self {
        FailureCheck {
            window,
            looked: Instant::now(),
        }
    }

    /// Feeds counters read by the caller (the round's own read).
    fn observe(&mut self, counters: &[Partition]) -> Option<String> {
        self.looked = Instant::now();
        self.window.observe(counters)
    }

    /// After a task ended: reads the counters if it is time to; why the batch should pause, if
    /// too many of its recent outcomes failed.
    async fn after_task(
        &mut self,
        store: &Store,
        batch: &Batch,
        report: &TaskReport,
    ) -> Result<Option<String>, StoreError> {
        if report.failed == 0 && self.looked.elapsed() < FAILURE_LOOK {
            return Ok(None);
        }
        let counters = store.partitions(batch.id).await?;
        Ok(self.observe(&counters))
    }
}

/// The failure rate over (at least) a batch's last `size` final outcomes, read off its cumulative
/// partition counters as delivery goes. Only outcomes of this run count: a batch resumed after
/// pausing itself gets a whole new window before it can pause again.
#[derive(Debug)]
pub struct FailureWindow {
    size: u64,
    threshold: f64,
    /// (final outcomes, failed) as observed, oldest first; the front is the window's start.
    seen: VecDeque<(u64, u64)>,
}

impl FailureWindow {
    /// A window of `size` outcomes (at least 1) that trips above `threshold` (0–1).
    pub fn new(size: u64, threshold: f64) -> Self {
        FailureWindow {
            size: size.max(1),
            threshold,
            seen: VecDeque::new(),
        }
    }

    /// Takes the partitions' counters; returns why the batch should pause when more than the
    /// threshold of the last `size` (or more) final outcomes failed.
    pub fn observe(&mut self, partitions: &[Partition]) -> Option<String> {
        let count = |f: fn(&Partition) -> i64| -> u64 {
            partitions
                .iter()
                .map(|p| u64::try_from(f(p)).unwrap_or(0))
                .sum()
        };
        // An unknown outcome (a claim settled after an instance died) says nothing about the
        // provider: it is neither a failure nor an outcome here.
        let failed = count(|p| p.failed - p.unknown);
        let done = count(|p| p.sent + p.delivered + p.failed - p.unknown);
        if self.seen.back().is_some_and(|&(d, _)| d == done) {
            return None;
        }
        self.seen.push_back((done, failed));
        // Move the start up to the newest observation that still leaves a whole window.
        while self.seen.len() > 1
            && self
                .seen
                .get(1)
                .is_some_and(|&(d, _)| done - d >= self.size)
        {
            self.seen.pop_front();
        }
        let &(start_done, start_failed) = self.seen.front()?;
        let outcomes = done.saturating_sub(start_done);
        if outcomes < self.size {
            return None;
        }
        let rate = failed.saturating_sub(start_failed) as f64 / outcomes as f64;
        (rate > self.threshold).then(|| {
            format!(
                "{:.1}% of the last {outcomes} messages failed, over the batch's failure_threshold \
                 of {:.1}%",
                rate * 100.0,
                self.threshold * 100.0
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(sent: i64, failed: i64) -> Vec<Partition> {
        with_unknown(sent, failed, 0)
    }

    /// Counters where `unknown` of the `failed` are unknown outcomes (in partition 0).
    fn with_unknown(sent: i64, failed: i64, unknown: i64) -> Vec<Partition> {
        // Split over two partitions, as a batch's counters are.
        vec![
            Partition {
                batch_id: 1,
                idx: 0,
                total: 1_000_000,
                sent: sent / 2,
                delivered: 0,
                failed: failed / 2 + unknown,
                cancelled: 0,
                unknown,
            },
            Partition {
                batch_id: 1,
                idx: 1,
                total: 1_000_000,
                sent: sent - sent / 2,
                delivered: 0,
                failed: failed - failed / 2,
                cancelled: 7,
                unknown: 0,
            },
        ]
    }

    #[test]
    fn trips_only_over_a_whole_window_above_the_threshold() {
        let mut w = FailureWindow::new(1000, 0.1);
        assert_eq!(w.observe(&counters(0, 0)), None);
        // Every outcome failed, but the window is not full yet.
        assert_eq!(w.observe(&counters(0, 999)), None);
        let why = w
            .observe(&counters(0, 1000))
            .expect("a whole window, all failed");
        assert!(
            why.contains("100.0% of the last 1000 messages failed"),
            "{why}"
        );
        assert!(why.contains("failure_threshold of 10.0%"), "{why}");
    }

    #[test]
    fn exactly_at_the_threshold_does_not_trip() {
        let mut w = FailureWindow::new(1000, 0.1);
        w.observe(&counters(0, 0));
        assert_eq!(w.observe(&counters(900, 100)), None);
        assert!(
            w.observe(&counters(1799, 201)).is_some(),
            "101 of 1000 failed"
        );
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut w = FailureWindow::new(1000, 0.1);
        w.observe(&counters(0, 0));
        // A burst of failures early on, under a full window: no pause yet...
        assert_eq!(w.observe(&counters(500, 300)), None);
        // ...then 3000 good outcomes: the window now starts after the burst.
        assert_eq!(w.observe(&counters(3500, 300)), None);
        // The window has moved past the burst: 50 failed of the last 1000 or so.
        assert_eq!(w.observe(&counters(4450, 350)), None);
        // A new burst in a whole window trips it.
        assert!(w.observe(&counters(4650, 1150)).is_some());
    }

    #[test]
    fn unknown_outcomes_do_not_count() {
        let mut w = FailureWindow::new(1000, 0.1);
        w.observe(&with_unknown(0, 0, 0));
        // 256 claims of a dead instance settled as unknown outcomes among 1000 sent: no pause.
        assert_eq!(w.observe(&with_unknown(1000, 0, 256)), None);
        assert_eq!(w.observe(&with_unknown(2000, 50, 256)), None);
        // Real failures still trip it, the unknown ones left out of the rate.
        let why = w
            .observe(&with_unknown(2000, 400, 256))
            .expect("real failures over the threshold");
        assert!(why.contains("28.6% of the last 1400 messages"), "{why}");
    }

    #[test]
    fn one_never_trips() {
        let mut w = FailureWindow::new(10, 1.0);
        w.observe(&counters(0, 0));
        assert_eq!(w.observe(&counters(0, 100)), None);
    }
}
