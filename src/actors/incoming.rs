//! The instance's desk for what providers receive: one task per instance, behind a bounded
//! channel, that stores delivery receipts by lots (one transaction for all the receipts waiting,
//! up to `LOT`), acts on inbound STOP and START, and tells each sender whether its item is
//! stored, so that the provider acknowledges it only then. Once a second it also tries the
//! receipts kept for want of a message (`Store::match_pending_receipts`).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::domain::phone::{E164Phone, Region};
use crate::domain::receipt::{Keyword, Keywords, Receipt};
use crate::provider::{Delivery, InboundSms, Incoming};
use crate::store::{ReceiptTimeouts, ReceiptsApplied, Store};
use crate::telemetry::Metrics;

/// Receipts stored in one transaction, at most.
pub const LOT: usize = 500;
/// Items waiting for the desk, at most: past this, providers answer "try again later".
pub const CHANNEL: usize = 2000;
/// How often kept receipts are tried again.
const SWEEP: Duration = Duration::from_secs(1);

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
    loop {
        tokio::select! {
            got = rx.recv_many(&mut lot, LOT) => {
                if got == 0 {
                    break;
                }
                desk.take(std::mem::take(&mut lot)).await;
            }
            _ = sweep.tick() => desk.sweep().await,
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
        }
    }
    // What is already queued is answered, stored or not.
    rx.close();
    while rx.recv_many(&mut lot, LOT).await > 0 {
        desk.take(std::mem::take(&mut lot)).await;
    }
}

impl Desk {
    /// Stores a lot and answers each of its items.
    async fn take(&self, lot: Vec<Delivery>) {
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
            return;
        }
        let stored = self.receipts(receipts).await;
        for answer in answers {
            let _ = answer.send(stored);
        }
    }

    async fn receipts(&self, receipts: Vec<Receipt>) -> bool {
        match self.store.record_receipts(receipts, &self.timeouts).await {
            Ok(applied) => {
                self.count(&applied);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "Storing receipts failed; their providers send them again.");
                false
            }
        }
    }

    async fn sweep(&self) {
        match self
            .store
            .match_pending_receipts(LOT as i64, &self.timeouts)
            .await
        {
            Ok(applied) => self.count(&applied),
            Err(e) => tracing::warn!(error = %e, "Matching kept receipts failed."),
        }
    }

    fn count(&self, applied: &ReceiptsApplied) {
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
