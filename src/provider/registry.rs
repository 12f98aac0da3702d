//! The registry of provider kinds: `KINDS` lists them, and `configure` reads every provider the
//! configuration names. A new kind is a folder under `src/provider/` and one line in `KINDS`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;

use super::kinds::{Configured, Kind, SettingError};
use super::{http, simulator, smpp};

/// Every provider kind, by its key under `providers.`.
pub static KINDS: &[&dyn Kind] = &[&simulator::Kind, &http::Kind, &smpp::Kind];

/// `providers.*`: the default provider and each kind's table, read by its kind.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct ProviderSettings {
    /// The provider of batches that do not name one.
    pub default: String,
    /// The kinds' tables by kind, as configured (`providers.simulator`, `providers.http`).
    #[serde(flatten)]
    pub kinds: BTreeMap<String, config::Value>,
}

impl Default for ProviderSettings {
    fn default() -> Self {
        Self {
            default: simulator::NAME.into(),
            kinds: BTreeMap::new(),
        }
    }
}

impl fmt::Debug for ProviderSettings {
    /// The checked settings of each provider (which hide their secrets), never the raw tables.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("ProviderSettings");
        out.field("default", &self.default);
        match configure(self) {
            Ok(configured) => {
                for provider in &configured {
                    out.field(&provider.key, &provider.settings);
                }
            }
            Err(e) => {
                out.field("invalid", &e.key);
            }
        }
        out.finish()
    }
}

/// Every configured provider, checked: known kinds only, names of lower-case letters, digits,
/// `_` and `-`, no name twice, and a default that names one of them.
pub fn configure(settings: &ProviderSettings) -> Result<Vec<Configured>, SettingError> {
    if let Some(unknown) = settings
        .kinds
        .keys()
        .find(|k| !KINDS.iter().any(|kind| kind.name() == k.as_str()))
    {
        let known: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
        return Err(SettingError::new(
            format!("providers.{unknown}"),
            format!("unknown provider kind (known: {})", known.join(", ")),
        ));
    }
    let mut all = Vec::new();
    let mut names = HashSet::new();
    for kind in KINDS {
        for provider in kind.configure(settings.kinds.get(kind.name()))? {
            if !is_provider_name(&provider.name) {
                return Err(SettingError::new(
                    provider.key,
                    "a provider name is lower-case letters, digits, `_` and `-`",
                ));
            }
            if !names.insert(provider.name.clone()) {
                return Err(SettingError::new(
                    provider.key,
                    format!("the name of another provider (`{}`)", provider.name),
                ));
            }
            all.push(provider);
        }
    }
    if !names.contains(&settings.default) {
        return Err(SettingError::new(
            "providers.default",
            format!("unknown provider `{}`", settings.default),
        ));
    }
    Ok(all)
}

/// Lower-case letters, digits, `_` and `-`: names that environment variables can reach.
fn is_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
