//! The broker session: the connection to the broker, in MQTT 5 or 3.1.1, kept in step with
//! the flows, and what the rest of the gateway exchanges with it (messages in, acks back,
//! subscription changes).
//!
//! Where each part lives:
//! - [`session`]: the state machine: connect, negotiate the version, reconnect with backoff,
//!   hand messages over, acknowledge them on the connection they came on.
//! - [`subscriptions`]: which filters to subscribe and unsubscribe on each connection, and
//!   what the broker answered (no I/O, so it is tested alone).
//! - [`held`]: the record of every form of a filter this client id may hold at the broker, so
//!   that what no flow needs (another shared group's, a removed flow's) is unsubscribed.
//! - [`report`]: what the operator reads about subscriptions: refusals naming their flows,
//!   and one line for what many SUBACKs took.
//! - [`protocol`]: the packets of both versions, through rumqttc's codecs; [`reasons`]: the
//!   broker's codes in words; [`connection`]: the socket and its reader and writer tasks; [`window`]: the
//!   in-flight window in messages and bytes.
//!
//! What it guarantees: nothing is cancelled half way (connects and socket I/O run in tasks of
//! their own); memory follows the in-flight window (TCP backpressure makes the broker hold the
//! rest); keepalive never stops; an ack never crosses connections; ready means every wanted
//! filter is answered on the current connection.

mod connection;
mod held;
pub mod protocol;
mod reasons;
mod report;
mod session;
mod subscriptions;
mod window;

pub use connection::{ConnectError, Target};
pub use held::Held;
pub use protocol::Version;
pub use session::{BrokerSession, CONNECT_TIMEOUT, STABLE_AFTER};
pub use subscriptions::Subscriptions;
pub use window::Window;

use crate::config::MqttSettings;
use crate::db::BrokerRow;
use bytes::Bytes;
use rumqttc::QoS;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

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
/// `max_in_flight` becomes version 5's Receive Maximum.
pub fn target(settings: &MqttSettings, broker: &BrokerRow, max_in_flight: usize) -> anyhow::Result<Target> {
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
        version: settings.protocol,
        session_expiry: settings.session_expiry.unwrap_or(u32::MAX),
        receive_maximum: u16::try_from(max_in_flight).unwrap_or(u16::MAX),
    })
}

/// Connects once as the gateway would (same version negotiation) and disconnects: for
/// `mqtt-gateway check`. Returns the version the broker accepted.
pub async fn probe(mut target: Target) -> Result<Version, ConnectError> {
    let connected = match connection::connect(target.clone(), target.version, CONNECT_TIMEOUT).await {
        Err(ConnectError::Refused(refusal)) if refusal.wrong_version() && target.version == Version::V5 => {
            target.version = Version::V311;
            connection::connect(target, Version::V311, CONNECT_TIMEOUT).await?
        }
        other => other?,
    };
    let version = connected.version;
    let mut stream = connected.stream;
    let mut out = bytes::BytesMut::new();
    if protocol::write(version, protocol::Outgoing::Disconnect, &mut out).is_ok() {
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    }
    Ok(version)
}

/// A message handed to the processor, with what it takes to acknowledge it once written.
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// RETAIN as delivered: set only when the broker sent it because of a subscription.
    pub retain: bool,
    /// MQTT 5: the Subscription Identifiers this copy was sent for (see
    /// [`crate::flows::FlowSet::routed`]); empty with 3.1.1.
    pub subscription_ids: Vec<u32>,
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
    /// Each filter with its Subscription Identifier.
    filters: BTreeMap<String, u32>,
    done: oneshot::Sender<()>,
}

impl SubscriptionHandle {
    /// Subscribes what is new in `filters` (and what the broker refused, again), unsubscribes
    /// what is no longer there, and waits up to `limit` for the broker to confirm it all. False
    /// when it did not in time (the broker is away, say): the session goes on and applies the
    /// set once it is back.
    pub async fn want(&self, filters: BTreeMap<String, u32>, limit: Duration) -> bool {
        let (done, confirmed) = oneshot::channel();
        if self.0.send(Want { filters, done }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(limit, confirmed).await, Ok(Ok(())))
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
            protocol: Version::V5,
            session_expiry: None,
        };
        let target = |u: Option<&str>, p: Option<&str>| {
            let row = BrokerRow {
                host: "h".into(),
                port: Some(1884),
                username: u.map(Into::into),
                password: p.map(Into::into),
            };
            target(&settings, &row, 100_000).unwrap()
        };
        assert!(target(Some("u"), Some("p")).credentials.is_some());
        assert!(target(Some("u"), None).credentials.is_none());
        assert!(target(Some("u"), Some("")).credentials.is_none());
        assert_eq!(target(None, None).port, 1884);
        assert_eq!(target(None, None).receive_maximum, u16::MAX, "Receive Maximum is at most 65535");
        assert_eq!(target(None, None).session_expiry, u32::MAX, "never ends unless set");
    }
}
