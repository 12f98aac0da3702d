use std::collections::HashSet;

use super::*;
use crate::domain::state::EVERY_EVENT;
use StepStatus::{Completed, Failed, Initial, Paused, Ready, Running};

/// The counters of the batches below.
const COUNTERS: Prepared = Prepared {
    recipients: 10,
    processed: 10,
    valid: 8,
    invalid: 1,
    duplicates: 1,
    opted_out: 0,
};

fn batch(state: BatchState) -> Bookkeeping {
    Bookkeeping {
        state,
        resume_to: None,
        steps: Steps::default(),
        conditions: Conditions::default(),
        error: None,
        restarts: 0,
        started_at: None,
        finished_at: None,
        updated_at: Utc::now().naive_utc(),
    }
}

/// A batch in `state` whose `step` runs.
fn running(state: BatchState, step: Step) -> Bookkeeping {
    let mut b = batch(state);
    b.steps.of(step).status = Running;
    b
}

fn apply(b: &Bookkeeping, event: Event) -> Bookkeeping {
    project(b, &COUNTERS, event, None, 0).unwrap_or_else(|e| panic!("{event:?}: {e}"))
}

fn condition<'a>(b: &'a Bookkeeping, kind: &str) -> &'a Condition {
    b.conditions
        .get(kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {:?}", b.conditions))
}

const START_NOW: Event = Event::Start {
    schedule_in_future: false,
};

#[test]
fn start_runs_preparation_or_waits_for_the_schedule() {
    let started = apply(&batch(BatchState::Initial), START_NOW);
    assert_eq!(started.state, BatchState::Preparing);
    assert_eq!(started.steps.preparation.status, Running);
    assert!(started.steps.preparation.started_at.is_some());
    assert_eq!(started.steps.delivery.status, Ready);
    assert!(started.started_at.is_some());

    let scheduled = apply(
        &batch(BatchState::Initial),
        Event::Start {
            schedule_in_future: true,
        },
    );
    assert_eq!(scheduled.state, BatchState::Scheduled);
    assert_eq!(scheduled.steps.preparation.status, Ready);
    assert!(scheduled.steps.preparation.started_at.is_none());
}

#[test]
fn prepared_and_delivered_record_conditions() {
    let preparing = apply(&batch(BatchState::Initial), START_NOW);
    let delivering = apply(&preparing, Event::Prepared);
    assert_eq!(delivering.state, BatchState::Delivering);
    assert_eq!(delivering.steps.preparation.status, Completed);
    assert!(delivering.steps.preparation.finished_at.is_some());
    assert_eq!(delivering.steps.delivery.status, Running);
    let c = condition(&delivering, "Prepared");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "Completed")
    );
    assert!(c.message.contains("8 of 10"), "{}", c.message);

    let completed = apply(&delivering, Event::Delivered);
    assert_eq!(completed.state, BatchState::Completed);
    assert_eq!(completed.steps.delivery.status, Completed);
    assert!(completed.finished_at.is_some());
    assert_eq!(condition(&completed, "Delivered").status, "True");
}

#[test]
fn pause_and_resume_keep_the_step_and_flip_the_condition() {
    let delivering = running(BatchState::Delivering, Step::Delivery);
    let paused = apply(&delivering, Event::Pause);
    assert_eq!(paused.state, BatchState::Paused);
    assert_eq!(paused.resume_to, Some(BatchState::Delivering));
    assert_eq!(paused.steps.delivery.status, Paused);
    assert_eq!(condition(&paused, "Paused").status, "True");

    let resumed = apply(&paused, Event::Resume);
    assert_eq!(resumed.state, BatchState::Delivering);
    assert_eq!(resumed.resume_to, None);
    assert_eq!(resumed.steps.delivery.status, Running);
    assert_eq!(condition(&resumed, "Paused").status, "False");
    assert_eq!(condition(&resumed, "Paused").reason, "Resumed");
}

#[test]
fn a_pause_of_its_own_says_why() {
    let delivering = running(BatchState::Delivering, Step::Delivery);
    let cause = Cause::new("FailureThresholdExceeded", "12% of the last 1000 failed");
    let paused = project(&delivering, &COUNTERS, Event::Pause, Some(&cause), 0).expect("pause");
    let c = condition(&paused, "Paused");
    assert_eq!(
        (c.reason.as_str(), c.message.as_str()),
        ("FailureThresholdExceeded", "12% of the last 1000 failed")
    );
}

#[test]
fn fail_records_the_error_and_retry_clears_it() {
    let cause = Cause::new("RetriesExhausted", "template: broken");
    let failed = project(
        &batch(BatchState::Preparing),
        &COUNTERS,
        Event::Fail,
        Some(&cause),
        4,
    )
    .expect("fail");
    assert_eq!(failed.state, BatchState::Failed);
    assert_eq!(failed.resume_to, Some(BatchState::Preparing));
    assert_eq!(failed.error.as_deref(), Some("template: broken"));
    assert_eq!(failed.restarts, 4);
    assert_eq!(failed.steps.preparation.status, Failed);
    assert_eq!(
        failed.steps.preparation.error.as_deref(),
        Some("template: broken")
    );
    assert_eq!(condition(&failed, "Failed").message, "template: broken");

    let retried = apply(&failed, Event::Retry);
    assert_eq!(retried.state, BatchState::Preparing);
    assert_eq!(retried.error, None);
    assert_eq!(retried.finished_at, None);
    assert_eq!(retried.restarts, 0);
    assert_eq!(retried.steps.preparation.status, Running);
    assert_eq!(retried.steps.preparation.error, None);
    assert_eq!(condition(&retried, "Failed").status, "False");
}

#[test]
fn cancel_stops_the_running_step_and_refusals_change_nothing() {
    let preparing = running(BatchState::Preparing, Step::Preparation);
    let cancelled = apply(&preparing, Event::Cancel);
    assert_eq!(cancelled.state, BatchState::Cancelled);
    assert_eq!(cancelled.steps.preparation.status, Paused);
    assert!(cancelled.finished_at.is_some());
    assert_eq!(condition(&cancelled, "Cancelled").status, "True");

    let err = project(
        &batch(BatchState::Completed),
        &COUNTERS,
        Event::Pause,
        None,
        0,
    )
    .expect_err("completed is final");
    assert_eq!(err.to_string(), "cannot pause a batch in state completed");
}

#[test]
fn stored_records_read_back() {
    // The JSON the store keeps: a step's status by its name, conditions as a list.
    let steps: Steps = serde_json::from_str(
        r#"{"preparation":{"status":"completed","started_at":"2026-12-01T10:00:00Z","finished_at":null,"error":null}}"#,
    )
    .expect("steps");
    assert_eq!(steps.preparation.status, Completed);
    assert_eq!(steps.delivery, StepRecord::default());
    assert!(serde_json::from_str::<Steps>(r#"{"preparation":{"status":"done"}}"#).is_err());
    let conditions = Conditions(vec![Condition {
        kind: "Paused".into(),
        status: "True".into(),
        reason: "Requested".into(),
        message: "paused while delivering".into(),
        last_transition_time: Utc::now(),
    }]);
    let json = serde_json::to_string(&conditions).expect("to JSON");
    assert!(json.starts_with(r#"[{"type":"Paused""#), "{json}");
    assert_eq!(
        serde_json::from_str::<Conditions>(&json).expect("back"),
        conditions
    );
}

/// A xorshift64 generator: the property test's sequences, replayable from their seed.
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// What each step's record must say in a batch at rest in `state` (resuming into or failed from
/// `resume_to`).
fn expected_steps(state: BatchState, resume_to: Option<BatchState>) -> (StepStatus, StepStatus) {
    use BatchState as B;
    match (state, resume_to) {
        (B::Initial, _) => (Initial, Initial),
        (B::Scheduled, _) | (B::Paused, Some(B::Scheduled)) => (Ready, Ready),
        (B::Preparing, _) => (Running, Ready),
        (B::Paused, Some(B::Preparing)) => (Paused, Ready),
        (B::Failed, Some(B::Preparing)) => (Failed, Ready),
        (B::Delivering, _) => (Completed, Running),
        (B::Paused, Some(B::Delivering)) => (Completed, Paused),
        (B::Failed, Some(B::Delivering)) => (Completed, Failed),
        (B::Completed, _) => (Completed, Completed),
        (state, resume_to) => panic!("no batch rests in {state:?} with {resume_to:?}"),
    }
}

/// The step bookkeeping over random sequences of every event, allowed or not: each step's
/// status, the batch's times and error, and its conditions always agree with the state the
/// state machine says the batch is in, and a refused event is refused as `transition` refuses it.
#[test]
fn bookkeeping_follows_the_state_over_random_event_sequences() {
    // Every sequence starts from a new batch.
    let mut seen: HashSet<(BatchState, Option<BatchState>)> = [(BatchState::Initial, None)].into();
    for seed in 1..=3000u64 {
        let mut rng = Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut b = batch(BatchState::Initial);
        // Cancelled from a batch that had run: its steps as they were.
        let mut before_cancel: Option<(StepStatus, StepStatus)> = None;
        for _ in 0..rng.below(40) + 1 {
            let event = EVERY_EVENT[rng.below(EVERY_EVENT.len())];
            let cause = (rng.below(2) == 0).then(|| Cause::new("Because", "a reason"));
            let from = Lifecycle {
                state: b.state,
                resume_to: b.resume_to,
            };
            let allowed = transition(from, event);
            let steps_before = b.steps.clone();
            match project(&b, &COUNTERS, event, cause.as_ref(), 2) {
                Err(refused) => {
                    assert_eq!(Err(refused), allowed, "seed {seed}: {from:?} + {event:?}");
                    continue;
                }
                Ok(next) => {
                    let lc = allowed.expect("project allows only what the state machine does");
                    assert_eq!((next.state, next.resume_to), (lc.state, lc.resume_to));
                    b = next;
                }
            }
            let (state, resume_to) = (b.state, b.resume_to);
            seen.insert((state, resume_to));
            let got = (b.steps.preparation.status, b.steps.delivery.status);
            let context = format!("seed {seed}: {from:?} + {event:?} -> {state:?}/{resume_to:?}");
            if state == BatchState::Cancelled {
                // A cancel stops whatever ran: nothing runs, the rest stays as it was.
                let stop = |s: StepStatus| if s == Running { Paused } else { s };
                let expected = *before_cancel.get_or_insert((
                    stop(steps_before.preparation.status),
                    stop(steps_before.delivery.status),
                ));
                assert_eq!(got, expected, "{context}");
            } else {
                assert_eq!(got, expected_steps(state, resume_to), "{context}");
            }
            let running: Vec<Step> = [(Step::Preparation, got.0), (Step::Delivery, got.1)]
                .into_iter()
                .filter(|(_, status)| *status == Running)
                .map(|(step, _)| step)
                .collect();
            assert_eq!(running, Vec::from_iter(state.step()), "{context}");
            for (record, status) in [(&b.steps.preparation, got.0), (&b.steps.delivery, got.1)] {
                if !matches!(status, Initial | Ready) {
                    assert!(
                        record.started_at.is_some(),
                        "{context}: a step that ran has its start"
                    );
                }
                assert_eq!(
                    record.finished_at.is_some(),
                    status == Completed,
                    "{context}"
                );
                assert_eq!(record.error.is_some(), status == Failed, "{context}");
            }
            assert_eq!(b.finished_at.is_some(), state.is_final(), "{context}");
            assert_eq!(b.error.is_some(), state == BatchState::Failed, "{context}");
            if state == BatchState::Failed {
                let expected = cause.as_ref().map_or("step failed", |c| c.message.as_str());
                assert_eq!(b.error.as_deref(), Some(expected), "{context}");
            }
            let all = &b.conditions.0;
            let is_true = |kind: &str| all.iter().any(|c| c.kind == kind && c.status == "True");
            for (kind, holds) in [
                ("Paused", state == BatchState::Paused),
                ("Failed", state == BatchState::Failed),
                ("Cancelled", state == BatchState::Cancelled),
                ("Delivered", state == BatchState::Completed),
                ("Prepared", got.0 == Completed),
            ] {
                assert_eq!(is_true(kind), holds, "{context}: {kind} in {all:?}");
            }
            let kinds: HashSet<&str> = all.iter().map(|c| c.kind.as_str()).collect();
            assert_eq!(
                kinds.len(),
                all.len(),
                "{context}: one condition of each type"
            );
        }
    }
    // Every state the machine can rest in was reached.
    for state in BatchState::ALL {
        assert!(
            seen.iter().any(|(s, _)| *s == state),
            "{state:?} never reached"
        );
    }
}
