//! The `simulator` provider: deterministic by number, so that tests and demos can rely on it
//! (docs/api.md, "The simulator provider").

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;

use super::kinds::{self, Build, BuildError, Configured, SettingError};
use super::{Accepted, IncomingSink, OutgoingSms, ProviderError, SmsProvider};

/// The name of the built-in simulator provider (also its kind's key).
pub const NAME: &str = "simulator";

/// `providers.simulator.*`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatorSettings {
    /// Simulated latency of each call, in milliseconds.
    pub latency_ms: u64,
    /// Messages per second (token bucket); 0 means unlimited.
    pub rate_limit: u32,
}

impl Build for SimulatorSettings {
    fn build(
        &self,
        _name: &str,
        _incoming: &IncomingSink,
    ) -> Result<Arc<dyn SmsProvider>, BuildError> {
        Ok(Arc::new(Simulator::new(Duration::from_millis(
            self.latency_ms,
        ))))
    }
}

/// The `simulator` kind: one provider, `simulator`, always there.
pub struct Kind;

impl kinds::Kind for Kind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn configure(&self, table: Option<&config::Value>) -> Result<Vec<Configured>, SettingError> {
        let settings: SimulatorSettings = kinds::read("providers.simulator", table)?;
        Ok(vec![Configured {
            name: NAME.into(),
            key: "providers.simulator".into(),
            rate_limit: settings.rate_limit,
            receipt_timeout: None,
            settings: Arc::new(settings),
        }])
    }
}

/// Succeeds, except numbers ending `0001` (permanent failure) and `0002` (transient failure on
/// the first attempt only), after a fixed latency.
pub struct Simulator {
    latency: Duration,
}

impl Simulator {
    /// A simulator answering after `latency`.
    pub fn new(latency: Duration) -> Self {
        Simulator { latency }
    }

    fn answer(sms: &OutgoingSms<'_>) -> Result<Accepted, ProviderError> {
        if sms.phone.ends_with("0001") {
            Err(ProviderError::Permanent("invalid destination".into()))
        } else if sms.phone.ends_with("0002") && sms.attempt <= 1 {
            Err(ProviderError::Transient("simulated gateway hiccup".into()))
        } else {
            Ok(Accepted {
                provider_message_id: None,
                receipt_ids: Vec::new(),
            })
        }
    }
}

impl SmsProvider for Simulator {
    fn send<'a>(
        &'a self,
        sms: &'a OutgoingSms<'a>,
    ) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(async move {
            if !self.latency.is_zero() {
                tokio::time::sleep(self.latency).await;
            }
            Self::answer(sms)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sms(phone: &str, attempt: i32) -> OutgoingSms<'_> {
        OutgoingSms {
            message_id: 1,
            phone,
            body: "hi",
            attempt,
        }
    }

    #[tokio::test]
    async fn answers_by_number() {
        let sim = Simulator::new(Duration::ZERO);
        assert!(sim.send(&sms("+8613800001234", 1)).await.is_ok());
        let err = sim
            .send(&sms("+8613800000001", 1))
            .await
            .expect_err("0001 fails");
        assert!(!err.is_transient());
        assert_eq!(err.to_string(), "invalid destination");
        let err = sim
            .send(&sms("+8613800000002", 1))
            .await
            .expect_err("0002 fails once");
        assert!(err.is_transient());
        assert!(sim.send(&sms("+8613800000002", 2)).await.is_ok());
    }
}
