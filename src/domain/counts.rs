//! The checks a step's end must pass before the supervisor records it: docs/api.md's counting rules,
//! and that preparation read every recipient. A step is never declared complete on a count
//! nobody verified: the figures come from the database as it stands (rows counted, not only the
//! counters the steps kept), and these pure functions say whether they add up.

/// Counts of messages by status, and the same as the batch's partition counters keep them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByStatus {
    /// Not yet claimed.
    pub pending: i64,
    /// Claimed, in a provider's hands or about to be.
    pub sending: i64,
    /// Accepted by the provider.
    pub sent: i64,
    /// Delivery receipt arrived.
    pub delivered: i64,
    /// Failed for good.
    pub failed: i64,
    /// Cancelled before being sent.
    pub cancelled: i64,
}

impl ByStatus {
    /// Every message counted.
    pub fn total(&self) -> i64 {
        self.pending + self.sending + self.sent + self.delivered + self.failed + self.cancelled
    }

    /// Messages in a final status.
    pub fn done(&self) -> i64 {
        self.sent + self.delivered + self.failed + self.cancelled
    }
}

/// A batch's counters of preparation, as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Recipients uploaded.
    pub recipients: i64,
    /// Recipients preparation has looked at.
    pub processed: i64,
    /// Recipients with a message.
    pub valid: i64,
    /// Recipients with an invalid number or template.
    pub invalid: i64,
    /// Recipients repeating an earlier number.
    pub duplicates: i64,
    /// Recipients whose number opted out.
    pub opted_out: i64,
}

impl Prepared {
    /// `valid + invalid + duplicates + opted_out`.
    pub fn counted(&self) -> i64 {
        self.valid + self.invalid + self.duplicates + self.opted_out
    }
}

/// What a step's end is checked against: a batch's figures as the database holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchTally {
    /// The batch's counters of preparation.
    pub counters: Prepared,
    /// The id of the batch's last recipient (`None`: it has none).
    pub last_recipient_id: Option<i64>,
    /// The preparation checkpoint: every recipient up to it is prepared.
    pub checkpoint: i64,
    /// Message rows of the batch, counted by status.
    pub messages: ByStatus,
    /// The same, as the partitions count them (`pending` there: total less the final ones).
    pub partitions: ByStatus,
    /// The sum of the partitions' `total`.
    pub partition_total: i64,
}

/// Whether a step's end holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything adds up: the step is complete.
    Holds,
    /// The step has work left (preparation's checkpoint is before the last recipient): it runs
    /// again from its checkpoint.
    Unfinished(String),
    /// The counts do not add up: the batch fails, saying which.
    Broken(String),
}

/// Collects the rules that do not hold.
#[derive(Default)]
struct Mismatches(String);

impl Mismatches {
    fn expect(&mut self, holds: bool, rule: impl FnOnce() -> String) {
        if !holds {
            if !self.0.is_empty() {
                self.0.push_str("; ");
            }
            self.0.push_str(&rule());
        }
    }

    fn verdict(self) -> Verdict {
        if self.0.is_empty() {
            Verdict::Holds
        } else {
            Verdict::Broken(self.0)
        }
    }
}

impl BatchTally {
    /// Preparation is complete only when its checkpoint reached the last recipient and the
    /// counts add up: every recipient counted once, one message row per valid recipient.
    pub fn preparation_verdict(&self) -> Verdict {
        if let Some(last) = self.last_recipient_id
            && self.checkpoint < last
        {
            return Verdict::Unfinished(format!(
                "preparation ended with its checkpoint at recipient {}, before the batch's last \
                 recipient {last}",
                self.checkpoint
            ));
        }
        let mut m = Mismatches::default();
        self.check_messages_stored(&mut m);
        m.verdict()
    }

    /// Delivery is complete only when every message is in a final status and the counting
    /// rules hold on the rows themselves: `valid = sent + delivered + failed + cancelled`, and
    /// the partition counters (what `results` shows) agree with the rows.
    pub fn delivery_verdict(&self) -> Verdict {
        let mut m = Mismatches::default();
        self.check_messages_stored(&mut m);
        let (rows, counted) = (&self.messages, &self.partitions);
        let valid = self.counters.valid;
        m.expect(rows.pending + rows.sending == 0, || {
            format!(
                "{} messages are still pending and {} sending",
                rows.pending, rows.sending
            )
        });
        m.expect(rows.done() == valid, || {
            format!(
                "valid = sent + delivered + failed + cancelled does not hold: {valid} ≠ {} + {} + \
                 {} + {}",
                rows.sent, rows.delivered, rows.failed, rows.cancelled
            )
        });
        for (name, row, count) in [
            ("sent", rows.sent, counted.sent),
            ("delivered", rows.delivered, counted.delivered),
            ("failed", rows.failed, counted.failed),
            ("cancelled", rows.cancelled, counted.cancelled),
        ] {
            m.expect(row == count, || {
                format!("{row} messages are {name} but the counters say {count}")
            });
        }
        m.verdict()
    }

    /// The first counting rule, every recipient processed once, and one message row (and one
    /// partition place) per valid recipient.
    fn check_messages_stored(&self, m: &mut Mismatches) {
        let c = &self.counters;
        m.expect(c.counted() == c.recipients, || {
            format!(
                "recipients = valid + invalid + duplicates + opted_out does not hold: {} ≠ {} + \
                 {} + {} + {}",
                c.recipients, c.valid, c.invalid, c.duplicates, c.opted_out
            )
        });
        m.expect(c.processed == c.recipients, || {
            format!(
                "{} recipients were processed of {}",
                c.processed, c.recipients
            )
        });
        let (stored, valid) = (self.messages.total(), c.valid);
        m.expect(stored == valid, || {
            format!("{stored} messages stored for {valid} valid recipients")
        });
        m.expect(self.partition_total == valid, || {
            format!(
                "the partitions hold {} messages for {valid} valid recipients",
                self.partition_total
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared() -> Prepared {
        Prepared {
            recipients: 100,
            processed: 100,
            valid: 90,
            invalid: 5,
            duplicates: 4,
            opted_out: 1,
        }
    }

    /// A batch prepared whole: 90 messages, all pending.
    fn preparation() -> BatchTally {
        let pending = ByStatus {
            pending: 90,
            ..ByStatus::default()
        };
        BatchTally {
            counters: prepared(),
            last_recipient_id: Some(1100),
            checkpoint: 1100,
            messages: pending,
            partitions: pending,
            partition_total: 90,
        }
    }

    /// The same batch delivered.
    fn delivery() -> BatchTally {
        let done = ByStatus {
            sent: 80,
            failed: 7,
            cancelled: 3,
            ..ByStatus::default()
        };
        BatchTally {
            messages: done,
            partitions: done,
            ..preparation()
        }
    }

    fn broken(v: Verdict) -> String {
        match v {
            Verdict::Broken(why) => why,
            other => panic!("not broken: {other:?}"),
        }
    }

    #[test]
    fn a_complete_preparation_holds() {
        assert_eq!(preparation().preparation_verdict(), Verdict::Holds);
        let empty = BatchTally::default();
        assert_eq!(
            empty.preparation_verdict(),
            Verdict::Holds,
            "a batch of no recipients"
        );
    }

    #[test]
    fn a_checkpoint_short_of_the_last_recipient_is_unfinished() {
        let mut t = preparation();
        t.checkpoint = 1000;
        // The counters may add up for what was read: it is the checkpoint that tells.
        assert_eq!(
            t.preparation_verdict(),
            Verdict::Unfinished(
                "preparation ended with its checkpoint at recipient 1000, before the batch's \
                 last recipient 1100"
                    .into()
            )
        );
    }

    #[test]
    fn recipients_left_out_break_the_first_rule() {
        // The report: 50,000 recipients, 2,000 counted, the checkpoint at the end.
        let mut t = preparation();
        t.counters = Prepared {
            recipients: 50_000,
            processed: 2_000,
            valid: 1_996,
            invalid: 4,
            duplicates: 0,
            opted_out: 0,
        };
        t.messages.pending = 1_996;
        t.partition_total = 1_996;
        let why = broken(t.preparation_verdict());
        assert!(
            why.contains(
                "recipients = valid + invalid + duplicates + opted_out does not hold: 50000 ≠ \
                 1996 + 4 + 0 + 0"
            ),
            "{why}"
        );
        assert!(
            why.contains("2000 recipients were processed of 50000"),
            "{why}"
        );
    }

    #[test]
    fn rows_and_counters_must_agree() {
        let mut t = preparation();
        t.messages.pending = 89;
        assert_eq!(
            broken(t.preparation_verdict()),
            "89 messages stored for 90 valid recipients"
        );
        let mut t = preparation();
        t.counters.processed = 101;
        t.counters.duplicates = 5;
        let why = broken(t.preparation_verdict());
        assert!(
            why.contains("101 recipients were processed of 100"),
            "{why}"
        );
        assert!(why.contains("100 ≠ 90 + 5 + 5 + 1"), "{why}");
    }

    #[test]
    fn a_finished_delivery_holds() {
        assert_eq!(delivery().delivery_verdict(), Verdict::Holds);
        // A prepared batch is not a delivered one.
        assert!(matches!(
            preparation().delivery_verdict(),
            Verdict::Broken(why) if why.contains("90 messages are still pending")
        ));
    }

    #[test]
    fn messages_left_pending_break_delivery() {
        let mut t = delivery();
        t.messages.cancelled = 0;
        t.messages.pending = 3;
        let why = broken(t.delivery_verdict());
        assert!(
            why.contains("3 messages are still pending and 0 sending"),
            "{why}"
        );
        assert!(
            why.contains(
                "valid = sent + delivered + failed + cancelled does not hold: 90 ≠ 80 + 0 + 7 + 0"
            ),
            "{why}"
        );
        assert!(
            why.contains("0 messages are cancelled but the counters say 3"),
            "{why}"
        );
    }

    #[test]
    fn counters_that_drifted_from_the_rows_break_delivery() {
        let mut t = delivery();
        t.partitions.sent = 81;
        assert_eq!(
            broken(t.delivery_verdict()),
            "80 messages are sent but the counters say 81"
        );
        let mut t = delivery();
        t.counters.invalid = 4;
        assert!(broken(t.delivery_verdict()).contains("100 ≠ 90 + 4 + 4 + 1"));
    }
}
