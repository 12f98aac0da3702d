//! How delivery tasks reach the partition workers. A task is a work hint — batch, partition and a
//! range of message ids — never data: the worker claims what is still `pending` in that range.

mod in_process;
pub mod rabbitmq;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use in_process::InProcess;

use crate::telemetry::trace::TraceContext;

/// One unit of delivery work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, actix::Message)]
#[rtype(result = "Result<TaskReport, TransportError>")]
pub struct DeliveryTask {
    /// The batch's internal id.
    pub batch_id: i64,
    /// The partition the messages belong to.
    pub partition: i32,
    /// First message id of the range (inclusive).
    pub first_id: i64,
    /// Last message id of the range (inclusive).
    pub last_id: i64,
    /// 1 for a transactional batch's task, 0 for a marketing one's: transactional tasks go to
    /// the workers first (RabbitMQ message priority; in-process, the pool's admission). A task
    /// published without it is a marketing one.
    #[serde(default)]
    pub priority: u8,
    /// The task covers the batch's partitions from `partition` on, not that one only: a small
    /// batch's messages go out as one task (one claim, one broker message, one worker run)
    /// instead of one per partition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub across: bool,
}

/// A task handed to a worker, with the trace of the span that handed it over (the Delivery
/// step's, or the publish span of the instance that published it): the worker's span for the
/// task is that span's child.
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "Result<TaskReport, TransportError>")]
pub struct Assignment {
    /// The task.
    pub task: DeliveryTask,
    /// Where the task's span belongs.
    pub trace: TraceContext,
}

/// What a worker did with a task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskReport {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages sent.
    pub sent: usize,
    /// Messages failed for good.
    pub failed: usize,
    /// Messages put back for a later retry.
    pub retried: usize,
    /// Messages put back because the batch stopped.
    pub released: usize,
    /// Messages cancelled.
    pub cancelled: usize,
}

/// Why a task could not be handed over or carried out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The receiving side is gone (worker stopped, connection lost).
    #[error("transport closed: {0}")]
    Closed(String),
    /// The worker could not finish the task.
    #[error("task failed: {0}")]
    Task(String),
    /// The worker could not reach the database; the task can run again once it is back.
    #[error("task failed, database unavailable: {0}")]
    Unavailable(String),
}

/// Carries delivery tasks to workers. `dispatch` resolves once the task is accepted by the
/// transport (in-process: done by a worker; a broker: confirmed), and waits while the workers
/// are full: that wait is the backpressure.
pub trait Transport: Send + Sync {
    /// Hands one task over.
    fn dispatch(
        &self,
        task: DeliveryTask,
    ) -> BoxFuture<'static, Result<TaskReport, TransportError>>;
    /// How many tasks may be in flight at once before `dispatch` would only queue.
    fn capacity(&self) -> usize;
    /// Whether tasks dispatched earlier (and already answered) may still wait in the transport
    /// to be carried out: a batch without progress is re-planned only when none can, since its
    /// tasks may just be queued behind other batches'. In-process, a dispatch answers once its
    /// task is done, so none can.
    fn may_hold_tasks(&self) -> bool {
        false
    }
    /// Resolves once `may_hold_tasks` is false (at once when it already is), without polling:
    /// a Delivery step without progress waits on it before it looks again.
    fn held_tasks_gone(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
    /// Tasks waiting in the transport to be carried out, as last seen (a broker's queue depth,
    /// read once a second and counting this instance's publishes since): the Delivery step of a
    /// large batch holds back its tasks while it is high, so that a batch's tasks in the broker
    /// stay bounded. `None` when unknown, or when the transport holds none (in-process).
    fn backlog(&self) -> Option<usize> {
        None
    }
    /// Whether a dispatch answers only once its task is carried out (in-process), rather than
    /// once the task is handed over (a broker's confirmation, within milliseconds). A Delivery
    /// step keeps its turn among the instance's steps while it waits for answers of the second
    /// kind, and gives it back while it waits for the first.
    fn answers_when_done(&self) -> bool {
        false
    }
}
