//! A batch's lifecycle bookkeeping: the operator's actions, each step's record, the conditions
//! that say why the batch is where it is, and the projection of a batch's bookkeeping after an
//! event. Pure functions on plain values: the supervisor and the registry apply them and the
//! store saves what they return.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::counts::Prepared;
use super::state::{BatchState, Event, Lifecycle, Step, StepStatus, TransitionError, transition};

/// An operator's lifecycle action (`POST /v1/batches/{id}/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `POST /start`
    Start,
    /// `POST /pause`
    Pause,
    /// `POST /resume`
    Resume,
    /// `POST /cancel`
    Cancel,
    /// `POST /retry`
    Retry,
}

impl Action {
    /// The state machine event this action is for a batch scheduled at `schedule_at`, now.
    pub fn event(self, schedule_at: Option<NaiveDateTime>) -> Event {
        match self {
            Action::Start => Event::Start {
                schedule_in_future: schedule_at.is_some_and(|at| at > Utc::now().naive_utc()),
            },
            Action::Pause => Event::Pause,
            Action::Resume => Event::Resume,
            Action::Cancel => Event::Cancel,
            Action::Retry => Event::Retry,
        }
    }
}

/// One step's record, kept as JSON in `batches.steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// `initial, ready, running, paused, completed, failed`.
    pub status: StepStatus,
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
            status: StepStatus::Initial,
            started_at: None,
            finished_at: None,
            error: None,
        }
    }
}

impl StepRecord {
    fn start(&mut self, at: DateTime<Utc>) {
        self.status = StepStatus::Running;
        self.started_at.get_or_insert(at);
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

impl Steps {
    /// The record of `step`.
    pub fn of(&mut self, step: Step) -> &mut StepRecord {
        match step {
            Step::Preparation => &mut self.preparation,
            Step::Delivery => &mut self.delivery,
        }
    }
}

/// A condition of the batch, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// `Prepared`, `Delivered`, `Paused`, `Cancelled`, `Failed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True` or `False`.
    pub status: String,
    /// A CamelCase reason.
    pub reason: String,
    /// A human sentence.
    pub message: String,
    /// When the status last changed.
    pub last_transition_time: DateTime<Utc>,
}

/// A batch's conditions, one of each type, kept as JSON in `batches.conditions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Conditions(pub Vec<Condition>);

impl Conditions {
    /// The condition of type `kind`, if the batch has one.
    pub fn get(&self, kind: &str) -> Option<&Condition> {
        self.0.iter().find(|c| c.kind == kind)
    }

    /// Sets the condition of type `kind`; its transition time moves only when its status does.
    fn set(&mut self, kind: &str, status: bool, reason: &str, message: String, at: DateTime<Utc>) {
        let status = if status { "True" } else { "False" }.to_string();
        match self.0.iter_mut().find(|c| c.kind == kind) {
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = at;
                }
                c.status = status;
                c.reason = reason.into();
                c.message = message;
            }
            None => self.0.push(Condition {
                kind: kind.into(),
                status,
                reason: reason.into(),
                message,
                last_transition_time: at,
            }),
        }
    }
}

/// Why the batch did something of its own accord, as its condition tells it: a CamelCase
/// reason and a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The condition's reason (`FailureThresholdExceeded`, `RetriesExhausted`,
    /// `CountsDoNotAddUp`).
    pub reason: &'static str,
    /// The condition's message (and, for a failure, the batch's and the step's `error`).
    pub message: String,
}

impl Cause {
    /// A cause with this reason and message.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Cause {
            reason,
            message: message.into(),
        }
    }
}

/// What a state transition reads and writes of a batch: everything but its counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Bookkeeping {
    /// The state.
    pub state: BatchState,
    /// For `paused`, the state it resumes into; for `failed`, the state a retry restarts.
    pub resume_to: Option<BatchState>,
    /// Each step's record.
    pub steps: Steps,
    /// Why the batch is where it is.
    pub conditions: Conditions,
    /// Why it failed.
    pub error: Option<String>,
    /// Step restarts since the step last succeeded.
    pub restarts: i32,
    /// When it was first started.
    pub started_at: Option<NaiveDateTime>,
    /// When it reached a final state.
    pub finished_at: Option<NaiveDateTime>,
    /// When it last changed.
    pub updated_at: NaiveDateTime,
}

/// A batch's bookkeeping with the condition `kind` set and its state left as it is: what the
/// batch waits for while it stays where it is (`ProviderAvailable`).
pub fn note(
    batch: &Bookkeeping,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
) -> Bookkeeping {
    let now = Utc::now();
    let mut b = batch.clone();
    b.updated_at = now.naive_utc();
    b.conditions.set(kind, status, reason, message, now);
    b
}

/// A batch's bookkeeping after `event`: the new state and the step statuses, times, conditions
/// and error that go with it. `counters` are the batch's own, for the `Prepared` condition;
/// `restarts` the supervisor's count.
pub fn project(
    batch: &Bookkeeping,
    counters: &Prepared,
    event: Event,
    cause: Option<&Cause>,
    restarts: u32,
) -> Result<Bookkeeping, TransitionError> {
    let from = batch.state;
    let next = transition(
        Lifecycle {
            state: from,
            resume_to: batch.resume_to,
        },
        event,
    )?;
    let now = Utc::now().naive_utc();
    let at = now.and_utc();
    let mut b = batch.clone();
    b.state = next.state;
    b.resume_to = next.resume_to;
    b.updated_at = now;
    b.restarts = i32::try_from(restarts).unwrap_or(i32::MAX);
    let (steps, conditions) = (&mut b.steps, &mut b.conditions);
    let mut set = |kind: &str, status: bool, reason: &str, message: String| {
        conditions.set(kind, status, reason, message, at)
    };
    match event {
        Event::Start { schedule_in_future } => {
            b.started_at = Some(now);
            if schedule_in_future {
                steps.preparation.status = StepStatus::Ready;
            } else {
                steps.preparation.start(at);
            }
            steps.delivery.status = StepStatus::Ready;
        }
        Event::Due => steps.preparation.start(at),
        Event::Prepared => {
            steps.preparation.status = StepStatus::Completed;
            steps.preparation.finished_at = Some(at);
            let c = counters;
            set(
                "Prepared",
                true,
                "Completed",
                format!(
                    "{} of {} recipients are valid ({} invalid, {} duplicates, {} opted out)",
                    c.valid, c.recipients, c.invalid, c.duplicates, c.opted_out
                ),
            );
            steps.delivery.start(at);
        }
        Event::Delivered => {
            steps.delivery.status = StepStatus::Completed;
            steps.delivery.finished_at = Some(at);
            b.finished_at = Some(now);
            set(
                "Delivered",
                true,
                "Completed",
                "every valid recipient's message reached a final status".into(),
            );
        }
        Event::Pause | Event::Cancel => {
            for step in [&mut steps.preparation, &mut steps.delivery] {
                if step.status == StepStatus::Running {
                    step.status = StepStatus::Paused;
                }
            }
            if event == Event::Pause {
                match cause {
                    // Delivery paused the batch itself.
                    Some(why) => set("Paused", true, why.reason, why.message.clone()),
                    None => set("Paused", true, "Requested", format!("paused while {from}")),
                }
            } else {
                b.finished_at = Some(now);
                set(
                    "Cancelled",
                    true,
                    "Requested",
                    format!("cancelled while {from}"),
                );
                // A paused batch that is cancelled is no longer paused.
                if from == BatchState::Paused {
                    set(
                        "Paused",
                        false,
                        "Cancelled",
                        "cancelled while paused".into(),
                    );
                }
            }
        }
        Event::Resume => {
            // A batch paused while scheduled waits for its time again: no step runs yet.
            if let Some(step) = next.state.step() {
                steps.of(step).status = StepStatus::Running;
            }
            set(
                "Paused",
                false,
                "Resumed",
                format!("resumed into {}", next.state),
            );
        }
        Event::Fail => {
            let (reason, message) = cause.map_or(("RetriesExhausted", "step failed".into()), |c| {
                (c.reason, c.message.clone())
            });
            if let Some(step) = from.step() {
                let step = steps.of(step);
                step.status = StepStatus::Failed;
                step.error = Some(message.clone());
            }
            b.error = Some(message.clone());
            b.finished_at = Some(now);
            set("Failed", true, reason, message);
        }
        Event::Retry => {
            if let Some(step) = next.state.step() {
                let step = steps.of(step);
                step.status = StepStatus::Running;
                step.error = None;
            }
            b.error = None;
            b.finished_at = None;
            b.restarts = 0;
            set(
                "Failed",
                false,
                "Retried",
                format!("retrying from {}", next.state),
            );
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests;
