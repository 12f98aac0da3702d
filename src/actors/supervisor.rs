//! The BatchSupervisor: one per active batch. It owns the batch's state machine, persists every
//! transition under an optimistic version check, runs the Preparation or Delivery child of the
//! current state, restarts a child that errors or panics (from its checkpoint), and fails the
//! batch after `retry_count` restarts.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::gates::{Gate, GateState};
use super::registry::SupervisorStopped;
use super::{Deps, StepEnd, delivery, preparation};
use crate::domain::counts::Verdict;
use crate::domain::state::{
    BatchState, Event, Lifecycle, Step, StepStatus, TransitionError, transition,
};
use crate::store::StoreError;
use crate::store::models::{Batch, LifecycleUpdate, StepRecord, Steps};

/// An operator's lifecycle action (API.md "Lifecycle actions").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `POST /start`
    Start,
    /// `POST /pause`
    Pause,
    /// `POST /resume`
    Resume,
    /// `POST /cancel`
    Cancel,
    /// `POST /retry`
    Retry,
}

impl Action {
    /// The state machine event this action is for the given batch.
    pub fn event(self, batch: &Batch) -> Event {
        match self {
            Action::Start => Event::Start {
                schedule_in_future: batch
                    .schedule_at
                    .is_some_and(|at| at > chrono::Utc::now().naive_utc()),
            },
            Action::Pause => Event::Pause,
            Action::Resume => Event::Resume,
            Action::Cancel => Event::Cancel,
            Action::Retry => Event::Retry,
        }
    }
}

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ActError {
    /// No such batch.
    #[error("no batch {0}")]
    NotFound(String),
    /// Not allowed in the batch's state.
    #[error(transparent)]
    Invalid(#[from] TransitionError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The supervisor is gone (shutting down).
    #[error("batch supervisor unavailable: {0}")]
    Unavailable(String),
}

/// Asks the supervisor to apply an operator's action; answers the batch as saved.
#[derive(Debug, Message)]
#[rtype(result = "Result<Batch, ActError>")]
pub struct Act(pub Action);

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

/// Why the batch did something of its own accord, as its condition tells it: a CamelCase
/// reason and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The condition's reason (`FailureThresholdExceeded`, `RetriesExhausted`,
    /// `CountsDoNotAddUp`).
    pub reason: &'static str,
    /// The condition's message (and, for a failure, the batch's and the step's `error`).
    pub message: String,
}

impl Cause {
    /// A cause with this reason and message.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Cause {
            reason,
            message: message.into(),
        }
    }
}

/// How often a batch waiting for the database tries again (a step to run, a transition to save).
const DATABASE_RETRY: Duration = Duration::from_secs(1);
/// How long the supervisor's own check that the database answers may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Stop sending and wait for the child to stop (process shutdown). The batch keeps its state,
/// so the next start of the service continues it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Stop supervising here: another instance holds the batch's lease now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

/// A condition of the batch, as API.md shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// `Prepared`, `Delivered`, `Paused`, `Cancelled`, `Failed`, `Restarted`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// A human sentence.
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: chrono::DateTime<chrono::Utc>,
}

/// The running child: its generation (stale exits are ignored) and the handle that aborts it.
struct Child {
    generation: u64,
    abort: tokio::task::AbortHandle,
}

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
    cancel_cleanup: bool,
    draining: Vec<oneshot::Sender<()>>,
}

impl BatchSupervisor {
    /// A supervisor for a batch as loaded from the store.
    pub fn new(
        deps: Deps,
        batch: Batch,
        registry: Recipient<SupervisorStopped>,
        generation: u64,
    ) -> Self {
        let state = batch.state.parse().unwrap_or(BatchState::Initial);
        let gate = Arc::new(Gate::new(gate_state(state), batch.provider.clone()));
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
            cancel_cleanup: false,
            draining: Vec::new(),
        }
    }

    fn state(&self) -> BatchState {
        self.batch.state.parse().unwrap_or(BatchState::Initial)
    }

    /// Applies an event: checks it against the state machine, persists it (reloading and
    /// re-checking once per concurrent change), then acts on the new state.
    fn apply(
        &mut self,
        event: Event,
        cause: Option<Cause>,
    ) -> ResponseActFuture<Self, Result<Batch, ActError>> {
        let store = self.deps.core.store.clone();
        let current = self.batch.clone();
        let restarts = self.restarts;
        Box::pin(
            async move {
                let mut row = current;
                if event == Event::Prepared {
                    // Preparation's counters changed the row without a new version: the
                    // `Prepared` condition states them, so read them.
                    row = store.batch(row.id).await?;
                }
                for _ in 0..5 {
                    let next = project(&row, event, cause.as_ref(), restarts)?;
                    match store
                        .save_lifecycle(row.id, row.version, &LifecycleUpdate::from(&next))
                        .await
                    {
                        Ok(saved) => return Ok(saved),
                        Err(StoreError::Conflict(_)) => row = store.batch(row.id).await?,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(StoreError::Conflict(row.public_id).into())
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

    /// Adopts the row if it changed behind this supervisor's back (an action saved by another
    /// instance), and acts on its state.
    fn poll(&mut self, ctx: &mut Context<Self>) {
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
                        if state_changed {
                            act.enter_state(ctx);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "Polling the batch failed."),
                }),
        );
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
                let due = self
                    .batch
                    .schedule_at
                    .map(|at| at - chrono::Utc::now().naive_utc())
                    .and_then(|d| d.to_std().ok())
                    .unwrap_or(Duration::ZERO);
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
            BatchState::Initial | BatchState::Paused => {}
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
        let task = actix::spawn(work);
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
                let cause = Cause::new("FailureThresholdExceeded", reason);
                self.apply_own(Event::Pause, Some(cause), ctx);
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
                Ok::<_, StoreError>(match step {
                    Step::Preparation => tally.preparation_verdict(),
                    Step::Delivery => tally.delivery_verdict(),
                })
            }
            .into_actor(self)
            .map(move |verdict, act, ctx| match verdict {
                Ok(Verdict::Holds) => {
                    let event = match step {
                        Step::Preparation => {
                            act.restarts = 0;
                            Event::Prepared
                        }
                        Step::Delivery => Event::Delivered,
                    };
                    act.apply_own(event, None, ctx);
                }
                Ok(Verdict::Unfinished(why)) => {
                    tracing::error!(batch_id = %act.batch.public_id, step = step.as_str(), %why, "Step ended before its work was done.");
                    act.step_failed(why, false, ctx);
                }
                Ok(Verdict::Broken(why)) => {
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
        ctx.wait(self.apply(event, cause).map(move |result, act, ctx| {
            if let Err(ActError::Store(_)) = result {
                act.timer = Some(ctx.run_later(DATABASE_RETRY, move |act, ctx| {
                    act.timer = None;
                    act.apply_own(event, again, ctx);
                }));
            }
        }));
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
        if !matches!(self.state(), BatchState::Failed | BatchState::Completed) {
            self.enter_state(ctx);
        }
        // Actions taken through other instances land in the database: pick them up.
        let every = Duration::from_millis(self.deps.core.settings.smsbatch.poll_ms);
        ctx.run_interval(every, |act, ctx| act.poll(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(child) = self.child.take() {
            child.abort.abort();
        }
        self.deps.core.gates.remove(self.batch.id);
        // What the batch's delivery went through is free now: back to the system, so that an
        // idle service holds no more than it did before the batch.
        crate::memory::release_freed_memory();
        if let Err(e) = self.registry.try_send(SupervisorStopped {
            batch_id: self.batch.id,
            generation: self.registration,
        }) {
            tracing::warn!(batch_id = %self.batch.public_id, error = %e, "Registry not told that a supervisor stopped.");
        }
    }
}

impl Handler<Act> for BatchSupervisor {
    type Result = AtomicResponse<Self, Result<Batch, ActError>>;

    fn handle(&mut self, msg: Act, _ctx: &mut Self::Context) -> Self::Result {
        let event = msg.0.event(&self.batch);
        if msg.0 == Action::Retry {
            self.restarts = 0;
        }
        AtomicResponse::new(self.apply(event, None))
    }
}

impl Handler<Stop> for BatchSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Drain> for BatchSupervisor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Drain, _ctx: &mut Self::Context) -> Self::Result {
        self.gate.set(GateState::Held);
        if self.child.is_none() {
            return Box::pin(async {});
        }
        let (tx, rx) = oneshot::channel();
        self.draining.push(tx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// The batch row after `event`: the new state and the step statuses, times, conditions and error
/// that go with it. Pure, so the bookkeeping is testable on its own.
pub fn project(
    batch: &Batch,
    event: Event,
    cause: Option<&Cause>,
    restarts: u32,
) -> Result<Batch, TransitionError> {
    let from: BatchState = batch.state.parse().unwrap_or(BatchState::Initial);
    let resume_to = batch.resume_to.as_deref().and_then(|s| s.parse().ok());
    let next = transition(
        Lifecycle {
            state: from,
            resume_to,
        },
        event,
    )?;
    let now = chrono::Utc::now().naive_utc();
    let at = now.and_utc();
    let mut b = batch.clone();
    b.state = next.state.as_str().to_string();
    b.resume_to = next.resume_to.map(|s| s.as_str().to_string());
    b.updated_at = now;
    b.restarts = i32::try_from(restarts).unwrap_or(i32::MAX);
    let mut steps = b.steps();
    let mut conditions: Vec<Condition> = serde_json::from_str(&b.conditions).unwrap_or_default();
    let mut set = |kind: &str, status: bool, reason: &str, message: String| {
        set_condition(&mut conditions, kind, status, reason, message, now)
    };
    let running = StepStatus::Running.as_str();
    match event {
        Event::Start { schedule_in_future } => {
            b.started_at = Some(now);
            if schedule_in_future {
                steps.preparation.status = StepStatus::Ready.as_str().into();
            } else {
                start_step(&mut steps.preparation, at);
            }
            steps.delivery.status = StepStatus::Ready.as_str().into();
        }
        Event::Due => start_step(&mut steps.preparation, at),
        Event::Prepared => {
            steps.preparation.status = StepStatus::Completed.as_str().into();
            steps.preparation.finished_at = Some(at);
            set(
                "Prepared",
                true,
                "Completed",
                format!(
                    "{} of {} recipients are valid ({} invalid, {} duplicates, {} opted out)",
                    b.valid, b.recipients, b.invalid, b.duplicates, b.opted_out
                ),
            );
            start_step(&mut steps.delivery, at);
        }
        Event::Delivered => {
            steps.delivery.status = StepStatus::Completed.as_str().into();
            steps.delivery.finished_at = Some(at);
            b.finished_at = Some(now);
            set(
                "Delivered",
                true,
                "Completed",
                "every valid recipient's message reached a final status".into(),
            );
        }
        Event::Pause | Event::Cancel => {
            for step in [&mut steps.preparation, &mut steps.delivery] {
                if step.status == running {
                    step.status = StepStatus::Paused.as_str().into();
                }
            }
            if event == Event::Pause {
                match cause {
                    // Delivery paused the batch itself.
                    Some(why) => set("Paused", true, why.reason, why.message.clone()),
                    None => set("Paused", true, "Requested", format!("paused while {from}")),
                }
            } else {
                b.finished_at = Some(now);
                set(
                    "Cancelled",
                    true,
                    "Requested",
                    format!("cancelled while {from}"),
                );
                // A paused batch that is cancelled is no longer paused.
                if from == BatchState::Paused {
                    set(
                        "Paused",
                        false,
                        "Cancelled",
                        "cancelled while paused".into(),
                    );
                }
            }
        }
        Event::Resume => {
            // A batch paused while scheduled waits for its time again: no step runs yet.
            if let Some(step) = next.state.step() {
                step_of(&mut steps, step).status = running.into();
            }
            set(
                "Paused",
                false,
                "Resumed",
                format!("resumed into {}", next.state),
            );
        }
        Event::Fail => {
            let (reason, message) = cause.map_or(("RetriesExhausted", "step failed".into()), |c| {
                (c.reason, c.message.clone())
            });
            if let Some(step) = from.step() {
                let step = step_of(&mut steps, step);
                step.status = StepStatus::Failed.as_str().into();
                step.error = Some(message.clone());
            }
            b.error = Some(message.clone());
            b.finished_at = Some(now);
            set("Failed", true, reason, message);
        }
        Event::Retry => {
            if let Some(step) = next.state.step() {
                let step = step_of(&mut steps, step);
                step.status = running.into();
                step.error = None;
            }
            b.error = None;
            b.finished_at = None;
            b.restarts = 0;
            set(
                "Failed",
                false,
                "Retried",
                format!("retrying from {}", next.state),
            );
        }
    }
    b.steps = serde_json::to_string(&steps).unwrap_or_else(|_| "{}".into());
    b.conditions = serde_json::to_string(&conditions).unwrap_or_else(|_| "[]".into());
    Ok(b)
}

fn start_step(step: &mut StepRecord, at: DateTime<Utc>) {
    step.status = StepStatus::Running.as_str().into();
    step.started_at.get_or_insert(at);
}

fn step_of(steps: &mut Steps, step: Step) -> &mut StepRecord {
    match step {
        Step::Preparation => &mut steps.preparation,
        Step::Delivery => &mut steps.delivery,
    }
}

fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
    now: NaiveDateTime,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let at = now.and_utc();
    match conditions.iter_mut().find(|c| c.kind == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = at;
            }
            c.status = status;
            c.reason = reason.into();
            c.message = message;
        }
        None => conditions.push(Condition {
            kind: kind.into(),
            status,
            reason: reason.into(),
            message,
            last_transition_time: at,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::state::EVERY_EVENT;

    fn batch(state: BatchState) -> Batch {
        let now = chrono::Utc::now().naive_utc();
        Batch {
            id: 1,
            public_id: "b".into(),
            name: "n".into(),
            campaign_id: None,
            content: "Hi".into(),
            url: None,
            provider: "simulator".into(),
            message_type: "transactional".into(),
            schedule_at: None,
            partition_count: 1,
            state: state.as_str().into(),
            resume_to: None,
            version: 0,
            steps: "{}".into(),
            recipients: 10,
            processed: 10,
            valid: 8,
            invalid: 1,
            duplicates: 1,
            opted_out: 0,
            segments: 8,
            restarts: 0,
            conditions: "[]".into(),
            error: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
            failure_threshold: 0.1,
        }
    }

    fn conditions(b: &Batch) -> Vec<Condition> {
        serde_json::from_str(&b.conditions).expect("conditions JSON")
    }

    fn condition<'a>(all: &'a [Condition], kind: &str) -> &'a Condition {
        all.iter()
            .find(|c| c.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} condition in {all:?}"))
    }

    #[test]
    fn start_runs_preparation_or_waits_for_the_schedule() {
        let started = project(
            &batch(BatchState::Initial),
            Event::Start {
                schedule_in_future: false,
            },
            None,
            0,
        )
        .expect("start");
        assert_eq!(started.state, "preparing");
        assert_eq!(started.steps().preparation.status, "running");
        assert!(started.steps().preparation.started_at.is_some());
        assert_eq!(started.steps().delivery.status, "ready");
        assert!(started.started_at.is_some());

        let scheduled = project(
            &batch(BatchState::Initial),
            Event::Start {
                schedule_in_future: true,
            },
            None,
            0,
        )
        .expect("start");
        assert_eq!(scheduled.state, "scheduled");
        assert_eq!(scheduled.steps().preparation.status, "ready");
        assert!(scheduled.steps().preparation.started_at.is_none());
    }

    #[test]
    fn prepared_and_delivered_record_conditions() {
        let preparing = project(
            &batch(BatchState::Initial),
            Event::Start {
                schedule_in_future: false,
            },
            None,
            0,
        )
        .expect("start");
        let delivering = project(&preparing, Event::Prepared, None, 0).expect("prepared");
        assert_eq!(delivering.state, "delivering");
        let steps = delivering.steps();
        assert_eq!(steps.preparation.status, "completed");
        assert!(steps.preparation.finished_at.is_some());
        assert_eq!(steps.delivery.status, "running");
        let prepared = conditions(&delivering);
        let c = condition(&prepared, "Prepared");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Completed")
        );
        assert!(c.message.contains("8 of 10"), "{}", c.message);

        let completed = project(&delivering, Event::Delivered, None, 0).expect("delivered");
        assert_eq!(completed.state, "completed");
        assert_eq!(completed.steps().delivery.status, "completed");
        assert!(completed.finished_at.is_some());
        assert_eq!(
            condition(&conditions(&completed), "Delivered").status,
            "True"
        );
    }

    #[test]
    fn pause_and_resume_keep_the_step_and_flip_the_condition() {
        let mut delivering = batch(BatchState::Delivering);
        delivering.steps = r#"{"delivery":{"status":"running","started_at":null,"finished_at":null,"error":null}}"#.into();
        let paused = project(&delivering, Event::Pause, None, 0).expect("pause");
        assert_eq!(paused.state, "paused");
        assert_eq!(paused.resume_to.as_deref(), Some("delivering"));
        assert_eq!(paused.steps().delivery.status, "paused");
        assert_eq!(condition(&conditions(&paused), "Paused").status, "True");

        let resumed = project(&paused, Event::Resume, None, 0).expect("resume");
        assert_eq!(resumed.state, "delivering");
        assert_eq!(resumed.resume_to, None);
        assert_eq!(resumed.steps().delivery.status, "running");
        let c = conditions(&resumed);
        assert_eq!(condition(&c, "Paused").status, "False");
        assert_eq!(condition(&c, "Paused").reason, "Resumed");
    }

    #[test]
    fn fail_records_the_error_and_retry_clears_it() {
        let failed = project(
            &batch(BatchState::Preparing),
            Event::Fail,
            Some(&Cause::new("RetriesExhausted", "template: broken")),
            4,
        )
        .expect("fail");
        assert_eq!(failed.state, "failed");
        assert_eq!(failed.resume_to.as_deref(), Some("preparing"));
        assert_eq!(failed.error.as_deref(), Some("template: broken"));
        assert_eq!(failed.restarts, 4);
        let steps = failed.steps();
        assert_eq!(steps.preparation.status, "failed");
        assert_eq!(steps.preparation.error.as_deref(), Some("template: broken"));
        let c = conditions(&failed);
        assert_eq!(condition(&c, "Failed").message, "template: broken");

        let retried = project(&failed, Event::Retry, None, 0).expect("retry");
        assert_eq!(retried.state, "preparing");
        assert_eq!(retried.error, None);
        assert_eq!(retried.finished_at, None);
        assert_eq!(retried.steps().preparation.status, "running");
        assert_eq!(retried.steps().preparation.error, None);
        assert_eq!(condition(&conditions(&retried), "Failed").status, "False");
    }

    /// A xorshift64 generator: the property test's sequences, replayable from their seed.
    struct Xorshift(u64);

    impl Xorshift {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// What a step's record must say in a batch at rest in `state` (resuming into or failed
    /// from `resume_to`).
    fn expected_steps(
        state: BatchState,
        resume_to: Option<BatchState>,
    ) -> (&'static str, &'static str) {
        use BatchState::*;
        match (state, resume_to) {
            (Initial, _) => ("initial", "initial"),
            (Scheduled, _) | (Paused, Some(Scheduled)) => ("ready", "ready"),
            (Preparing, _) => ("running", "ready"),
            (Paused, Some(Preparing)) => ("paused", "ready"),
            (Failed, Some(Preparing)) => ("failed", "ready"),
            (Delivering, _) => ("completed", "running"),
            (Paused, Some(Delivering)) => ("completed", "paused"),
            (Failed, Some(Delivering)) => ("completed", "failed"),
            (Completed, _) => ("completed", "completed"),
            (state, resume_to) => panic!("no batch rests in {state:?} with {resume_to:?}"),
        }
    }

    /// The step bookkeeping over random sequences of every event, allowed or not: each step's
    /// status, the batch's times and error, and its conditions always agree with the state the
    /// state machine says the batch is in, and a refused event changes nothing.
    #[test]
    fn bookkeeping_follows_the_state_over_random_event_sequences() {
        // Every sequence starts from a new batch.
        let mut seen: std::collections::HashSet<(BatchState, Option<BatchState>)> =
            [(BatchState::Initial, None)].into();
        for seed in 1..=3000u64 {
            let mut rng = Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut b = batch(BatchState::Initial);
            // Cancelled from a batch that had run: its steps as they were.
            let mut before_cancel: Option<(String, String)> = None;
            for _ in 0..rng.below(40) + 1 {
                let event = EVERY_EVENT[rng.below(EVERY_EVENT.len())];
                let cause = (rng.below(2) == 0).then(|| Cause::new("Because", "a reason"));
                let from = Lifecycle {
                    state: b.state.parse().expect("state"),
                    resume_to: b
                        .resume_to
                        .as_deref()
                        .map(|s| s.parse().expect("resume_to")),
                };
                let allowed = transition(from, event);
                let steps_before = b.steps();
                match project(&b, event, cause.as_ref(), 2) {
                    Err(refused) => {
                        assert_eq!(Err(refused), allowed, "seed {seed}: {from:?} + {event:?}");
                        continue;
                    }
                    Ok(next) => {
                        let lc = allowed.expect("project allows only what the state machine does");
                        assert_eq!(next.state, lc.state.as_str(), "seed {seed}");
                        assert_eq!(
                            next.resume_to.as_deref(),
                            lc.resume_to.map(BatchState::as_str)
                        );
                        b = next;
                    }
                }
                let state: BatchState = b.state.parse().expect("state");
                let resume_to: Option<BatchState> = b
                    .resume_to
                    .as_deref()
                    .map(|s| s.parse().expect("resume_to"));
                seen.insert((state, resume_to));
                let steps = b.steps();
                let got = (
                    steps.preparation.status.as_str(),
                    steps.delivery.status.as_str(),
                );
                let context =
                    format!("seed {seed}: {from:?} + {event:?} -> {state:?}/{resume_to:?}");
                if state == BatchState::Cancelled {
                    // A cancel stops whatever ran: nothing runs, the rest stays as it was.
                    let (p, d) = before_cancel.get_or_insert_with(|| {
                        let stop = |s: &str| {
                            if s == "running" {
                                "paused".to_owned()
                            } else {
                                s.to_owned()
                            }
                        };
                        (
                            stop(&steps_before.preparation.status),
                            stop(&steps_before.delivery.status),
                        )
                    });
                    assert_eq!(got, (p.as_str(), d.as_str()), "{context}");
                } else {
                    assert_eq!(got, expected_steps(state, resume_to), "{context}");
                }
                let running: Vec<&str> = [("preparation", got.0), ("delivery", got.1)]
                    .into_iter()
                    .filter(|(_, status)| *status == "running")
                    .map(|(name, _)| name)
                    .collect();
                assert_eq!(
                    running,
                    state
                        .step()
                        .map(Step::as_str)
                        .into_iter()
                        .collect::<Vec<_>>(),
                    "{context}"
                );
                for (record, status) in [(&steps.preparation, got.0), (&steps.delivery, got.1)] {
                    if status != "initial" && status != "ready" {
                        assert!(
                            record.started_at.is_some(),
                            "{context}: a step that ran has its start"
                        );
                    }
                    assert_eq!(
                        record.finished_at.is_some(),
                        status == "completed",
                        "{context}"
                    );
                    assert_eq!(record.error.is_some(), status == "failed", "{context}");
                }
                assert_eq!(b.finished_at.is_some(), state.is_final(), "{context}");
                assert_eq!(b.error.is_some(), state == BatchState::Failed, "{context}");
                if state == BatchState::Failed {
                    let expected = cause.as_ref().map_or("step failed", |c| c.message.as_str());
                    assert_eq!(b.error.as_deref(), Some(expected), "{context}");
                }
                let all = conditions(&b);
                let is_true = |kind: &str| all.iter().any(|c| c.kind == kind && c.status == "True");
                for (kind, holds) in [
                    ("Paused", state == BatchState::Paused),
                    ("Failed", state == BatchState::Failed),
                    ("Cancelled", state == BatchState::Cancelled),
                    ("Delivered", state == BatchState::Completed),
                    ("Prepared", got.0 == "completed"),
                ] {
                    assert_eq!(is_true(kind), holds, "{context}: {kind} in {all:?}");
                }
                let kinds: std::collections::HashSet<&str> =
                    all.iter().map(|c| c.kind.as_str()).collect();
                assert_eq!(
                    kinds.len(),
                    all.len(),
                    "{context}: one condition of each type"
                );
            }
        }
        // Every state the machine can rest in was reached.
        for state in BatchState::ALL {
            assert!(
                seen.iter().any(|(s, _)| *s == state),
                "{state:?} never reached"
            );
        }
    }

    #[test]
    fn cancel_stops_the_running_step_and_refusals_change_nothing() {
        let mut preparing = batch(BatchState::Preparing);
        preparing.steps = r#"{"preparation":{"status":"running","started_at":null,"finished_at":null,"error":null}}"#.into();
        let cancelled = project(&preparing, Event::Cancel, None, 0).expect("cancel");
        assert_eq!(cancelled.state, "cancelled");
        assert_eq!(cancelled.steps().preparation.status, "paused");
        assert!(cancelled.finished_at.is_some());
        assert_eq!(
            condition(&conditions(&cancelled), "Cancelled").status,
            "True"
        );

        let err = project(&batch(BatchState::Completed), Event::Pause, None, 0)
            .expect_err("completed is final");
        assert_eq!(err.to_string(), "cannot pause a batch in state completed");
    }
}
