//! TCP proxies on free loopback ports. [`DelayProxy`] adds a fixed delay to everything the
//! client sends, like a broker across a WAN or a cellular uplink (the other direction passes at
//! once; bytes keep their order; each chunk is held until `delay` after it was read), and counts
//! the bytes the server sends back (say, what a database returned to a gateway).
//! [`Mqtt311Only`] makes a broker look like one that speaks only MQTT 3.1.1; [`Cutter`] ends
//! connections with a packet of the test's choice.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub struct DelayProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
    downward: Arc<AtomicU64>,
}

impl DelayProxy {
    /// Proxies 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream` (call inside a tokio runtime).
    pub async fn start(upstream: u16, delay: Duration) -> anyhow::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let downward = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&downward);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, delay, Arc::clone(&counter)));
            }
        });
        Ok(DelayProxy { port, task, downward })
    }

    /// Bytes the upstream server has sent to clients so far, over every connection.
    pub fn bytes_to_clients(&self) -> u64 {
        self.downward.load(Ordering::Relaxed)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: u16, delay: Duration, counter: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let upward_read = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = client_read.read(&mut buffer).await {
            if n == 0 || chunks_tx.send((Instant::now() + delay, buffer[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let upward_write = async move {
        while let Some((due, chunk)) = chunks.recv().await {
            tokio::time::sleep_until(due).await;
            if server_write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downward = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n) = server_read.read(&mut buffer).await {
            if n == 0 || client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
            counter.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward_read, upward_write, downward);
}

/// A broker that speaks only MQTT 3.1.1, as such a broker answers: a version 5 CONNECT gets the
/// 3.1.1 CONNACK with return code 1 (unacceptable protocol version) and the connection is
/// closed; any other CONNECT, and all that follows, passes through to the real broker.
pub struct Mqtt311Only {
    pub port: u16,
    /// Version 5 CONNECTs refused so far.
    pub refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Mqtt311Only {
    /// Listens on 127.0.0.1:`port` (returned) in front of 127.0.0.1:`upstream` (call inside a
    /// tokio runtime).
    pub async fn start(upstream: u16) -> anyhow::Result<Mqtt311Only> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&refused);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(screen(client, upstream, std::sync::Arc::clone(&counter)));
            }
        });
        Ok(Mqtt311Only { port, refused, task })
    }
}

impl Drop for Mqtt311Only {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the CONNECT, answers a version 5 one as a 3.1.1 broker does, passes the rest on.
async fn screen(
    mut client: TcpStream,
    upstream: u16,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut first = Vec::new();
    let mut buffer = [0u8; 4096];
    // The protocol level is the byte after the name "MQTT": fixed header (type, remaining
    // length of 1 to 4 bytes), then 0x00 0x04 'M' 'Q' 'T' 'T' and the level.
    let level = loop {
        if let Some(length_bytes) = (1..=4).find(|&i| first.len() > i && first[i] & 0x80 == 0) {
            let at = 1 + length_bytes + 6;
            if first.len() > at {
                break first[at];
            }
        }
        match client.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => first.extend_from_slice(&buffer[..n]),
        }
    };
    if level == 5 {
        refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = client.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
        let _ = client.shutdown().await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    if server.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

/// A plain relay in front of a broker that can end every connection as another broker would:
/// [`Cutter::cut_with`] writes a packet of the test's choice (a version 5 DISCONNECT with a
/// reason, say) to each client, then closes. Mosquitto 2.0 itself closes a taken-over session
/// without a word.
pub struct Cutter {
    pub port: u16,
    cut: tokio::sync::broadcast::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Cutter {
    /// Relays 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream` (call inside a tokio runtime).
    pub async fn start(upstream: u16) -> anyhow::Result<Cutter> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, _) = tokio::sync::broadcast::channel(4);
        let cuts = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay_until_cut(client, upstream, cuts.subscribe()));
            }
        });
        Ok(Cutter { port, cut, task })
    }

    /// Sends `packet` to every connected client and closes its connection.
    pub fn cut_with(&self, packet: &[u8]) {
        let _ = self.cut.send(packet.to_vec());
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_until_cut(
    mut client: TcpStream,
    upstream: u16,
    mut cut: tokio::sync::broadcast::Receiver<Vec<u8>>,
) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        Ok(packet) = cut.recv() => {
            let _ = client.write_all(&packet).await;
            let _ = client.shutdown().await;
        }
    }
}
