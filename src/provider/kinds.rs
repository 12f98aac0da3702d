//! What a provider kind is: it reads and checks its own table of the configuration
//! (`providers.<kind>`) into the providers it configures, and their settings build them. The
//! kinds are listed in `registry.rs`.

use std::fmt;
use std::sync::Arc;

use super::{IncomingSink, SmsProvider};

/// A kind of provider.
pub trait Kind: Sync {
    /// Its key under `providers.`.
    fn name(&self) -> &'static str;
    /// Reads and checks its table (`None` when the configuration has none) into the providers it
    /// configures.
    fn configure(&self, table: Option<&config::Value>) -> Result<Vec<Configured>, SettingError>;
}

/// One provider as configured, checked, not yet built.
#[derive(Debug)]
pub struct Configured {
    /// The name batches select it by.
    pub name: String,
    /// Its configuration key, for errors (`providers.http.gw`).
    pub key: String,
    /// Its rate limit a second, in what `SmsProvider::cost` counts (messages, or SMPP's
    /// segments); 0 means unlimited.
    pub rate_limit: u32,
    /// How long after its submit a message's receipt still counts (`receipt_timeout_ms`);
    /// `None`: always.
    pub receipt_timeout: Option<std::time::Duration>,
    /// Its settings, which build it.
    pub settings: Arc<dyn Build>,
}

/// Settings that build a provider. `Debug` never shows a secret.
pub trait Build: fmt::Debug + Send + Sync {
    /// The provider `name`, from these (checked) settings.
    /// What it receives from the network (receipts, inbound messages) goes to `incoming`.
    fn build(
        &self,
        name: &str,
        incoming: &IncomingSink,
    ) -> Result<Arc<dyn SmsProvider>, BuildError>;
}

/// A setting out of range, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}`: {reason}")]
pub struct SettingError {
    /// The key, e.g. `providers.http.gw.url`.
    pub key: String,
    /// Why it is refused.
    pub reason: String,
}

impl SettingError {
    /// A refusal of `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        SettingError {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Why a provider could not be built from its settings.
#[derive(Debug, thiserror::Error)]
#[error("provider `{name}`: {reason}")]
pub struct BuildError {
    /// The provider.
    pub name: String,
    /// What failed.
    pub reason: String,
}

impl From<SettingError> for BuildError {
    fn from(e: SettingError) -> Self {
        BuildError {
            name: e.key,
            reason: e.reason,
        }
    }
}

/// Reads a kind's table (or part of one) as its settings type, naming `key` when it cannot.
pub fn read<T: serde::de::DeserializeOwned + Default>(
    key: &str,
    table: Option<&config::Value>,
) -> Result<T, SettingError> {
    match table {
        None => Ok(T::default()),
        Some(value) => value
            .clone()
            .try_deserialize()
            .map_err(|e| SettingError::new(key, e.to_string())),
    }
}
