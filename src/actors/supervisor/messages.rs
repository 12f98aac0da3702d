//! The messages a supervisor takes (and the one it sends the registry when it stops), with
//! their handlers.

use actix::prelude::*;
use tokio::sync::oneshot;

use super::BatchSupervisor;
use crate::actors::ActError;
use crate::actors::gates::GateState;
use crate::domain::lifecycle::Action;
use crate::store::models::Batch;
use crate::telemetry::trace::TraceContext;

/// A supervisor stopped (its batch reached a final state, or the process stops).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SupervisorStopped {
    /// The batch's internal id.
    pub batch_id: i64,
    /// Which supervisor of that batch stopped (a newer one stays registered).
    pub generation: u64,
}

/// The instance's watch saw the batch's row at this version: a supervisor behind it reads the
/// row again (an action saved through another instance).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Changed(pub i64);

/// Asks the supervisor to apply an operator's action, with the trace of the request that asked
/// (the batch's steps that the action starts belong to it); answers the batch as saved.
#[derive(Debug, Message)]
#[rtype(result = "Result<Batch, ActError>")]
pub struct Act(pub Action, pub TraceContext);

/// Stop sending and wait for the child to stop (process shutdown). The batch keeps its state,
/// so the next start of the service continues it.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Drain;

/// Stop supervising here: another instance holds the batch's lease now.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Act> for BatchSupervisor {
    type Result = AtomicResponse<Self, Result<Batch, ActError>>;

    fn handle(&mut self, msg: Act, _ctx: &mut Self::Context) -> Self::Result {
        let event = msg.0.event(self.batch.schedule_at);
        if msg.0 == Action::Retry {
            self.restarts = 0;
        }
        let store = self.deps.core.requests.clone();
        // Steps started from here on are the request's; a refused action leaves them as they were.
        let before = std::mem::replace(&mut self.trace, msg.1);
        AtomicResponse::new(Box::pin(self.apply(event, None, store).map(
            |result, act, ctx| {
                if result.is_err() {
                    act.trace = before;
                }
                // An action that left nothing to do here (refused, or a retry that failed)
                // lets the batch go.
                if act.is_idle() {
                    act.stop_when_idle(ctx);
                }
                result
            },
        )))
    }
}

impl Handler<Changed> for BatchSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Changed, ctx: &mut Self::Context) {
        if msg.0 > self.batch.version {
            self.reload(ctx);
        }
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
