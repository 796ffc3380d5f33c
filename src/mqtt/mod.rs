//! The broker session: one task that owns the connection to the broker, reconnects with
//! backoff, keeps the subscriptions in step with the flows, hands messages to the processor and
//! sends their acknowledgements back on the connection they came on.
//!
//! What it guarantees, and how:
//! - **Nothing is cancelled half way.** A connect attempt (DNS, TCP, TLS, CONNACK) runs in a
//!   task of its own with its own timeout; reading and writing run in their own tasks
//!   ([`connection`]). The session only waits on channels and timers, so a heartbeat or an ack
//!   never cancels a connect or a write in progress (which rumqttc's `poll()` in a `select!`
//!   did, and on a slow link never let a reconnect finish).
//! - **Memory follows the in-flight window** ([`window`]): the reader stops reading when
//!   `MAX_IN_FLIGHT` messages or `MAX_IN_FLIGHT_BYTES` bytes are taken and not yet
//!   acknowledged; TCP backpressure makes the broker hold the rest.
//! - **Keepalive never stops.** Pings and acks are written whatever the reader is doing, so a
//!   long wait for the database does not make the broker drop the gateway.
//! - **Acks belong to a connection.** An ack whose message came on an earlier connection is
//!   dropped: its packet id means nothing now, and the broker redelivers the message.
//! - **Ready means subscribed.** The broker counts as connected (`/readyz`, `READY=1`) only
//!   once the current connection's SUBACKs are in.
//!
//! This file is one concept, the session's state machine (long because every branch of it says
//! why); the socket and its tasks live in [`connection`], the in-flight window in [`window`],
//! what the broker's session holds across restarts in [`memory`].

mod connection;
mod memory;
mod window;

pub use connection::{ConnectError, Target};
use memory::Forgotten;
pub use memory::Memory;
pub use window::Window;

use crate::backoff::Backoff;
use crate::config::MqttSettings;
use crate::db::BrokerRow;
use crate::flows::FlowSet;
use crate::health::{self, Health};
use connection::{Connected, Event};
use rumqttc::mqttbytes::v4::{
    Packet, PubAck, Publish, Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::{MqttOptions, QoS};
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
/// Acks or packets handled in one turn of the session's loop when more are ready.
const BURST: usize = 256;

/// Why the first connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to MQTT broker {address}: {cause}{}", hint(&cause.to_string()))]
    Connect { address: String, cause: String },
    #[error("no SUBACK from the broker within {0:?}")]
    SubscribeTimeout(Duration),
    #[error("interrupted by shutdown")]
    Interrupted,
}

fn hint(error_text: &str) -> String {
    crate::tls::explain(error_text).map(|hint| format!(" ({hint})")).unwrap_or_default()
}

/// How flows' topic filters are subscribed: the QoS, and the shared group, if any.
#[derive(Debug, Clone)]
pub struct Subscriptions {
    pub qos: QoS,
    pub shared_group: Option<String>,
}

impl Subscriptions {
    pub fn new(settings: &MqttSettings) -> Subscriptions {
        let qos = if settings.qos == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        Subscriptions { qos, shared_group: settings.shared_group.clone() }
    }

    /// The filter as sent to the broker. Messages still arrive with their real topic, so flows
    /// match them with the plain filter.
    pub fn broker_filter(&self, filter: &str) -> String {
        match &self.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_owned(),
        }
    }
}

/// As the original: credentials only when both are given and non-empty.
fn credentials(broker: &BrokerRow) -> Option<(String, String)> {
    match (&broker.username, &broker.password) {
        (Some(user), Some(password)) if !user.is_empty() && !password.is_empty() => {
            Some((user.clone(), password.clone()))
        }
        _ => None,
    }
}

fn port(broker: &BrokerRow) -> u16 {
    broker.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(1883)
}

/// Where the session connects, from the chosen `mqtt_servers` row and the environment.
pub fn target(settings: &MqttSettings, broker: &BrokerRow) -> anyhow::Result<Target> {
    let tls = match &settings.tls {
        Some(tls) => Some(Arc::new(crate::tls::broker_config(tls)?)),
        None => None,
    };
    Ok(Target {
        host: broker.host.clone(),
        port: port(broker),
        tls,
        client_id: settings.client_id.clone(),
        keepalive: settings.keepalive,
        clean_session: settings.clean_session,
        credentials: credentials(broker),
    })
}

/// rumqttc client options for the same broker, for one-off checks (`mqtt-gateway check`).
pub fn options(settings: &MqttSettings, broker: &BrokerRow) -> anyhow::Result<MqttOptions> {
    let mut options = MqttOptions::new(&settings.client_id, &broker.host, port(broker));
    options.set_keep_alive(settings.keepalive).set_clean_session(true);
    if let Some((user, password)) = credentials(broker) {
        options.set_credentials(user, password);
    }
    if let Some(tls) = &settings.tls {
        let config = crate::tls::broker_config(tls)?;
        options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(options)
}

/// A message handed to the processor, with what it takes to acknowledge it once written.
pub struct Message {
    pub publish: Publish,
    pub ack: AckToken,
}

/// Enough to acknowledge one message: the connection it came on, its packet id and QoS, and
/// the bytes it holds in the in-flight window.
#[derive(Debug, Clone, Copy)]
pub struct AckToken {
    connection: u64,
    pkid: u16,
    qos: QoS,
    bytes: usize,
}

/// The processor's way to acknowledge messages. Sending never waits, so the processor can
/// never block the session nor the session the processor.
#[derive(Clone)]
pub struct Acker(mpsc::UnboundedSender<AckToken>);

impl Acker {
    pub fn ack(&self, token: AckToken) {
        // Fails only when the session is gone; the broker then redelivers.
        let _ = self.0.send(token);
    }
}

/// Asks the session to hold exactly a set of subscriptions.
#[derive(Clone)]
pub struct SubscriptionHandle(mpsc::UnboundedSender<Want>);

struct Want {
    filters: BTreeSet<String>,
    done: oneshot::Sender<()>,
}

impl SubscriptionHandle {
    /// Subscribes what is new in `filters`, unsubscribes what is no longer there, and waits
    /// up to `limit` for the broker to confirm it all. False when it did not in time (the
    /// broker is away, say): the session goes on and applies the set once it is back.
    pub async fn want(&self, filters: BTreeSet<String>, limit: Duration) -> bool {
        let (done, confirmed) = oneshot::channel();
        if self.0.send(Want { filters, done }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(limit, confirmed).await, Ok(Ok(())))
    }
}

/// How the broker answered one filter on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    Granted(QoS),
    Refused,
}

/// The current connection and what the session knows about it.
struct Link {
    id: u64,
    outgoing: mpsc::UnboundedSender<Packet>,
    events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    since: Instant,
    last_sent: Instant,
    ping_sent: Option<Instant>,
    next_pkid: u16,
    /// SUBSCRIBEs and UNSUBSCRIBEs sent and not yet answered, by packet id.
    subscribing: HashMap<u16, Vec<String>>,
    unsubscribing: HashMap<u16, Vec<String>>,
    /// Filters being forgotten in `gateway_subscriptions` before their UNSUBSCRIBE.
    forgetting: BTreeSet<String>,
    /// What the broker answered for each filter on this connection.
    granted: BTreeMap<String, Grant>,
}

impl Link {
    fn send(&mut self, packet: Packet) {
        // A closed queue means the writer ended; its `Closed` event is on its way.
        let _ = self.outgoing.send(packet);
        self.last_sent = Instant::now();
    }

    fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        self.next_pkid
    }

    fn pending(&self) -> bool {
        !self.subscribing.is_empty() || !self.unsubscribing.is_empty() || !self.forgetting.is_empty()
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
    subscriptions: Subscriptions,
    flows: watch::Receiver<Arc<FlowSet>>,
    /// The filters every flow needs, as last asked for.
    wanted: BTreeSet<String>,
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
    memory: Option<Memory>,
    last_keepalive_check: Instant,
    /// Closed channels are no longer polled (a closed channel is always ready).
    acks_open: bool,
    wants_open: bool,
    forgotten_tx: mpsc::UnboundedSender<Forgotten>,
    forgotten: mpsc::UnboundedReceiver<Forgotten>,
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
        memory: Option<Memory>,
        health: Arc<Health>,
    ) -> (BrokerSession, SubscriptionHandle, Acker) {
        let (forgotten_tx, forgotten) = mpsc::unbounded_channel();
        let (want_tx, wants) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let wanted = flows.borrow().filters();
        let mut tick = tokio::time::interval(health::BEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let session = BrokerSession {
            address: target.address(),
            target,
            subscriptions,
            flows,
            wanted,
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
            memory,
            last_keepalive_check: Instant::now(),
            acks_open: true,
            wants_open: true,
            forgotten_tx,
            forgotten,
        };
        (session, SubscriptionHandle(want_tx), Acker(ack_tx))
    }

    pub fn address(&self) -> &str {
        &self.address
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
        self.link.as_ref().is_some_and(|link| {
            !link.pending() && self.wanted.iter().all(|filter| link.granted.contains_key(filter))
        })
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
            forgotten = self.forgotten.recv() => {
                if let Some(forgotten) = forgotten {
                    self.unsubscribe(forgotten);
                }
                Happened::Nothing
            }
            want = self.wants.recv(), if wants_open => {
                match want {
                    Some(want) => {
                        self.wanted = want.filters;
                        self.waiters.push(want.done);
                        self.sync_subscriptions();
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
        match event {
            Some(Event::Packet(packet)) => {
                self.incoming(packet);
                Happened::Nothing
            }
            Some(Event::Closed(why)) => {
                self.lost(&why);
                Happened::Lost(why)
            }
            None => {
                self.lost("the connection's tasks ended");
                Happened::Lost("the connection's tasks ended".to_owned())
            }
        }
    }

    fn begin_connect(&mut self) {
        if self.connecting.is_none() && self.link.is_none() {
            tracing::debug!("Connecting to MQTT broker {}", self.address);
            self.connecting = Some(tokio::spawn(connection::connect(self.target.clone(), CONNECT_TIMEOUT)));
        }
    }

    fn connect_failed(&mut self, error: ConnectError) -> Happened {
        let delay = self.backoff.step();
        match &error {
            ConnectError::Refused(code) => tracing::error!("MQTT connection failed with reason code: {code}"),
            _ => tracing::warn!(
                "Cannot connect to MQTT broker {}: {error}{}; retrying in {:.1}s",
                self.address,
                hint(&error.to_string()),
                delay.as_secs_f64()
            ),
        }
        self.retry_at = Some(Instant::now() + delay);
        Happened::ConnectFailed(error)
    }

    fn established(&mut self, connected: Connected) {
        self.connections += 1;
        tracing::debug!(session_present = connected.connack.session_present, "CONNACK from {}", self.address);
        if self.connections > 1 {
            tracing::info!("Reconnected to MQTT broker {}", self.address);
            metrics::counter!("mqtt_gateway_broker_reconnects_total").increment(1);
        }
        let (read, write) = tokio::io::split(connected.stream);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (outgoing, queued) = mpsc::unbounded_channel();
        let reader = tokio::spawn(connection::read_packets(
            read,
            connected.leftover,
            Arc::clone(&self.window),
            events_tx.clone(),
        ));
        let writer = tokio::spawn(connection::write_packets(write, queued, events_tx));
        let granted = self.kept_subscriptions(connected.connack.session_present);
        let now = Instant::now();
        self.link = Some(Link {
            id: self.connections,
            outgoing,
            events,
            reader,
            writer,
            since: now,
            last_sent: now,
            ping_sent: None,
            next_pkid: 0,
            subscribing: HashMap::new(),
            unsubscribing: HashMap::new(),
            forgetting: BTreeSet::new(),
            granted,
        });
        self.sync_subscriptions();
        self.check_ready();
    }

    /// What the broker still holds of earlier connections: with a session present, the filters
    /// `gateway_subscriptions` knows, as asked now (same shared group, same QoS); without one,
    /// nothing, and the memory is cleared.
    fn kept_subscriptions(&mut self, session_present: bool) -> BTreeMap<String, Grant> {
        let Some(memory) = self.memory.as_mut() else { return BTreeMap::new() };
        if !session_present {
            if !memory.known.is_empty() {
                memory.forget(None, None);
            }
            return BTreeMap::new();
        }
        let qos = self.subscriptions.qos as u8;
        let kept: BTreeMap<String, Grant> = memory
            .known
            .iter()
            .filter(|(filter, (sent, asked))| {
                *sent == self.subscriptions.broker_filter(filter) && *asked == qos
            })
            .map(|(filter, _)| (filter.clone(), Grant::Granted(self.subscriptions.qos)))
            .collect();
        let wanted: Vec<&str> =
            kept.keys().filter(|f| self.wanted.contains(*f)).map(String::as_str).collect();
        if !wanted.is_empty() {
            // Not subscribed again: the broker would resend every retained message.
            tracing::info!("The broker's session still holds the subscriptions to {}", wanted.join(", "));
        }
        kept
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
                if let Event::Packet(Packet::Publish(publish)) = event {
                    window.release(publish.payload.len() + publish.topic.len());
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
            hint(why),
            delay.as_secs_f64()
        );
        self.retry_at = Some(Instant::now() + delay);
    }

    fn incoming(&mut self, packet: Packet) {
        match packet {
            Packet::Publish(publish) => self.receive(publish),
            Packet::SubAck(ack) => self.subscribed(ack.pkid, &ack.return_codes),
            Packet::UnsubAck(ack) => {
                if let Some(link) = self.link.as_mut() {
                    if let Some(filters) = link.unsubscribing.remove(&ack.pkid) {
                        for filter in &filters {
                            link.granted.remove(filter);
                        }
                        tracing::info!("Unsubscribed from {}", filters.join(", "));
                    }
                }
                self.check_ready();
            }
            Packet::PingResp => {
                if let Some(link) = self.link.as_mut() {
                    link.ping_sent = None;
                }
            }
            _ => {}
        }
    }

    /// Hands a message to the processor; nothing here waits.
    fn receive(&mut self, publish: Publish) {
        let bytes = publish.payload.len() + publish.topic.len();
        let (Some(messages), Some(link)) = (&self.messages, &self.link) else {
            // Shutting down: neither written nor acknowledged, so the broker redelivers it.
            self.window.release(bytes);
            return;
        };
        metrics::counter!("mqtt_gateway_messages_received_total").increment(1);
        let ack = AckToken { connection: link.id, pkid: publish.pkid, qos: publish.qos, bytes };
        if let Err(mpsc::error::SendError(message)) = messages.send(Message { publish, ack }) {
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
            link.send(Packet::PubAck(PubAck::new(token.pkid)));
        }
    }

    /// Sends the SUBSCRIBE and UNSUBSCRIBE that bring the connection to the wanted set.
    fn sync_subscriptions(&mut self) {
        let Some(link) = self.link.as_mut() else { return };
        let in_progress: BTreeSet<&String> = link.subscribing.values().flatten().collect();
        let new: Vec<String> = self
            .wanted
            .iter()
            .filter(|f| !link.granted.contains_key(*f) && !in_progress.contains(f))
            .cloned()
            .collect();
        if !new.is_empty() {
            let pkid = link.pkid();
            let filters = new
                .iter()
                .map(|f| SubscribeFilter::new(self.subscriptions.broker_filter(f), self.subscriptions.qos));
            let mut subscribe = Subscribe::new_many(filters);
            subscribe.pkid = pkid;
            link.send(Packet::Subscribe(subscribe));
            link.subscribing.insert(pkid, new);
        }
        let leaving: BTreeSet<&String> =
            link.unsubscribing.values().flatten().chain(&link.forgetting).collect();
        let old: Vec<String> = link
            .granted
            .iter()
            .filter(|(f, grant)| {
                !self.wanted.contains(*f) && !leaving.contains(f) && **grant != Grant::Refused
            })
            .map(|(f, _)| f.clone())
            .collect();
        if old.is_empty() {
            return;
        }
        let connection = link.id;
        match self.memory.as_mut() {
            // Forgotten first, unsubscribed once that is done (see `Memory`).
            Some(memory) => {
                link.forgetting.extend(old.iter().cloned());
                memory.forget(Some(old), Some((self.forgotten_tx.clone(), connection)));
            }
            None => self.unsubscribe(Forgotten { connection, filters: old, ok: true }),
        }
    }

    /// Sends the UNSUBSCRIBE for filters no flow uses any more, on the connection they were
    /// meant for.
    fn unsubscribe(&mut self, forgotten: Forgotten) {
        let Some(link) = self.link.as_mut().filter(|link| link.id == forgotten.connection) else { return };
        for filter in &forgotten.filters {
            link.forgetting.remove(filter);
        }
        let old: Vec<String> = forgotten.filters.into_iter().filter(|f| !self.wanted.contains(f)).collect();
        if forgotten.ok && !old.is_empty() {
            let pkid = link.pkid();
            let mut unsubscribe = Unsubscribe::new(self.subscriptions.broker_filter(&old[0]));
            unsubscribe.topics = old.iter().map(|f| self.subscriptions.broker_filter(f)).collect();
            unsubscribe.pkid = pkid;
            link.send(Packet::Unsubscribe(unsubscribe));
            link.unsubscribing.insert(pkid, old);
        }
        self.check_ready();
    }

    /// Records the broker's answer to one SUBSCRIBE, and says what it means for the flows.
    fn subscribed(&mut self, pkid: u16, codes: &[SubscribeReasonCode]) {
        let Some(link) = self.link.as_mut() else { return };
        let Some(filters) = link.subscribing.remove(&pkid) else { return };
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
        let mut accepted = Vec::new();
        for (filter, code) in
            filters.iter().zip(codes.iter().chain(std::iter::repeat(&SubscribeReasonCode::Failure)))
        {
            let grant = match code {
                SubscribeReasonCode::Success(qos) => {
                    if (*qos as u8) < (self.subscriptions.qos as u8) {
                        tracing::warn!(
                            "MQTT broker granted QoS {} for {filter} where {} was asked: flows {} get at-most-once delivery",
                            *qos as u8,
                            self.subscriptions.qos as u8,
                            flows_of(filter)
                        );
                    }
                    accepted.push(filter.as_str());
                    Grant::Granted(*qos)
                }
                SubscribeReasonCode::Failure => {
                    tracing::error!(
                        "MQTT broker refused the subscription to {filter}: flows {} receive nothing",
                        flows_of(filter)
                    );
                    Grant::Refused
                }
            };
            link.granted.insert(filter.clone(), grant);
        }
        if !accepted.is_empty() {
            tracing::info!("Subscribed to {}", accepted.join(", "));
            if let Some(memory) = self.memory.as_mut() {
                let qos = self.subscriptions.qos as i8;
                memory.remember(
                    accepted
                        .iter()
                        .map(|f| crate::db::SubscriptionRow {
                            topic_filter: f.to_string(),
                            broker_filter: self.subscriptions.broker_filter(f),
                            qos,
                        })
                        .collect(),
                );
            }
        }
        let refused: Vec<String> =
            link.granted.iter().filter(|(_, g)| **g == Grant::Refused).map(|(f, _)| f.clone()).collect();
        metrics::gauge!("mqtt_gateway_subscriptions_refused").set(refused.len() as f64);
        self.health.set_refused(refused);
        drop(flows);
        self.check_ready();
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
        let keepalive = self.target.keepalive;
        let full = self.window.is_full();
        let Some(link) = self.link.as_mut() else { return };
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
            link.send(Packet::PingReq);
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
        link.send(Packet::Disconnect);
        // Closing the queue lets the writer finish and shut its half down.
        drop(link.outgoing);
        // Read on until the broker closes the connection. Closing a socket with unread data in
        // it makes the kernel send a reset, and the broker then throws away the last acks and
        // the DISCONNECT it had not read yet, redelivering those messages.
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            while let Some(event) = link.events.recv().await {
                match event {
                    Event::Closed(_) => break,
                    Event::Packet(Packet::Publish(publish)) => {
                        self.window.release(publish.payload.len() + publish.topic.len())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_groups_prefix_broker_filters_only() {
        let plain = Subscriptions { qos: QoS::AtLeastOnce, shared_group: None };
        let shared = Subscriptions { qos: QoS::AtLeastOnce, shared_group: Some("gw".into()) };
        assert_eq!(plain.broker_filter("a/#"), "a/#");
        assert_eq!(shared.broker_filter("a/#"), "$share/gw/a/#");
    }

    #[test]
    fn credentials_are_sent_only_when_both_are_set() {
        let settings = MqttSettings {
            client_id: "c".into(),
            keepalive: Duration::from_secs(60),
            qos: 1,
            clean_session: false,
            shared_group: None,
            client_id_explicit: false,
            tls: None,
        };
        let target = |u: Option<&str>, p: Option<&str>| {
            let row = BrokerRow {
                host: "h".into(),
                port: Some(1884),
                username: u.map(Into::into),
                password: p.map(Into::into),
            };
            target(&settings, &row).unwrap()
        };
        assert!(target(Some("u"), Some("p")).credentials.is_some());
        assert!(target(Some("u"), None).credentials.is_none());
        assert!(target(Some("u"), Some("")).credentials.is_none());
        assert_eq!(target(None, None).port, 1884);
    }
}
