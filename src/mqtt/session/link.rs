//! The connection's life as the session sees it: connecting (with the fall back from MQTT 5 to
//! 3.1.1), what a new connection starts (reader, writer, every subscription), keeping it alive,
//! noticing it is gone, and closing it cleanly at shutdown.

use super::{BrokerSession, Happened};
use crate::mqtt::connection::{self, ConnectError, Connected, Event};
use crate::mqtt::protocol::{Incoming, Outgoing, Version};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A connect attempt (DNS, TCP, TLS handshake, CONNECT and CONNACK) may take this long: enough
/// for TLS over a link with seconds of latency.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The reconnect delay starts over only after a connection stayed up this long, so a broker
/// that accepts and then drops the client (a duplicate client id, an auth plugin) is not
/// hammered.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection waits for the record of held forms before going on without it.
const HELD_TIMEOUT: Duration = Duration::from_secs(8);

/// The current connection.
pub(super) struct Link {
    pub(super) id: u64,
    pub(super) version: Version,
    pub(super) outgoing: mpsc::UnboundedSender<Outgoing>,
    pub(super) events: mpsc::UnboundedReceiver<Event>,
    pub(super) reader: JoinHandle<()>,
    pub(super) writer: JoinHandle<()>,
    pub(super) since: Instant,
    pub(super) last_sent: Instant,
    pub(super) ping_sent: Option<Instant>,
    /// Ours, or the one a version 5 broker asked for.
    pub(super) keepalive: Duration,
}

impl Link {
    pub(super) fn send(&mut self, packet: Outgoing) {
        // A closed queue means the writer ended; its `Closed` event is on its way.
        let _ = self.outgoing.send(packet);
        self.last_sent = Instant::now();
    }
}

impl BrokerSession {
    pub(super) fn begin_connect(&mut self) {
        if self.connecting.is_none() && self.link.is_none() {
            tracing::debug!("Connecting to MQTT broker {} with MQTT {}", self.address, self.version.name());
            let attempt = connection::connect(self.target.clone(), self.version, CONNECT_TIMEOUT);
            self.connecting = Some(tokio::spawn(attempt));
        }
    }

    pub(super) fn connect_failed(&mut self, error: ConnectError) -> Happened {
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
                crate::mqtt::hint(&error.to_string()),
                delay.as_secs_f64()
            ),
        }
        self.retry_at = Some(Instant::now() + delay);
        Happened::ConnectFailed(error)
    }

    pub(super) fn established(&mut self, connected: Connected) {
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
        // Read before this connection's SUBSCRIBEs are recorded: what earlier ones left.
        if let Some(held) = &self.held {
            let answer = held.read();
            let (connection, answers) = (self.connections, self.held_answers_tx.clone());
            tokio::spawn(async move {
                let held =
                    tokio::time::timeout(HELD_TIMEOUT, answer).await.ok().and_then(Result::ok).flatten();
                let _ = answers.send((connection, held));
            });
        }
        // Whatever the session says it holds: the broker may have lost what it last saved.
        let with_ids = version == Version::V5 && connected.subscription_ids;
        self.subscriptions.connected(self.held.is_some(), with_ids);
        self.send_planned();
        self.check_ready();
    }

    /// The connection is gone: forget it, give back what its unread events held, and
    /// schedule the next attempt.
    pub(super) fn lost(&mut self, why: &str) {
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
            crate::mqtt::hint(why),
            delay.as_secs_f64()
        );
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Pings when nothing else was sent for half the keepalive, and gives up on a connection
    /// that does not answer within the keepalive while it is being read.
    /// When the keepalive next needs looking at: a ping due half a keepalive after the last
    /// packet sent, or the answer to one overdue. `None` without a connection or a keepalive.
    pub(super) fn keepalive_due(&self) -> Option<Instant> {
        let link = self.link.as_ref()?;
        if link.keepalive.is_zero() {
            return None;
        }
        let ping = link.last_sent + link.keepalive / 2;
        Some(match link.ping_sent {
            Some(sent) => ping.min(sent + link.keepalive + Duration::from_millis(1)),
            None => ping,
        })
    }

    pub(super) fn keep_alive(&mut self) {
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
    pub(super) async fn disconnect(mut self) {
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
