//! Per-batch gates: how a supervisor tells the workers of this process, between two provider
//! calls, that its batch paused or was cancelled. A plain atomic, read once per message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

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
    state: AtomicU8,
    /// The batch's provider name.
    pub provider: String,
}

impl Gate {
    /// A gate in the given state.
    pub fn new(state: GateState, provider: impl Into<String>) -> Self {
        Gate {
            state: AtomicU8::new(state as u8),
            provider: provider.into(),
        }
    }
    /// The current state.
    pub fn state(&self) -> GateState {
        match self.state.load(Ordering::Acquire) {
            0 => GateState::Open,
            1 => GateState::Held,
            _ => GateState::Cancelled,
        }
    }
    /// True when workers may send.
    pub fn is_open(&self) -> bool {
        self.state() == GateState::Open
    }
    /// Changes the state.
    pub fn set(&self, state: GateState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

/// The gates of the batches this process supervises. The lock is never held across an await.
#[derive(Debug, Clone, Default)]
pub struct Gates(Arc<RwLock<HashMap<i64, Arc<Gate>>>>);

impl Gates {
    /// The gate of a batch, if this process supervises it.
    pub fn get(&self, batch_id: i64) -> Option<Arc<Gate>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&batch_id)
            .cloned()
    }
    /// Installs a batch's gate.
    pub fn insert(&self, batch_id: i64, gate: Arc<Gate>) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(batch_id, gate);
    }
    /// Removes a batch's gate.
    pub fn remove(&self, batch_id: i64) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&batch_id);
    }
    /// Holds every gate (shutdown: workers stop sending and release what they claimed).
    pub fn hold_all(&self) {
        for gate in self.0.read().unwrap_or_else(|p| p.into_inner()).values() {
            if gate.state() == GateState::Open {
                gate.set(GateState::Held);
            }
        }
    }
}
