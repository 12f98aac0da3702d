//! Per-batch gates: how a supervisor tells the workers of this process, between two provider
//! calls, that its batch paused or was cancelled; read once per message, and awaitable by the
//! steps so that a pause interrupts any wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;

/// What workers may do with a batch's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// Send.
    Open,
    /// Stop sending; claimed messages go back to `pending` (pause, shutdown).
    Held,
    /// Stop sending; claimed messages become `cancelled`.
    Cancelled,
}

/// One batch's gate, with the provider its messages go through.
#[derive(Debug)]
pub struct Gate {
    state: watch::Sender<GateState>,
    /// Set when the batch's counters moved (a worker here recorded outcomes, or the instance's
    /// watch saw another instance do so): the delivery step wakes on it instead of polling.
    progress: tokio::sync::Notify,
    /// The batch's provider name.
    pub provider: String,
}

impl Gate {
    /// A gate in the given state.
    pub fn new(state: GateState, provider: impl Into<String>) -> Self {
        Gate {
            state: watch::Sender::new(state),
            progress: tokio::sync::Notify::new(),
            provider: provider.into(),
        }
    }
    /// The current state.
    pub fn state(&self) -> GateState {
        *self.state.borrow()
    }
    /// True when workers may send.
    pub fn is_open(&self) -> bool {
        self.state() == GateState::Open
    }
    /// Changes the state.
    pub fn set(&self, state: GateState) {
        self.state.send_replace(state);
    }
    /// Says that the batch's counters moved. Nudges coalesce: one waiting wake-up at most.
    pub fn nudge(&self) {
        self.progress.notify_one();
    }
    /// Resolves at the next nudge (at once if one came since the last wake-up).
    pub async fn progressed(&self) {
        self.progress.notified().await;
    }
    /// Resolves once the gate is not open (at once if it is closed already).
    pub async fn closed(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s != GateState::Open).await;
    }
}

/// The gates of the batches this process supervises, whether the process is stopping, and how
/// many tasks of each batch this process's workers are carrying out. The locks are never held
/// across an await.
#[derive(Debug, Clone, Default)]
pub struct Gates {
    map: Arc<RwLock<HashMap<i64, Arc<Gate>>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    working: Arc<Mutex<HashMap<i64, usize>>>,
}

/// A task a worker of this process is carrying out, from before its first claim until its last
/// outcome is recorded (or the task is dropped). Counted per batch until dropped.
#[derive(Debug)]
pub struct Working {
    working: Arc<Mutex<HashMap<i64, usize>>>,
    batch_id: i64,
}

impl Drop for Working {
    fn drop(&mut self) {
        let mut working = self.working.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = working.get_mut(&self.batch_id) {
            *n -= 1;
            if *n == 0 {
                working.remove(&self.batch_id);
            }
        }
    }
}

impl Gates {
    /// Counts a task of `batch_id` as being carried out here until the guard is dropped.
    pub fn working_on(&self, batch_id: i64) -> Working {
        *self
            .working
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(batch_id)
            .or_insert(0) += 1;
        Working {
            working: Arc::clone(&self.working),
            batch_id,
        }
    }

    /// True while a worker of this process carries out a task of `batch_id`: only then can
    /// messages claimed under this process's id be in a worker's hands.
    pub fn is_working_on(&self, batch_id: i64) -> bool {
        self.working
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&batch_id)
    }

    /// The gate of a batch, if this process supervises it.
    pub fn get(&self, batch_id: i64) -> Option<Arc<Gate>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&batch_id)
            .cloned()
    }
    /// Installs a batch's gate.
    pub fn insert(&self, batch_id: i64, gate: Arc<Gate>) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(batch_id, gate);
    }
    /// Removes a batch's gate.
    pub fn remove(&self, batch_id: i64) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&batch_id);
    }
    /// Shutdown: holds every gate, and makes workers treat every batch (also those supervised
    /// elsewhere) as held: they stop sending and release what they claimed.
    pub fn begin_shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for gate in self.map.read().unwrap_or_else(|p| p.into_inner()).values() {
            if gate.state() == GateState::Open {
                gate.set(GateState::Held);
            }
        }
    }

    /// True once shutdown began.
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Acquire)
    }
}
