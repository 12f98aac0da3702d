//! The instance's desk for what providers receive: one task per instance, behind a bounded
//! channel, that stores delivery receipts by lots (one transaction for all the receipts waiting,
//! up to `LOT`), acts on inbound STOP and START, and tells each sender whether its item is
//! stored, so that the provider acknowledges it only then. Once a second it also tries the
//! receipts kept for want of a message whose time has come (`Store::match_pending_receipts`),
//! and for a few seconds after it kept one, every 100 ms, those whose key has been written since
//! (`Store::match_keyed_receipts`): an SMSC reports within milliseconds, before the worker has
//! recorded the slice that holds the message.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::domain::phone::{E164Phone, Region};
use crate::domain::receipt::{Keyword, Keywords};
use crate::provider::{Delivery, InboundSms, Incoming};
use crate::store::{ReceiptTimeouts, ReceiptsApplied, Store};
use crate::telemetry::Metrics;

/// Receipts stored in one transaction, at most.
pub const LOT: usize = 500;
/// Items waiting for the desk, at most: past this, providers answer "try again later".
pub const CHANNEL: usize = 2000;
/// How often kept receipts are tried again.
const SWEEP: Duration = Duration::from_secs(1);
/// How often, after the desk kept a receipt, it looks for kept receipts whose key has come.
const EAGER: Duration = Duration::from_millis(100);
/// How long after it last kept a receipt it keeps looking so.
const EAGER_FOR: Duration = Duration::from_secs(5);

/// What the desk needs.
pub struct Desk {
    /// The database.
    pub store: Store,
    /// The metrics.
    pub metrics: Metrics,
    /// The stop and start words.
    pub keywords: Keywords,
    /// The region of senders written without `+`.
    pub region: Region,
    /// How long after its submit a message's receipt still counts, per provider.
    pub timeouts: ReceiptTimeouts,
}

/// Runs the desk until `stop` turns true and then until what was sent to it is answered.
pub async fn run(desk: Desk, mut rx: mpsc::Receiver<Delivery>, mut stop: watch::Receiver<bool>) {
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lot = Vec::with_capacity(LOT);
    // The next look for kept receipts by their keys, and until when to look so: fixed
    // instants, so that a stream of receipts does not put the look off.
    let mut eager_at: Option<Instant> = None;
    let mut eager_until = Instant::now();
    loop {
        let eager = async {
            match eager_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let kept = tokio::select! {
            got = rx.recv_many(&mut lot, LOT) => {
                if got == 0 {
                    break;
                }
                desk.take(std::mem::take(&mut lot)).await
            }
            _ = sweep.tick() => desk.sweep().await,
            () = eager => {
                eager_at = None;
                desk.keyed().await
            }
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
                false
            }
        };
        let now = Instant::now();
        if kept {
            eager_until = now + EAGER_FOR;
        }
        if eager_at.is_none() && now < eager_until {
            eager_at = Some(now + EAGER);
        }
    }
    // What is already queued is answered, stored or not.
    rx.close();
    while rx.recv_many(&mut lot, LOT).await > 0 {
        desk.take(std::mem::take(&mut lot)).await;
    }
}

impl Desk {
    /// Stores a lot and answers each of its items; true when it kept a receipt.
    async fn take(&self, lot: Vec<Delivery>) -> bool {
        let mut receipts = Vec::new();
        let mut answers = Vec::new();
        for delivery in lot {
            match delivery.incoming {
                Incoming::Receipt(receipt) => {
                    receipts.push(receipt);
                    answers.push(delivery.stored);
                }
                Incoming::Inbound(sms) => {
                    let stored = self.inbound(&sms).await;
                    let _ = delivery.stored.send(stored);
                }
            }
        }
        if receipts.is_empty() {
            return false;
        }
        let (stored, kept) = match self.store.record_receipts(receipts, &self.timeouts).await {
            Ok(applied) => (true, self.count(&applied)),
            Err(e) => {
                tracing::warn!(error = %e, "Storing receipts failed; their providers send them again.");
                (false, false)
            }
        };
        for answer in answers {
            let _ = answer.send(stored);
        }
        kept
    }

    /// Tries the kept receipts that are due; true when some are still kept.
    async fn sweep(&self) -> bool {
        let due = self
            .store
            .match_pending_receipts(LOT as i64, &self.timeouts);
        match due.await {
            Ok(applied) => self.count(&applied),
            Err(e) => {
                tracing::warn!(error = %e, "Matching kept receipts failed.");
                false
            }
        }
    }

    /// Applies the kept receipts whose key has come; true when it applied some (more may
    /// follow).
    async fn keyed(&self) -> bool {
        match self
            .store
            .match_keyed_receipts(LOT as i64, &self.timeouts)
            .await
        {
            Ok(applied) => {
                self.count(&applied);
                applied.delivered + applied.failed + applied.parts > 0
            }
            Err(e) => {
                tracing::warn!(error = %e, "Matching kept receipts failed.");
                false
            }
        }
    }

    /// Counts what a lot did in the metrics; true when it kept receipts.
    fn count(&self, applied: &ReceiptsApplied) -> bool {
        let receipts = &self.metrics.receipts;
        for (outcome, n) in [
            ("delivered", applied.delivered),
            ("failed", applied.failed),
            ("part", applied.parts),
            ("repeated", applied.repeated),
            ("kept", applied.kept),
            ("dropped", applied.dropped),
            ("late", applied.late),
        ] {
            if n > 0 {
                receipts.with_label_values(&[outcome]).inc_by(n);
            }
        }
        for latency in &applied.latencies {
            self.metrics.receipt_latency.observe(*latency);
        }
        if applied.dropped > 0 {
            tracing::warn!(
                dropped = applied.dropped,
                "Receipts matched no message after their last try; dropped."
            );
        }
        applied.kept > 0
    }

    /// Acts on an inbound message; `false` when the database failed (it comes again).
    async fn inbound(&self, sms: &InboundSms) -> bool {
        let keyword = self.keywords.classify(&sms.text);
        self.metrics
            .inbound
            .with_label_values(&[sms.provider.as_str(), keyword.as_str()])
            .inc();
        if keyword == Keyword::None {
            return true;
        }
        let Ok(phone) = E164Phone::parse(&sms.from, self.region) else {
            tracing::warn!(provider = %sms.provider, "An inbound message's sender is no phone number; ignored.");
            return true;
        };
        let phone = phone.into_string();
        let done = match keyword {
            Keyword::Stop => self
                .store
                .add_opt_outs(std::slice::from_ref(&phone), "inbound")
                .await
                .map(|added| {
                    self.metrics
                        .opt_outs
                        .with_label_values(&["inbound"])
                        .inc_by(added as u64);
                }),
            _ => self.store.remove_opt_out(&phone).await.map(|_| ()),
        };
        match done {
            Ok(()) => {
                tracing::info!(provider = %sms.provider, action = keyword.as_str(), "Inbound opt-out request applied.");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "Applying an inbound opt-out request failed.");
                false
            }
        }
    }
}
