//! A TCP proxy in front of MariaDB that can refuse writes the way a proxy in front of a
//! failing-over primary does (MaxScale with `master_failure_mode=fail_on_write`): reads are
//! answered, and a connection that sends a write statement is closed. Turning refusal on
//! closes every open connection too, as the primary going away does; a client then has to
//! connect again, and prepare its statements again, which is where the proxy sees them.
//!
//! It reads the MySQL protocol from the client just enough for that: whole packets are
//! forwarded, and a command packet (sequence 0) that is a query or a statement to prepare
//! whose SQL starts with `INSERT`, `UPDATE`, `DELETE` or `REPLACE` is a write. No TLS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct WriteRefusingProxy {
    pub port: u16,
    refusing: watch::Sender<bool>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl WriteRefusingProxy {
    /// Proxies 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream`, passing everything until
    /// told to refuse writes (call inside a tokio runtime).
    pub async fn start(upstream: u16) -> anyhow::Result<WriteRefusingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (refusing, watching) = watch::channel(false);
        let refused = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&refused);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, watching.clone(), Arc::clone(&counter)));
            }
        });
        Ok(WriteRefusingProxy { port, refusing, refused, task })
    }

    /// Starts refusing writes (closing every connection open now) or stops.
    pub fn refuse_writes(&self, refuse: bool) {
        self.refusing.send_replace(refuse);
    }

    /// How many write statements it refused, closing their connection.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl Drop for WriteRefusingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const COM_QUERY: u8 = 0x03;
const COM_STMT_PREPARE: u8 = 0x16;

/// Whether a whole client packet (header included) is a write statement.
fn is_write(packet: &[u8]) -> bool {
    let (sequence, payload) = (packet[3], &packet[4..]);
    let Some((&command, sql)) = payload.split_first() else { return false };
    if sequence != 0 || (command != COM_QUERY && command != COM_STMT_PREPARE) {
        return false;
    }
    let sql = String::from_utf8_lossy(sql);
    let verb = sql.trim_start().split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("");
    ["INSERT", "UPDATE", "DELETE", "REPLACE"].iter().any(|w| verb.eq_ignore_ascii_case(w))
}

/// The length of the first packet in `buffer`, header included, once it is all there.
fn whole_packet(buffer: &[u8]) -> Option<usize> {
    let header = buffer.get(..4)?;
    let length = 4 + (header[0] as usize | (header[1] as usize) << 8 | (header[2] as usize) << 16);
    (buffer.len() >= length).then_some(length)
}

async fn relay(client: TcpStream, upstream: u16, refusing: watch::Receiver<bool>, refused: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Only a change from now on closes this connection.
    let mut failover = refusing.clone();
    failover.borrow_and_update();
    let upward = async move {
        let mut pending = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
            while let Some(length) = whole_packet(&pending) {
                if *refusing.borrow() && is_write(&pending[..length]) {
                    refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if server_write.write_all(&pending[..length]).await.is_err() {
                    return;
                }
                pending.drain(..length);
            }
        }
    };
    let downward = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
    };
    let failing_over = async move {
        while failover.changed().await.is_ok() {
            if *failover.borrow() {
                return;
            }
        }
        std::future::pending().await
    };
    // Whichever ends first ends the connection: both sockets are dropped, and closed, with it.
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
        _ = failing_over => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(sequence: u8, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut p = vec![n as u8, (n >> 8) as u8, (n >> 16) as u8, sequence];
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn writes_are_told_from_reads() {
        let query = |sql: &str| packet(0, &[&[COM_QUERY], sql.as_bytes()].concat());
        let prepare = |sql: &str| packet(0, &[&[COM_STMT_PREPARE], sql.as_bytes()].concat());
        assert!(is_write(&prepare("INSERT INTO data (a) VALUES (?)")));
        assert!(is_write(&prepare("update flows SET last_msg_id = 1")));
        assert!(is_write(&query("  DELETE FROM gateway_outbox")));
        assert!(!is_write(&prepare("SELECT @@SESSION.max_allowed_packet")));
        assert!(!is_write(&query("BEGIN")));
        assert!(!is_write(&query("SET SESSION lock_wait_timeout = 5")));
        // The handshake response (sequence 1) is never a command.
        assert!(!is_write(&packet(1, &[&[COM_QUERY], &b"INSERT"[..]].concat())));
        assert_eq!(whole_packet(&prepare("SELECT 1")[..6]), None);
        assert_eq!(whole_packet(&prepare("SELECT 1")), Some(4 + 9));
    }
}
