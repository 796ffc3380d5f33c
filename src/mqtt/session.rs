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

use super::connection::{self, ConnectError, Connected, Event, Target};
use super::held::Held;
use super::protocol::{Incoming, Outgoing, Received, Version};
use super::subscriptions::{SubAckReport, SubscriptionSync, Subscriptions};
use super::window::Window;
use super::{AckToken, Acker, Message, StartError, SubscriptionHandle, Want};
use crate::backoff::Backoff;
use crate::flows::FlowSet;
use crate::health::{self, Health};
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
/// A connect attempt (DNS, TCP, TLS handshake, CONNECT and CONNACK) may take this long: enough
/// for TLS over a link with seconds of latency.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The reconnect delay starts over only after a connection stayed up this long, so a broker
/// that accepts and then drops the client (a duplicate client id, an auth plugin) is not
/// hammered.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long the initial subscriptions may take before startup fails.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(30);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection waits for the record of held forms before going on without it.
const HELD_TIMEOUT: Duration = Duration::from_secs(8);
/// Acks or packets handled in one turn of the session's loop when more are ready.
const BURST: usize = 256;

/// The current connection.
struct Link {
    id: u64,
    version: Version,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    since: Instant,
    last_sent: Instant,
    ping_sent: Option<Instant>,
    /// Ours, or the one a version 5 broker asked for.
    keepalive: Duration,
}

impl Link {
    fn send(&mut self, packet: Outgoing) {
        // A closed queue means the writer ended; its `Closed` event is on its way.
        let _ = self.outgoing.send(packet);
        self.last_sent = Instant::now();
    }
}

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
    tick: tokio::time::Interval,
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
        let wanted = flows.borrow().filters();
        let mut tick = tokio::time::interval(health::BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let session = BrokerSession {
            address: target.address(),
            version: target.version,
            target,
            subscriptions: SubscriptionSync::new(subscriptions, wanted),
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
            tick,
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
        if self.last_keepalive_check.elapsed() >= health::BEAT {
            self.last_keepalive_check = Instant::now();
            self.keep_alive();
        }
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
                    let packets = self.subscriptions.held(held);
                    self.send_all(packets);
                    self.check_ready();
                }
                Happened::Nothing
            }
            want = self.wants.recv(), if wants_open => {
                match want {
                    Some(want) => {
                        self.waiters.push(want.done);
                        let packets = self.subscriptions.want(want.filters);
                        self.send_all(packets);
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
            _ = self.tick.tick() => Happened::Nothing,
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

    fn begin_connect(&mut self) {
        if self.connecting.is_none() && self.link.is_none() {
            tracing::debug!("Connecting to MQTT broker {} with MQTT {}", self.address, self.version.name());
            let attempt = connection::connect(self.target.clone(), self.version, CONNECT_TIMEOUT);
            self.connecting = Some(tokio::spawn(attempt));
        }
    }

    fn connect_failed(&mut self, error: ConnectError) -> Happened {
        if let ConnectError::Refused(refusal) = &error {
            if refusal.wrong_version() && self.version == Version::V5 {
                // Once per process: this broker speaks 3.1.1, and will on every reconnect.
                tracing::warn!(
                    "MQTT broker {} does not accept MQTT 5 ({}); connecting with MQTT 3.1.1 from now on",
                    self.address,
                    refusal.reason
                );
                if self.target.session_expiry != u32::MAX {
                    tracing::warn!(
                        "MQTT_SESSION_EXPIRY_SECONDS has no effect with MQTT 3.1.1: the broker's own setting decides"
                    );
                }
                self.version = Version::V311;
                self.begin_connect();
                return Happened::Nothing;
            }
        }
        let delay = self.backoff.step();
        match &error {
            ConnectError::Refused(refusal) if self.version == Version::V311 => {
                tracing::error!("MQTT connection failed with reason code: {}", refusal.v311_code)
            }
            // The original's number where 3.1.1 has one for it, then the broker's own code.
            ConnectError::Refused(refusal) => tracing::error!(
                "MQTT connection failed with reason code: {} (MQTT 5 reason 0x{:02X}: {})",
                refusal.v311_code,
                refusal.code,
                refusal.reason
            ),
            _ => tracing::warn!(
                "Cannot connect to MQTT broker {}: {error}{}; retrying in {:.1}s",
                self.address,
                super::hint(&error.to_string()),
                delay.as_secs_f64()
            ),
        }
        self.retry_at = Some(Instant::now() + delay);
        Happened::ConnectFailed(error)
    }

    fn established(&mut self, connected: Connected) {
        self.connections += 1;
        tracing::debug!(
            session_present = connected.session_present,
            session_expiry = connected.session_expiry,
            "CONNACK (MQTT {}) from {}",
            connected.version.name(),
            self.address
        );
        if self.connections > 1 {
            tracing::info!("Reconnected to MQTT broker {}", self.address);
            metrics::counter!("mqtt_gateway_broker_reconnects_total").increment(1);
        }
        let (read, write) = tokio::io::split(connected.stream);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (outgoing, queued) = mpsc::unbounded_channel();
        let version = connected.version;
        let reader = tokio::spawn(connection::read_packets(
            read,
            version,
            connected.leftover,
            Arc::clone(&self.window),
            events_tx.clone(),
        ));
        let writer = tokio::spawn(connection::write_packets(write, version, queued, events_tx));
        let now = Instant::now();
        self.link = Some(Link {
            id: self.connections,
            version,
            outgoing,
            events,
            reader,
            writer,
            since: now,
            last_sent: now,
            ping_sent: None,
            keepalive: connected.keepalive,
        });
        // Whatever the session says it holds: the broker may have lost what it last saved.
        let packets = self.subscriptions.connected(self.held.is_some());
        for packet in packets {
            self.send(packet);
        }
        if let Some(held) = &self.held {
            let answer = held.reconcile(self.subscriptions.wanted_forms());
            let (connection, answers) = (self.connections, self.held_answers_tx.clone());
            tokio::spawn(async move {
                let held =
                    tokio::time::timeout(HELD_TIMEOUT, answer).await.ok().and_then(Result::ok).flatten();
                let _ = answers.send((connection, held));
            });
        }
        self.check_ready();
    }

    /// The connection is gone: forget it, give back what its unread events held, and
    /// schedule the next attempt.
    fn lost(&mut self, why: &str) {
        let Some(link) = self.link.take() else { return };
        self.health.set_broker_connected(false);
        link.reader.abort();
        link.writer.abort();
        // Messages the reader had passed on but the session never took: give back their room
        // once the reader has stopped sending.
        let window = Arc::clone(&self.window);
        let mut events = link.events;
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Packet(Incoming::Publish(message)) = event {
                    window.release(message.payload.len() + message.topic.len());
                }
            }
        });
        if link.since.elapsed() >= STABLE_AFTER {
            self.backoff.reset();
        }
        let delay = self.backoff.step();
        tracing::warn!(
            "Lost connection to MQTT broker {}: {why}{}; reconnecting in {:.1}s",
            self.address,
            super::hint(why),
            delay.as_secs_f64()
        );
        self.retry_at = Some(Instant::now() + delay);
    }

    fn incoming(&mut self, packet: Incoming) {
        match packet {
            Incoming::Publish(message) => self.receive(message),
            Incoming::SubAck { pkid, grants } => {
                if let Some(report) = self.subscriptions.suback(pkid, grants) {
                    self.report(report);
                }
                self.check_ready();
            }
            Incoming::UnsubAck { pkid } => {
                if let Some((gone, next)) = self.subscriptions.unsuback(pkid) {
                    tracing::info!("Unsubscribed from {}", gone.join(", "));
                    if let Some(held) = &self.held {
                        held.remove(gone);
                    }
                    self.send_all(next);
                }
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
        metrics::counter!("mqtt_gateway_messages_received_total").increment(1);
        let ack = AckToken { connection: link.id, pkid: message.pkid, qos: message.qos, bytes };
        let message = Message { topic: message.topic, payload: message.payload, retain: message.retain, ack };
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

    /// Sends what the subscriptions asked for; the forms of a SUBSCRIBE are recorded as held
    /// first, since the broker may hold them from the moment it reads the packet.
    fn send_all(&mut self, packets: Vec<Outgoing>) {
        for packet in packets {
            if let (Some(held), Outgoing::Subscribe { filters, .. }) = (&self.held, &packet) {
                held.add(filters.clone());
            }
            self.send(packet);
        }
    }

    /// Says what one SUBACK means for the flows.
    fn report(&mut self, report: SubAckReport) {
        let flows = self.flows.borrow();
        let flows_of = |filter: &str| {
            flows
                .flows
                .iter()
                .filter(|f| f.filter.as_str() == filter)
                .map(|f| f.code.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let asked = self.subscriptions.forms().qos as u8;
        for (filter, qos) in &report.downgraded {
            tracing::warn!(
                "MQTT broker granted QoS {} for {filter} where {asked} was asked: flows {} get at-most-once delivery",
                *qos as u8,
                flows_of(filter)
            );
        }
        for (filter, refusal) in &report.refused {
            tracing::error!(
                error_kind = "subscription_refused",
                "MQTT broker refused the subscription to {filter} ({}, reason code 0x{:02X}): flows {} receive nothing",
                refusal.reason,
                refusal.code,
                flows_of(filter)
            );
        }
        if !report.accepted.is_empty() {
            tracing::info!("Subscribed to {}", report.accepted.join(", "));
        }
        drop(flows);
        let refused = self.subscriptions.refused();
        metrics::gauge!("mqtt_gateway_subscriptions_refused").set(refused.len() as f64);
        self.health.set_refused(refused);
    }

    /// Once every wanted filter is answered on this connection: ready, and tell the waiters.
    fn check_ready(&mut self) {
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

    /// Pings when nothing else was sent for half the keepalive, and gives up on a connection
    /// that does not answer within the keepalive while it is being read.
    fn keep_alive(&mut self) {
        let full = self.window.is_full();
        let Some(link) = self.link.as_mut() else { return };
        let keepalive = link.keepalive;
        if keepalive.is_zero() {
            return;
        }
        if full {
            // The answer waits behind messages we are not reading yet: not the broker's fault.
            link.ping_sent = None;
        } else if link.ping_sent.is_some_and(|sent| sent.elapsed() > keepalive) {
            self.lost(&format!("no answer to a ping within the {}s keepalive", keepalive.as_secs()));
            return;
        }
        if link.last_sent.elapsed() >= keepalive / 2 {
            link.send(Outgoing::PingReq);
            link.ping_sent.get_or_insert_with(Instant::now);
        }
    }

    /// Sends the acks still queued, then DISCONNECT, and waits for the broker to close the
    /// connection, bounded in time.
    async fn disconnect(mut self) {
        if let Some(connecting) = self.connecting.take() {
            connecting.abort();
        }
        while let Ok(token) = self.acks.try_recv() {
            self.acknowledge(token);
        }
        let Some(mut link) = self.link.take() else { return };
        link.send(Outgoing::Disconnect);
        // Closing the queue lets the writer finish and shut its half down.
        drop(link.outgoing);
        // Read on until the broker closes the connection. Closing a socket with unread data in
        // it makes the kernel send a reset, and the broker then throws away the last acks and
        // the DISCONNECT it had not read yet, redelivering those messages.
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            while let Some(event) = link.events.recv().await {
                match event {
                    Event::Closed(_) => break,
                    Event::Packet(Incoming::Publish(message)) => {
                        self.window.release(message.payload.len() + message.topic.len())
                    }
                    Event::Packet(_) => {}
                }
            }
        })
        .await;
        link.reader.abort();
        link.writer.abort();
    }
}
