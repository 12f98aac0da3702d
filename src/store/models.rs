//! Rows as diesel reads and writes them: `Batch` / `NewBatch` / `LifecycleUpdate` and friends.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{batches, messages, partitions, recipients};
use super::types::to_json;
use crate::domain::batch::{MessageStatus, MessageType};
use crate::domain::counts::Prepared;
use crate::domain::lifecycle::{Bookkeeping, Conditions, Steps};
use crate::domain::state::BatchState;

/// A batch row, its states, steps and conditions typed (`store::types`).
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = batches)]
pub struct Batch {
    pub id: i64,
    pub public_id: String,
    pub name: String,
    pub campaign_id: Option<String>,
    pub content: String,
    pub url: Option<String>,
    pub provider: String,
    pub message_type: MessageType,
    pub schedule_at: Option<NaiveDateTime>,
    pub partition_count: i32,
    pub state: BatchState,
    pub resume_to: Option<BatchState>,
    pub version: i64,
    pub steps: Steps,
    pub recipients: i64,
    pub processed: i64,
    pub valid: i64,
    pub invalid: i64,
    pub duplicates: i64,
    pub opted_out: i64,
    pub segments: i64,
    pub restarts: i32,
    pub conditions: Conditions,
    pub error: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub started_at: Option<NaiveDateTime>,
    pub finished_at: Option<NaiveDateTime>,
    pub failure_threshold: f64,
    /// The public id of the batch this one was resent from.
    pub parent_id: Option<String>,
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
    /// The public id of the batch this one resends (`Store::resend`).
    pub parent_id: Option<String>,
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

impl From<&Bookkeeping> for LifecycleUpdate {
    fn from(b: &Bookkeeping) -> Self {
        LifecycleUpdate {
            state: b.state.as_str().to_owned(),
            resume_to: b.resume_to.map(|s| s.as_str().to_owned()),
            steps: to_json(&b.steps),
            restarts: b.restarts,
            conditions: to_json(&b.conditions),
            error: b.error.clone(),
            updated_at: b.updated_at,
            started_at: b.started_at,
            finished_at: b.finished_at,
        }
    }
}

impl Batch {
    /// What a state transition reads and writes of the batch.
    pub fn bookkeeping(&self) -> Bookkeeping {
        Bookkeeping {
            state: self.state,
            resume_to: self.resume_to,
            steps: self.steps.clone(),
            conditions: self.conditions.clone(),
            error: self.error.clone(),
            restarts: self.restarts,
            started_at: self.started_at,
            finished_at: self.finished_at,
            updated_at: self.updated_at,
        }
    }

    /// Takes the counters of preparation as read afresh (they change without a new version).
    pub fn set_prepared(&mut self, counters: Prepared) {
        let Prepared {
            recipients,
            processed,
            valid,
            invalid,
            duplicates,
            opted_out,
        } = counters;
        self.recipients = recipients;
        self.processed = processed;
        self.valid = valid;
        self.invalid = invalid;
        self.duplicates = duplicates;
        self.opted_out = opted_out;
    }

    /// The batch's counters of preparation.
    pub fn prepared(&self) -> Prepared {
        Prepared {
            recipients: self.recipients,
            processed: self.processed,
            valid: self.valid,
            invalid: self.invalid,
            duplicates: self.duplicates,
            opted_out: self.opted_out,
        }
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
    pub status: MessageStatus,
    pub segments: i32,
    pub attempts: i32,
    pub provider_message_id: Option<String>,
    pub error: Option<String>,
    pub updated_at: NaiveDateTime,
    /// When its (last) receipt said it was delivered.
    pub delivered_at: Option<NaiveDateTime>,
}

/// A message a worker has claimed (`pending → sending`) and must now send.
#[derive(Debug, Clone, QueryableByName)]
#[diesel(table_name = messages)]
pub struct ClaimedMessage {
    pub id: i64,
    pub phone: String,
    pub body: String,
    pub attempts: i32,
    pub partition: i32,
    /// The number is on the opt-out list (looked up by the claim): the message is cancelled,
    /// not sent.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub opted_out: bool,
}

/// Delivery counters of one partition.
#[derive(Debug, Clone, Copy, Queryable, QueryableByName, Selectable, PartialEq, Eq)]
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
    /// The counters of a new batch's `count` partitions, every one zero.
    pub fn zeroed(batch_id: i64, count: i32) -> Vec<Partition> {
        (0..count)
            .map(|idx| Partition {
                batch_id,
                idx,
                total: 0,
                sent: 0,
                delivered: 0,
                failed: 0,
                cancelled: 0,
                unknown: 0,
            })
            .collect()
    }

    /// Messages in a final status.
    pub fn done(&self) -> i64 {
        self.sent + self.delivered + self.failed + self.cancelled
    }
}
