//! Validated batch values, message kinds and statuses, and progress counting.

use serde::{Deserialize, Serialize};

/// How many partitions a batch's messages are spread over: 1..=256
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PartitionCount(u16);

impl PartitionCount {
    /// The smallest allowed count.
    pub const MIN: u16 = 1;
    /// The largest allowed count.
    pub const MAX: u16 = 256;

    /// Accepts 1..=256. Takes an `i64` so that any JSON integer or database value can be passed
    /// without a lossy cast first.
    pub fn new(n: i64) -> Result<Self, InvalidValue> {
        match u16::try_from(n) {
            Ok(n) if (Self::MIN..=Self::MAX).contains(&n) => Ok(PartitionCount(n)),
            _ => Err(InvalidValue {
                field: "partition_count",
                reason: format!("must be between {} and {}, got {n}", Self::MIN, Self::MAX),
            }),
        }
    }

    /// The count, always in 1..=256.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// A batch name: 1..=200 chars (chars, not bytes), trimmed must be non-empty. Kept exactly as given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BatchName(String);

impl BatchName {
    /// The longest allowed name, in chars.
    pub const MAX_CHARS: usize = 200;

    /// Accepts a name of at most 200 chars that is not empty or all whitespace.
    pub fn parse(s: &str) -> Result<Self, InvalidValue> {
        let invalid = |reason: String| InvalidValue {
            field: "name",
            reason,
        };
        if s.trim().is_empty() {
            return Err(invalid("must not be empty".to_owned()));
        }
        let chars = s.chars().count();
        if chars > Self::MAX_CHARS {
            return Err(invalid(format!(
                "must be at most {} characters, got {chars}",
                Self::MAX_CHARS
            )));
        }
        Ok(BatchName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, giving up the wrapper.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A value that failed validation: which field, and why. Handlers answer it with 422 `invalid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidValue {
    /// The request field, as named in docs/api.md.
    pub field: &'static str,
    /// What is wrong with it, for the error message.
    pub reason: String,
}

/// The kind of messages in a batch (docs/api.md `message_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageType {
    /// Notifications a recipient expects (codes, receipts). The default.
    #[default]
    Transactional,
    /// Promotions.
    Marketing,
}

string_enum!(MessageType {
    Transactional => "transactional",
    Marketing => "marketing",
});

impl MessageType {
    /// The priority of the batch's delivery tasks: transactional messages (a code, a notice)
    /// go to the workers before marketing ones.
    pub const fn priority(self) -> u8 {
        match self {
            MessageType::Transactional => 1,
            MessageType::Marketing => 0,
        }
    }
}

/// Where one message is on its way to the recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageStatus {
    /// Written, not yet claimed by a worker.
    Pending,
    /// Claimed by a worker and handed, or about to be handed, to a provider.
    Sending,
    /// Accepted by the provider.
    Sent,
    /// The provider's delivery receipt arrived.
    Delivered,
    /// The provider refused it, or every attempt failed.
    Failed,
    /// Cancelled before it was sent.
    Cancelled,
}

string_enum!(MessageStatus {
    Pending => "pending",
    Sending => "sending",
    Sent => "sent",
    Delivered => "delivered",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl MessageStatus {
    /// The code stored in the database. These numbers are persisted: never renumber them.
    pub const fn as_i16(self) -> i16 {
        match self {
            MessageStatus::Pending => 0,
            MessageStatus::Sending => 1,
            MessageStatus::Sent => 2,
            MessageStatus::Delivered => 3,
            MessageStatus::Failed => 4,
            MessageStatus::Cancelled => 5,
        }
    }

    /// The status stored as `v`, or `None` for a code no status has.
    pub fn from_i16(v: i16) -> Option<Self> {
        Some(match v {
            0 => MessageStatus::Pending,
            1 => MessageStatus::Sending,
            2 => MessageStatus::Sent,
            3 => MessageStatus::Delivered,
            4 => MessageStatus::Failed,
            5 => MessageStatus::Cancelled,
            _ => return None,
        })
    }
}

/// A step's progress as docs/api.md shows it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    /// Items the step has to process.
    pub total: i64,
    /// Items processed so far, successfully or not.
    pub processed: i64,
    /// Processed items that succeeded.
    pub success: i64,
    /// Processed items that failed.
    pub failed: i64,
    /// `processed / total` in percent, one decimal, within 0.0..=100.0.
    pub percentage: f64,
}

impl Progress {
    /// Builds a progress and its percentage: `processed * 100 / total` rounded to one decimal,
    /// 0.0 when `total` is 0, and never above 100.0 (counters may briefly overshoot a total that
    /// was read earlier).
    pub fn new(total: i64, processed: i64, success: i64, failed: i64) -> Self {
        let percentage = if total <= 0 {
            0.0
        } else {
            // Tenths of a percent, rounded, then back to percent: 400/985 -> 406.09 -> 40.6.
            let tenths = (processed as f64 * 1000.0 / total as f64).round();
            (tenths / 10.0).clamp(0.0, 100.0)
        };
        Progress {
            total,
            processed,
            success,
            failed,
            percentage,
        }
    }
}

/// Which partition a recipient's message belongs to: spreads consecutive recipients evenly.
pub fn partition_for(recipient_id: i64, partitions: PartitionCount) -> i32 {
    // rem_euclid keeps the result in 0..partitions even for negative ids, and 0..=255 fits an i32.
    recipient_id.rem_euclid(i64::from(partitions.get())) as i32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn partition_count_bounds() {
        assert_eq!(PartitionCount::new(1).unwrap().get(), 1);
        assert_eq!(PartitionCount::new(256).unwrap().get(), 256);
        for bad in [0, -1, 257, 65_536 + 4, i64::MIN, i64::MAX] {
            let err = PartitionCount::new(bad).unwrap_err();
            assert_eq!(err.field, "partition_count", "{bad}");
        }
        assert_eq!(
            PartitionCount::new(0).unwrap_err().to_string(),
            "partition_count: must be between 1 and 256, got 0"
        );
        assert_eq!(
            serde_json::to_string(&PartitionCount::new(4).unwrap()).unwrap(),
            "4"
        );
    }

    #[test]
    fn batch_name_counts_chars_not_bytes() {
        let two_hundred = "界".repeat(200);
        assert_eq!(
            BatchName::parse(&two_hundred).unwrap().as_str(),
            two_hundred
        );
        let err = BatchName::parse(&"a".repeat(201)).unwrap_err();
        assert_eq!(err.field, "name");
        assert_eq!(err.reason, "must be at most 200 characters, got 201");
    }

    #[test]
    fn batch_name_must_not_be_blank() {
        for blank in ["", " ", "\t\n "] {
            assert_eq!(
                BatchName::parse(blank).unwrap_err().to_string(),
                "name: must not be empty"
            );
        }
        let name = BatchName::parse(" black-friday ").unwrap();
        assert_eq!(name.as_str(), " black-friday ");
        assert_eq!(name.clone().into_string(), " black-friday ");
        assert_eq!(serde_json::to_string(&name).unwrap(), "\" black-friday \"");
        assert_eq!(BatchName::parse("x").unwrap().as_str(), "x");
    }

    #[test]
    fn message_type_strings_and_default() {
        assert_eq!(MessageType::default(), MessageType::Transactional);
        for t in MessageType::ALL {
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{t}\""));
            assert_eq!(t.as_str().parse::<MessageType>(), Ok(t));
        }
        assert_eq!("marketing".parse(), Ok(MessageType::Marketing));
        assert!("spam".parse::<MessageType>().is_err());
    }

    #[test]
    fn message_status_strings_and_codes() {
        assert_eq!(MessageStatus::ALL.len(), 6);
        for (code, s) in MessageStatus::ALL.into_iter().enumerate() {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<MessageStatus>(), Ok(s));
            assert_eq!(i64::from(s.as_i16()), code as i64);
            assert_eq!(MessageStatus::from_i16(s.as_i16()), Some(s));
        }
        assert_eq!(MessageStatus::Delivered.as_i16(), 3);
        assert_eq!(MessageStatus::from_i16(6), None);
        assert_eq!(MessageStatus::from_i16(-1), None);
    }

    #[test]
    fn progress_percentage() {
        assert_eq!(Progress::new(985, 400, 398, 2).percentage, 40.6);
        assert_eq!(Progress::new(1000, 1000, 990, 10).percentage, 100.0);
        assert_eq!(Progress::new(0, 0, 0, 0).percentage, 0.0);
        assert_eq!(Progress::new(3, 1, 1, 0).percentage, 33.3);
        assert_eq!(Progress::new(3, 2, 2, 0).percentage, 66.7);
        assert_eq!(Progress::new(10, 12, 12, 0).percentage, 100.0);
        assert_eq!(Progress::new(1_000_000, 1, 1, 0).percentage, 0.0);
    }

    #[test]
    fn progress_serializes_like_the_api() {
        let json = serde_json::to_value(Progress::new(985, 400, 398, 2)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"total": 985, "processed": 400, "success": 398, "failed": 2, "percentage": 40.6})
        );
    }

    #[test]
    fn partitions_spread_consecutive_ids_evenly() {
        let four = PartitionCount::new(4).unwrap();
        let assigned: Vec<_> = (1..=8).map(|id| partition_for(id, four)).collect();
        assert_eq!(assigned, [1, 2, 3, 0, 1, 2, 3, 0]);
        assert_eq!(partition_for(-1, four), 3);
        let one = PartitionCount::new(1).unwrap();
        assert_eq!(partition_for(i64::MAX, one), 0);
        let max = PartitionCount::new(256).unwrap();
        assert_eq!(partition_for(i64::MAX, max), 255);
        assert_eq!(partition_for(i64::MIN, max), 0);
    }
}
