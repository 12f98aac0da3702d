//! SMS providers: the `SmsProvider` trait, the rate limiter in front of each provider, and the
//! kinds (`kinds.rs`): the built-in `simulator`, the generic JSON-over-HTTP `http` gateways and
//! `smpp` accounts.

pub mod http;
pub mod kinds;
pub mod rate;
pub mod registry;
pub mod simulator;
pub mod smpp;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use futures_util::future::BoxFuture;

pub use http::HttpProvider;

use crate::domain::receipt::Receipt;
pub use simulator::Simulator;

pub use kinds::{BuildError, SettingError};
pub use rate::{RateLedger, RateLimiter};
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
    /// The provider could take no message at all (no session bound): not a failure of the
    /// message, which waits for the provider without using an attempt.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

/// Why a provider can take no message now, as a batch's condition says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    /// A CamelCase reason (`BindRefused`, `SessionsDown`).
    pub reason: &'static str,
    /// A human sentence.
    pub message: String,
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

    /// What `sms` costs of the provider's rate limit: 1 (a message), or its segments for a
    /// provider whose limit counts them (SMPP).
    fn cost(&self, sms: &OutgoingSms<'_>) -> u32 {
        let _ = sms;
        1
    }

    /// Why it can take no message now, when it knows (an SMPP account whose binds are refused
    /// or whose sessions are down); `None` while it can, or may soon.
    fn unavailable(&self) -> Option<Unavailable> {
        None
    }

    /// Resolves once it may take messages again (at once for a provider that is never
    /// unavailable).
    fn available(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }

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
    /// Its rate limit (messages, or segments as `SmsProvider::cost` counts them, a second).
    pub limiter: RateLimiter,
    /// How long after its submit a message's receipt still counts; `None`: always.
    pub receipt_timeout: Option<std::time::Duration>,
}

/// The configured providers by name.
#[derive(Clone)]
pub struct Providers {
    by_name: Arc<HashMap<String, Arc<Provider>>>,
    default: String,
}

impl Providers {
    /// Builds every provider the configuration names (`kinds::configure`). With a `ledger`,
    /// each rate limit holds for the account across every instance that counts in it;
    /// without, for this instance alone.
    pub fn from_settings(
        settings: &ProviderSettings,
        incoming: &IncomingSink,
        ledger: Option<Arc<dyn RateLedger>>,
    ) -> Result<Self, BuildError> {
        let mut by_name = HashMap::new();
        for configured in configure(settings)? {
            let limiter = match &ledger {
                Some(ledger) => {
                    RateLimiter::shared(configured.rate_limit, &configured.name, ledger.clone())
                }
                None => RateLimiter::new(configured.rate_limit),
            };
            let provider = Provider {
                gateway: configured.settings.build(&configured.name, incoming)?,
                limiter,
                receipt_timeout: configured.receipt_timeout,
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

    /// Each provider's `receipt_timeout`, for those that have one.
    pub fn receipt_timeouts(&self) -> BTreeMap<String, std::time::Duration> {
        self.by_name
            .values()
            .filter_map(|p| Some((p.name.clone(), p.receipt_timeout?)))
            .collect()
    }

    /// The name of the default provider.
    pub fn default_name(&self) -> &str {
        &self.default
    }
}
