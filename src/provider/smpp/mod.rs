//! The `smpp` provider kind: an SMPP 3.4 client (ESME) for one account per name under
//! `providers.smpp.<name>`. It opens `binds` transceiver sessions (`session.rs`), each a task it
//! owns and joins when the service stops; a message goes to the bound session with the most room
//! in its window, as one `submit_sm` per segment (`text.rs`: GSM-7 or UCS-2, concatenated parts
//! behind a UDH), each asking for a receipt. The account's `rate_limit` counts segments: the
//! worker takes a message's parts ([`SmsProvider::cost`]) before it hands the message over.
//!
//! How the SMSC's answers map to the worker's: an error status fails the message with its name
//! and code, except `ESME_RTHROTTLED` and `ESME_RMSGQFUL`, which pause the session and retry
//! later; a submit never written is retried; a submit written whose answer was lost is
//! [`ProviderError::Unknown`], settled by `smsbatch.redelivery` as a crash's would be.

pub mod pdu;
pub mod receipt;
pub mod session;
pub mod settings;
pub mod text;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use self::pdu::{Address, SubmitSm};
use self::session::{Config, State, Submit, Submitted};
use self::text::Parts;
use super::kinds::BuildError;
use super::{
    Accepted, IncomingSink, OutgoingSms, ProviderError, SessionReport, SmsProvider, Unavailable,
};

pub use settings::{Kind, MessageIdFormat, SmppProviderSettings};

/// How long a message waits for a bound session before it is retried later.
const BIND_WAIT: Duration = Duration::from_secs(2);
/// A later part refused for throttling is tried again in place (an earlier part went), this
/// many times.
const PART_RETRIES: usize = 5;

/// One SMPP account's sessions.
pub struct SmppProvider {
    name: String,
    sessions: Vec<mpsc::Sender<Submit>>,
    states: watch::Receiver<Vec<State>>,
    /// Each session's submits written and unanswered.
    in_flight: Vec<Arc<AtomicUsize>>,
    next: AtomicUsize,
    source: Address,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    message_id_format: MessageIdFormat,
}

impl SmppProvider {
    /// Starts the sessions of the account `name` on the current Tokio runtime.
    pub fn start(
        name: &str,
        settings: &SmppProviderSettings,
        incoming: IncomingSink,
    ) -> Result<Self, BuildError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| BuildError {
            name: name.to_owned(),
            reason: "an SMPP provider starts inside the service's runtime".into(),
        })?;
        let config = Arc::new(Config {
            provider: name.to_owned(),
            host: settings.host.clone(),
            port: settings.port,
            system_id: settings.system_id.clone(),
            password: settings.password.expose().to_owned(),
            system_type: settings.system_type.clone(),
            window: settings.window,
            enquire_link: Duration::from_millis(settings.enquire_link_ms),
            response_timeout: settings.response_timeout(),
            reconnect: Duration::from_millis(settings.reconnect_ms),
            message_id_format: settings.message_id_format,
            incoming,
        });
        let (states_tx, states) = watch::channel(vec![State::Connecting; settings.binds]);
        let (stop, stop_rx) = watch::channel(false);
        let mut sessions = Vec::with_capacity(settings.binds);
        let mut tasks = Vec::with_capacity(settings.binds);
        let in_flight: Vec<Arc<AtomicUsize>> =
            (0..settings.binds).map(|_| Arc::default()).collect();
        for (index, in_flight) in in_flight.iter().enumerate() {
            // A session holds `window` submits written and as many queued: no more wait in it.
            let (tx, rx) = mpsc::channel(settings.window);
            sessions.push(tx);
            tasks.push(runtime.spawn(session::run(
                config.clone(),
                index,
                rx,
                states_tx.clone(),
                in_flight.clone(),
                stop_rx.clone(),
            )));
        }
        Ok(SmppProvider {
            name: name.to_owned(),
            sessions,
            states,
            in_flight,
            next: AtomicUsize::new(0),
            source: settings.source(),
            stop,
            tasks: Mutex::new(tasks),
            message_id_format: settings.message_id_format,
        })
    }

    /// A bound session, the one with the most room in its window (round robin among equals),
    /// after waiting a moment for one when none is bound.
    async fn pick(&self) -> Result<usize, ProviderError> {
        let mut states = self.states.clone();
        let bound = |all: &Vec<State>| all.contains(&State::Bound);
        if tokio::time::timeout(BIND_WAIT, states.wait_for(bound))
            .await
            .is_err()
        {
            return Err(ProviderError::Unavailable(format!(
                "no SMPP session of `{}` bound: {}",
                self.name,
                self.why_unbound()
            )));
        }
        let all = self.states.borrow();
        let n = all.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .filter(|&i| all[i] == State::Bound)
            .min_by_key(|&i| std::cmp::Reverse(self.sessions[i].capacity()))
            .ok_or_else(|| {
                ProviderError::Transient(format!("no SMPP session of `{}` bound", self.name))
            })
    }

    /// Why no session is bound: the first session's state.
    fn why_unbound(&self) -> String {
        match self.states.borrow().first().map(State::report) {
            Some(("refused", Some(status))) => format!("bind refused: {status}"),
            Some(("down", Some(why))) => why.to_owned(),
            Some(("closed", _)) => "the service is stopping".into(),
            _ => "connecting".into(),
        }
    }

    /// One part through `session`.
    async fn submit(&self, session: usize, pdu: SubmitSm) -> Submitted {
        let (reply, answer) = oneshot::channel();
        if self.sessions[session]
            .send(Submit { pdu, reply })
            .await
            .is_err()
        {
            return Submitted::NotSent("the session has stopped".into());
        }
        // The session answers every submit it took; a dropped answer means it ended abruptly,
        // perhaps after writing it.
        answer
            .await
            .unwrap_or_else(|_| Submitted::Unknown("the session ended".into()))
    }

    async fn send_message(&self, sms: &OutgoingSms<'_>) -> Result<Accepted, ProviderError> {
        let parts = Parts::of(sms.body);
        // The concatenation reference only has to differ between messages in flight to one
        // handset: the message id's low byte does.
        let messages = parts.messages((sms.message_id & 0xFF) as u8);
        let total = messages.len();
        let destination = Address {
            ton: 1,
            npi: 1,
            addr: sms.phone.trim_start_matches('+').to_owned(),
        };
        let session = self.pick().await?;
        let mut first_id = None;
        let mut receipt_ids = Vec::with_capacity(total);
        for (index, (esm_class, short_message)) in messages.into_iter().enumerate() {
            let pdu = SubmitSm {
                source: self.source.clone(),
                destination: destination.clone(),
                esm_class,
                registered_delivery: 1,
                data_coding: parts.data_coding,
                short_message,
            };
            let part = || {
                if total > 1 {
                    format!(" (part {} of {total})", index + 1)
                } else {
                    String::new()
                }
            };
            let mut tries = 0;
            let outcome = loop {
                let outcome = self.submit(session, pdu.clone()).await;
                match outcome {
                    Submitted::Refused(status)
                        if index > 0 && session::is_throttling(status) && tries < PART_RETRIES =>
                    {
                        // The session pauses itself; this part waits in its queue meanwhile.
                        tries += 1;
                    }
                    other => break other,
                }
            };
            match outcome {
                Submitted::Accepted(id) => {
                    if !id.is_empty() {
                        receipt_ids.push(receipt::canonical_id(
                            self.message_id_format,
                            receipt::Side::Submit,
                            &id,
                        ));
                    }
                    if index == 0 {
                        first_id = Some(id);
                    }
                }
                Submitted::Refused(status) if index == 0 && session::is_throttling(status) => {
                    return Err(ProviderError::Transient(pdu::status_name(status)));
                }
                Submitted::Refused(status) => {
                    return Err(ProviderError::Permanent(format!(
                        "{}{}",
                        pdu::status_name(status),
                        part()
                    )));
                }
                Submitted::NotSent(why) if index == 0 => {
                    return Err(ProviderError::Transient(why));
                }
                // An earlier part went: sending the message again would repeat it.
                Submitted::NotSent(why) | Submitted::Unknown(why) => {
                    return Err(ProviderError::Unknown(format!("{why}{}", part())));
                }
            }
        }
        Ok(Accepted {
            provider_message_id: first_id.filter(|id| !id.is_empty()),
            receipt_ids,
        })
    }
}

impl SmsProvider for SmppProvider {
    fn send<'a>(
        &'a self,
        sms: &'a OutgoingSms<'a>,
    ) -> BoxFuture<'a, Result<Accepted, ProviderError>> {
        Box::pin(self.send_message(sms))
    }

    fn unavailable(&self) -> Option<Unavailable> {
        let states = self.states.borrow();
        if states
            .iter()
            .any(|s| matches!(s, State::Bound | State::Connecting))
        {
            return None;
        }
        let refused = states.iter().find_map(|s| match s {
            State::Refused(status) => Some(status.clone()),
            _ => None,
        });
        let down = states.iter().find_map(|s| match s {
            State::Down(why) => Some(why.clone()),
            _ => None,
        });
        match (refused, down) {
            (Some(status), _) => Some(Unavailable {
                reason: "BindRefused",
                message: format!("the SMSC refuses to bind `{}`: {status}", self.name),
            }),
            (None, Some(why)) => Some(Unavailable {
                reason: "SessionsDown",
                message: format!("no SMPP session of `{}` is up: {why}", self.name),
            }),
            // Closed: the service is stopping, and the batch's gate with it.
            (None, None) => None,
        }
    }

    fn available(&self) -> BoxFuture<'_, ()> {
        let mut states = self.states.clone();
        Box::pin(async move {
            // The sender lives as long as the provider: an error means it is gone, and then
            // there is nothing to wait for.
            let _ = states.wait_for(|all| all.contains(&State::Bound)).await;
        })
    }

    fn cost(&self, sms: &OutgoingSms<'_>) -> u32 {
        crate::domain::sms::analyze(sms.body).segments
    }

    fn sessions(&self) -> Vec<SessionReport> {
        let states = self.states.borrow();
        states
            .iter()
            .zip(&self.in_flight)
            .map(|(state, in_flight)| {
                let (state, reason) = state.report();
                SessionReport {
                    state,
                    reason: reason.map(str::to_owned),
                    in_flight: in_flight.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        Box::pin(async move {
            for task in tasks {
                let _ = task.await;
            }
        })
    }
}

impl Drop for SmppProvider {
    fn drop(&mut self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }
}
