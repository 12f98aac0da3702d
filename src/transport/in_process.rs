//! The embedded transport: tasks go straight into the worker pool's bounded mailboxes, through
//! an admission that lets transactional tasks in before marketing ones (`priority`).

use std::sync::atomic::{AtomicUsize, Ordering};

use actix::Recipient;
use futures_util::future::BoxFuture;

use super::{Assignment, DeliveryTask, TaskReport, Transport, TransportError};
use crate::admission::Admission;
use crate::telemetry::Metrics;
use crate::telemetry::trace::TraceContext;

/// Round-robins tasks over the local workers with `send().await`, which waits while the chosen
/// worker's mailbox is full.
pub struct InProcess {
    workers: Vec<Recipient<Assignment>>,
    next: AtomicUsize,
    mailbox: usize,
    admission: Admission,
    metrics: Metrics,
}

impl InProcess {
    /// A transport over these workers (the partition workers' addresses), each with a mailbox of `mailbox` tasks.
    pub fn new(workers: Vec<Recipient<Assignment>>, mailbox: usize, metrics: Metrics) -> Self {
        // Two tasks per worker in its hands (one running, one next), so that none waits for
        // work; the rest wait for a place by priority, not in the mailboxes' order.
        let places = workers.len() * (mailbox + 1).min(2);
        InProcess {
            workers,
            next: AtomicUsize::new(0),
            mailbox,
            admission: Admission::new(places),
            metrics,
        }
    }
}

impl Transport for InProcess {
    fn dispatch(
        &self,
        task: DeliveryTask,
    ) -> BoxFuture<'static, Result<TaskReport, TransportError>> {
        // Called within the Delivery step's span: the task's span is its child.
        self.dispatch_traced(task, TraceContext::current())
    }

    fn answers_when_done(&self) -> bool {
        true
    }

    fn capacity(&self) -> usize {
        // Each worker runs one task and holds `mailbox` more.
        self.workers.len() * (self.mailbox + 1)
    }
}

impl InProcess {
    /// Hands a task to a worker; its span is a child of `trace` (a task consumed from the
    /// broker: the span that published it).
    pub fn dispatch_traced(
        &self,
        task: DeliveryTask,
        trace: TraceContext,
    ) -> BoxFuture<'static, Result<TaskReport, TransportError>> {
        let workers = self.workers.clone();
        let next = self.next_worker();
        let admission = self.admission.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            // A place in the pool first, by priority: the wait for one is the backpressure.
            let _place = admission.enter(task.priority).await;
            let worker = workers
                .get(next(workers.len()))
                .cloned()
                .ok_or_else(|| TransportError::Closed("no workers".into()))?;
            let depth = metrics
                .mailbox_depth
                .with_label_values(&["partition_worker"]);
            depth.inc();
            metrics.tasks_in_flight.inc();
            let result = worker.send(Assignment { task, trace }).await;
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

    /// Picks the next worker round-robin once a task has its place.
    fn next_worker(&self) -> impl FnOnce(usize) -> usize + use<> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        move |len| n % len.max(1)
    }
}
