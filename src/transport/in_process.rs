//! The embedded transport: tasks go straight into the worker pool's bounded mailboxes.

use std::sync::atomic::{AtomicUsize, Ordering};

use actix::Recipient;
use futures_util::future::BoxFuture;

use super::{DeliveryTask, TaskReport, Transport, TransportError};
use crate::telemetry::Metrics;

/// Round-robins tasks over the local workers with `send().await`, which waits while the chosen
/// worker's mailbox is full.
pub struct InProcess {
    workers: Vec<Recipient<DeliveryTask>>,
    next: AtomicUsize,
    mailbox: usize,
    metrics: Metrics,
}

impl InProcess {
    /// A transport over these workers (the partition workers' addresses), each with a mailbox of `mailbox` tasks.
    pub fn new(workers: Vec<Recipient<DeliveryTask>>, mailbox: usize, metrics: Metrics) -> Self {
        InProcess {
            workers,
            next: AtomicUsize::new(0),
            mailbox,
            metrics,
        }
    }
}

impl Transport for InProcess {
    fn dispatch(
        &self,
        task: DeliveryTask,
    ) -> BoxFuture<'static, Result<TaskReport, TransportError>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len().max(1);
        let worker = self.workers.get(i).cloned();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let worker = worker.ok_or_else(|| TransportError::Closed("no workers".into()))?;
            let depth = metrics
                .mailbox_depth
                .with_label_values(&["partition_worker"]);
            depth.inc();
            metrics.tasks_in_flight.inc();
            let result = worker.send(task).await;
            metrics.tasks_in_flight.dec();
            match result {
                Ok(report) => report,
                Err(e) => {
                    // The worker never took it off the mailbox.
                    depth.dec();
                    Err(TransportError::Closed(e.to_string()))
                }
            }
        })
    }

    fn capacity(&self) -> usize {
        // Each worker runs one task and holds `mailbox` more.
        self.workers.len() * (self.mailbox + 1)
    }
}
