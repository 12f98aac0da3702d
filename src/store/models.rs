//! Rows as diesel reads and writes them: `Batch` / `NewBatch` / `LifecycleUpdate` and friends.

use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::schema::{batches, messages, partitions, recipients};

/// A batch row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = batches)]
pub struct Batch {
    pub id: i64,
    pub public_id: String,
    pub name: String,
    pub campaign_id: Option<String>,
    pub content: String,
    pub url: Option<String>,
    pub provider: String,
    pub message_type: String,
    pub schedule_at: Option<NaiveDateTime>,
    pub partition_count: i32,
    pub state: String,
    pub resume_to: Option<String>,
    pub version: i64,
    /// JSON of `Steps`.
    pub steps: String,
    pub recipients: i64,
    pub processed: i64,
    pub valid: i64,
    pub invalid: i64,
    pub duplicates: i64,
    pub opted_out: i64,
    pub segments: i64,
    pub restarts: i32,
    pub conditions: String,
    pub error: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub finished_at: Option<NaiveDateTime>,
    pub failure_threshold: f64,
}

/// A batch to create, in state `initial`.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = batches, treat_none_as_default_value = false)]
pub struct NewBatch {
    pub public_id: String,
    pub name: String,
    pub campaign_id: Option<String>,
    pub content: String,
    pub url: Option<String>,
    pub provider: String,
    pub message_type: String,
    pub schedule_at: Option<NaiveDateTime>,
    pub partition_count: i32,
    pub state: String,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub failure_threshold: f64,
}

/// Everything a state transition writes; saved under an optimistic version check. Counters are
/// not part of it, so a transition never overwrites progress written meanwhile.
#[derive(Debug, Clone, AsChangeset)]
#[diesel(table_name = batches, treat_none_as_null = true)]
pub struct LifecycleUpdate {
    pub state: String,
    pub resume_to: Option<String>,
    /// JSON of `Steps`.
    pub steps: String,
    pub restarts: i32,
    pub conditions: String,
    pub error: Option<String>,
    pub updated_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub finished_at: Option<NaiveDateTime>,
}

impl From<&Batch> for LifecycleUpdate {
    fn from(b: &Batch) -> Self {
        LifecycleUpdate {
            state: b.state.clone(),
            resume_to: b.resume_to.clone(),
            steps: b.steps.clone(),
            restarts: b.restarts,
            conditions: b.conditions.clone(),
            error: b.error.clone(),
            updated_at: b.updated_at,
            started_at: b.started_at,
            finished_at: b.finished_at,
        }
    }
}

/// One step's bookkeeping, kept as JSON in `batches.steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// `initial, ready, running, paused, completed, failed`.
    pub status: String,
    /// When it first ran.
    pub started_at: Option<DateTime<Utc>>,
    /// When it completed.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
}

impl Default for StepRecord {
    fn default() -> Self {
        StepRecord {
            status: "initial".into(),
            started_at: None,
            finished_at: None,
            error: None,
        }
    }
}

/// Both steps of a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Steps {
    /// Recipients → messages.
    pub preparation: StepRecord,
    /// Messages → providers.
    pub delivery: StepRecord,
}

impl Batch {
    /// The steps' bookkeeping (defaults when the column is empty).
    pub fn steps(&self) -> Steps {
        serde_json::from_str(&self.steps).unwrap_or_default()
    }
}

/// A recipient as uploaded; `vars` is a JSON object of strings.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = recipients)]
pub struct Recipient {
    pub id: i64,
    pub batch_id: i64,
    pub phone: String,
    pub vars: Option<String>,
}

/// A recipient to store.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = recipients, treat_none_as_default_value = false)]
pub struct NewRecipient {
    pub batch_id: i64,
    pub phone: String,
    pub vars: Option<String>,
}

/// A prepared message to store (status `pending`).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = messages)]
pub struct NewMessage {
    pub batch_id: i64,
    pub partition: i32,
    pub recipient_id: i64,
    pub phone: String,
    pub body: String,
    pub encoding: String,
    pub segments: i32,
    pub updated_at: NaiveDateTime,
}

/// A message row as the messages endpoint shows it.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = messages)]
pub struct MessageRow {
    pub id: i64,
    pub phone: String,
    pub status: i16,
    pub segments: i32,
    pub attempts: i32,
    pub provider_message_id: Option<String>,
    pub error: Option<String>,
    pub updated_at: NaiveDateTime,
}

/// A message a worker has claimed (`pending → sending`) and must now send.
#[derive(Debug, Clone, Queryable, QueryableByName)]
#[diesel(table_name = messages)]
pub struct ClaimedMessage {
    pub id: i64,
    pub phone: String,
    pub body: String,
    pub attempts: i32,
}

/// Delivery counters of one partition.
#[derive(Debug, Clone, Copy, Queryable, Selectable, PartialEq, Eq)]
#[diesel(table_name = partitions)]
pub struct Partition {
    pub batch_id: i64,
    pub idx: i32,
    pub total: i64,
    pub sent: i64,
    pub delivered: i64,
    pub failed: i64,
    pub cancelled: i64,
    /// Of `failed`, those settled as `unknown_outcome` after an instance died mid-send.
    pub unknown: i64,
}

impl Partition {
    /// Messages in a final status.
    pub fn done(&self) -> i64 {
        self.sent + self.delivered + self.failed + self.cancelled
    }
}
