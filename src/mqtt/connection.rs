//! One connection to the broker: the socket (TCP, or TLS over it), the CONNECT/CONNACK
//! exchange, and two tasks that own the socket's halves, one reading packets and one writing
//! them. MQTT's packets are encoded and decoded with rumqttc's codec; the socket is ours, which
//! is what lets reading pause without stopping the protocol.
//!
//! Why not rumqttc's `EventLoop`: it reads, writes and pings inside one `poll()`. Pausing reads
//! for backpressure there stops pings and acks too, and a `poll()` dropped by a `select!`
//! cancels a connect or a write half done. Here a paused reader stops only reading (TCP
//! backpressure makes the broker hold the rest), while the writer goes on sending acks and
//! pings.

use super::window::Window;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, Packet};
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::tokio_rustls::TlsConnector;
use rumqttc::ConnectReturnCode;
use rustls::pki_types::ServerName;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// MQTT's largest packet: the broker decides what size is acceptable, not us.
pub const MAX_PACKET: usize = 268_435_455;
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
}

impl Target {
    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
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
    #[error("the broker sent {0} instead of CONNACK")]
    Unexpected(String),
    #[error("the broker closed the connection before CONNACK")]
    Closed,
    #[error("malformed packet from the broker: {0}")]
    Protocol(CodecError),
    /// The broker answered CONNACK with this MQTT 3.1.1 return code.
    #[error("refused with reason code {0}")]
    Refused(u8),
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
}

/// A connection whose CONNACK accepted us.
pub struct Connected {
    pub stream: Box<dyn Stream>,
    pub connack: ConnAck,
    /// Bytes read after the CONNACK (a persistent session may send at once); the reader
    /// starts with them.
    pub leftover: BytesMut,
}

/// The MQTT 3.1.1 CONNACK return code, the number operators know from the original's log line.
pub fn return_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

/// DNS, TCP, TLS and CONNECT/CONNACK, all within `limit`. Runs in a task of its own, so
/// nothing else the session does can cancel it half way.
pub async fn connect(target: Target, limit: Duration) -> Result<Connected, ConnectError> {
    tokio::time::timeout(limit, connect_unbounded(target)).await.map_err(|_| ConnectError::Timeout(limit))?
}

async fn connect_unbounded(target: Target) -> Result<Connected, ConnectError> {
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
    let mut connect = Connect::new(target.client_id.as_str());
    connect.keep_alive = u16::try_from(target.keepalive.as_secs()).unwrap_or(u16::MAX);
    connect.clean_session = target.clean_session;
    if let Some((user, password)) = &target.credentials {
        connect.set_login(user.as_str(), password.as_str());
    }
    let mut out = BytesMut::new();
    Packet::Connect(connect).write(&mut out, MAX_PACKET).map_err(ConnectError::Protocol)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    tracing::debug!("CONNECT sent to {}", target.address());
    let mut buffer = BytesMut::with_capacity(READ_CHUNK);
    loop {
        match Packet::read(&mut buffer, MAX_PACKET) {
            Ok(Packet::ConnAck(connack)) if connack.code == ConnectReturnCode::Success => {
                return Ok(Connected { stream, connack, leftover: buffer });
            }
            Ok(Packet::ConnAck(connack)) => return Err(ConnectError::Refused(return_code(connack.code))),
            Ok(other) => return Err(ConnectError::Unexpected(format!("{other:?}"))),
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(error) => return Err(ConnectError::Protocol(error)),
        }
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(ConnectError::Closed);
        }
    }
}

/// What the reader and writer tell the session.
#[derive(Debug)]
pub enum Event {
    Packet(Packet),
    /// The connection is over; the text says why.
    Closed(String),
}

/// Reads packets until the socket closes. Before each read it waits for room in the in-flight
/// window (counting what the buffer already holds), so while the gateway cannot keep up the
/// socket is simply not read and the broker holds the rest. Never waits on the session.
pub async fn read_packets(
    mut socket: ReadHalf<Box<dyn Stream>>,
    mut buffer: BytesMut,
    window: Arc<Window>,
    events: mpsc::UnboundedSender<Event>,
) {
    let why = loop {
        loop {
            match Packet::read(&mut buffer, MAX_PACKET) {
                Ok(mut packet) => {
                    if let Packet::Publish(publish) = &mut packet {
                        // A copy of its own: a slice would keep the whole read buffer it came in
                        // alive (up to twice its size, for a large message) until it is acked,
                        // and the window would count less than is held.
                        publish.payload = Bytes::copy_from_slice(&publish.payload);
                        window.take(publish.payload.len() + publish.topic.len());
                    }
                    if events.send(Event::Packet(packet)).is_err() {
                        return;
                    }
                }
                Err(CodecError::InsufficientBytes(_)) => break,
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
    mut outgoing: mpsc::UnboundedReceiver<Packet>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut buffer = BytesMut::with_capacity(4096);
    while let Some(packet) = outgoing.recv().await {
        let mut next = Some(packet);
        while let Some(packet) = next {
            if let Err(error) = packet.write(&mut buffer, MAX_PACKET) {
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
