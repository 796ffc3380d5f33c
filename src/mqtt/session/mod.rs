//! The broker session's state machine: one task that owns the connection to the broker,
//! reconnects with backoff, negotiates the MQTT version, keeps the subscriptions in step with
//! the flows ([`super::subscriptions`]), hands messages to the processor and sends their
//! acknowledgements back on the connection they came on.
//!
//! - **Nothing is cancelled half way.** A connect attempt runs in a task of its own with its
//!   own timeout; reading and writing run in their own tasks ([`super::connection`]). The
//!   session only waits on channels and timers, so a heartbeat or an ack never cancels a
//!   connect or a write in progress.
//! - **Keepalive never stops.** Pings and acks are written whatever the reader is doing.
//! - **Acks belong to a connection.** An ack whose message came on an earlier connection is
//!   dropped: its packet id means nothing now, and the broker redelivers the message.
//! - **Version 5 first.** A broker that refuses it at CONNECT gets 3.1.1 at once, and from then
//!   on, with one WARNING: the drop-in connects wherever the original did.
//!
//! This file is the loop and what it hands on (messages, acks, subscription changes);
//! [`link`] is the connection's life (connect, keep alive, lose, close).

mod link;

use link::Link;
pub use link::{CONNECT_TIMEOUT, STABLE_AFTER};

use super::connection::{ConnectError, Connected, Event, Target};
use super::held::Held;
use super::protocol::{Incoming, Outgoing, Received, Version};
use super::report::Tally;
use super::subscriptions::{SubscriptionSync, Subscriptions};
use super::window::Window;
use super::{AckToken, Acker, Message, StartError, SubscriptionHandle, Want};
use crate::backoff::Backoff;
use crate::flows::FlowSet;
use crate::health::{Health, Part};
use rumqttc::QoS;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long the initial subscriptions may take before startup fails.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a busy session looks at its keepalive (an idle one sleeps until it is due).
const KEEPALIVE_CHECK: Duration = Duration::from_secs(1);
/// Acks or packets handled in one turn of the session's loop when more are ready.
const BURST: usize = 256;

/// What a turn of the session's loop found, for [`BrokerSession::start`].
enum Happened {
    Nothing,
    ConnectFailed(ConnectError),
    Lost(String),
    ProcessorDone,
}

pub struct BrokerSession {
    target: Target,
    address: String,
    /// The version the next connect asks for: `MQTT_PROTOCOL`, until a broker refuses 5.
    version: Version,
    subscriptions: SubscriptionSync,
    tally: Tally,
    /// `mqtt_gateway_messages_received_total`, found once: it moves with every message.
    received: metrics::Counter,
    flows: watch::Receiver<Arc<FlowSet>>,
    /// Callers of [`SubscriptionHandle::want`] waiting for the broker's confirmation.
    waiters: Vec<oneshot::Sender<()>>,
    wants: mpsc::UnboundedReceiver<Want>,
    /// `None` once shutdown began: later messages are given up, for redelivery.
    messages: Option<mpsc::UnboundedSender<Message>>,
    acks: mpsc::UnboundedReceiver<AckToken>,
    window: Arc<Window>,
    link: Option<Link>,
    connecting: Option<JoinHandle<Result<Connected, ConnectError>>>,
    retry_at: Option<Instant>,
    connections: u64,
    backoff: Backoff,
    health: Arc<Health>,
    processor: Option<JoinHandle<()>>,
    /// `None` with a clean session, which the broker never keeps.
    held: Option<Held>,
    held_answers_tx: mpsc::UnboundedSender<(u64, Option<BTreeSet<String>>)>,
    held_answers: mpsc::UnboundedReceiver<(u64, Option<BTreeSet<String>>)>,
    last_keepalive_check: Instant,
    /// Closed channels are no longer polled (a closed channel is always ready).
    acks_open: bool,
    wants_open: bool,
}

impl BrokerSession {
    /// The session, a handle for subscription changes, and the processor's acker. Messages go
    /// to `messages`; `window` bounds how many (and how many bytes) are in hand at once.
    pub fn new(
        target: Target,
        subscriptions: Subscriptions,
        flows: watch::Receiver<Arc<FlowSet>>,
        messages: mpsc::UnboundedSender<Message>,
        window: Arc<Window>,
        held: Option<Held>,
        health: Arc<Health>,
    ) -> (BrokerSession, SubscriptionHandle, Acker) {
        let (want_tx, wants) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (held_answers_tx, held_answers) = mpsc::unbounded_channel();
        let wanted = flows.borrow().subscriptions();
        let session = BrokerSession {
            address: target.address(),
            version: target.version,
            target,
            subscriptions: SubscriptionSync::new(subscriptions, wanted),
            tally: Tally::default(),
            received: metrics::counter!("mqtt_gateway_messages_received_total"),
            flows,
            waiters: Vec::new(),
            wants,
            messages: Some(messages),
            acks,
            window,
            link: None,
            connecting: None,
            retry_at: None,
            connections: 0,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP),
            health,
            processor: None,
            held,
            held_answers_tx,
            held_answers,
            last_keepalive_check: Instant::now(),
            acks_open: true,
            wants_open: true,
        };
        (session, SubscriptionHandle(want_tx), Acker(ack_tx))
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The MQTT version of the current connection (or of the next one).
    pub fn version(&self) -> Version {
        self.link.as_ref().map_or(self.version, |link| link.version)
    }

    /// Connects and subscribes every current filter, waiting for the SUBACKs so that a message
    /// published once this returns is delivered. A refused CONNACK is logged and retried, as
    /// the original's network loop did; a broker that cannot be reached at all fails startup.
    pub async fn start(&mut self, shutdown: &CancellationToken) -> Result<(), StartError> {
        self.begin_connect();
        let mut deadline: Option<Instant> = None;
        loop {
            if shutdown.is_cancelled() {
                return Err(StartError::Interrupted);
            }
            if self.is_ready() {
                return Ok(());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(StartError::SubscribeTimeout(SUBACK_TIMEOUT));
            }
            let happened = tokio::select! {
                _ = shutdown.cancelled() => return Err(StartError::Interrupted),
                happened = self.turn() => happened,
            };
            match happened {
                Happened::ConnectFailed(ConnectError::Refused(_)) | Happened::Nothing => {}
                Happened::ConnectFailed(cause) => {
                    return Err(StartError::Connect {
                        address: self.address.clone(),
                        cause: cause.to_string(),
                    })
                }
                Happened::Lost(cause) => {
                    return Err(StartError::Connect { address: self.address.clone(), cause })
                }
                Happened::ProcessorDone => return Err(StartError::Interrupted),
            }
            if self.link.is_some() && deadline.is_none() {
                deadline = Some(Instant::now() + SUBACK_TIMEOUT);
            }
        }
    }

    /// Runs until shutdown, then waits for `processor` to finish (so its acks go out) and
    /// disconnects cleanly.
    pub async fn run(mut self, shutdown: CancellationToken, processor: JoinHandle<()>) {
        self.processor = Some(processor);
        loop {
            if shutdown.is_cancelled() && self.messages.is_some() {
                // Dropping the sender lets the processor drain what it has and stop.
                self.messages = None;
            }
            let happened = tokio::select! {
                _ = shutdown.cancelled(), if self.messages.is_some() => continue,
                happened = self.turn() => happened,
            };
            if let Happened::ProcessorDone = happened {
                break;
            }
        }
        self.disconnect().await;
    }

    fn is_ready(&self) -> bool {
        self.link.is_some() && self.subscriptions.is_ready()
    }

    /// Waits for the next thing to happen and handles it. Everything awaited here is a channel,
    /// a timer or a task handle, so dropping a turn half way loses nothing.
    async fn turn(&mut self) -> Happened {
        // Beaten on every turn, not on a tick alone: under load the channels are always ready
        // and a timer branch could wait long.
        self.health.beat_session();
        if self.last_keepalive_check.elapsed() >= KEEPALIVE_CHECK {
            self.last_keepalive_check = Instant::now();
            self.keep_alive();
        }
        // Idle, the session sleeps until a ping is due (or the watchdog pokes it).
        let keepalive_due = self.keepalive_due();
        let keepalive = async move {
            match keepalive_due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let (link, connecting, retry_at, processor) =
            (&mut self.link, &mut self.connecting, self.retry_at, &mut self.processor);
        let link_event = async move {
            match link.as_mut() {
                Some(link) => link.events.recv().await,
                None => std::future::pending().await,
            }
        };
        let connected = async move {
            match connecting.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        let retry = async move {
            match retry_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let processor = async move {
            match processor.as_mut() {
                Some(task) => task.await,
                None => std::future::pending().await,
            }
        };
        let (acks_open, wants_open) = (self.acks_open, self.wants_open);
        tokio::select! {
            _ = processor => {
                self.processor = None;
                Happened::ProcessorDone
            }
            token = self.acks.recv(), if acks_open => {
                match token {
                    Some(token) => {
                        self.acknowledge(token);
                        // What else is ready goes in the same turn.
                        for _ in 0..BURST {
                            let Ok(token) = self.acks.try_recv() else { break };
                            self.acknowledge(token);
                        }
                    }
                    None => self.acks_open = false,
                }
                Happened::Nothing
            }
            event = link_event => {
                let mut happened = self.on_event(event);
                for _ in 0..BURST {
                    if !matches!(happened, Happened::Nothing) {
                        break;
                    }
                    let Some(Ok(event)) = self.link.as_mut().map(|link| link.events.try_recv()) else { break };
                    happened = self.on_event(Some(event));
                }
                happened
            }
            Some((connection, held)) = self.held_answers.recv() => {
                if self.link.as_ref().is_some_and(|link| link.id == connection) {
                    self.subscriptions.held(held);
                    self.send_planned();
                    self.check_ready();
                }
                Happened::Nothing
            }
            want = self.wants.recv(), if wants_open => {
                match want {
                    Some(want) => {
                        self.waiters.push(want.done);
                        self.subscriptions.want(want.filters);
                        self.send_planned();
                        self.check_ready();
                    }
                    None => self.wants_open = false,
                }
                Happened::Nothing
            }
            result = connected => {
                self.connecting = None;
                match result {
                    Ok(Ok(connected)) => {
                        self.established(connected);
                        Happened::Nothing
                    }
                    Ok(Err(error)) => self.connect_failed(error),
                    Err(panic) => self.connect_failed(ConnectError::Io(std::io::Error::other(panic.to_string()))),
                }
            }
            _ = retry => {
                self.retry_at = None;
                self.begin_connect();
                Happened::Nothing
            }
            _ = keepalive => {
                self.last_keepalive_check = Instant::now();
                self.keep_alive();
                Happened::Nothing
            }
            _ = self.health.poked(Part::Session) => Happened::Nothing,
        }
    }

    fn on_event(&mut self, event: Option<Event>) -> Happened {
        let why = match event {
            Some(Event::Packet(Incoming::Disconnect(reason))) => {
                format!("the broker ended the connection: {reason}")
            }
            Some(Event::Packet(packet)) => {
                self.incoming(packet);
                return Happened::Nothing;
            }
            Some(Event::Closed(why)) => why,
            None => "the connection's tasks ended".to_owned(),
        };
        self.lost(&why);
        Happened::Lost(why)
    }

    fn incoming(&mut self, packet: Incoming) {
        match packet {
            Incoming::Publish(message) => self.receive(message),
            Incoming::SubAck { pkid, grants } => {
                if let Some(report) = self.subscriptions.suback(pkid, grants) {
                    self.tally.suback(report);
                }
                self.send_planned();
                self.check_ready();
            }
            Incoming::UnsubAck { pkid } => {
                if let Some(gone) = self.subscriptions.unsuback(pkid) {
                    if let Some(held) = &self.held {
                        held.remove(gone.clone());
                    }
                    self.tally.unsuback(gone);
                }
                self.send_planned();
                self.check_ready();
            }
            Incoming::PingResp => {
                if let Some(link) = self.link.as_mut() {
                    link.ping_sent = None;
                }
            }
            Incoming::Disconnect(_) => {}
            Incoming::Other(name) => tracing::debug!("Ignoring {name} from the broker"),
        }
    }

    /// Hands a message to the processor; nothing here waits.
    fn receive(&mut self, message: Received) {
        let bytes = message.payload.len() + message.topic.len();
        let (Some(messages), Some(link)) = (&self.messages, &self.link) else {
            // Shutting down: neither written nor acknowledged, so the broker redelivers it.
            self.window.release(bytes);
            return;
        };
        self.received.increment(1);
        let ack = AckToken { connection: link.id, pkid: message.pkid, qos: message.qos, bytes };
        let message = Message {
            topic: message.topic,
            payload: message.payload,
            retain: message.retain,
            subscription_ids: message.subscription_ids,
            ack,
        };
        if let Err(mpsc::error::SendError(message)) = messages.send(message) {
            self.window.release(message.ack.bytes);
        }
    }

    /// Sends a processor's acknowledgement, if its message came on the current connection.
    fn acknowledge(&mut self, token: AckToken) {
        self.window.release(token.bytes);
        if token.qos == QoS::AtMostOnce {
            return;
        }
        if let Some(link) = self.link.as_mut().filter(|link| link.id == token.connection) {
            link.send(Outgoing::PubAck(token.pkid));
        }
    }

    fn send(&mut self, packet: Outgoing) {
        if let Some(link) = self.link.as_mut() {
            link.send(packet);
        }
    }

    /// Sends what the subscriptions planned, as far as their window allows; the forms of a
    /// SUBSCRIBE are recorded as held first, since the broker may hold them from the moment it
    /// reads the packet.
    fn send_planned(&mut self) {
        if self.link.is_none() {
            return;
        }
        for packet in self.subscriptions.packets() {
            if let (Some(held), Outgoing::Subscribe { filters, .. }) = (&self.held, &packet) {
                held.add(filters.clone());
            }
            self.send(packet);
        }
    }

    /// Once every wanted filter is answered on this connection: ready, and tell the waiters.
    fn check_ready(&mut self) {
        if self.subscriptions.idle() {
            // Told once a wave of answers is in, not per SUBACK: thousands of flows.
            self.tally.flush(self.subscriptions.forms().qos, &self.flows.borrow());
            let refused = self.subscriptions.refused();
            metrics::gauge!("mqtt_gateway_subscriptions_refused").set(refused.len() as f64);
            self.health.set_refused(refused);
        }
        if !self.is_ready() {
            return;
        }
        if !self.health.broker_connected() {
            self.health.set_broker_connected(true);
        }
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}
