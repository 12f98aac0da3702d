//! SMS providers: the `SmsProvider` trait, the rate limiter in front of each provider, and the
//! kinds (`kinds.rs`): the built-in `simulator`, the generic JSON-over-HTTP `http` gateways and
//! `smpp` accounts.

pub mod http;
pub mod kinds;
pub mod registry;
pub mod simulator;
pub mod smpp;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use futures_util::future::BoxFuture;

pub use http::HttpProvider;

use crate::domain::receipt::Receipt;
pub use simulator::Simulator;

pub use kinds::{BuildError, SettingError};
pub use registry::{ProviderSettings, configure};

/// One SMS to hand to a provider.
#[derive(Debug, Clone)]
pub struct OutgoingSms<'a> {
    /// The message id: also the idempotency key of providers that support one.
    pub message_id: i64,
    /// E.164 destination.
    pub phone: &'a str,
    /// Rendered text.
    pub body: &'a str,
    /// 1 for the first attempt.
    pub attempt: i32,
}

/// What a provider answers when it took a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The provider's id for the message, if it gives one.
    pub provider_message_id: Option<String>,
    /// The ids its receipts will name, one per part, in their canonical form
    /// (`domain::receipt::canonical_text` or the account's `message_id_format`); empty when
    /// the provider sends no receipts.
    pub receipt_ids: Vec<String>,
}

/// Why a provider did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth retrying later (timeouts, 5xx, throttling).
    #[error("transient provider error: {0}")]
    Transient(String),
    /// Retrying will not help (invalid destination, rejected content).
    #[error("{0}")]
    Permanent(String),
    /// The message may have reached the provider, and its answer was lost (a connection that
    /// dropped after the request went): `smsbatch.redelivery` decides, as after a crash.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

impl ProviderError {
    /// True when a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ProviderError::Transient(_))
    }
}

/// One session of a provider that keeps connections open (SMPP), as `/readyz` and the metrics
/// show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionReport {
    /// One of `SessionReport::STATES`.
    pub state: &'static str,
    /// Why it is refused or down.
    pub reason: Option<String>,
    /// Requests written and not yet answered (SMPP's window in use).
    pub in_flight: usize,
}

impl SessionReport {
    /// Every state a session reports.
    pub const STATES: [&'static str; 5] = ["connecting", "bound", "refused", "down", "closed"];
}

/// A mobile-originated message, as a provider received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSms {
    /// The provider it came through.
    pub provider: String,
    /// The sender, as given (normalised to E.164 where it is acted on).
    pub from: String,
    /// The number or name it was sent to.
    pub to: String,
    /// Its text.
    pub text: String,
}

/// What a provider receives from the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A delivery receipt.
    Receipt(Receipt),
    /// A mobile-originated message.
    Inbound(InboundSms),
}

/// One thing received, and where to say whether it was stored: a provider acknowledges it to
/// its peer (`deliver_sm_resp`, a webhook's 2xx) only once `stored` says `true`.
#[derive(Debug)]
pub struct Delivery {
    /// What came.
    pub incoming: Incoming,
    /// `true` once it is durable; `false` (or dropped) when it could not be stored.
    pub stored: oneshot::Sender<bool>,
}

/// Where providers hand what they receive: the instance's desk (`actors::incoming`), behind a
/// bounded channel.
pub type IncomingSink = mpsc::Sender<Delivery>;

/// An SMS gateway.
pub trait SmsProvider: Send + Sync {
    /// Sends one message.
    fn send<'a>(
        &'a self,
        sms: &'a OutgoingSms<'a>,
    ) -> BoxFuture<'a, Result<Accepted, ProviderError>>;

    /// Its sessions, for a provider that keeps connections open; none for the others.
    fn sessions(&self) -> Vec<SessionReport> {
        Vec::new()
    }

    /// True when `token` opens this provider's webhooks (receipts, inbound messages): only an
    /// `http` provider with its `webhook_token` set has them.
    fn webhook_accepts(&self, token: &str) -> bool {
        let _ = token;
        false
    }

    /// Closes its connections cleanly once nothing more is sent (SMPP's `unbind`).
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// A provider with its name and rate limit.
pub struct Provider {
    /// The name batches use.
    pub name: String,
    /// The gateway.
    pub gateway: Arc<dyn SmsProvider>,
    /// Its messages-per-second limit.
    pub limiter: RateLimiter,
}

/// The configured providers by name.
#[derive(Clone)]
pub struct Providers {
    by_name: Arc<HashMap<String, Arc<Provider>>>,
    default: String,
}

impl Providers {
    /// Builds every provider the configuration names (`kinds::configure`).
    pub fn from_settings(
        settings: &ProviderSettings,
        incoming: &IncomingSink,
    ) -> Result<Self, BuildError> {
        let mut by_name = HashMap::new();
        for configured in configure(settings)? {
            let provider = Provider {
                gateway: configured.settings.build(&configured.name, incoming)?,
                limiter: RateLimiter::new(configured.rate_limit),
                name: configured.name,
            };
            by_name.insert(provider.name.clone(), Arc::new(provider));
        }
        Ok(Providers {
            by_name: Arc::new(by_name),
            default: settings.default.clone(),
        })
    }

    /// A provider by name.
    pub fn get(&self, name: &str) -> Option<Arc<Provider>> {
        self.by_name.get(name).cloned()
    }

    /// Closes every provider's connections; called once no message is being sent.
    pub async fn shut_down(&self) {
        let all: Vec<_> = self
            .by_name
            .values()
            .map(|provider| provider.gateway.shutdown())
            .collect();
        futures_util::future::join_all(all).await;
    }

    /// The sessions of each provider that keeps some, by name.
    pub fn sessions(&self) -> BTreeMap<String, Vec<SessionReport>> {
        self.by_name
            .values()
            .map(|p| (p.name.clone(), p.gateway.sessions()))
            .filter(|(_, sessions)| !sessions.is_empty())
            .collect()
    }

    /// The name of the default provider.
    pub fn default_name(&self) -> &str {
        &self.default
    }
}

/// A token bucket: at most `rate` messages a second, with a burst of one second's worth.
/// The lock is held only to compute the wait, never across it.
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter of `per_second` messages a second; 0 means unlimited.
    pub fn new(per_second: u32) -> Self {
        RateLimiter {
            rate: f64::from(per_second),
            state: Mutex::new((f64::from(per_second), Instant::now())),
        }
    }

    /// Waits until one message may go.
    pub async fn acquire(&self) {
        if self.rate <= 0.0 {
            return;
        }
        let wait = {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (tokens, last) = &mut *guard;
            let now = Instant::now();
            *tokens =
                (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
            *last = now;
            // Take the token now, even if it goes negative: later callers queue behind it.
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                None
            } else {
                Some(Duration::from_secs_f64(-*tokens / self.rate))
            }
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limiter_spaces_calls_after_the_burst() {
        let limiter = RateLimiter::new(10);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            limiter.acquire().await;
        }
        // 10 go at once (the burst), the other 20 at 10 a second.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(1900), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(2100), "{elapsed:?}");
    }

    #[tokio::test]
    async fn unlimited_limiter_never_waits() {
        let limiter = RateLimiter::new(0);
        for _ in 0..1000 {
            limiter.acquire().await;
        }
    }
}
