//! The Delivery step: splits each partition's pending messages into tasks of `task_size` and
//! dispatches them through the transport, round-robin over the partitions, with at most the
//! transport's capacity in flight. It re-plans until every message is in a final status, so
//! retries and messages released by a pause are picked up again.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use super::gates::Gate;
use super::{Deps, StepEnd};
use crate::store::StoreError;
use crate::store::models::Batch;
use crate::transport::{DeliveryTask, TransportError};

/// How long delivery sleeps when nothing is due yet (retries waiting, tasks of other instances).
const IDLE_POLL: Duration = Duration::from_millis(100);

/// Why delivery could not go on.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A task could not be handed over.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// Runs (or continues) delivery of a batch until every message is final or the gate closes.
#[tracing::instrument(skip_all, fields(batch_id = %batch.public_id, step = "delivery"), err)]
pub async fn run(deps: Deps, batch: Batch, gate: Arc<Gate>) -> Result<StepEnd, DeliveryError> {
    let store = &deps.core.store;
    let task_size = deps.core.settings.smsbatch.task_size as i64;
    let max_in_flight = deps.transport.capacity().max(1);
    let partitions = batch.partition_count.max(1);
    loop {
        if !gate.is_open() {
            return Ok(StepEnd::Stopped);
        }
        let counters = store.partitions(batch.id).await?;
        if counters.iter().all(|p| p.done() >= p.total) {
            tracing::info!(batch_id = %batch.public_id, "Delivery finished.");
            return Ok(StepEnd::Finished);
        }
        // One planning round: walk every partition's due pending messages once.
        let mut cursors = vec![0i64; partitions as usize];
        let mut exhausted = vec![false; partitions as usize];
        let mut in_flight = FuturesUnordered::new();
        let mut dispatched = 0usize;
        'round: loop {
            let mut planned = false;
            for p in 0..partitions {
                let slot = p as usize;
                if exhausted[slot] {
                    continue;
                }
                if !gate.is_open() {
                    break 'round;
                }
                let ids = store
                    .next_task_ids(batch.id, p, cursors[slot], task_size)
                    .await?;
                let (Some(&first_id), Some(&last_id)) = (ids.first(), ids.last()) else {
                    exhausted[slot] = true;
                    continue;
                };
                cursors[slot] = last_id;
                while in_flight.len() >= max_in_flight {
                    if let Some(result) = in_flight.next().await {
                        result?;
                    }
                }
                in_flight.push(deps.transport.dispatch(DeliveryTask {
                    batch_id: batch.id,
                    partition: p,
                    first_id,
                    last_id,
                }));
                dispatched += 1;
                planned = true;
            }
            if !planned {
                break;
            }
        }
        // Let what was handed over finish (or be skipped, if the gate closed) before looking again.
        while let Some(result) = in_flight.next().await {
            result?;
        }
        if dispatched == 0 {
            let wait = match store.earliest_retry(batch.id).await? {
                Some(due) => (due - chrono::Utc::now().naive_utc())
                    .to_std()
                    .unwrap_or(Duration::ZERO)
                    .min(IDLE_POLL),
                None => IDLE_POLL,
            };
            tokio::time::sleep(wait.max(Duration::from_millis(5))).await;
        }
    }
}
