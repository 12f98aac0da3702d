//! A batch whose provider can take nothing (an SMPP account whose binds are refused): delivery
//! stops, the batch stays `delivering` and says why in its `ProviderAvailable` condition, and
//! delivery starts again once the provider may take messages. No message fails meanwhile, and
//! nothing polls: the wait is on the provider's own state.

use actix::prelude::*;

use super::BatchSupervisor;
use crate::domain::lifecycle::note;
use crate::domain::state::BatchState;
use crate::provider::Unavailable;

/// The condition's type.
const CONDITION: &str = "ProviderAvailable";

impl BatchSupervisor {
    /// Delivery ended because the batch's provider takes nothing: says so, and waits for it.
    pub(super) fn wait_for_provider(&mut self, why: Unavailable, ctx: &mut Context<Self>) {
        tracing::warn!(batch_id = %self.batch.public_id, reason = why.reason, message = %why.message, "Delivery waits for its provider.");
        self.note(false, why.reason, why.message, ctx);
        let Some(provider) = self.deps.core.providers.get(&self.batch.provider) else {
            return;
        };
        let available = async move { provider.gateway.available().await };
        // Held as the supervisor's timer: a new state (a pause, a cancel) cancels the wait.
        self.timer = Some(ctx.spawn(available.into_actor(self).map(|(), act, ctx| {
            act.timer = None;
            if act.state() == BatchState::Delivering && act.child.is_none() && act.gate.is_open()
            {
                tracing::info!(batch_id = %act.batch.public_id, "Provider available again; delivery goes on.");
                let message = format!("provider `{}` takes messages again", act.batch.provider);
                act.note(true, "Available", message, ctx);
                act.spawn_child(ctx);
            }
        })));
    }

    /// Saves the `ProviderAvailable` condition, the batch's state left as it is.
    fn note(
        &mut self,
        status: bool,
        reason: &'static str,
        message: String,
        ctx: &mut Context<Self>,
    ) {
        let store = self.deps.core.store.clone();
        let row = self.batch.clone();
        let save = async move {
            store
                .save_transition::<crate::store::StoreError>(row, |b| {
                    Ok(note(
                        &b.bookkeeping(),
                        CONDITION,
                        status,
                        reason,
                        message.clone(),
                    ))
                })
                .await
        };
        ctx.spawn(save.into_actor(self).map(|saved, act, _ctx| match saved {
            // Newer than the copy here (an action may have been saved meanwhile, and this
            // condition planned again on it).
            Ok(saved) if saved.version > act.batch.version => act.batch = saved,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(batch_id = %act.batch.public_id, error = %e, "Condition not saved.");
            }
        }));
    }
}
