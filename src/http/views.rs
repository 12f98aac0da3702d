//! The JSON shapes of API.md, built from store rows.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;

use crate::actors::supervisor::Condition;
use crate::domain::batch::{MessageStatus, Progress};
use crate::domain::state::BatchState;
use crate::domain::template::Template;
use crate::store::BatchRecord;
use crate::store::models::{Batch, MessageRow, Partition};

fn utc(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

/// A batch as `GET /v1/batches/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct BatchView {
    pub id: String,
    pub name: String,
    pub campaign_id: Option<String>,
    pub content: String,
    pub url: Option<String>,
    pub contains_url: bool,
    pub provider: String,
    pub message_type: String,
    pub schedule_at: Option<DateTime<Utc>>,
    pub partition_count: i32,
    pub state: String,
    /// For a paused batch the state resume returns to; for a failed one the state retry returns to.
    pub resume_to: Option<String>,
    pub current_step: Option<&'static str>,
    pub steps: StepsView,
    pub results: ResultsView,
    pub partitions: Vec<PartitionView>,
    pub conditions: Vec<Condition>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Both steps.
#[derive(Debug, Serialize)]
pub struct StepsView {
    pub preparation: StepView,
    pub delivery: StepView,
}

/// One step's status.
#[derive(Debug, Serialize)]
pub struct StepView {
    pub status: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub progress: Progress,
    pub error: Option<String>,
}

/// The batch's counts (API.md "Counting rules").
#[derive(Debug, Serialize)]
pub struct ResultsView {
    pub recipients: i64,
    pub valid: i64,
    pub invalid: i64,
    pub duplicates: i64,
    pub opted_out: i64,
    pub sent: i64,
    pub delivered: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Valid messages not yet in a final status.
    pub pending: i64,
    pub segments: i64,
}

/// One partition's counts.
#[derive(Debug, Serialize)]
pub struct PartitionView {
    pub index: i32,
    pub status: &'static str,
    pub total: i64,
    pub sent: i64,
    pub delivered: i64,
    pub failed: i64,
    pub cancelled: i64,
}

impl BatchView {
    /// Builds the view of a batch and its partitions.
    pub fn new(record: &BatchRecord) -> Self {
        let b: &Batch = &record.batch;
        let parts = &record.partitions;
        let sum = |f: fn(&Partition) -> i64| parts.iter().map(f).sum::<i64>();
        let (sent, delivered, failed, cancelled) = (
            sum(|p| p.sent),
            sum(|p| p.delivered),
            sum(|p| p.failed),
            sum(|p| p.cancelled),
        );
        let done = sent + delivered + failed + cancelled;
        let state: BatchState = b.state.parse().unwrap_or(BatchState::Initial);
        let resume_to: Option<BatchState> = b.resume_to.as_deref().and_then(|s| s.parse().ok());
        let current_step = match state {
            BatchState::Scheduled | BatchState::Preparing => Some("preparation"),
            BatchState::Delivering => Some("delivery"),
            BatchState::Paused | BatchState::Failed => match resume_to {
                Some(BatchState::Delivering) => Some("delivery"),
                Some(_) => Some("preparation"),
                None => None,
            },
            _ => None,
        };
        let steps = b.steps();
        let delivery_status = steps.delivery.status.as_str();
        BatchView {
            id: b.public_id.clone(),
            name: b.name.clone(),
            campaign_id: b.campaign_id.clone(),
            content: b.content.clone(),
            url: b.url.clone(),
            contains_url: Template::parse(&b.content).is_ok_and(|t| t.contains_url()),
            provider: b.provider.clone(),
            message_type: b.message_type.clone(),
            schedule_at: b.schedule_at.map(utc),
            partition_count: b.partition_count,
            state: b.state.clone(),
            resume_to: b.resume_to.clone(),
            current_step,
            steps: StepsView {
                preparation: StepView {
                    status: steps.preparation.status.clone(),
                    started_at: steps.preparation.started_at,
                    finished_at: steps.preparation.finished_at,
                    progress: Progress::new(
                        b.recipients,
                        b.processed,
                        b.processed - b.invalid,
                        b.invalid,
                    ),
                    error: steps.preparation.error.clone(),
                },
                delivery: StepView {
                    status: steps.delivery.status.clone(),
                    started_at: steps.delivery.started_at,
                    finished_at: steps.delivery.finished_at,
                    progress: Progress::new(b.valid, done, sent + delivered, failed),
                    error: steps.delivery.error.clone(),
                },
            },
            results: ResultsView {
                recipients: b.recipients,
                valid: b.valid,
                invalid: b.invalid,
                duplicates: b.duplicates,
                opted_out: b.opted_out,
                sent,
                delivered,
                failed,
                cancelled,
                pending: (b.valid - done).max(0),
                segments: b.segments,
            },
            partitions: parts
                .iter()
                .map(|p| PartitionView {
                    index: p.idx,
                    status: if p.total > 0 && p.done() >= p.total {
                        "completed"
                    } else {
                        match delivery_status {
                            "running" => "running",
                            "paused" => "paused",
                            "completed" => "completed",
                            _ => "initial",
                        }
                    },
                    total: p.total,
                    sent: p.sent,
                    delivered: p.delivered,
                    failed: p.failed,
                    cancelled: p.cancelled,
                })
                .collect(),
            conditions: serde_json::from_str(&b.conditions).unwrap_or_default(),
            error: b.error.clone(),
            created_at: utc(b.created_at),
            updated_at: utc(b.updated_at),
            started_at: b.started_at.map(utc),
            finished_at: b.finished_at.map(utc),
        }
    }
}

/// A page of batches.
#[derive(Debug, Serialize)]
pub struct BatchPage {
    pub items: Vec<BatchView>,
    pub next: Option<String>,
}

/// One message as the messages endpoint shows it.
#[derive(Debug, Serialize)]
pub struct MessageView {
    pub id: String,
    pub phone: String,
    pub status: &'static str,
    pub segments: i32,
    pub attempts: i32,
    pub provider_message_id: Option<String>,
    pub error: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl From<MessageRow> for MessageView {
    fn from(m: MessageRow) -> Self {
        MessageView {
            id: m.id.to_string(),
            phone: m.phone,
            status: MessageStatus::from_i16(m.status)
                .map(MessageStatus::as_str)
                .unwrap_or("unknown"),
            segments: m.segments,
            attempts: m.attempts,
            provider_message_id: m.provider_message_id,
            error: m.error,
            updated_at: utc(m.updated_at),
        }
    }
}

/// A page of messages.
#[derive(Debug, Serialize)]
pub struct MessagePage {
    pub items: Vec<MessageView>,
    pub next: Option<String>,
}
