//! The BatchRegistry: one per process. It finds or spawns the supervisor of a batch, forwards the
//! operator's actions to it, recovers the batches a previous run left active, and drains them on
//! shutdown.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;

use super::Deps;
use super::supervisor::{Act, ActError, Action, BatchSupervisor, Drain};
use crate::config::Redelivery;
use crate::domain::state::{BatchState, Lifecycle, transition};
use crate::store::StoreError;
use crate::store::models::Batch;

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
}

/// A supervisor stopped (its batch reached a final state, or the process stops).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SupervisorStopped {
    /// The batch's internal id.
    pub batch_id: i64,
    /// Which supervisor of that batch stopped (a newer one stays registered).
    pub generation: u64,
}

/// At start-up: settle what the previous run left in flight and resume active batches.
#[derive(Debug, Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct Recover;

/// At shutdown: stop sending and wait (up to the timeout) for every child to stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown(pub Duration);

/// Finds, spawns and recovers supervisors.
pub struct BatchRegistry {
    deps: Deps,
    supervisors: HashMap<i64, (u64, Addr<BatchSupervisor>)>,
    generation: u64,
}

impl BatchRegistry {
    /// A registry over the shared dependencies.
    pub fn new(deps: Deps) -> Self {
        BatchRegistry {
            deps,
            supervisors: HashMap::new(),
            generation: 0,
        }
    }

    fn supervisor(&mut self, batch: Batch, ctx: &mut Context<Self>) -> Addr<BatchSupervisor> {
        if let Some((_, addr)) = self
            .supervisors
            .get(&batch.id)
            .filter(|(_, a)| a.connected())
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
        self.supervisors.insert(id, (self.generation, addr.clone()));
        addr
    }
}

impl Actor for BatchRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.deps.core.settings.smsbatch.supervisor_mailbox);
    }
}

impl Handler<Command> for BatchRegistry {
    type Result = ResponseActFuture<Self, Result<Batch, ActError>>;

    fn handle(&mut self, msg: Command, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.deps.core.store.clone();
        let Command {
            public_id,
            action,
            resent,
        } = msg;
        let id = public_id.clone();
        Box::pin(
            async move { load(&store, &public_id).await }
                .into_actor(self)
                .map(move |loaded, act, ctx| {
                    let batch = loaded?;
                    // Refuse what the state machine refuses without waking a supervisor for it.
                    if !act.supervisors.contains_key(&batch.id) {
                        check(&batch, action)?;
                    }
                    Ok(act.supervisor(batch, ctx))
                })
                .then(
                    move |addr: Result<Addr<BatchSupervisor>, ActError>, act, ctx| {
                        let registry = ctx.address();
                        async move {
                            match addr?.send(Act(action)).await {
                                Ok(answer) => answer,
                                // The supervisor stopped between the lookup and the send (its batch
                                // had just reached a final state): go through the registry once more,
                                // which answers from the stored state or starts a new supervisor.
                                Err(MailboxError::Closed) if !resent => registry
                                    .send(Command {
                                        public_id: id,
                                        action,
                                        resent: true,
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

async fn load(store: &crate::store::Store, public_id: &str) -> Result<Batch, ActError> {
    store
        .find_batch(public_id)
        .await?
        .map(|r| r.batch)
        .ok_or_else(|| ActError::NotFound(public_id.to_string()))
}

/// Checks an action against the state machine for a batch as stored.
fn check(batch: &Batch, action: Action) -> Result<(), ActError> {
    let lifecycle = Lifecycle {
        state: batch.state.parse().unwrap_or(BatchState::Initial),
        resume_to: batch.resume_to.as_deref().and_then(|s| s.parse().ok()),
    };
    transition(lifecycle, action.event(batch))?;
    Ok(())
}

impl Handler<SupervisorStopped> for BatchRegistry {
    type Result = ();

    fn handle(&mut self, msg: SupervisorStopped, _ctx: &mut Self::Context) {
        if self
            .supervisors
            .get(&msg.batch_id)
            .is_some_and(|(generation, _)| *generation == msg.generation)
        {
            self.supervisors.remove(&msg.batch_id);
        }
    }
}

impl Handler<Recover> for BatchRegistry {
    type Result = AtomicResponse<Self, Result<usize, StoreError>>;

    fn handle(&mut self, _msg: Recover, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.deps.core.store.clone();
        let resend = self.deps.core.settings.smsbatch.redelivery == Redelivery::AtLeastOnce;
        AtomicResponse::new(Box::pin(
            async move {
                // Messages a dead process left `sending` have an unknown outcome; settle them
                // before anything plans delivery again.
                for batch in store
                    .batches_in_states(&["delivering", "paused", "cancelled", "failed"])
                    .await?
                {
                    let parts = store.partitions(batch.id).await?;
                    if parts.iter().all(|p| p.done() >= p.total) {
                        continue;
                    }
                    let settled = store
                        .recover_sending(batch.id, batch.partition_count, resend)
                        .await?;
                    if settled > 0 {
                        tracing::warn!(batch_id = %batch.public_id, messages = settled, resend, "Settled messages left sending by a previous run.");
                    }
                    if batch.state == "cancelled" {
                        store.cancel_pending(batch.id, batch.partition_count).await?;
                    }
                }
                store
                    .batches_in_states(&["scheduled", "preparing", "delivering"])
                    .await
            }
            .into_actor(self)
            .map(|active, act, ctx| {
                let active = active?;
                let n = active.len();
                for batch in active {
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
        self.deps.core.gates.hold_all();
        let drains: Vec<_> = self
            .supervisors
            .values()
            .map(|(_, a)| a.send(Drain))
            .collect();
        Box::pin(async move {
            let all = futures_util::future::join_all(drains);
            if tokio::time::timeout(msg.0, all).await.is_err() {
                tracing::warn!("Shutdown timeout reached with work still in flight.");
            }
        })
    }
}
