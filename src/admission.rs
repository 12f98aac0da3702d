//! Admission by priority to a fixed number of places: the worker pool's capacity, and the steps
//! an instance runs at once. When all places are taken, the next one freed goes to the
//! longest-waiting transactional task (or step) before any marketing one. Within a class, first
//! come, first served, so that every batch takes turns with the others instead of one batch
//! filling the pool.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// How many classes of priority there are (0 = marketing, 1 = transactional).
pub const CLASSES: usize = 2;

#[derive(Debug)]
struct State {
    free: usize,
    /// Waiters by class, highest class last.
    waiting: [VecDeque<oneshot::Sender<Place>>; CLASSES],
}

/// The places of a pool.
#[derive(Debug, Clone)]
pub struct Admission {
    state: Arc<Mutex<State>>,
}

/// One place in the pool; freed when dropped (also when it is dropped unreceived in a waiter's
/// channel, so a waiter that gave up loses no place).
#[derive(Debug)]
pub struct Place {
    state: Arc<Mutex<State>>,
}

impl Admission {
    /// `places` places (at least one).
    pub fn new(places: usize) -> Self {
        Admission {
            state: Arc::new(Mutex::new(State {
                free: places.max(1),
                waiting: Default::default(),
            })),
        }
    }

    /// Waits for a place for a task of `class` (above `CLASSES - 1` counts as the highest).
    pub async fn enter(&self, class: u8) -> Place {
        let class = usize::from(class).min(CLASSES - 1);
        let rx = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.free > 0 && state.waiting.iter().all(VecDeque::is_empty) {
                state.free -= 1;
                return Place {
                    state: self.state.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            state.waiting[class].push_back(tx);
            rx
        };
        match rx.await {
            Ok(place) => place,
            // The sender is only dropped by `Place::drop` handing it on, which always sends.
            Err(_) => Place {
                state: self.state.clone(),
            },
        }
    }

    /// True while someone waits for a place: a long holder may then give its place up and
    /// queue again, so that it takes turns with the others.
    pub fn is_waited(&self) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // A waiter that gave up stays queued until a freed place passes it over: not counted.
        state
            .waiting
            .iter()
            .any(|w| w.iter().any(|tx| !tx.is_closed()))
    }

    /// Places free now (for tests and metrics).
    pub fn free(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).free
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Hand the place to the first waiter of the highest class still waiting.
        for class in (0..CLASSES).rev() {
            while let Some(tx) = state.waiting[class].pop_front() {
                let place = Place {
                    state: self.state.clone(),
                };
                match tx.send(place) {
                    Ok(()) => return,
                    // That waiter gave up; its place must not be freed again by the returned
                    // value's drop (it would lock this mutex again): forget it and try the next.
                    Err(place) => std::mem::forget(place),
                }
            }
        }
        state.free += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_freed_place_goes_to_transactional_first_then_in_order() {
        let admission = Admission::new(1);
        let first = admission.enter(0).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for (name, class) in [("m1", 0u8), ("t1", 1), ("m2", 0), ("t2", 1)] {
            let admission = admission.clone();
            let tx = tx.clone();
            waiters.push(tokio::spawn(async move {
                let place = admission.enter(class).await;
                tx.send(name).expect("listening");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                drop(place);
            }));
            // Let each waiter queue up before the next one.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        drop(first);
        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(rx.recv().await.expect("a waiter got a place"));
        }
        assert_eq!(order, ["t1", "t2", "m1", "m2"]);
        for w in waiters {
            w.await.expect("waiter");
        }
        assert_eq!(admission.free(), 1, "every place is back");
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_place() {
        let admission = Admission::new(1);
        let first = admission.enter(1).await;
        let gave_up =
            tokio::time::timeout(std::time::Duration::from_millis(10), admission.enter(1)).await;
        assert!(gave_up.is_err(), "no place while the first is held");
        drop(first);
        assert_eq!(admission.free(), 1);
        let again = admission.enter(0).await;
        assert_eq!(admission.free(), 0);
        drop(again);
        assert_eq!(admission.free(), 1);
    }

    #[tokio::test]
    async fn it_says_whether_anyone_waits() {
        let admission = Admission::new(1);
        let held = admission.enter(0).await;
        assert!(!admission.is_waited(), "nobody waits yet");
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { drop(admission.enter(1).await) })
        };
        while !admission.is_waited() {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert!(
            !admission.is_waited(),
            "a waiter that gave up does not count"
        );
        drop(held);
        assert_eq!(admission.free(), 1);
    }
}
