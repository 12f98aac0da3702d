//! The batch state machine as a pure function of (lifecycle, event).

use serde::{Deserialize, Serialize};

/// Where a batch is in its life; see the state table in docs/api.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchState {
    /// Created, recipients may still be added.
    Initial,
    /// Started with a `schedule_at` in the future; waiting for it.
    Scheduled,
    /// The preparation step is validating recipients and writing messages.
    Preparing,
    /// The delivery step is handing messages to providers.
    Delivering,
    /// Paused by a user; `Lifecycle::resume_to` says where it resumes.
    Paused,
    /// Every message reached an outcome. Final.
    Completed,
    /// A step failed; `Lifecycle::resume_to` says which state a retry restarts. Final.
    Failed,
    /// Cancelled by a user. Final.
    Cancelled,
}

string_enum!(BatchState {
    Initial => "initial",
    Scheduled => "scheduled",
    Preparing => "preparing",
    Delivering => "delivering",
    Paused => "paused",
    Completed => "completed",
    Failed => "failed",
    Cancelled => "cancelled",
});

impl BatchState {
    /// True for `completed`, `failed` and `cancelled`: no event but a retry of a failed batch
    /// moves the batch on.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            BatchState::Completed | BatchState::Failed | BatchState::Cancelled
        )
    }

    /// The step that runs in this state, if any (Preparing -> Preparation, Delivering -> Delivery).
    pub fn step(self) -> Option<Step> {
        match self {
            BatchState::Preparing => Some(Step::Preparation),
            BatchState::Delivering => Some(Step::Delivery),
            _ => None,
        }
    }
}

/// A string that names no variant of the enum it was parsed as; shared by every `FromStr` in
/// `domain`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value `{0}`")]
pub struct UnknownValue(pub String);

/// The status of one step (preparation or delivery) of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached yet.
    Initial,
    /// Queued to run.
    Ready,
    /// Running now.
    Running,
    /// Stopped by a pause; resumes from its checkpoint.
    Paused,
    /// Finished.
    Completed,
    /// Stopped by an error; a retry resumes from its checkpoint.
    Failed,
}

string_enum!(StepStatus {
    Initial => "initial",
    Ready => "ready",
    Running => "running",
    Paused => "paused",
    Completed => "completed",
    Failed => "failed",
});

/// The two steps a batch runs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Validates recipients, renders and writes the messages.
    Preparation,
    /// Sends the messages.
    Delivery,
}

string_enum!(Step {
    Preparation => "preparation",
    Delivery => "delivery",
});

/// Something that happened to a batch; `transition` decides what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A user started the batch.
    Start {
        /// True when `schedule_at` is later than now.
        schedule_in_future: bool,
    },
    /// The scheduled time arrived.
    Due,
    /// The preparation step finished.
    Prepared,
    /// Every message reached an outcome.
    Delivered,
    /// A user paused the batch.
    Pause,
    /// A user resumed a paused batch.
    Resume,
    /// A user cancelled the batch.
    Cancel,
    /// A step failed fatally.
    Fail,
    /// A user retried a failed batch.
    Retry,
}

impl Event {
    /// The event's name as it appears in error messages ("cannot pause a batch …").
    pub fn name(self) -> &'static str {
        match self {
            Event::Start { .. } => "start",
            Event::Due => "due",
            Event::Prepared => "prepared",
            Event::Delivered => "delivered",
            Event::Pause => "pause",
            Event::Resume => "resume",
            Event::Cancel => "cancel",
            Event::Fail => "fail",
            Event::Retry => "retry",
        }
    }
}

/// Every event, each `Start` both ways: for the tests that walk the state machine.
#[cfg(test)]
pub(crate) const EVERY_EVENT: [Event; 10] = [
    Event::Start {
        schedule_in_future: true,
    },
    Event::Start {
        schedule_in_future: false,
    },
    Event::Due,
    Event::Prepared,
    Event::Delivered,
    Event::Pause,
    Event::Resume,
    Event::Cancel,
    Event::Fail,
    Event::Retry,
];

/// A batch's position in the state machine. `resume_to` is the state a paused batch resumes into, or the state a failed batch retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    /// The current state.
    pub state: BatchState,
    /// For `Paused`, the state it was paused in; for `Failed`, the state that failed; else `None`.
    pub resume_to: Option<BatchState>,
}

impl Lifecycle {
    /// A lifecycle in `state` with nothing to resume to.
    pub const fn new(state: BatchState) -> Self {
        Lifecycle {
            state,
            resume_to: None,
        }
    }
}

/// An event that is not allowed in the batch's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} a batch in state {from}")]
pub struct TransitionError {
    /// The state the batch was in.
    pub from: BatchState,
    /// The event's `Event::name`.
    pub event: &'static str,
}

/// Applies `event` to `current`, or says why it is not allowed. The rules are the table in
/// docs/api.md; anything not listed there is an error.
pub fn transition(current: Lifecycle, event: Event) -> Result<Lifecycle, TransitionError> {
    use BatchState::*;

    let refuse = TransitionError {
        from: current.state,
        event: event.name(),
    };
    let next = match (current.state, event) {
        (
            Initial,
            Event::Start {
                schedule_in_future: true,
            },
        ) => Lifecycle::new(Scheduled),
        (
            Initial,
            Event::Start {
                schedule_in_future: false,
            },
        ) => Lifecycle::new(Preparing),
        (Scheduled, Event::Due) => Lifecycle::new(Preparing),
        (Preparing, Event::Prepared) => Lifecycle::new(Delivering),
        (Delivering, Event::Delivered) => Lifecycle::new(Completed),
        (from @ (Scheduled | Preparing | Delivering), Event::Pause) => Lifecycle {
            state: Paused,
            resume_to: Some(from),
        },
        // `resume_to` is stored with the batch, so it is checked rather than trusted: resuming
        // into any state but one that can be paused would jump past the rules above.
        (Paused, Event::Resume) => match current.resume_to {
            Some(to @ (Scheduled | Preparing | Delivering)) => Lifecycle::new(to),
            _ => return Err(refuse),
        },
        (from, Event::Cancel) if !from.is_final() => Lifecycle::new(Cancelled),
        (from @ (Preparing | Delivering), Event::Fail) => Lifecycle {
            state: Failed,
            resume_to: Some(from),
        },
        (Failed, Event::Retry) => match current.resume_to {
            Some(to @ (Preparing | Delivering)) => Lifecycle::new(to),
            _ => return Err(refuse),
        },
        _ => return Err(refuse),
    };
    Ok(next)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::BatchState::*;
    use super::*;

    /// Every legal transition: (from, the `resume_to` it needs or `None` for "any", event, result).
    fn legal() -> Vec<(BatchState, Option<BatchState>, Event, Lifecycle)> {
        let to = Lifecycle::new;
        let with = |state, resume_to| Lifecycle {
            state,
            resume_to: Some(resume_to),
        };
        let start = |schedule_in_future| Event::Start { schedule_in_future };
        vec![
            (Initial, None, start(true), to(Scheduled)),
            (Initial, None, start(false), to(Preparing)),
            (Scheduled, None, Event::Due, to(Preparing)),
            (Preparing, None, Event::Prepared, to(Delivering)),
            (Delivering, None, Event::Delivered, to(Completed)),
            (Scheduled, None, Event::Pause, with(Paused, Scheduled)),
            (Preparing, None, Event::Pause, with(Paused, Preparing)),
            (Delivering, None, Event::Pause, with(Paused, Delivering)),
            (Paused, Some(Scheduled), Event::Resume, to(Scheduled)),
            (Paused, Some(Preparing), Event::Resume, to(Preparing)),
            (Paused, Some(Delivering), Event::Resume, to(Delivering)),
            (Initial, None, Event::Cancel, to(Cancelled)),
            (Scheduled, None, Event::Cancel, to(Cancelled)),
            (Preparing, None, Event::Cancel, to(Cancelled)),
            (Delivering, None, Event::Cancel, to(Cancelled)),
            (Paused, None, Event::Cancel, to(Cancelled)),
            (Preparing, None, Event::Fail, with(Failed, Preparing)),
            (Delivering, None, Event::Fail, with(Failed, Delivering)),
            (Failed, Some(Preparing), Event::Retry, to(Preparing)),
            (Failed, Some(Delivering), Event::Retry, to(Delivering)),
        ]
    }

    #[test]
    fn every_state_and_event_matches_the_table() {
        let table = legal();
        let resume_tos = std::iter::once(None).chain(BatchState::ALL.map(Some));
        let mut checked = 0;
        for state in BatchState::ALL {
            for resume_to in resume_tos.clone() {
                for event in EVERY_EVENT {
                    let current = Lifecycle { state, resume_to };
                    let expected = table
                        .iter()
                        .find(|(from, needs, ev, _)| {
                            *from == state
                                && *ev == event
                                && needs.is_none_or(|n| resume_to == Some(n))
                        })
                        .map(|(_, _, _, next)| *next);
                    let actual = transition(current, event);
                    match expected {
                        Some(next) => assert_eq!(actual, Ok(next), "{current:?} + {event:?}"),
                        None => assert_eq!(
                            actual,
                            Err(TransitionError {
                                from: state,
                                event: event.name()
                            }),
                            "{current:?} + {event:?}"
                        ),
                    }
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 8 * 9 * 10);
    }

    #[test]
    fn pause_then_resume_returns_to_the_paused_state() {
        for from in [Scheduled, Preparing, Delivering] {
            let paused = transition(Lifecycle::new(from), Event::Pause).unwrap();
            assert_eq!(paused.state, Paused);
            assert_eq!(paused.resume_to, Some(from));
            let resumed = transition(paused, Event::Resume).unwrap();
            assert_eq!(resumed, Lifecycle::new(from));
        }
    }

    #[test]
    fn fail_then_retry_returns_to_the_failed_step() {
        for from in [Preparing, Delivering] {
            let failed = transition(Lifecycle::new(from), Event::Fail).unwrap();
            assert_eq!(failed.resume_to, Some(from));
            let retried = transition(failed, Event::Retry).unwrap();
            assert_eq!(retried, Lifecycle::new(from));
        }
    }

    #[test]
    fn cancelling_a_paused_batch_forgets_resume_to() {
        let paused = transition(Lifecycle::new(Delivering), Event::Pause).unwrap();
        let cancelled = transition(paused, Event::Cancel).unwrap();
        assert_eq!(cancelled, Lifecycle::new(Cancelled));
    }

    #[test]
    fn resume_or_retry_without_resume_to_is_refused() {
        assert!(transition(Lifecycle::new(Paused), Event::Resume).is_err());
        assert!(transition(Lifecycle::new(Failed), Event::Retry).is_err());
    }

    #[test]
    fn full_happy_path() {
        let mut lc = Lifecycle::new(Initial);
        for event in [
            Event::Start {
                schedule_in_future: true,
            },
            Event::Due,
            Event::Prepared,
            Event::Delivered,
        ] {
            lc = transition(lc, event).unwrap();
        }
        assert_eq!(lc, Lifecycle::new(Completed));
    }

    #[test]
    fn error_message_names_event_and_state() {
        let err = transition(Lifecycle::new(Completed), Event::Pause).unwrap_err();
        assert_eq!(err.to_string(), "cannot pause a batch in state completed");
        let err = transition(
            Lifecycle::new(Delivering),
            Event::Start {
                schedule_in_future: false,
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "cannot start a batch in state delivering");
    }

    #[test]
    fn final_states_and_steps() {
        let finals: Vec<_> = BatchState::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(finals, [Completed, Failed, Cancelled]);
        assert_eq!(Preparing.step(), Some(Step::Preparation));
        assert_eq!(Delivering.step(), Some(Step::Delivery));
        for s in [Initial, Scheduled, Paused, Completed, Failed, Cancelled] {
            assert_eq!(s.step(), None);
        }
        assert_eq!(Step::Preparation.as_str(), "preparation");
        assert_eq!(Step::Delivery.as_str(), "delivery");
    }

    #[test]
    fn event_names() {
        let names: Vec<_> = EVERY_EVENT.iter().map(|e| e.name()).collect();
        assert_eq!(
            names,
            [
                "start",
                "start",
                "due",
                "prepared",
                "delivered",
                "pause",
                "resume",
                "cancel",
                "fail",
                "retry"
            ]
        );
    }

    #[test]
    fn batch_state_strings_match_serde_and_round_trip() {
        for s in BatchState::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<BatchState>(), Ok(s));
            assert_eq!(
                serde_json::from_str::<BatchState>(&format!("\"{}\"", s.as_str())).unwrap(),
                s
            );
        }
        assert_eq!("delivering".parse::<BatchState>(), Ok(Delivering));
        assert_eq!(
            "Delivering".parse::<BatchState>(),
            Err(UnknownValue("Delivering".into()))
        );
        assert_eq!(UnknownValue("x".into()).to_string(), "unknown value `x`");
    }

    #[test]
    fn step_status_strings_match_serde_and_round_trip() {
        assert_eq!(StepStatus::ALL.len(), 6);
        for s in StepStatus::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
            assert_eq!(s.as_str().parse::<StepStatus>(), Ok(s));
        }
        assert!("done".parse::<StepStatus>().is_err());
    }
}
