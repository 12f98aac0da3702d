//! The `simulator` provider: deterministic by number, so that tests and demos can rely on it
//! (API.md, "The simulator provider").

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{Accepted, OutgoingSms, ProviderError, SmsProvider};

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
