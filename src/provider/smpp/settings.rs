//! `providers.smpp.<name>.*`: the settings of one SMPP 3.4 account, their checks, and the kind
//! that reads them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::SmppProvider;
use super::pdu::Address;
use crate::provider::kinds::{self, Build, BuildError, Configured, SettingError};
use crate::provider::{IncomingSink, SmsProvider};
use crate::secret::Secret;

/// How receipt ids compare with the ids of `submit_sm_resp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MessageIdFormat {
    /// The same text, case and leading zeros ignored.
    #[default]
    Text,
    /// Hex in `submit_sm_resp`, decimal in receipts.
    HexDecimal,
    /// Decimal in `submit_sm_resp`, hex in receipts.
    DecimalHex,
}

/// `providers.smpp.<name>.*`: one SMPP account (`src/provider/smpp/`).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmppProviderSettings {
    /// The SMSC's host.
    pub host: String,
    /// The SMSC's port.
    pub port: u16,
    /// Bind credentials: the account.
    pub system_id: String,
    /// Bind credentials: its password, a secret.
    pub password: Secret,
    /// Bind credentials: the system type, often empty.
    pub system_type: String,
    /// Transceiver sessions this instance opens to the account.
    pub binds: usize,
    /// `submit_sm` awaiting their response, at most, per session.
    pub window: usize,
    /// The sender: a number or an alphanumeric name.
    pub source_addr: String,
    /// The sender's type of number: 5 (alphanumeric) or 1 (international) by default.
    pub source_addr_ton: Option<u8>,
    /// The sender's numbering plan: 0 (unknown) for a name, 1 (E.164) by default.
    pub source_addr_npi: Option<u8>,
    /// Segments per second for the account; 0 means none.
    pub rate_limit: u32,
    /// Keep-alive period, in milliseconds.
    pub enquire_link_ms: u64,
    /// How long a PDU's answer may take, in milliseconds.
    pub response_timeout_ms: u64,
    /// The first reconnect delay, in milliseconds; it doubles up to a minute.
    pub reconnect_ms: u64,
    /// How receipt ids compare with submit ids.
    pub message_id_format: MessageIdFormat,
    /// How long a `sent` message waits for its receipt, in milliseconds.
    pub receipt_timeout_ms: u64,
}

impl Default for SmppProviderSettings {
    fn default() -> Self {
        Self {
            host: String::new(),
            port: 2775,
            system_id: String::new(),
            password: Secret::default(),
            system_type: String::new(),
            binds: 1,
            window: 10,
            source_addr: String::new(),
            source_addr_ton: None,
            source_addr_npi: None,
            rate_limit: 0,
            enquire_link_ms: 30_000,
            response_timeout_ms: 10_000,
            reconnect_ms: 1_000,
            message_id_format: MessageIdFormat::Text,
            receipt_timeout_ms: 172_800_000,
        }
    }
}

impl fmt::Debug for SmppProviderSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmppProviderSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("system_id", &self.system_id)
            .field("password", &self.password)
            .field("system_type", &self.system_type)
            .field("binds", &self.binds)
            .field("window", &self.window)
            .field("source_addr", &self.source_addr)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

impl SmppProviderSettings {
    /// Checks the settings of the account configured at `key` (`providers.smpp.<name>`).
    pub fn check(&self, key: &str) -> Result<(), SettingError> {
        let invalid =
            |field: &str, reason: &str| SettingError::new(format!("{key}.{field}"), reason);
        if self.host.is_empty() {
            return Err(invalid("host", "must be set"));
        }
        if self.port == 0 {
            return Err(invalid("port", "must be a TCP port, 1 to 65535"));
        }
        // SMPP 3.4's field sizes, NUL included: system_id 16, password 9, system_type 13.
        for (field, value, max) in [
            ("system_id", self.system_id.as_str(), 15),
            ("password", self.password.expose(), 8),
            ("system_type", self.system_type.as_str(), 12),
        ] {
            if value.len() > max {
                return Err(invalid(field, &format!("at most {max} bytes in SMPP 3.4")));
            }
        }
        if self.system_id.is_empty() {
            return Err(invalid("system_id", "must be set"));
        }
        if self.password.is_empty() {
            return Err(invalid("password", "must be set"));
        }
        if self.source_addr.is_empty() {
            return Err(invalid("source_addr", "must be set"));
        }
        if self.source_addr.len() > 20 {
            return Err(invalid("source_addr", "at most 20 bytes in SMPP 3.4"));
        }
        if self.binds == 0 || self.binds > 64 {
            return Err(invalid("binds", "must be 1 to 64"));
        }
        if self.window == 0 || self.window > 1024 {
            return Err(invalid("window", "must be 1 to 1024"));
        }
        for (field, value) in [
            ("enquire_link_ms", self.enquire_link_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("reconnect_ms", self.reconnect_ms),
            ("receipt_timeout_ms", self.receipt_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The sender with its type of number and numbering plan: an alphanumeric name is TON 5,
    /// NPI 0; a number is international, E.164, without its `+`.
    pub fn source(&self) -> Address {
        let digits = self
            .source_addr
            .strip_prefix('+')
            .unwrap_or(&self.source_addr);
        let numeric = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
        let addr = if numeric { digits } else { &self.source_addr };
        Address {
            ton: self.source_addr_ton.unwrap_or(if numeric { 1 } else { 5 }),
            npi: self.source_addr_npi.unwrap_or(if numeric { 1 } else { 0 }),
            addr: addr.to_owned(),
        }
    }

    /// `response_timeout_ms`.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
}

impl Build for SmppProviderSettings {
    fn build(
        &self,
        name: &str,
        incoming: &IncomingSink,
    ) -> Result<Arc<dyn SmsProvider>, BuildError> {
        Ok(Arc::new(SmppProvider::start(name, self, incoming.clone())?))
    }
}

/// The `smpp` kind: accounts by name under `providers.smpp`, none by default.
pub struct Kind;

impl kinds::Kind for Kind {
    fn name(&self) -> &'static str {
        "smpp"
    }

    fn configure(&self, table: Option<&config::Value>) -> Result<Vec<Configured>, SettingError> {
        let tables: BTreeMap<String, config::Value> = kinds::read("providers.smpp", table)?;
        let mut accounts = Vec::new();
        for (name, table) in tables {
            let key = format!("providers.smpp.{name}");
            let settings: SmppProviderSettings = kinds::read(&key, Some(&table))?;
            settings.check(&key)?;
            accounts.push(Configured {
                key,
                name,
                // Segments, not messages: `SmppProvider::cost` counts a message's parts.
                rate_limit: settings.rate_limit,
                receipt_timeout: Some(std::time::Duration::from_millis(
                    settings.receipt_timeout_ms,
                )),
                settings: Arc::new(settings),
            });
        }
        Ok(accounts)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    fn account() -> SmppProviderSettings {
        SmppProviderSettings {
            host: "127.0.0.1".into(),
            system_id: "esme".into(),
            password: Secret::new("pw"),
            source_addr: "Shop".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_account_passes_and_each_missing_key_is_named() {
        account().check("providers.smpp.a").unwrap();
        type Change = fn(&mut SmppProviderSettings);
        let cases: [(&str, Change); 6] = [
            ("host", |s| s.host.clear()),
            ("system_id", |s| s.system_id.clear()),
            ("password", |s| s.password = Secret::default()),
            ("source_addr", |s| s.source_addr.clear()),
            ("window", |s| s.window = 0),
            ("password", |s| s.password = Secret::new("ninebytes")),
        ];
        for (field, change) in cases {
            let mut settings = account();
            change(&mut settings);
            let e = settings.check("providers.smpp.a").unwrap_err();
            assert_eq!(e.key, format!("providers.smpp.a.{field}"));
        }
    }

    #[test]
    fn the_sender_type_follows_its_form() {
        let mut s = account();
        assert_eq!((s.source().ton, s.source().npi), (5, 0));
        s.source_addr = "+4479460000".into();
        assert_eq!(
            s.source(),
            Address {
                ton: 1,
                npi: 1,
                addr: "4479460000".into()
            }
        );
        s.source_addr_ton = Some(2);
        assert_eq!(s.source().ton, 2);
    }

    #[test]
    fn the_password_never_shows() {
        let shown = format!("{:?}", account());
        assert!(!shown.contains("pw\""), "{shown}");
    }
}
