//! A TCP proxy on a free loopback port that adds a fixed delay to everything the client sends,
//! like a broker across a WAN or a cellular uplink. The other direction passes at once. Bytes
//! keep their order; each chunk is held until `delay` after it was read. It counts the bytes
//! the server sends back (say, what a database returned to a gateway).

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
