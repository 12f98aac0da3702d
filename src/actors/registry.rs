//! The BatchRegistry: one per process. It finds or spawns the supervisor of a batch, forwards the
//! operator's actions to it, recovers the batches a previous run left active, and drains them on
//! shutdown.
//!
//! Several instances share one database: each active batch's supervisor runs in the instance that
//! holds its lease. The coordination is once per instance, never once per batch:
//! - every `poll_ms`, one watch statement lists the batches whose row or counters changed since
//!   the last look; a supervisor behind its row's version reads it again (an action saved through
//!   another instance), and the gate of a batch whose counters moved is nudged (its Delivery step
//!   sleeps until then);
//! - every `lease_ms / 3`, the heartbeat, one statement renewing all its leases (stopping the
//!   supervisors of leases it lost), the take-over of active batches whose lease expired — the
//!   batches of an instance that died — after settling that instance's claims, and one check of
//!   its batches' versions, in case the watch missed a change;
//! - the leases of supervisors that stopped go back in one statement for all the stops that came
//!   while the previous release ran.
//!
//! An action on a batch another live instance supervises is saved in the database directly (with
//! the same state machine and version check); the owner's watch picks it up within `poll_ms`.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use super::ActError;
use super::Deps;
use super::supervisor::{Act, BatchSupervisor, Changed, Drain, SupervisorStopped};
use crate::config::Redelivery;
use crate::domain::lifecycle::{Action, project};
use crate::domain::state::{BatchState, Lifecycle, transition};
use crate::store::models::Batch;
use crate::store::{Store, StoreError};
use crate::telemetry::trace::TraceContext;

/// How far each look of the watch reaches back over the previous one.
const WATCH_MARGIN: chrono::Duration = chrono::Duration::seconds(1);

/// Applies an operator's action to a batch (by public id); answers the batch as saved.
#[derive(Debug, Message)]
#[rtype(result = "Result<Batch, ActError>")]
pub struct Command {
    /// The batch's public id.
    pub public_id: String,
    /// What to do.
    pub action: Action,
    /// Set on the one resend after the supervisor stopped under the command.
    pub resent: bool,
    /// The trace of the request that asked (`TraceContext::current()` in its handler).
    pub trace: TraceContext,
}

/// At start-up: settle what the previous run left in flight and resume active batches.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct Recover;

/// At shutdown: stop sending and wait (until the deadline) for every child to stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown(pub std::time::Instant);

/// Finds, spawns and recovers supervisors.
pub struct BatchRegistry {
    deps: Deps,
    supervisors: HashMap<i64, (u64, Addr<BatchSupervisor>, std::time::Instant)>,
    generation: u64,
    ticking: bool,
    watching: bool,
    /// When the watch last looked (by this process's clock).
    looked: Option<chrono::NaiveDateTime>,
    /// What the watch's last look found: the next look, which overlaps it, forwards only news.
    seen: crate::store::Changes,
    /// Batches whose supervisors stopped, their leases not yet given back.
    to_release: Vec<i64>,
    /// A release is running: the stops that come meanwhile wait for it, then go in one statement.
    releasing: bool,
}

impl BatchRegistry {
    /// A registry over the shared dependencies.
    pub fn new(deps: Deps) -> Self {
        BatchRegistry {
            deps,
            supervisors: HashMap::new(),
            generation: 0,
            ticking: false,
            watching: false,
            looked: None,
            seen: crate::store::Changes::default(),
            to_release: Vec::new(),
            releasing: false,
        }
    }

    fn supervisor(&mut self, batch: Batch, ctx: &mut Context<Self>) -> Addr<BatchSupervisor> {
        if let Some((_, addr, _)) = self
            .supervisors
            .get(&batch.id)
            .filter(|(_, a, _)| a.connected())
        {
            return addr.clone();
        }
        self.generation += 1;
        let id = batch.id;
        let addr = BatchSupervisor::new(
            self.deps.clone(),
            batch,
            ctx.address().recipient(),
            self.generation,
        )
        .start();
        self.supervisors.insert(
            id,
            (self.generation, addr.clone(), std::time::Instant::now()),
        );
        self.count_supervisors();
        addr
    }
}

impl BatchRegistry {
    fn lease(&self) -> Duration {
        Duration::from_millis(self.deps.core.settings.smsbatch.lease_ms)
    }

    fn count_supervisors(&self) {
        self.deps
            .core
            .metrics
            .supervised
            .set(i64::try_from(self.supervisors.len()).unwrap_or(i64::MAX));
    }

    fn horizon(&self) -> Duration {
        self.deps.core.settings.smsbatch.schedule_horizon()
    }

    /// Tells each supervisor of these batches their version in the database: a supervisor
    /// behind it reads its row again (an action saved through another instance). Answers the
    /// batches whose supervisor's mailbox was full.
    fn forward_versions(&self, versions: &std::collections::BTreeMap<i64, i64>) -> Vec<i64> {
        let mut refused = Vec::new();
        for (id, version) in versions {
            if let Some((_, addr, _)) = self.supervisors.get(id)
                && addr.try_send(Changed(*version)).is_err()
            {
                // A full mailbox is busy with this batch already; the next look tries again.
                tracing::debug!(batch = id, "Supervisor did not take a change.");
                refused.push(*id);
            }
        }
        refused
    }

    /// The instance's one watch: every `poll_ms`, one statement finds the batches whose row or
    /// counters changed since the last look (`Store::changed_since`); their supervisors here
    /// hear of it. Nothing runs while this instance supervises nothing.
    fn watch(&mut self, ctx: &mut Context<Self>) {
        if self.supervisors.is_empty() {
            self.looked = None;
            self.seen = crate::store::Changes::default();
            return;
        }
        if std::mem::replace(&mut self.watching, true) {
            return;
        }
        let now = chrono::Utc::now().naive_utc();
        // Each look reaches back over the last one by a margin: a change is stamped before its
        // transaction commits, and another instance's clock may run a little behind.
        let since = self.looked.unwrap_or(now) - WATCH_MARGIN;
        let store = self.deps.core.store.clone();
        ctx.spawn(
            async move { store.changed_since(since).await }
                .into_actor(self)
                .map(move |changes, act, _ctx| {
                    act.watching = false;
                    match changes {
                        Ok(changes) => {
                            act.looked = Some(now);
                            let news = changes.news(&act.seen);
                            act.seen = changes;
                            // A change a supervisor did not take is news again next time.
                            for id in act.forward_versions(&news.versions) {
                                act.seen.versions.remove(&id);
                            }
                            for id in news.progressed() {
                                if let Some(gate) = act.deps.core.gates.get(id) {
                                    gate.nudge();
                                }
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "Watching for changes failed."),
                    }
                }),
        );
    }

    /// Heartbeat, lease renewal, take-over of unsupervised batches. One at a time; it never
    /// blocks the registry's mailbox.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.release_leases(ctx);
        if std::mem::replace(&mut self.ticking, true) {
            return;
        }
        let store = self.deps.core.store.clone();
        let instance = self.deps.core.instance.clone();
        let lease = self.lease();
        let resend = self.deps.core.settings.smsbatch.redelivery == Redelivery::AtLeastOnce;
        let horizon = self.horizon();
        let started = std::time::Instant::now();
        ctx.spawn(
            async move {
                store.heartbeat(&instance).await?;
                let held = store.renew_leases(&instance, lease).await?;
                let taken = take_over(&store, &instance, lease, resend, horizon).await?;
                // The watch's check against a change it missed: the version of every batch
                // supervised here.
                let versions = store.leased_versions(&instance).await?;
                Ok::<_, StoreError>((held, taken, versions))
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.ticking = false;
                match result {
                    Ok((held, taken, versions)) => {
                        let _ = act.forward_versions(&versions);
                        // Supervisors of leases this instance lost (it was too slow to renew
                        // them, and another took over) stop: one supervisor per batch.
                        // (A supervisor started after this round began holds a lease the
                        // renewal did not see yet.)
                        let lost: Vec<i64> = act
                            .supervisors
                            .iter()
                            .filter(|(id, (_, _, since))| !held.contains(id) && *since < started)
                            .map(|(id, _)| *id)
                            .collect();
                        for id in lost {
                            if let Some((_, addr, _)) = act.supervisors.remove(&id) {
                                act.count_supervisors();
                                tracing::warn!(batch = id, "Lease lost; stopping its supervisor here.");
                                if addr.try_send(super::supervisor::Stop).is_err() {
                                    tracing::warn!(batch = id, "Supervisor did not take the stop.");
                                }
                            }
                        }
                        for batch in taken {
                            tracing::info!(batch_id = %batch.public_id, state = %batch.state, "Taking over batch.");
                            act.supervisor(batch, ctx);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "Lease upkeep failed; retrying."),
                }
            }),
        );
    }
}

/// Takes the lease of every active batch nobody supervises, settles the claims its dead
/// instances left, and returns the batches now this instance's to supervise.
async fn take_over(
    store: &Store,
    instance: &str,
    lease: Duration,
    resend: bool,
    horizon: Duration,
) -> Result<Vec<Batch>, StoreError> {
    let mut taken = Vec::new();
    for batch in store.unsupervised_batches(horizon).await? {
        if !store.acquire_lease(batch.id, instance, lease).await? {
            continue;
        }
        if may_hold_claims(batch.state) {
            store
                .settle_orphans(&batch, instance, lease, resend, None)
                .await?;
        }
        taken.push(batch);
    }
    Ok(taken)
}

impl Actor for BatchRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.core.settings.smsbatch.supervisor_mailbox);
        ctx.run_interval(
            self.deps.core.settings.smsbatch.upkeep_every(),
            |act, ctx| act.tick(ctx),
        );
        let watch = Duration::from_millis(self.deps.core.settings.smsbatch.poll_ms);
        ctx.run_interval(watch, |act, ctx| act.watch(ctx));
    }
}

/// Where a command goes.
enum Route {
    /// To this instance's supervisor of the batch.
    Local(Addr<BatchSupervisor>),
    /// This instance now holds the lease: start a supervisor here.
    Spawn(Batch),
    /// Another live instance supervises the batch: the action was saved in the database.
    Saved(Batch),
}

impl Handler<Command> for BatchRegistry {
    type Result = ResponseActFuture<Self, Result<Batch, ActError>>;

    fn handle(&mut self, msg: Command, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.deps.core.requests.clone();
        let instance = self.deps.core.instance.clone();
        let lease = self.lease();
        let resend_messages =
            self.deps.core.settings.smsbatch.redelivery == Redelivery::AtLeastOnce;
        let Command {
            public_id,
            action,
            resent,
            trace,
        } = msg;
        let id = public_id.clone();
        Box::pin(
            async move { load(&store, &public_id).await }
                .into_actor(self)
                .then(move |loaded, act, _ctx| {
                    let local = loaded.as_ref().ok().and_then(|b| {
                        act.supervisors
                            .get(&b.id)
                            .filter(|(_, a, _)| a.connected())
                            .map(|(_, a, _)| a.clone())
                    });
                    let store = act.deps.core.requests.clone();
                    async move {
                        let batch = loaded?;
                        if let Some(addr) = local {
                            return Ok(Route::Local(addr));
                        }
                        // Refuse what the state machine refuses without waking a supervisor.
                        check(&batch, action)?;
                        // Free, expired or already this instance's: taken here.
                        if store.acquire_lease(batch.id, &instance, lease).await? {
                            if may_hold_claims(batch.state) {
                                store
                                    .settle_orphans(&batch, &instance, lease, resend_messages, None)
                                    .await?;
                            }
                            return Ok(Route::Spawn(batch));
                        }
                        Ok(Route::Saved(apply_remotely(&store, batch, action).await?))
                    }
                    .into_actor(act)
                })
                .map(|route: Result<Route, ActError>, act, ctx| {
                    Ok(match route? {
                        Route::Local(addr) => Ok(addr),
                        Route::Spawn(batch) => Ok(act.supervisor(batch, ctx)),
                        Route::Saved(batch) => Err(batch),
                    })
                })
                .then(
                    move |addr: Result<Result<Addr<BatchSupervisor>, Batch>, ActError>,
                          act,
                          ctx| {
                        let registry = ctx.address();
                        async move {
                            let addr = match addr? {
                                Ok(addr) => addr,
                                Err(saved) => return Ok(saved),
                            };
                            match addr.send(Act(action, trace.clone())).await {
                                Ok(answer) => answer,
                                // The supervisor stopped between the lookup and the send (its batch
                                // had just reached a final state): go through the registry once more,
                                // which answers from the stored state or starts a new supervisor.
                                Err(MailboxError::Closed) if !resent => registry
                                    .send(Command {
                                        public_id: id,
                                        action,
                                        resent: true,
                                        trace,
                                    })
                                    .await
                                    .map_err(|e| ActError::Unavailable(e.to_string()))?,
                                Err(e) => Err(ActError::Unavailable(e.to_string())),
                            }
                        }
                        .into_actor(act)
                    },
                ),
        )
    }
}

/// Saves an action on a batch that another instance supervises: the same state machine and
/// version check as a supervisor's (the batch's restarts are the supervisor's to count); the
/// owner acts on the new state when it next looks.
async fn apply_remotely(store: &Store, batch: Batch, action: Action) -> Result<Batch, ActError> {
    store
        .save_transition(batch, |b| {
            let restarts = u32::try_from(b.restarts).unwrap_or(0);
            let event = action.event(b.schedule_at);
            Ok::<_, ActError>(project(
                &b.bookkeeping(),
                &b.prepared(),
                event,
                None,
                restarts,
            )?)
        })
        .await
}

async fn load(store: &crate::store::Store, public_id: &str) -> Result<Batch, ActError> {
    store
        .batch_by_public_id(public_id)
        .await?
        .ok_or_else(|| ActError::NotFound(public_id.to_string()))
}

/// Whether a batch in this state may have messages left `sending` by an instance that died
/// (before preparation there are no messages; a scheduled batch has not delivered yet).
fn may_hold_claims(state: BatchState) -> bool {
    !matches!(state, BatchState::Initial | BatchState::Scheduled)
}

/// Checks an action against the state machine for a batch as stored (the same check a
/// supervisor makes before it saves a transition).
fn check(batch: &Batch, action: Action) -> Result<(), ActError> {
    let lifecycle = Lifecycle {
        state: batch.state,
        resume_to: batch.resume_to,
    };
    transition(lifecycle, action.event(batch.schedule_at))?;
    Ok(())
}

impl Handler<SupervisorStopped> for BatchRegistry {
    type Result = ();

    fn handle(&mut self, msg: SupervisorStopped, ctx: &mut Self::Context) {
        if self
            .supervisors
            .get(&msg.batch_id)
            .is_some_and(|(generation, _, _)| *generation == msg.generation)
        {
            self.supervisors.remove(&msg.batch_id);
            self.count_supervisors();
            if self.supervisors.is_empty() {
                // What the batches' work went through is free now: back to the system, once
                // the instance is idle (not at every supervisor's stop), so that an idle
                // service holds no more than it did before.
                crate::memory::release_freed_memory();
            }
            // Nothing left to supervise here (a final state, or a pause): the lease goes back.
            self.to_release.push(msg.batch_id);
            self.release_leases(ctx);
        }
    }
}

impl BatchRegistry {
    /// Gives back the leases of the supervisors that stopped, in one statement for all the
    /// stops that came while the last one ran (a thousand small batches ending together are a
    /// few statements, not a thousand). A batch supervised here again since its stop keeps its
    /// lease: its new supervisor holds it.
    fn release_leases(&mut self, ctx: &mut Context<Self>) {
        if self.releasing {
            return;
        }
        let supervisors = &self.supervisors;
        let mut ids = std::mem::take(&mut self.to_release);
        ids.retain(|id| !supervisors.contains_key(id));
        if ids.is_empty() {
            return;
        }
        self.releasing = true;
        let store = self.deps.core.store.clone();
        let instance = self.deps.core.instance.clone();
        ctx.spawn(
            async move {
                let released = store.release_leases(&ids, &instance).await;
                (ids, released)
            }
            .into_actor(self)
            .map(|(ids, released), act, ctx| {
                act.releasing = false;
                match released {
                    Ok(()) => act.release_leases(ctx),
                    Err(e) => {
                        // Tried again at the next heartbeat, not at once: a database that
                        // refuses gets one statement per heartbeat, not a loop of them.
                        tracing::warn!(batches = ids.len(), error = %e, "Leases not released; trying again at the next heartbeat.");
                        act.to_release.extend(ids);
                    }
                }
            }),
        );
    }
}

impl Handler<Recover> for BatchRegistry {
    type Result = AtomicResponse<Self, Result<usize, StoreError>>;

    fn handle(&mut self, _msg: Recover, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.deps.core.store.clone();
        let instance = self.deps.core.instance.clone();
        let lease = self.lease();
        let resend = self.deps.core.settings.smsbatch.redelivery == Redelivery::AtLeastOnce;
        let horizon = self.horizon();
        AtomicResponse::new(Box::pin(
            async move {
                store.heartbeat(&instance).await?;
                // Batches that need no supervisor may still hold claims of a dead process:
                // settle them (the claims of live instances are theirs to finish).
                for batch in store
                    .batches_in_states(&[
                        BatchState::Paused,
                        BatchState::Cancelled,
                        BatchState::Failed,
                    ])
                    .await?
                {
                    let parts = store.partitions(batch.id).await?;
                    if parts.iter().all(|p| p.done() >= p.total) {
                        continue;
                    }
                    store.settle_orphans(&batch, &instance, lease, resend, None).await?;
                    if batch.state == BatchState::Cancelled {
                        store.cancel_pending(batch.id, batch.partition_count).await?;
                    }
                }
                take_over(&store, &instance, lease, resend, horizon).await
            }
            .into_actor(self)
            .map(|taken, act, ctx| {
                let taken = taken?;
                let n = taken.len();
                for batch in taken {
                    tracing::info!(batch_id = %batch.public_id, state = %batch.state, "Resuming batch.");
                    act.supervisor(batch, ctx);
                }
                Ok(n)
            }),
        ))
    }
}

impl Handler<Shutdown> for BatchRegistry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Shutdown, _ctx: &mut Self::Context) -> Self::Result {
        self.deps.core.gates.begin_shutdown();
        let drains: Vec<_> = self
            .supervisors
            .values()
            .map(|(_, a, _)| a.send(Drain))
            .collect();
        Box::pin(async move {
            let all = futures_util::future::join_all(drains);
            if tokio::time::timeout_at(msg.0.into(), all).await.is_err() {
                tracing::warn!("Shutdown timeout reached with work still in flight.");
            }
        })
    }
}
