//! Rate limits. Each provider has one [`RateLimiter`] in front of it: unlimited, a token bucket
//! of this instance alone, or the account's budget shared by every instance through a
//! [`RateLedger`] (the database), so that two instances at a limit of 150 a second send 150
//! a second together, not 300.
//!
//! The shared budget is counted in windows of wall-clock time, the same for every instance:
//! `max(100 ms, 1 s / rate)` long, each allowing its share of the rate (fractions carried over
//! exactly, so 15 a second in windows of 100 ms allow 1, 2, 1, 2, …). An instance asks the ledger
//! for tokens of the current window only when its own are spent — for what its callers wait
//! for, at least a quarter of the window's share — and keeps what it was granted until the
//! window ends. One statement per ask, a few per window at most, and none while nothing is sent.
//! Any run of whole windows lasting a second allows at most `rate`, so any second of sending
//! holds at most one window's share more. When the ledger cannot be reached, nothing is sent
//! until it answers again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::store::Store;

/// Where the instances of a deployment count what they take of an account's rate.
pub trait RateLedger: Send + Sync {
    /// Adds `want` to what `account` took in the window starting at `start_ms` (milliseconds
    /// since the epoch); returns the window's total, this take included.
    fn take<'a>(
        &'a self,
        account: &'a str,
        start_ms: i64,
        want: i64,
    ) -> BoxFuture<'a, Result<i64, String>>;

    /// Forgets `account`'s windows that started before `before_ms`.
    fn forget<'a>(&'a self, account: &'a str, before_ms: i64) -> BoxFuture<'a, Result<(), String>>;
}

impl RateLedger for Store {
    fn take<'a>(
        &'a self,
        account: &'a str,
        start_ms: i64,
        want: i64,
    ) -> BoxFuture<'a, Result<i64, String>> {
        Box::pin(async move {
            self.take_rate(account, start_ms, want)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn forget<'a>(&'a self, account: &'a str, before_ms: i64) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.forget_rate_windows(account, before_ms)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}

/// The windows an account's shared rate is counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    rate: i128,
    length_ms: i64,
}

impl Windows {
    /// The windows of `rate` a second (not 0): 100 ms long, or longer for rates under ten a
    /// second, so that each window allows at least one.
    pub fn new(rate: u32) -> Self {
        let rate = rate.max(1);
        Windows {
            rate: i128::from(rate),
            length_ms: i64::from(1000u32.div_ceil(rate).max(100)),
        }
    }

    /// How long each window is.
    pub fn length(&self) -> Duration {
        Duration::from_millis(self.length_ms.unsigned_abs())
    }

    /// The window holding the instant `epoch_ms`.
    pub fn index(&self, epoch_ms: i64) -> i64 {
        epoch_ms.div_euclid(self.length_ms)
    }

    /// When window `index` starts, in milliseconds since the epoch.
    pub fn start_ms(&self, index: i64) -> i64 {
        index.saturating_mul(self.length_ms)
    }

    /// What window `index` allows: the rate's total up to its end less the total up to its
    /// start, each rounded down, so that no fraction is lost or counted twice.
    pub fn allowance(&self, index: i64) -> i64 {
        let upto = |i: i64| i128::from(i) * i128::from(self.length_ms) * self.rate / 1000;
        i64::try_from(upto(index.saturating_add(1)) - upto(index)).unwrap_or(i64::MAX)
    }
}

/// What a take of `want` granted, given the window's total after it and its allowance: the part
/// of the take that fell within the allowance.
pub fn granted(total: i64, want: i64, allowance: i64) -> i64 {
    (allowance - (total - want)).clamp(0, want)
}

/// One provider's limit.
pub struct RateLimiter {
    kind: Kind,
}

enum Kind {
    Unlimited,
    Local(Bucket),
    Shared(Box<Shared>),
}

impl RateLimiter {
    /// `per_second` tokens a second for this instance alone; 0 means unlimited.
    pub fn new(per_second: u32) -> Self {
        let kind = if per_second == 0 {
            Kind::Unlimited
        } else {
            Kind::Local(Bucket::new(per_second))
        };
        RateLimiter { kind }
    }

    /// `per_second` tokens a second for `account`, across every instance that counts in
    /// `ledger`; 0 means unlimited.
    pub fn shared(per_second: u32, account: &str, ledger: Arc<dyn RateLedger>) -> Self {
        if per_second == 0 {
            return Self::new(0);
        }
        RateLimiter {
            kind: Kind::Shared(Box::new(Shared {
                account: account.to_owned(),
                windows: Windows::new(per_second),
                ledger,
                state: Mutex::new(Window::default()),
                granted: Notify::new(),
            })),
        }
    }

    /// True when it holds an account's budget across instances.
    pub fn is_shared(&self) -> bool {
        matches!(self.kind, Kind::Shared(_))
    }

    /// Waits until `n` tokens may go (segments or messages, as the provider counts).
    pub async fn acquire(&self, n: u32) {
        match &self.kind {
            Kind::Unlimited => {}
            Kind::Local(bucket) => bucket.acquire(n).await,
            Kind::Shared(shared) => shared.acquire(i64::from(n)).await,
        }
    }
}

/// A token bucket: `rate` a second, with a burst of one second's worth. The lock is held only
/// to compute the wait, never across it.
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(per_second: u32) -> Self {
        Bucket {
            rate: f64::from(per_second),
            state: Mutex::new((f64::from(per_second), Instant::now())),
        }
    }

    async fn acquire(&self, n: u32) {
        let wait = {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (tokens, last) = &mut *guard;
            let now = Instant::now();
            *tokens =
                (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
            *last = now;
            // Take the tokens now, even if they go negative: later callers queue behind them.
            *tokens -= f64::from(n);
            (*tokens < 0.0).then(|| Duration::from_secs_f64(-*tokens / self.rate))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

/// An account's budget shared through a ledger.
struct Shared {
    account: String,
    windows: Windows,
    ledger: Arc<dyn RateLedger>,
    state: Mutex<Window>,
    /// Woken when an ask of the ledger ends.
    granted: Notify,
}

/// This instance's share of the current window.
#[derive(Debug, Default)]
struct Window {
    index: i64,
    /// Tokens granted and not yet taken.
    left: i64,
    /// The ledger said the window is spent.
    full: bool,
    /// A caller is asking the ledger.
    asking: bool,
    /// Tokens the callers waiting for that ask still need.
    waiting: i64,
    /// The window whose start the instance last forgot older windows at.
    forgot: i64,
    /// The ledger failed at its last ask.
    failing: bool,
}

/// What a caller does next.
enum Step<'a> {
    Done,
    Sleep(Duration),
    /// Wait for the ask under way to end, needing this many tokens.
    Wait(tokio::sync::futures::Notified<'a>, i64),
    Ask {
        index: i64,
        want: i64,
    },
}

/// Windows kept in the ledger behind the current one.
const KEEP: Duration = Duration::from_secs(60);

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn acquire(&self, mut need: i64) {
        loop {
            let step = {
                let mut s = self.lock();
                let now = epoch_ms();
                let index = self.windows.index(now);
                if index != s.index {
                    // What was left of a past window is of no use: its time is over.
                    s.index = index;
                    s.left = 0;
                    s.full = false;
                }
                let take = need.min(s.left);
                s.left -= take;
                need -= take;
                if need == 0 {
                    Step::Done
                } else if s.full {
                    let next = self.windows.start_ms(index + 1);
                    Step::Sleep(Duration::from_millis((next - now).max(1).unsigned_abs()))
                } else if s.asking {
                    // Registered under the lock, so the ask's end cannot come first unseen.
                    s.waiting += need;
                    Step::Wait(self.granted.notified(), need)
                } else {
                    s.asking = true;
                    let allowance = self.windows.allowance(index);
                    let floor = (allowance + 3) / 4;
                    let want = (need + s.waiting).clamp(floor.max(1), allowance.max(1));
                    Step::Ask { index, want }
                }
            };
            match step {
                Step::Done => return,
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Wait(notified, n) => {
                    // Counted off the demand even if this caller is dropped while it waits.
                    let _waiting = Waiting { shared: self, n };
                    notified.await;
                }
                Step::Ask { index, want } => self.ask(index, want).await,
            }
        }
    }

    /// Asks the ledger for `want` tokens of window `index` on behalf of every waiting caller.
    async fn ask(&self, index: i64, want: i64) {
        let asking = Asking { shared: self };
        let start = self.windows.start_ms(index);
        let answer = self.ledger.take(&self.account, start, want).await;
        let forget = {
            let mut s = self.lock();
            match answer {
                Ok(total) => {
                    if s.failing {
                        s.failing = false;
                        tracing::info!(provider = %self.account, "Rate ledger answering again.");
                    }
                    let granted = granted(total, want, self.windows.allowance(index));
                    if s.index == index {
                        s.left += granted;
                        s.full |= granted < want;
                    }
                }
                Err(e) => {
                    if !s.failing {
                        s.failing = true;
                        tracing::warn!(provider = %self.account, error = %e, "Rate ledger unreachable; sending waits for it.");
                    }
                    if s.index == index {
                        s.full = true;
                    }
                }
            }
            let keep = i64::try_from(KEEP.as_millis()).unwrap_or(i64::MAX);
            let due = start - self.windows.start_ms(s.forgot) >= keep;
            if due {
                s.forgot = index;
            }
            due.then_some(start - keep)
        };
        drop(asking);
        if let Some(before) = forget
            && let Err(e) = self.ledger.forget(&self.account, before).await
        {
            tracing::warn!(provider = %self.account, error = %e, "Forgetting old rate windows failed.");
        }
    }
}

/// Ends an ask, however it ends: the next caller may ask, and the waiting ones look again.
struct Asking<'a> {
    shared: &'a Shared,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.shared.lock().asking = false;
        self.shared.granted.notify_waiters();
    }
}

/// A caller waiting for an ask, counted in the demand the ask is made for.
struct Waiting<'a> {
    shared: &'a Shared,
    n: i64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.shared.lock().waiting -= self.n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_local_bucket_spaces_calls_after_the_burst() {
        let limiter = RateLimiter::new(10);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            limiter.acquire(1).await;
        }
        // 10 go at once (the burst), the other 20 at 10 a second.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(2100), "{elapsed:?}");
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let limiter = RateLimiter::new(0);
        for _ in 0..1000 {
            limiter.acquire(3).await;
        }
    }

    #[test]
    fn windows_allow_the_rate_exactly_whatever_its_fraction() {
        for rate in [1, 3, 7, 10, 15, 150, 999, 1000, 12_345] {
            let w = Windows::new(rate);
            assert!(w.length() >= Duration::from_millis(100), "{rate}");
            let per_second = 1000 / w.length_ms;
            for first in [0, 17, 1_765_000_000_000 / w.length_ms] {
                let allowed: Vec<i64> = (first..first + 10 * per_second.max(1))
                    .map(|i| w.allowance(i))
                    .collect();
                assert!(allowed.iter().all(|&a| a >= 1), "{rate}: {allowed:?}");
                // Any run of windows allows the rate over its length, give or take the
                // fraction at each end.
                let total: i64 = allowed.iter().sum();
                let expected = i64::from(rate) * allowed.len() as i64 * w.length_ms / 1000;
                assert!(
                    (total - expected).abs() <= 1,
                    "{rate}: {total} vs {expected}"
                );
            }
        }
        assert_eq!(Windows::new(15).length(), Duration::from_millis(100));
        assert_eq!(
            (0..4)
                .map(|i| Windows::new(15).allowance(i))
                .collect::<Vec<_>>(),
            [1, 2, 1, 2]
        );
        assert_eq!(Windows::new(4).length(), Duration::from_millis(250));
    }

    #[test]
    fn a_take_is_granted_what_fits_in_the_allowance() {
        // 15 allowed: a first take of 10 gets 10, the next 10 gets 5, then nothing.
        assert_eq!(granted(10, 10, 15), 10);
        assert_eq!(granted(20, 10, 15), 5);
        assert_eq!(granted(30, 10, 15), 0);
    }
}
