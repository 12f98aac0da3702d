//! The BatchSupervisor: one per active batch. It owns the batch's state machine, persists every
//! transition under an optimistic version check, runs the Preparation or Delivery child of the
//! current state, restarts a child that errors or panics (from its checkpoint), and fails the
//! batch after `retry_count` restarts.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use tokio::sync::oneshot;

use super::ActError;
use super::gates::{Gate, GateState};
use super::{Deps, StepEnd, delivery, preparation};
use crate::domain::counts::Verdict;
use crate::domain::lifecycle::{Cause, project};
use crate::domain::state::{BatchState, Event, Step};
use crate::store::StoreError;
use crate::store::models::Batch;
use crate::telemetry::trace::TraceContext;

mod messages;
mod provider;
pub use messages::{Act, Changed, Drain, Stop, SupervisorStopped};

/// A child (step run) ended.
#[derive(Debug)]
struct ChildExited {
    generation: u64,
    outcome: Result<StepEnd, StepFailure>,
}

/// Why a child's run failed.
#[derive(Debug)]
struct StepFailure {
    message: String,
    /// The database was out of reach: the step waits for it instead of counting a restart.
    unavailable: bool,
    /// A newer run of the step started under another supervisor (another instance took the
    /// batch over): this one lets the batch go.
    superseded: bool,
}

impl StepFailure {
    fn new(message: String, unavailable: bool) -> Self {
        StepFailure {
            message,
            unavailable,
            superseded: false,
        }
    }
}

/// The running child: its generation (stale exits are ignored) and the handle that aborts it.
struct Child {
    generation: u64,
    abort: tokio::task::AbortHandle,
}

/// How often a batch waiting for the database tries again (a step to run, a transition to save).
const DATABASE_RETRY: Duration = Duration::from_secs(1);
/// How long a supervisor left with nothing to do (a paused batch) waits before it stops.
const IDLE_GRACE: Duration = Duration::from_secs(2);
/// How long the supervisor's own check that the database answers may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Supervises one batch.
pub struct BatchSupervisor {
    deps: Deps,
    batch: Batch,
    gate: Arc<Gate>,
    registry: Recipient<SupervisorStopped>,
    /// Which supervisor of this batch the registry knows this one as.
    registration: u64,
    child: Option<Child>,
    generation: u64,
    restarts: u32,
    timer: Option<SpawnHandle>,
    /// The stop of a supervisor left with nothing to do, after `IDLE_GRACE`.
    idle: Option<SpawnHandle>,
    cancel_cleanup: bool,
    draining: Vec<oneshot::Sender<()>>,
    /// The trace of the request whose action started the batch's run here (empty after a
    /// recovery, a take-over or an action through another instance): its steps' spans are
    /// that request's children.
    trace: TraceContext,
}

impl BatchSupervisor {
    /// A supervisor for a batch as loaded from the store.
    pub fn new(
        deps: Deps,
        batch: Batch,
        registry: Recipient<SupervisorStopped>,
        generation: u64,
    ) -> Self {
        let gate = Arc::new(Gate::new(gate_state(batch.state), batch.provider.clone()));
        BatchSupervisor {
            deps,
            batch,
            gate,
            registry,
            registration: generation,
            child: None,
            generation: 0,
            restarts: 0,
            timer: None,
            idle: None,
            cancel_cleanup: false,
            draining: Vec::new(),
            trace: TraceContext::default(),
        }
    }

    fn state(&self) -> BatchState {
        self.batch.state
    }

    /// Applies an event: checks it against the state machine, persists it (reloading and
    /// re-checking once per concurrent change), then acts on the new state.
    fn apply(
        &mut self,
        event: Event,
        cause: Option<Cause>,
        store: crate::store::Store,
    ) -> ResponseActFuture<Self, Result<Batch, ActError>> {
        let current = self.batch.clone();
        let restarts = self.restarts;
        Box::pin(
            async move {
                store
                    .save_transition(current, |b| {
                        Ok::<_, ActError>(project(
                            &b.bookkeeping(),
                            &b.prepared(),
                            event,
                            cause.as_ref(),
                            restarts,
                        )?)
                    })
                    .await
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                match &result {
                    Ok(saved) => {
                        tracing::info!(batch_id = %saved.public_id, event = event.name(), state = %saved.state, "Batch transition.");
                        act.batch = saved.clone();
                        act.enter_state(ctx);
                    }
                    Err(ActError::Store(e)) => {
                        tracing::error!(batch_id = %act.batch.public_id, event = event.name(), error = %e, "Transition not saved.");
                    }
                    Err(_) => {}
                }
                result
            }),
        )
    }

    /// Adopts the row as stored (an action saved by another instance), and acts on its state.
    fn reload(&mut self, ctx: &mut Context<Self>) {
        let store = self.deps.core.store.clone();
        let id = self.batch.id;
        ctx.wait(
            async move { store.batch(id).await }
                .into_actor(self)
                .map(|row, act, ctx| match row {
                    Ok(row) if row.version > act.batch.version => {
                        tracing::info!(batch_id = %row.public_id, state = %row.state, "Batch changed through another instance.");
                        let state_changed = row.state != act.batch.state;
                        act.batch = row;
                        act.trace = TraceContext::default();
                        if state_changed {
                            act.enter_state(ctx);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "Reading the changed batch failed."),
                }),
        );
    }

    /// Stops the supervisor of a batch with nothing to do here (paused, done, or scheduled
    /// beyond the horizon) after a moment's grace: its lease goes back, and it holds nothing but
    /// its row until an action or its schedule wakes it again. The grace keeps a burst of
    /// actions (pause, resume, pause…) on one supervisor instead of bouncing each off one that
    /// is stopping.
    fn stop_when_idle(&mut self, ctx: &mut Context<Self>) {
        if let Some(idle) = self.idle.take() {
            ctx.cancel_future(idle);
        }
        self.idle = Some(ctx.run_later(IDLE_GRACE, |act, ctx| {
            act.idle = None;
            if act.is_idle() {
                ctx.stop();
            } else if act.state() == BatchState::Scheduled && act.timer.is_none() {
                // Due within the horizon by now: wait for it here.
                act.enter_state(ctx);
            }
        }));
    }

    fn is_idle(&self) -> bool {
        if self.child.is_some() || self.timer.is_some() || !self.draining.is_empty() {
            return false;
        }
        match self.state() {
            BatchState::Initial
            | BatchState::Paused
            | BatchState::Completed
            | BatchState::Failed => true,
            BatchState::Scheduled => {
                self.due_in() > self.deps.core.settings.smsbatch.schedule_horizon()
            }
            BatchState::Preparing | BatchState::Delivering | BatchState::Cancelled => false,
        }
    }

    /// How long until a scheduled batch is due (zero if it is, or has no schedule).
    fn due_in(&self) -> Duration {
        self.batch
            .schedule_at
            .map(|at| at - chrono::Utc::now().naive_utc())
            .and_then(|d| d.to_std().ok())
            .unwrap_or(Duration::ZERO)
    }

    /// Does what the (just saved or just loaded) state asks for.
    fn enter_state(&mut self, ctx: &mut Context<Self>) {
        let state = self.state();
        self.gate.set(gate_state(state));
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        match state {
            BatchState::Scheduled => {
                let due = self.due_in();
                if due > self.deps.core.settings.smsbatch.schedule_horizon() {
                    // The registry's upkeep starts a supervisor again once it is near.
                    self.stop_when_idle(ctx);
                    return;
                }
                self.timer = Some(ctx.run_later(due, |act, ctx| {
                    act.timer = None;
                    act.apply_own(Event::Due, None, ctx);
                }));
            }
            BatchState::Preparing | BatchState::Delivering => {
                if self.child.is_none() {
                    self.spawn_child(ctx);
                }
            }
            BatchState::Cancelled => {
                self.cancel_cleanup = true;
                if self.child.is_none() {
                    self.finish_cancel(ctx);
                }
            }
            BatchState::Completed | BatchState::Failed => {
                if self.child.is_none() {
                    ctx.stop();
                }
            }
            BatchState::Paused => {
                if self.child.is_none() {
                    self.stop_when_idle(ctx);
                }
            }
            BatchState::Initial => {}
        }
    }

    /// Starts the child of the current state's step, watched for errors and panics.
    fn spawn_child(&mut self, ctx: &mut Context<Self>) {
        let Some(step) = self.state().step() else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        let (deps, batch, gate) = (self.deps.clone(), self.batch.clone(), self.gate.clone());
        let work = match step {
            Step::Preparation => async move {
                preparation::run(deps, batch, gate)
                    .await
                    .map_err(|e| StepFailure {
                        superseded: e.is_superseded(),
                        ..StepFailure::new(e.to_string(), e.is_unavailable())
                    })
            }
            .boxed_local(),
            Step::Delivery => async move {
                delivery::run(deps, batch, gate)
                    .await
                    .map_err(|e| StepFailure::new(e.to_string(), e.is_unavailable()))
            }
            .boxed_local(),
        };
        // The child runs as its own task so that a panic in it is caught by its join handle
        // (and reported as an error) instead of taking the supervisor down.
        let task = actix::spawn(self.trace.attach(work));
        let abort = task.abort_handle();
        let watcher = async move {
            match task.await {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => Err(StepFailure::new(
                    format!("{step:?} panicked: {}", panic_text(e)),
                    false,
                )),
                Err(e) => Err(StepFailure::new(format!("{step:?} stopped: {e}"), false)),
            }
        }
        .into_actor(self)
        .map(move |outcome, act, ctx| {
            act.child_exited(
                ChildExited {
                    generation,
                    outcome,
                },
                ctx,
            )
        });
        ctx.spawn(watcher);
        self.child = Some(Child { generation, abort });
    }

    fn child_exited(&mut self, msg: ChildExited, ctx: &mut Context<Self>) {
        if self.child.as_ref().map(|c| c.generation) != Some(msg.generation) {
            return;
        }
        self.child = None;
        if !self.draining.is_empty() {
            for tx in self.draining.drain(..) {
                let _ = tx.send(());
            }
            return;
        }
        let state = self.state();
        match msg.outcome {
            Ok(StepEnd::Finished) if state == BatchState::Preparing => {
                self.verify_end(Step::Preparation, ctx);
            }
            Ok(StepEnd::Finished) if state == BatchState::Delivering => {
                self.verify_end(Step::Delivery, ctx);
            }
            Ok(StepEnd::TooManyFailures(reason)) if state == BatchState::Delivering => {
                tracing::warn!(batch_id = %self.batch.public_id, %reason, "Pausing the batch: too many failures.");
                self.deps.core.metrics.failure_threshold_pauses.inc();
                let cause = Cause::new("FailureThresholdExceeded", reason);
                self.apply_own(Event::Pause, Some(cause), ctx);
            }
            Ok(StepEnd::ProviderUnavailable(why)) if state == BatchState::Delivering => {
                self.wait_for_provider(why, ctx);
            }
            Err(failure) if failure.superseded => {
                tracing::warn!(batch_id = %self.batch.public_id, error = %failure.message, "A newer run of the batch's step started under another supervisor; letting the batch go.");
                ctx.stop();
            }
            Err(failure) if matches!(state, BatchState::Preparing | BatchState::Delivering) => {
                // A statement cut off by an outage does not always say so: ask the database.
                let store = self.deps.core.store.clone();
                ctx.wait(
                    async move {
                        let down = failure.unavailable
                            || !matches!(
                                tokio::time::timeout(PING_TIMEOUT, store.ping()).await,
                                Ok(Ok(()))
                            );
                        (failure.message, down)
                    }
                    .into_actor(self)
                    .map(|(error, down), act, ctx| act.step_failed(error, down, ctx)),
                );
            }
            _ => {
                // Stopped (or finished/failed after the state moved on): act on the state now.
                match state {
                    BatchState::Cancelled => self.finish_cancel(ctx),
                    BatchState::Preparing | BatchState::Delivering if self.gate.is_open() => {
                        self.spawn_child(ctx)
                    }
                    BatchState::Completed | BatchState::Failed => ctx.stop(),
                    BatchState::Paused => self.stop_when_idle(ctx),
                    _ => {}
                }
            }
        }
    }

    /// The running step says it finished: its end is saved only once the database's own counts
    /// say so (`domain::counts`). Preparation with recipients left to read runs again from its
    /// checkpoint (a restart); counts that do not add up fail the batch with a condition that
    /// says which rule broke.
    fn verify_end(&mut self, step: Step, ctx: &mut Context<Self>) {
        let store = self.deps.core.store.clone();
        let id = self.batch.id;
        ctx.wait(
            async move {
                let tally = store.batch_tally(id).await?;
                let verdict = match step {
                    Step::Preparation => tally.preparation_verdict(),
                    Step::Delivery => tally.delivery_verdict(),
                };
                Ok::<_, StoreError>((verdict, tally.counters))
            }
            .into_actor(self)
            .map(move |checked, act, ctx| match checked {
                Ok((Verdict::Holds, counters)) => {
                    let event = match step {
                        Step::Preparation => {
                            act.restarts = 0;
                            // Preparation's counters changed the row without a new version: the
                            // `Prepared` condition states them, as the tally just read them.
                            act.batch.set_prepared(counters);
                            Event::Prepared
                        }
                        Step::Delivery => Event::Delivered,
                    };
                    act.apply_own(event, None, ctx);
                }
                Ok((Verdict::Unfinished(why), _)) => {
                    tracing::error!(batch_id = %act.batch.public_id, step = step.as_str(), %why, "Step ended before its work was done.");
                    act.step_failed(why, false, ctx);
                }
                Ok((Verdict::Broken(why), _)) => {
                    tracing::error!(batch_id = %act.batch.public_id, step = step.as_str(), %why, "Counts do not add up; failing the batch.");
                    act.apply_own(Event::Fail, Some(Cause::new("CountsDoNotAddUp", why)), ctx);
                }
                Err(e) => {
                    let down = e.is_unavailable();
                    act.step_failed(format!("checking the step's counts: {e}"), down, ctx);
                }
            }),
        );
    }

    /// The running step failed. While the database is out of reach, the step waits for it and
    /// runs again, without counting a restart: an outage stops a batch, it does not fail it.
    /// Any other failure restarts the step from its checkpoint with backoff, and fails the
    /// batch after `retry_count` restarts.
    fn step_failed(&mut self, error: String, database_down: bool, ctx: &mut Context<Self>) {
        let settings = &self.deps.core.settings.smsbatch;
        let backoff = if database_down {
            tracing::warn!(batch_id = %self.batch.public_id, %error, "Database unavailable; the step runs again once it is back.");
            DATABASE_RETRY
        } else {
            self.restarts += 1;
            if self.restarts > settings.retry_count {
                tracing::error!(batch_id = %self.batch.public_id, %error, failures = self.restarts, "Step failed for good.");
                self.apply_own(
                    Event::Fail,
                    Some(Cause::new("RetriesExhausted", error)),
                    ctx,
                );
                return;
            }
            let backoff = Duration::from_millis(
                settings
                    .retry_backoff_ms
                    .saturating_mul(1 << self.restarts.min(10)),
            )
            .min(Duration::from_secs(60));
            let step = self.state().step().map(Step::as_str).unwrap_or("none");
            self.deps
                .core
                .metrics
                .step_restarts
                .with_label_values(&[step])
                .inc();
            tracing::warn!(batch_id = %self.batch.public_id, %error, restarts = self.restarts, ?backoff, "Step failed; restarting from its checkpoint.");
            backoff
        };
        self.timer = Some(ctx.run_later(backoff, |act, ctx| {
            act.timer = None;
            if act.child.is_none() && act.gate.is_open() {
                act.spawn_child(ctx);
            }
        }));
    }

    /// Applies an event of the batch's own (a step ended, the schedule is due). If the store
    /// cannot save it, it is tried again later, until it is saved or superseded (another
    /// transition cancels the timer): otherwise the batch would sit in a state nobody acts on.
    fn apply_own(&mut self, event: Event, cause: Option<Cause>, ctx: &mut Context<Self>) {
        let again = cause.clone();
        let store = self.deps.core.store.clone();
        ctx.wait(
            self.apply(event, cause, store)
                .map(move |result, act, ctx| {
                    if let Err(ActError::Store(_)) = result {
                        act.timer = Some(ctx.run_later(DATABASE_RETRY, move |act, ctx| {
                            act.timer = None;
                            act.apply_own(event, again, ctx);
                        }));
                    }
                }),
        );
    }

    /// After a cancel, once no child runs: every message still pending becomes `cancelled`.
    fn finish_cancel(&mut self, ctx: &mut Context<Self>) {
        if !std::mem::take(&mut self.cancel_cleanup) {
            return;
        }
        let store = self.deps.core.store.clone();
        let (id, partitions, public_id) = (
            self.batch.id,
            self.batch.partition_count,
            self.batch.public_id.clone(),
        );
        ctx.wait(
            async move { store.cancel_pending(id, partitions).await }
                .into_actor(self)
                .map(move |result, _act, ctx| {
                    match result {
                        Ok(n) => tracing::info!(batch_id = %public_id, cancelled = n, "Batch cancelled."),
                        Err(e) => tracing::error!(batch_id = %public_id, error = %e, "Cancelling pending messages failed; the next start finishes it."),
                    }
                    ctx.stop();
                }),
        );
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn gate_state(state: BatchState) -> GateState {
    match state {
        BatchState::Preparing | BatchState::Delivering => GateState::Open,
        BatchState::Cancelled => GateState::Cancelled,
        _ => GateState::Held,
    }
}

impl Actor for BatchSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.core.settings.smsbatch.supervisor_mailbox);
        self.deps
            .core
            .gates
            .insert(self.batch.id, self.gate.clone());
        // A supervisor woken for a failed batch waits for its retry; one for a running or
        // scheduled batch (a command, or recovery after a restart) takes up the work.
        // A supervisor woken for a paused batch waits for the action it was started for.
        if !matches!(
            self.state(),
            BatchState::Failed | BatchState::Completed | BatchState::Paused
        ) {
            self.enter_state(ctx);
        }
        // Actions taken through other instances reach it through the registry's watch
        // (`Changed`): no timer of its own touches the database.
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(child) = self.child.take() {
            child.abort.abort();
        }
        self.deps.core.gates.remove(self.batch.id);
        if let Err(e) = self.registry.try_send(SupervisorStopped {
            batch_id: self.batch.id,
            generation: self.registration,
        }) {
            tracing::warn!(batch_id = %self.batch.public_id, error = %e, "Registry not told that a supervisor stopped.");
        }
    }
}
