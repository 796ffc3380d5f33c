//! The broker session: owns the MQTT connection and its event loop.
//!
//! The event loop is polled without pause, whatever the database or endpoints are doing, so
//! keepalive pings and acknowledgements always flow. Incoming messages are handed to the
//! processor through a bounded channel. With QoS 1 (the default) the broker never has more
//! unacknowledged messages out than its in-flight window, so that hand-over does not wait.
//!
//! After a lost connection it reconnects with capped exponential backoff and jitter, and
//! subscribes every current flow's filter again, whatever the broker says it remembers.

use crate::backoff::Backoff;
use crate::config::MqttSettings;
use crate::db::BrokerRow;
use crate::flows::FlowSet;
use crate::health::{self, Health};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet,
    Publish, QoS, SubscribeReasonCode,
};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// MQTT's largest packet: the broker decides what size is acceptable, not us. A smaller limit
/// would make rumqttc drop the connection on a large message, which a persistent session
/// would then redeliver forever.
const MAX_PACKET: usize = 268_435_455;
/// Requests (acks, subscriptions) queued for the event loop; acks are tiny.
const REQUEST_QUEUE: usize = 10_000;
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long the initial subscriptions may take before startup fails.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(30);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the first connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `cause`, not `source`: its text is part of this message, and must not be repeated by
    /// the error chain.
    #[error("cannot connect to MQTT broker {address}: {cause}{}", hint(cause))]
    Connect { address: String, cause: ConnectionError },
    #[error("no SUBACK from the broker within {0:?}")]
    SubscribeTimeout(Duration),
    #[error("interrupted by shutdown")]
    Interrupted,
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

/// Client options from the chosen `mqtt_servers` row and the environment.
pub fn options(settings: &MqttSettings, broker: &BrokerRow) -> anyhow::Result<MqttOptions> {
    let port = broker.port.and_then(|p| u16::try_from(p).ok()).unwrap_or(1883);
    let mut options = MqttOptions::new(&settings.client_id, &broker.host, port);
    options
        .set_keep_alive(settings.keepalive)
        .set_clean_session(settings.clean_session)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_request_channel_capacity(REQUEST_QUEUE);
    // As the original: credentials only when both are given and non-empty.
    if let (Some(user), Some(password)) = (&broker.username, &broker.password) {
        if !user.is_empty() && !password.is_empty() {
            options.set_credentials(user, password);
        }
    }
    if let Some(tls) = &settings.tls {
        let config = crate::tls::broker_config(tls)?;
        options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(options)
}

/// The MQTT 3.1.1 CONNACK return code, the number operators know from the original's log line.
fn return_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

fn hint(error: &ConnectionError) -> String {
    let text = format!("{error} {error:?}");
    crate::tls::explain(&text).map(|hint| format!(" ({hint})")).unwrap_or_default()
}

/// A message handed to the processor, with what it takes to acknowledge it once written.
pub struct Message {
    pub publish: Publish,
    pub ack: AckToken,
}

/// Enough to acknowledge one message: its packet id, QoS, and the connection it came on.
#[derive(Debug, Clone, Copy)]
pub struct AckToken {
    generation: u64,
    pkid: u16,
    qos: QoS,
}

/// The processor's way to acknowledge messages. Sending never waits: a processor blocked on
/// acknowledgements while the session waits on the processor would deadlock, because rumqttc
/// only sends queued acks while the session polls it.
#[derive(Clone)]
pub struct Acker(mpsc::UnboundedSender<AckToken>);

impl Acker {
    pub fn ack(&self, token: AckToken) {
        // Fails only when the session is gone; the broker then redelivers.
        let _ = self.0.send(token);
    }
}

pub struct BrokerSession {
    eventloop: EventLoop,
    client: AsyncClient,
    address: String,
    subscriptions: Subscriptions,
    flows: watch::Receiver<Arc<FlowSet>>,
    /// `None` once shutdown began: later messages are left unacknowledged for redelivery.
    messages: Option<mpsc::Sender<Message>>,
    /// Messages received while the processor's queue was full, oldest first. Reading from the
    /// broker pauses while this holds `hold_limit` messages, so memory stays bounded whatever
    /// in-flight window the broker grants.
    overflow: VecDeque<Message>,
    hold_limit: usize,
    acks: mpsc::UnboundedReceiver<AckToken>,
    /// Acks waiting for room in rumqttc's request queue, in the order MQTT requires.
    unsent_acks: VecDeque<AckToken>,
    /// Counts connections: an ack from an earlier one is dropped, because its packet id means
    /// nothing to the new one and the broker redelivers the message anyway.
    generation: u64,
    backoff: Backoff,
    health: Arc<Health>,
}

impl BrokerSession {
    /// The session, a client handle for subscription changes, and the processor's acker.
    /// Messages go to `messages`; at most about `hold_limit` more wait beside it.
    pub fn new(
        options: MqttOptions,
        subscriptions: Subscriptions,
        flows: watch::Receiver<Arc<FlowSet>>,
        messages: mpsc::Sender<Message>,
        hold_limit: usize,
        health: Arc<Health>,
    ) -> (BrokerSession, AsyncClient, Acker) {
        let (host, port) = options.broker_address();
        let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let session = BrokerSession {
            eventloop,
            client: client.clone(),
            address: format!("{host}:{port}"),
            subscriptions,
            flows,
            messages: Some(messages),
            overflow: VecDeque::new(),
            hold_limit: hold_limit.max(1),
            acks,
            unsent_acks: VecDeque::new(),
            generation: 0,
            backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_CAP),
            health,
        };
        (session, client, Acker(ack_tx))
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Connects and subscribes every current filter, waiting for the SUBACKs so that a message
    /// published once this returns is delivered. A refused CONNACK is logged and retried, as
    /// the original's network loop did; a broker that cannot be reached at all fails startup.
    pub async fn start(&mut self, shutdown: &CancellationToken) -> Result<(), StartError> {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Err(StartError::Interrupted),
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    self.health.set_broker_connected(true);
                    break;
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    tracing::error!("MQTT connection failed with reason code: {}", return_code(code));
                    let delay = self.backoff.step();
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(StartError::Interrupted),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(cause) => return Err(StartError::Connect { address: self.address.clone(), cause }),
            }
        }
        self.backoff.reset();
        let filters = self.flows.borrow().filters();
        if filters.is_empty() {
            return Ok(());
        }
        self.subscribe(&filters).await;
        let deadline = tokio::time::sleep(SUBACK_TIMEOUT);
        tokio::pin!(deadline);
        loop {
            self.pass_on();
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Err(StartError::Interrupted),
                _ = &mut deadline => return Err(StartError::SubscribeTimeout(SUBACK_TIMEOUT)),
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    self.report_refused(&filters, &ack.return_codes);
                    return Ok(());
                }
                // A persistent session may deliver queued messages right after CONNACK.
                Ok(Event::Incoming(Packet::Publish(publish))) => self.receive(publish),
                Ok(_) => {}
                Err(cause) => return Err(StartError::Connect { address: self.address.clone(), cause }),
            }
        }
    }

    /// Polls the connection until shutdown, then waits for `processor` to finish (so its acks
    /// go out) and disconnects cleanly.
    pub async fn run(mut self, shutdown: CancellationToken, mut processor: JoinHandle<()>) {
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut processor_done = false;
        let mut beat = tokio::time::interval(health::BEAT);
        loop {
            self.health.beat_session();
            if shutdown.is_cancelled() && self.messages.is_some() {
                // Dropping the sender lets the processor drain what it has and stop; what waits
                // here was never written and is left unacknowledged, for redelivery.
                self.messages = None;
                self.overflow.clear();
            }
            self.pass_on();
            let reading = retry_at.is_none() && self.overflow.len() < self.hold_limit;
            let room = self.messages.clone().filter(|_| !self.overflow.is_empty());
            tokio::select! {
                biased;
                _ = &mut processor, if !processor_done => {
                    processor_done = true;
                    break;
                }
                token = self.acks.recv() => {
                    if let Some(token) = token {
                        self.unsent_acks.push_back(token);
                    }
                }
                _ = shutdown.cancelled(), if self.messages.is_some() => {}
                _ = beat.tick() => {}
                permit = async { room.as_ref().expect("guarded").reserve().await }, if room.is_some() => {
                    if let (Ok(permit), Some(message)) = (permit, self.overflow.pop_front()) {
                        permit.send(message);
                    }
                }
                _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                    retry_at = None;
                }
                event = self.eventloop.poll(), if reading => {
                    if let Some(delay) = self.handle(event).await {
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
            }
        }
        if !processor_done {
            let _ = processor.await;
        }
        self.disconnect().await;
    }

    /// Acts on one event; returns how long to wait before reconnecting after an error.
    async fn handle(&mut self, event: Result<Event, ConnectionError>) -> Option<Duration> {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!("Reconnected to MQTT broker {}", self.address);
                self.health.set_broker_connected(true);
                metrics::counter!("mqtt_gateway_broker_reconnects_total").increment(1);
                self.generation += 1;
                self.backoff.reset();
                let filters = self.flows.borrow().filters();
                self.subscribe(&filters).await;
                None
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                self.receive(publish);
                None
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) if ack.return_codes.iter().any(is_refused) => {
                tracing::error!(
                    "MQTT broker refused a subscription (packet {}): {:?}",
                    ack.pkid,
                    ack.return_codes
                );
                None
            }
            Ok(_) => None,
            Err(ConnectionError::ConnectionRefused(code)) => {
                tracing::error!("MQTT connection failed with reason code: {}", return_code(code));
                self.health.set_broker_connected(false);
                Some(self.backoff.step())
            }
            Err(error) => {
                self.health.set_broker_connected(false);
                let delay = self.backoff.step();
                tracing::warn!(
                    "Lost connection to MQTT broker {}: {error}{}; reconnecting in {:.1}s",
                    self.address,
                    hint(&error),
                    delay.as_secs_f64()
                );
                Some(delay)
            }
        }
    }

    /// Queues a received message for the processor; nothing here ever waits.
    fn receive(&mut self, publish: Publish) {
        if self.messages.is_none() {
            return;
        }
        metrics::counter!("mqtt_gateway_messages_received_total").increment(1);
        let ack = AckToken { generation: self.generation, pkid: publish.pkid, qos: publish.qos };
        self.overflow.push_back(Message { publish, ack });
        self.pass_on();
    }

    /// Moves waiting messages to the processor and waiting acks to rumqttc, as far as each
    /// has room, keeping order.
    fn pass_on(&mut self) {
        if let Some(messages) = &self.messages {
            while let Some(message) = self.overflow.pop_front() {
                match messages.try_send(message) {
                    Ok(()) => {}
                    Err(
                        mpsc::error::TrySendError::Full(message) | mpsc::error::TrySendError::Closed(message),
                    ) => {
                        self.overflow.push_front(message);
                        break;
                    }
                }
            }
        }
        while let Ok(token) = self.acks.try_recv() {
            self.unsent_acks.push_back(token);
        }
        while let Some(token) = self.unsent_acks.front().copied() {
            if token.generation != self.generation || token.qos == QoS::AtMostOnce {
                self.unsent_acks.pop_front();
                continue;
            }
            let mut stub = Publish::new("", token.qos, Vec::new());
            stub.pkid = token.pkid;
            if self.client.try_ack(&stub).is_err() {
                break;
            }
            self.unsent_acks.pop_front();
        }
    }

    async fn subscribe(&self, filters: &BTreeSet<String>) {
        if filters.is_empty() {
            return;
        }
        let topics = filters.iter().map(|f| {
            rumqttc::SubscribeFilter::new(self.subscriptions.broker_filter(f), self.subscriptions.qos)
        });
        if let Err(error) = self.client.subscribe_many(topics).await {
            tracing::error!("Cannot queue MQTT subscription: {error}");
        }
        tracing::info!("Subscribed to {}", join(filters));
    }

    fn report_refused(&self, filters: &BTreeSet<String>, codes: &[SubscribeReasonCode]) {
        for (filter, code) in filters.iter().zip(codes) {
            if is_refused(code) {
                tracing::error!("MQTT broker refused the subscription to {filter}");
            }
        }
    }

    /// Sends the acks still queued, then DISCONNECT, and waits for the broker to close the
    /// connection, bounded in time.
    async fn disconnect(mut self) {
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            self.pass_on();
            while !self.unsent_acks.is_empty() {
                if self.eventloop.poll().await.is_err() {
                    return;
                }
                self.pass_on();
            }
            if self.client.disconnect().await.is_err() {
                return;
            }
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // Read on until the broker closes the connection. Closing a socket with unread
            // messages in it makes the kernel send a reset, and the broker then throws away the
            // last acks and the DISCONNECT it had not read yet, redelivering those messages.
            // What arrives meanwhile is neither written nor acknowledged.
            while self.eventloop.poll().await.is_ok() {}
        })
        .await;
    }
}

fn is_refused(code: &SubscribeReasonCode) -> bool {
    matches!(code, SubscribeReasonCode::Failure)
}

pub fn join(filters: &BTreeSet<String>) -> String {
    filters.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
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
        let options = |s: &MqttSettings, r: &BrokerRow| options(s, r).unwrap();
        let row = |u: Option<&str>, p: Option<&str>| BrokerRow {
            host: "h".into(),
            port: Some(1884),
            username: u.map(Into::into),
            password: p.map(Into::into),
        };
        assert!(options(&settings, &row(Some("u"), Some("p"))).credentials().is_some());
        assert!(options(&settings, &row(Some("u"), None)).credentials().is_none());
        assert!(options(&settings, &row(Some("u"), Some(""))).credentials().is_none());
        assert_eq!(options(&settings, &row(None, None)).broker_address().1, 1884);
    }
}
