//! One SMPP transceiver session, as a task the provider owns: connect, bind, then submit what
//! the provider hands it with at most `window` submits unanswered, keep the link alive with
//! `enquire_link`, answer the SMSC's own requests, and when the link is lost, reconnect with a
//! doubling delay. Every submit gets exactly one answer: accepted, refused, never written (safe
//! to try again), or written with its answer lost (the SMSC may have it).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;

use super::pdu::{self, DeliverSm, Frame, SubmitSm};
use super::receipt::{self, Delivered};
use super::settings::MessageIdFormat;
use crate::provider::{Delivery, Incoming, IncomingSink};

/// The reconnect delay doubles up to this.
const MAX_RECONNECT: Duration = Duration::from_secs(60);
/// The first pause after `ESME_RTHROTTLED` or `ESME_RMSGQFUL`; it doubles while they go on.
const FIRST_THROTTLE: Duration = Duration::from_millis(100);
/// The longest pause for throttling.
const MAX_THROTTLE: Duration = Duration::from_secs(5);
/// `deliver_sm` taken and not yet answered (their store pending), at most, per session: past
/// this the session reads nothing more until answers go out.
const MAX_UNACKED: usize = 1000;

/// What became of one `submit_sm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// Taken, with the SMSC's message id (empty if it gave none).
    Accepted(String),
    /// Refused with this command status (throttling included).
    Refused(u32),
    /// Never written to the SMSC: another attempt cannot deliver it twice.
    NotSent(String),
    /// Written, and its answer lost: the SMSC may have taken it.
    Unknown(String),
}

/// A `submit_sm` to write, and where its answer goes.
pub struct Submit {
    /// The PDU, numbered by the session.
    pub pdu: SubmitSm,
    /// The answer.
    pub reply: oneshot::Sender<Submitted>,
}

/// A session's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Connecting or binding.
    Connecting,
    /// Bound: submits go.
    Bound,
    /// The SMSC refused the bind with this status; it is asked again after the delay.
    Refused(String),
    /// The link is down for this reason; it is connected again after the delay.
    Down(String),
    /// Unbound for good (the service is stopping).
    Closed,
}

impl State {
    /// Its name in `SessionReport::STATES`, and why it is refused or down.
    pub fn report(&self) -> (&'static str, Option<&str>) {
        match self {
            State::Connecting => ("connecting", None),
            State::Bound => ("bound", None),
            State::Refused(why) => ("refused", Some(why)),
            State::Down(why) => ("down", Some(why)),
            State::Closed => ("closed", None),
        }
    }
}

/// What a session needs to connect and bind.
#[derive(Debug)]
pub struct Config {
    /// The provider, for logs.
    pub provider: String,
    /// The SMSC's host and port.
    pub host: String,
    /// The SMSC's port.
    pub port: u16,
    /// Bind credentials.
    pub system_id: String,
    /// Bind credentials.
    pub password: String,
    /// Bind credentials.
    pub system_type: String,
    /// Submits unanswered, at most.
    pub window: usize,
    /// Keep-alive period.
    pub enquire_link: Duration,
    /// How long any answer may take.
    pub response_timeout: Duration,
    /// The first reconnect delay.
    pub reconnect: Duration,
    /// How receipt ids compare with submit ids.
    pub message_id_format: MessageIdFormat,
    /// Where receipts and inbound messages go to be stored.
    pub incoming: IncomingSink,
}

/// The session task: runs until `stop` turns true (or its provider is dropped), then unbinds.
pub async fn run(
    config: Arc<Config>,
    index: usize,
    mut requests: mpsc::Receiver<Submit>,
    states: watch::Sender<Vec<State>>,
    in_flight: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) {
    let set = |state: State| states.send_modify(|all| all[index] = state);
    let mut delay = config.reconnect;
    // `connecting` only at first: a session refused or down says so until it binds again.
    set(State::Connecting);
    while !*stop.borrow() {
        let why = match connect(&config).await {
            Ok((stream, buf)) => {
                set(State::Bound);
                tracing::info!(provider = %config.provider, session = index, "SMPP session bound.");
                delay = config.reconnect;
                match Link::new(&config, stream, buf, in_flight.clone())
                    .serve(&mut requests, &mut stop)
                    .await
                {
                    Ok(()) => break,
                    Err(why) => {
                        set(State::Down(why.clone()));
                        why
                    }
                }
            }
            Err(BindFailure::Refused(status)) => {
                let why = pdu::status_name(status);
                set(State::Refused(why.clone()));
                format!("bind refused: {why}")
            }
            Err(BindFailure::Down(why)) => {
                set(State::Down(why.clone()));
                why
            }
        };
        tracing::warn!(provider = %config.provider, session = index, reason = %why, retry_in_ms = delay.as_millis() as u64, "SMPP session down.");
        // Whatever is queued cannot go now: say so at once, and again while waiting.
        refuse_queued(&mut requests, &why);
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = sleep_until(until) => break,
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
                Some(submit) = requests.recv() => {
                    let _ = submit.reply.send(Submitted::NotSent(why.clone()));
                }
            }
        }
        delay = (delay * 2).min(MAX_RECONNECT);
    }
    refuse_queued(&mut requests, "the service is stopping");
    set(State::Closed);
}

/// Answers every queued submit: not sent, for `why`.
fn refuse_queued(requests: &mut mpsc::Receiver<Submit>, why: &str) {
    while let Ok(submit) = requests.try_recv() {
        let _ = submit.reply.send(Submitted::NotSent(why.to_owned()));
    }
}

/// Why a bind did not happen.
enum BindFailure {
    /// The SMSC answered with an error status.
    Refused(u32),
    /// No connection, or no answer.
    Down(String),
}

/// Connects and binds as a transceiver; gives back the stream and any bytes read past the
/// bind's answer.
async fn connect(config: &Config) -> Result<(TcpStream, BytesMut), BindFailure> {
    let deadline = Instant::now() + config.response_timeout;
    let address = (config.host.as_str(), config.port);
    let mut stream = match timeout_at(deadline, TcpStream::connect(address)).await {
        Err(_) => return Err(BindFailure::Down("connecting timed out".into())),
        Ok(Err(e)) => return Err(BindFailure::Down(format!("connecting: {e}"))),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let bind = pdu::bind_transceiver(1, &config.system_id, &config.password, &config.system_type);
    match timeout_at(deadline, stream.write_all(&bind)).await {
        Err(_) => return Err(BindFailure::Down("writing the bind timed out".into())),
        Ok(Err(e)) => return Err(BindFailure::Down(format!("writing the bind: {e}"))),
        Ok(Ok(())) => {}
    }
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match pdu::take_frame(&mut buf) {
            Err(e) => return Err(BindFailure::Down(format!("bind answer: {e}"))),
            Ok(Some(frame)) => {
                let h = frame.header;
                if h.command == pdu::BIND_TRANSCEIVER | pdu::RESPONSE
                    || h.command == pdu::GENERIC_NACK
                {
                    return if h.status == pdu::ROK && h.command != pdu::GENERIC_NACK {
                        Ok((stream, buf))
                    } else {
                        Err(BindFailure::Refused(h.status))
                    };
                }
                // Anything before the bind's answer is not for us yet.
                continue;
            }
            Ok(None) => {}
        }
        match timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => return Err(BindFailure::Down("no answer to the bind".into())),
            Ok(Err(e)) => return Err(BindFailure::Down(format!("reading the bind answer: {e}"))),
            Ok(Ok(0)) => return Err(BindFailure::Down("the SMSC closed the connection".into())),
            Ok(Ok(_)) => {}
        }
    }
}

/// A submit written and not yet answered.
struct Pending {
    reply: oneshot::Sender<Submitted>,
    deadline: Instant,
}

/// A bound link.
struct Link<'a> {
    config: &'a Config,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: BytesMut,
    sequence: u32,
    pending: HashMap<u32, Pending>,
    /// The `enquire_link` awaiting its answer, and by when.
    link_check: Option<Instant>,
    /// While throttled, no submit is written before this.
    paused_until: Option<Instant>,
    throttle: Duration,
    unbound: bool,
    /// `pending.len()`, for the metrics.
    in_flight: Arc<AtomicUsize>,
    /// `deliver_sm` handed to the desk: each gives its sequence number and whether it was
    /// stored, and is answered then.
    acks: FuturesUnordered<BoxFuture<'static, (u32, bool)>>,
}

impl<'a> Link<'a> {
    fn new(
        config: &'a Config,
        stream: TcpStream,
        buf: BytesMut,
        in_flight: Arc<AtomicUsize>,
    ) -> Self {
        let (reader, writer) = stream.into_split();
        Link {
            config,
            reader,
            writer,
            buf,
            sequence: 1,
            pending: HashMap::with_capacity(config.window),
            link_check: None,
            paused_until: None,
            throttle: FIRST_THROTTLE,
            unbound: false,
            in_flight,
            acks: FuturesUnordered::new(),
        }
    }

    /// Serves until the link is lost (`Err` with why) or `stop` turns true (`Ok`, unbound).
    /// Submits written and unanswered when the link is lost are answered `Unknown`.
    async fn serve(
        mut self,
        requests: &mut mpsc::Receiver<Submit>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let period = self.config.enquire_link;
        let mut keepalive = tokio::time::interval_at(Instant::now() + period, period);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            self.in_flight.store(self.pending.len(), Ordering::Relaxed);
            if self.paused_until.is_some_and(|t| t <= Instant::now()) {
                self.paused_until = None;
            }
            let deadline = self
                .pending
                .values()
                .map(|p| p.deadline)
                .chain(self.link_check)
                .min();
            let accepting = self.pending.len() < self.config.window && self.paused_until.is_none();
            let resume = self.paused_until;
            let reading = self.acks.len() < MAX_UNACKED;
            let step = tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break self.close().await;
                    }
                    Ok(())
                }
                read = self.reader.read_buf(&mut self.buf), if reading => match read {
                    Ok(0) => Err("the SMSC closed the connection".to_owned()),
                    Err(e) => Err(format!("reading: {e}")),
                    Ok(_) => self.handle_frames().await,
                },
                Some((sequence, stored)) = self.acks.next(), if !self.acks.is_empty() => {
                    self.acknowledge(sequence, stored).await
                }
                Some(submit) = requests.recv(), if accepting => self.submit(submit).await,
                _ = keepalive.tick() => self.enquire_link().await,
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    Err(format!("no answer within {} ms", self.config.response_timeout.as_millis()))
                }
                _ = sleep_until(resume.unwrap_or_else(Instant::now)), if resume.is_some() => Ok(()),
            };
            if let Err(why) = step {
                break Err(why);
            }
        };
        let why = match &result {
            Ok(()) => "the session closed".to_owned(),
            Err(why) => why.clone(),
        };
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send(Submitted::Unknown(why.clone()));
        }
        self.in_flight.store(0, Ordering::Relaxed);
        result
    }

    fn next_sequence(&mut self) -> u32 {
        // 1 to 0x7FFFFFFF, as SMPP 3.4 allows.
        self.sequence = if self.sequence >= 0x7FFF_FFFF {
            1
        } else {
            self.sequence + 1
        };
        self.sequence
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        match timeout(self.config.response_timeout, self.writer.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("writing: {e}")),
            Err(_) => Err("writing timed out".into()),
        }
    }

    async fn submit(&mut self, submit: Submit) -> Result<(), String> {
        if submit.reply.is_closed() {
            // Its sender gave up before it was written: it must not go now.
            return Ok(());
        }
        let sequence = self.next_sequence();
        let bytes = submit.pdu.encode(sequence);
        if let Err(why) = self.write(&bytes).await {
            let _ = submit.reply.send(Submitted::Unknown(why.clone()));
            return Err(why);
        }
        self.pending.insert(
            sequence,
            Pending {
                reply: submit.reply,
                deadline: Instant::now() + self.config.response_timeout,
            },
        );
        Ok(())
    }

    async fn enquire_link(&mut self) -> Result<(), String> {
        if self.link_check.is_some() {
            return Ok(());
        }
        let sequence = self.next_sequence();
        self.write(&pdu::bare(pdu::ENQUIRE_LINK, sequence)).await?;
        self.link_check = Some(Instant::now() + self.config.response_timeout);
        Ok(())
    }

    /// Handles every whole PDU in the buffer.
    async fn handle_frames(&mut self) -> Result<(), String> {
        loop {
            match pdu::take_frame(&mut self.buf) {
                Ok(Some(frame)) => self.handle(frame).await?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("unreadable PDU: {e}")),
            }
        }
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), String> {
        let h = frame.header;
        match h.command {
            c if c == pdu::SUBMIT_SM | pdu::RESPONSE => {
                if let Some(pending) = self.pending.remove(&h.sequence) {
                    let outcome = if h.status == pdu::ROK {
                        self.throttle = FIRST_THROTTLE;
                        Submitted::Accepted(pdu::submit_sm_resp_id(&frame.body).unwrap_or_default())
                    } else {
                        if is_throttling(h.status) {
                            self.slow_down();
                        }
                        Submitted::Refused(h.status)
                    };
                    let _ = pending.reply.send(outcome);
                }
            }
            pdu::GENERIC_NACK => {
                if let Some(pending) = self.pending.remove(&h.sequence) {
                    let _ = pending.reply.send(Submitted::Refused(h.status));
                }
            }
            c if c == pdu::ENQUIRE_LINK | pdu::RESPONSE => self.link_check = None,
            c if c == pdu::UNBIND | pdu::RESPONSE => self.unbound = true,
            pdu::ENQUIRE_LINK => {
                let answer = pdu::bare_response(pdu::ENQUIRE_LINK, pdu::ROK, h.sequence);
                self.write(&answer).await?;
            }
            pdu::UNBIND => {
                let answer = pdu::bare_response(pdu::UNBIND, pdu::ROK, h.sequence);
                self.write(&answer).await?;
                return Err("the SMSC unbound the session".into());
            }
            pdu::DELIVER_SM => self.deliver_sm(h.sequence, &frame.body).await?,
            c if c & pdu::RESPONSE == 0 => {
                let answer = pdu::bare_response(pdu::GENERIC_NACK, pdu::RINVCMDID, h.sequence);
                self.write(&answer).await?;
            }
            // An answer nobody waits for (one that came after its deadline).
            _ => {}
        }
        Ok(())
    }

    /// A receipt or an inbound message: handed to the desk, and answered once stored (or at
    /// once, `ESME_RX_T_APPN`, when the desk cannot take it now: the SMSC sends it again).
    async fn deliver_sm(&mut self, sequence: u32, body: &[u8]) -> Result<(), String> {
        let deliver = match DeliverSm::decode(body) {
            Ok(deliver) => deliver,
            Err(e) => {
                tracing::warn!(provider = %self.config.provider, error = %e, "Unreadable deliver_sm.");
                let answer = pdu::deliver_sm_resp(pdu::RSYSERR, sequence);
                return self.write(&answer).await;
            }
        };
        let incoming = match receipt::read(
            &self.config.provider,
            self.config.message_id_format,
            &deliver,
        ) {
            Delivered::Receipt(receipt) => Incoming::Receipt(receipt),
            Delivered::Inbound(sms) => Incoming::Inbound(sms),
            Delivered::Ignored(why) => {
                tracing::debug!(provider = %self.config.provider, reason = %why, "deliver_sm ignored.");
                return self.write(&pdu::deliver_sm_resp(pdu::ROK, sequence)).await;
            }
        };
        let (stored, answer) = oneshot::channel();
        match self.config.incoming.try_send(Delivery { incoming, stored }) {
            Ok(()) => {
                self.acks.push(Box::pin(async move {
                    (sequence, answer.await.unwrap_or(false))
                }));
                Ok(())
            }
            Err(_) => self.acknowledge(sequence, false).await,
        }
    }

    /// Answers a `deliver_sm`: taken once stored, else "try again later".
    async fn acknowledge(&mut self, sequence: u32, stored: bool) -> Result<(), String> {
        let status = if stored { pdu::ROK } else { pdu::RX_T_APPN };
        self.write(&pdu::deliver_sm_resp(status, sequence)).await
    }

    /// No submit for a while, longer each time the SMSC keeps saying so.
    fn slow_down(&mut self) {
        if self.paused_until.is_some() {
            return;
        }
        self.paused_until = Some(Instant::now() + self.throttle);
        self.throttle = (self.throttle * 2).min(MAX_THROTTLE);
    }

    /// A clean end: waits for the answers of what was written, then unbinds.
    async fn close(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + self.config.response_timeout;
        while !self.pending.is_empty() {
            self.read_until(deadline).await?;
        }
        // Receipts taken are answered before the unbind, or the SMSC sends them again.
        while let Ok(Some((sequence, stored))) = timeout_at(deadline, self.acks.next()).await {
            self.acknowledge(sequence, stored).await?;
        }
        let sequence = self.next_sequence();
        self.write(&pdu::bare(pdu::UNBIND, sequence)).await?;
        let deadline = Instant::now() + self.config.response_timeout;
        while !self.unbound {
            self.read_until(deadline).await?;
        }
        tracing::info!(provider = %self.config.provider, "SMPP session unbound.");
        Ok(())
    }

    async fn read_until(&mut self, deadline: Instant) -> Result<(), String> {
        match timeout_at(deadline, self.reader.read_buf(&mut self.buf)).await {
            Err(_) => Err("no answer while closing".into()),
            Ok(Err(e)) => Err(format!("reading: {e}")),
            Ok(Ok(0)) => Err("the SMSC closed the connection".into()),
            Ok(Ok(_)) => self.handle_frames().await,
        }
    }
}

/// `ESME_RTHROTTLED` and `ESME_RMSGQFUL`: the SMSC asks to slow down.
pub fn is_throttling(status: u32) -> bool {
    status == pdu::RTHROTTLED || status == pdu::RMSGQFUL
}
