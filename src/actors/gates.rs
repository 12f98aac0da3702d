//! Per-batch gates: how a supervisor tells the workers of this process, between two provider
//! calls, that its batch paused or was cancelled; read once per message, and awaitable by the
//! steps so that a pause interrupts any wait.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

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
    /// The batch's provider name.
    pub provider: String,
}

impl Gate {
    /// A gate in the given state.
    pub fn new(state: GateState, provider: impl Into<String>) -> Self {
        Gate {
            state: watch::Sender::new(state),
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
    /// Resolves once the gate is not open (at once if it is closed already).
    pub async fn closed(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s != GateState::Open).await;
    }
}

/// The gates of the batches this process supervises, and whether the process is stopping. The
/// lock is never held across an await.
#[derive(Debug, Clone, Default)]
pub struct Gates {
    map: Arc<RwLock<HashMap<i64, Arc<Gate>>>>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Gates {
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
