//! `providers.http.<name>.*`: the settings of one JSON-over-HTTP gateway, their checks, and the
//! kind that reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use super::{HttpProvider, IDEMPOTENCY_KEY};
use crate::provider::kinds::{self, Build, BuildError, Configured, SettingError};
use crate::provider::{IncomingSink, SmsProvider};
use crate::secret::{Secret, redact_http_url};

/// `providers.http.<name>.*`: one JSON-over-HTTP gateway (`src/provider/http/`).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpProviderSettings {
    /// The `http://` or `https://` URL every message is POSTed to. A secret: gateways often
    /// take a key in the query string.
    pub url: Secret,
    /// Headers sent with every request (e.g. `Authorization`); their values are secrets.
    pub headers: BTreeMap<String, Secret>,
    /// Timeout of one request, connection included, in milliseconds.
    pub timeout_ms: u64,
    /// Field of a 2xx JSON answer that holds the gateway's message id: a top-level field name,
    /// or a JSON pointer such as `/data/message_id`.
    pub id_field: String,
    /// Messages per second (token bucket); 0 means unlimited.
    pub rate_limit: u32,
    /// The bearer token the gateway's receipts and inbound messages are posted with
    /// (`/v1/providers/<name>/receipts`, `/inbound`); while empty those routes are closed and
    /// no receipt is expected.
    pub webhook_token: Secret,
}

impl Default for HttpProviderSettings {
    fn default() -> Self {
        Self {
            url: Secret::default(),
            headers: BTreeMap::new(),
            timeout_ms: 5000,
            id_field: "id".into(),
            rate_limit: 0,
            webhook_token: Secret::default(),
        }
    }
}

impl fmt::Debug for HttpProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpProviderSettings")
            .field("url", &redact_http_url(self.url.expose()))
            .field("headers", &self.headers)
            .field("timeout_ms", &self.timeout_ms)
            .field("id_field", &self.id_field)
            .field("rate_limit", &self.rate_limit)
            .field("webhook_token", &self.webhook_token)
            .finish()
    }
}

impl HttpProviderSettings {
    /// Checks the settings of the gateway configured at `key` (`providers.http.<name>`).
    pub fn check(&self, key: &str) -> Result<(), SettingError> {
        let invalid =
            |field: &str, reason: String| SettingError::new(format!("{key}{field}"), reason);
        let url = self.url.expose();
        if url.is_empty() {
            return Err(invalid(".url", "must be set".into()));
        }
        match reqwest::Url::parse(url) {
            Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
            Ok(_) => {
                return Err(invalid(
                    ".url",
                    format!(
                        "`{}` is not an http:// or https:// URL",
                        redact_http_url(url)
                    ),
                ));
            }
            Err(e) => {
                return Err(invalid(
                    ".url",
                    format!("`{}` is not a URL ({e})", redact_http_url(url)),
                ));
            }
        }
        for (header, value) in &self.headers {
            let key = format!(".headers.{header}");
            let parsed = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| invalid(&key, "not a valid header name".into()))?;
            if parsed == IDEMPOTENCY_KEY {
                return Err(invalid(&key, "set by the provider for each message".into()));
            }
            // The value is a secret: the reason never quotes it.
            reqwest::header::HeaderValue::from_str(value.expose())
                .map_err(|_| invalid(&key, "not a valid header value".into()))?;
        }
        if self.timeout_ms == 0 {
            return Err(invalid(".timeout_ms", "must be at least 1".into()));
        }
        if self.id_field.is_empty() {
            return Err(invalid(".id_field", "must not be empty".into()));
        }
        Ok(())
    }
}

impl Build for HttpProviderSettings {
    fn build(
        &self,
        name: &str,
        _incoming: &IncomingSink,
    ) -> Result<Arc<dyn SmsProvider>, BuildError> {
        Ok(Arc::new(HttpProvider::new(name, self)?))
    }
}

/// The `http` kind: gateways by name under `providers.http`, none by default.
pub struct Kind;

impl Kind {
    /// The gateways configured under `providers.http`, each checked.
    pub fn gateways(
        table: Option<&config::Value>,
    ) -> Result<BTreeMap<String, HttpProviderSettings>, SettingError> {
        let tables: BTreeMap<String, config::Value> = kinds::read("providers.http", table)?;
        let mut gateways = BTreeMap::new();
        for (name, table) in tables {
            let key = format!("providers.http.{name}");
            let settings: HttpProviderSettings = kinds::read(&key, Some(&table))?;
            settings.check(&key)?;
            gateways.insert(name, settings);
        }
        Ok(gateways)
    }
}

impl kinds::Kind for Kind {
    fn name(&self) -> &'static str {
        "http"
    }

    fn configure(&self, table: Option<&config::Value>) -> Result<Vec<Configured>, SettingError> {
        Ok(Kind::gateways(table)?
            .into_iter()
            .map(|(name, settings)| Configured {
                key: format!("providers.http.{name}"),
                name,
                rate_limit: settings.rate_limit,
                receipt_timeout: None,
                settings: Arc::new(settings),
            })
            .collect())
    }
}
