//! The actor system: one `BatchRegistry` per process, one `BatchSupervisor` per active batch
//! (owning its Preparation or Delivery child), and a pool of `PartitionWorker`s behind bounded
//! mailboxes. Actors stay thin: the work is in plain async functions (`preparation::run`,
//! `delivery::run`, `worker::process_task`) that can be tested without the actor runtime.

pub mod delivery;
pub mod gates;
pub mod incoming;
pub mod preparation;
pub mod registry;
pub mod supervisor;
pub mod worker;

use std::sync::Arc;

use crate::admission::{Admission, Place};
use crate::config::Settings;
use crate::domain::phone::Region;
use crate::domain::state::TransitionError;
use crate::provider::{Providers, Unavailable};
use crate::store::models::Batch;
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;
use crate::transport::Transport;
use gates::{Gate, Gates};

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

/// What every actor of the process shares.
#[derive(Clone)]
pub struct Core {
    /// The database, on the pool of the background work.
    pub store: Store,
    /// The database on the pool kept for API requests: the registry and the supervisors use it
    /// for the operators' actions, so that a busy instance still answers them promptly.
    pub requests: Store,
    /// The providers by name.
    pub providers: Providers,
    /// The metrics.
    pub metrics: Metrics,
    /// The configuration.
    pub settings: Arc<Settings>,
    /// The gates of the batches this process supervises.
    pub gates: Gates,
    /// The region of numbers written without `+`.
    pub region: Region,
    /// This process's id among the instances sharing the database (new at every start).
    pub instance: String,
    /// The places of the steps this process runs at once (`smsbatch.active_steps`).
    pub steps: Admission,
}

/// `Core` plus the transport, for the supervisors and their children.
#[derive(Clone)]
pub struct Deps {
    /// Shared dependencies.
    pub core: Core,
    /// Where delivery tasks go.
    pub transport: Arc<dyn Transport>,
}

/// How a step's run ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepEnd {
    /// All its work is done.
    Finished,
    /// It stopped early because the batch paused, was cancelled or the process stops.
    Stopped,
    /// Delivery stopped because too many of the batch's recent messages failed: the batch
    /// should pause, for the reason given.
    TooManyFailures(String),
    /// Delivery stopped because the batch's provider can take nothing now (an SMPP account
    /// whose binds are refused): the batch waits for it, saying why in a condition.
    ProviderUnavailable(Unavailable),
}

/// Waits for one of the instance's step places, transactional batches first (`Admission`);
/// `None` if the batch's gate closes meanwhile (a pause, a cancel, the process stopping). The
/// place is the step's until it drops it.
pub(crate) async fn take_turn(core: &Core, batch: &Batch, gate: &Gate) -> Option<Place> {
    /// Counts the step as waiting until it has its place or gives up (also when aborted).
    struct Waiting<'a>(&'a prometheus::IntGauge);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    core.metrics.steps_waiting.inc();
    let _waiting = Waiting(&core.metrics.steps_waiting);
    tokio::select! {
        place = core.steps.enter(batch.message_type.priority()) => Some(place),
        () = gate.closed() => None,
    }
}
