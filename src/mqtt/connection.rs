//! One connection to the broker: the socket (TCP, or TLS over it), the CONNECT/CONNACK
//! exchange, and two tasks that own the socket's halves, one reading packets and one writing
//! them. Packets are encoded and decoded by [`super::protocol`] with rumqttc's codecs; the socket
//! is ours, which is what lets reading pause without stopping the protocol.
//!
//! Why not rumqttc's `EventLoop`: it reads, writes and pings inside one `poll()`. Pausing reads
//! for backpressure there stops pings and acks too, and a `poll()` dropped by a `select!`
//! cancels a connect or a write half done. Here a paused reader stops only reading (TCP
//! backpressure makes the broker hold the rest), while the writer goes on sending acks and
//! pings.

use super::protocol::{self, ConnAck, Incoming, Outgoing, Refusal, SessionRequest, Version};
use super::window::Window;
use bytes::{Bytes, BytesMut};
use rumqttc::tokio_rustls::TlsConnector;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How much the reader asks the socket for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// A byte stream to the broker, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where and how to connect.
#[derive(Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub keepalive: Duration,
    pub clean_session: bool,
    pub credentials: Option<(String, String)>,
    /// The version asked for first (`MQTT_PROTOCOL`).
    pub version: Version,
    /// Version 5: how long the broker keeps the session after a disconnect; `u32::MAX` never
    /// ends it.
    pub session_expiry: u32,
    /// Version 5: Receive Maximum, the broker's own limit of unacknowledged messages.
    pub receive_maximum: u16,
}

impl Target {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn session_request(&self) -> SessionRequest {
        SessionRequest {
            keepalive_secs: u16::try_from(self.keepalive.as_secs()).unwrap_or(u16::MAX),
            clean_start: self.clean_session,
            // A clean session ends with the connection, as in 3.1.1.
            session_expiry: if self.clean_session { 0 } else { self.session_expiry },
            receive_maximum: self.receive_maximum,
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("invalid broker host name for TLS: {0}")]
    ServerName(String),
    #[error("the broker closed the connection before CONNACK")]
    Closed,
    #[error("malformed packet from the broker: {0}")]
    Protocol(protocol::CodecError),
    /// The broker answered CONNACK with a refusal.
    #[error("refused with reason code {} ({})", .0.v311_code, .0.reason)]
    Refused(Refusal),
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
}

/// A connection whose CONNACK accepted us.
pub struct Connected {
    pub stream: Box<dyn Stream>,
    pub version: Version,
    pub session_present: bool,
    /// The keepalive in force: ours, or the one a version 5 broker asked for instead.
    pub keepalive: Duration,
    /// Version 5: the session expiry the broker granted when it differs from the one asked.
    pub session_expiry: Option<u32>,
    /// Whether SUBSCRIBE may carry Subscription Identifiers.
    pub subscription_ids: bool,
    /// Bytes read after the CONNACK (a persistent session may send at once); the reader
    /// starts with them.
    pub leftover: BytesMut,
}

/// DNS, TCP, TLS and CONNECT/CONNACK in `version`, all within `limit`. Runs in a task of its
/// own, so nothing else the session does can cancel it half way.
pub async fn connect(target: Target, version: Version, limit: Duration) -> Result<Connected, ConnectError> {
    tokio::time::timeout(limit, connect_unbounded(target, version))
        .await
        .map_err(|_| ConnectError::Timeout(limit))?
}

async fn connect_unbounded(target: Target, version: Version) -> Result<Connected, ConnectError> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
    tcp.set_nodelay(true)?;
    tracing::debug!("TCP connection to {} open", target.address());
    let mut stream: Box<dyn Stream> = match &target.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = ServerName::try_from(target.host.clone())
                .map_err(|_| ConnectError::ServerName(target.host.clone()))?;
            let tls =
                TlsConnector::from(Arc::clone(config)).connect(name, tcp).await.map_err(ConnectError::Tls)?;
            Box::new(tls)
        }
    };
    let mut out = BytesMut::new();
    let credentials = target.credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    protocol::connect(version, &target.client_id, credentials, &target.session_request(), &mut out)
        .map_err(ConnectError::Protocol)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    tracing::debug!("CONNECT (MQTT {}) sent to {}", version.name(), target.address());
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    loop {
        match protocol::connack(version, &mut buffer).map_err(ConnectError::Protocol)? {
            Some(ConnAck::Accepted {
                session_present,
                server_keepalive,
                session_expiry,
                subscription_ids,
            }) => {
                let keepalive =
                    server_keepalive.map_or(target.keepalive, |secs| Duration::from_secs(secs.into()));
                return Ok(Connected {
                    stream,
                    version,
                    session_present,
                    keepalive,
                    session_expiry,
                    subscription_ids,
                    leftover: buffer,
                });
            }
            Some(ConnAck::Refused(refusal)) => return Err(ConnectError::Refused(refusal)),
            None => {}
        }
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(ConnectError::Closed);
        }
    }
}

/// What the reader and writer tell the session.
#[derive(Debug)]
pub enum Event {
    Packet(Incoming),
    /// The connection is over; the text says why.
    Closed(String),
}

/// Reads packets until the socket closes. Before each read it waits for room in the in-flight
/// window (counting what the buffer already holds), so while the gateway cannot keep up the
/// socket is simply not read and the broker holds the rest. Never waits on the session.
pub async fn read_packets(
    mut socket: ReadHalf<Box<dyn Stream>>,
    version: Version,
    mut buffer: BytesMut,
    window: Arc<Window>,
    events: mpsc::UnboundedSender<Event>,
) {
    let why = loop {
        loop {
            match protocol::read(version, &mut buffer) {
                Ok(Some(mut packet)) => {
                    if let Incoming::Publish(message) = &mut packet {
                        // A copy of its own: a slice would keep the whole read buffer it came in
                        // alive (up to twice its size, for a large message) until it is acked,
                        // and the window would count less than is held.
                        message.payload = Bytes::copy_from_slice(&message.payload);
                        window.take(message.payload.len() + message.topic.len());
                    }
                    if events.send(Event::Packet(packet)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let _ = events.send(Event::Closed(format!("malformed packet from the broker: {error}")));
                    return;
                }
            }
        }
        window.wait_for_room(buffer.len()).await;
        buffer.reserve(READ_CHUNK);
        match socket.read_buf(&mut buffer).await {
            Ok(0) => break "the broker closed the connection".to_owned(),
            Ok(_) => {}
            Err(error) => break error.to_string(),
        }
    };
    let _ = events.send(Event::Closed(why));
}

/// Writes what the session queues, in order, flushing when the queue runs dry. Ends when the
/// queue is closed (after a DISCONNECT) or the socket fails.
pub async fn write_packets(
    mut socket: WriteHalf<Box<dyn Stream>>,
    version: Version,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut buffer = BytesMut::with_capacity(4096);
    while let Some(packet) = outgoing.recv().await {
        let mut next = Some(packet);
        while let Some(packet) = next {
            if let Err(error) = protocol::write(version, packet, &mut buffer) {
                let _ = events.send(Event::Closed(format!("cannot encode a packet: {error}")));
                return;
            }
            next = if buffer.len() < READ_CHUNK { outgoing.try_recv().ok() } else { None };
        }
        if let Err(error) = socket.write_all(&buffer).await.and(socket.flush().await) {
            let _ = events.send(Event::Closed(error.to_string()));
            return;
        }
        buffer.clear();
    }
    let _ = socket.shutdown().await;
}
