//! The JSON shapes of docs/api.md, built from store rows.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::batch::{MessageStatus, MessageType, Progress};
use crate::domain::lifecycle::Condition;
use crate::domain::state::{BatchState, Step, StepStatus};
use crate::domain::template::Template;
use crate::store::BatchRecord;
use crate::store::models::{Batch, MessageRow, Partition};

use super::openapi::{ConditionDoc, PartitionStatus, ProgressDoc};

fn utc(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

/// A batch as `GET /v1/batches/{id}` shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Batch)]
pub struct BatchView {
    /// The batch's id (a UUID v7).
    #[schema(format = Uuid)]
    pub id: String,
    /// 1–200 characters.
    pub name: String,
    /// The caller's campaign reference.
    pub campaign_id: Option<String>,
    /// The message template: `{{var}}` placeholders, `{{url}}` for `url`.
    pub content: String,
    /// What `{{url}}` is replaced with.
    pub url: Option<String>,
    /// True when the content has `{{url}}` or a literal http(s) link.
    pub contains_url: bool,
    /// The provider the messages are sent through.
    pub provider: String,
    /// `transactional` or `marketing`.
    #[schema(value_type = MessageType)]
    pub message_type: String,
    /// When the batch starts preparing, if started before then.
    pub schedule_at: Option<DateTime<Utc>>,
    /// Partitions the messages are spread over (1–256).
    #[schema(minimum = 1, maximum = 256)]
    pub partition_count: i32,
    /// The failure rate (0–1) over the last outcomes above which the batch pauses itself.
    #[schema(minimum = 0, maximum = 1)]
    pub failure_threshold: f64,
    /// The batch's state.
    #[schema(value_type = BatchState)]
    pub state: String,
    /// For a paused batch the state resume returns to; for a failed one the state retry returns to.
    #[schema(value_type = Option<BatchState>)]
    pub resume_to: Option<String>,
    /// The step the batch is in, or last was in when paused or failed.
    #[schema(value_type = Option<Step>)]
    pub current_step: Option<&'static str>,
    /// Both steps' status and progress.
    pub steps: StepsView,
    /// The counts (docs/api.md "Counting rules").
    pub results: ResultsView,
    /// Each partition's delivery counts.
    pub partitions: Vec<PartitionView>,
    /// What happened to the batch, one condition per type.
    #[schema(value_type = Vec<ConditionDoc>)]
    pub conditions: Vec<Condition>,
    /// Why the batch failed.
    pub error: Option<String>,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it was started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// The batch this one was resent from (`POST /v1/batches/{id}/resend`), else null.
    #[schema(format = Uuid)]
    pub parent_id: Option<String>,
}

/// Both steps.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Steps)]
pub struct StepsView {
    /// Recipients → validated, rendered messages.
    pub preparation: StepView,
    /// Messages → providers.
    pub delivery: StepView,
}

/// One step's status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = StepState)]
pub struct StepView {
    /// The step's status.
    #[schema(value_type = StepStatus)]
    pub status: String,
    /// When it first started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its progress.
    #[schema(value_type = ProgressDoc)]
    pub progress: Progress,
    /// Why it failed.
    pub error: Option<String>,
}

/// The batch's counts (docs/api.md "Counting rules").
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Results)]
pub struct ResultsView {
    /// Recipients added.
    pub recipients: i64,
    /// Distinct valid numbers: one message each.
    pub valid: i64,
    /// Numbers that are not valid phone numbers.
    pub invalid: i64,
    /// Repeats of a valid number.
    pub duplicates: i64,
    /// Numbers that opted out.
    pub opted_out: i64,
    /// Messages the provider accepted.
    pub sent: i64,
    /// Messages whose delivery receipt arrived (no longer counted in `sent`).
    pub delivered: i64,
    /// Messages that failed.
    pub failed: i64,
    /// Messages cancelled before they were sent.
    pub cancelled: i64,
    /// Valid messages not yet in a final status.
    pub pending: i64,
    /// SMS segments of the prepared messages.
    pub segments: i64,
}

/// One partition's counts.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = PartitionCounts)]
pub struct PartitionView {
    /// 0-based.
    pub index: i32,
    /// Its delivery status.
    #[schema(value_type = PartitionStatus)]
    pub status: &'static str,
    /// Messages in the partition.
    pub total: i64,
    /// Sent.
    pub sent: i64,
    /// Delivered.
    pub delivered: i64,
    /// Failed.
    pub failed: i64,
    /// Cancelled.
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
        let (state, resume_to) = (b.state, b.resume_to);
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
        let steps = &b.steps;
        let delivery_status = steps.delivery.status;
        BatchView {
            id: b.public_id.clone(),
            name: b.name.clone(),
            campaign_id: b.campaign_id.clone(),
            content: b.content.clone(),
            url: b.url.clone(),
            contains_url: Template::parse(&b.content).is_ok_and(|t| t.contains_url()),
            provider: b.provider.clone(),
            message_type: b.message_type.as_str().to_owned(),
            schedule_at: b.schedule_at.map(utc),
            partition_count: b.partition_count,
            failure_threshold: b.failure_threshold,
            state: state.as_str().to_owned(),
            resume_to: resume_to.map(|s| s.as_str().to_owned()),
            current_step,
            steps: StepsView {
                preparation: StepView {
                    status: steps.preparation.status.as_str().to_owned(),
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
                    status: steps.delivery.status.as_str().to_owned(),
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
                        StepStatus::Completed
                    } else {
                        match delivery_status {
                            s @ (StepStatus::Running
                            | StepStatus::Paused
                            | StepStatus::Completed) => s,
                            _ => StepStatus::Initial,
                        }
                    }
                    .as_str(),
                    total: p.total,
                    sent: p.sent,
                    delivered: p.delivered,
                    failed: p.failed,
                    cancelled: p.cancelled,
                })
                .collect(),
            conditions: b.conditions.0.clone(),
            error: b.error.clone(),
            created_at: utc(b.created_at),
            updated_at: utc(b.updated_at),
            started_at: b.started_at.map(utc),
            finished_at: b.finished_at.map(utc),
            parent_id: b.parent_id.clone(),
        }
    }
}

/// A page of batches, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchPage {
    /// The batches.
    pub items: Vec<BatchView>,
    /// The `after` of the next page; null on the last one.
    #[schema(format = Uuid)]
    pub next: Option<String>,
}

/// One message as the messages endpoint shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Message)]
pub struct MessageView {
    /// The message's id (also the idempotency key given to providers).
    pub id: String,
    /// The recipient, in E.164.
    pub phone: String,
    /// Its status.
    #[schema(value_type = MessageStatus)]
    pub status: &'static str,
    /// SMS segments of its text.
    pub segments: i32,
    /// Provider calls made for it.
    pub attempts: i32,
    /// The provider's id for it, once sent.
    pub provider_message_id: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When the provider's receipt said it was delivered (of a message of several parts, the
    /// last part's); null until then.
    pub delivered_at: Option<DateTime<Utc>>,
}

impl From<MessageRow> for MessageView {
    fn from(m: MessageRow) -> Self {
        MessageView {
            id: m.id.to_string(),
            phone: m.phone,
            status: m.status.as_str(),
            segments: m.segments,
            attempts: m.attempts,
            provider_message_id: m.provider_message_id,
            error: m.error,
            updated_at: utc(m.updated_at),
            delivered_at: m.delivered_at.map(utc),
        }
    }
}

/// A page of messages, in id order.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessagePage {
    /// The messages.
    pub items: Vec<MessageView>,
    /// The `after` of the next page; null on the last one.
    pub next: Option<String>,
}

/// The answer to a recipients upload.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadResult {
    /// Rows of this upload.
    pub accepted: i64,
    /// Recipients of the batch so far.
    pub total: i64,
}

/// A number on the opt-out list.
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutView {
    /// E.164.
    pub phone: String,
    /// How it came on the list: `api`, `csv` or `inbound`.
    #[schema(pattern = "^(api|csv|inbound)$")]
    pub source: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

impl From<crate::store::OptOut> for OptOutView {
    fn from(o: crate::store::OptOut) -> Self {
        OptOutView {
            phone: o.phone,
            source: o.source,
            created_at: utc(o.created_at),
        }
    }
}

/// A page of the opt-out list, in number order.
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutPage {
    /// The numbers.
    pub items: Vec<OptOutView>,
    /// The `after` of the next page; null on the last one.
    pub next: Option<String>,
}

/// The answer to adding numbers to the opt-out list.
#[derive(Debug, Serialize, ToSchema)]
pub struct OptOutsAdded {
    /// Numbers new on the list.
    pub added: u64,
    /// Numbers on it already (or given twice).
    pub already: u64,
    /// Entries that are not phone numbers; nothing else is refused for them.
    pub invalid: u64,
}
