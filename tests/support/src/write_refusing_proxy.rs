//! A TCP proxy in front of MariaDB that can refuse writes while it answers reads, in two ways:
//! - [`Refusal::Close`], as a proxy in front of a failing-over primary does (MaxScale with
//!   `master_failure_mode=fail_on_write`): a connection that sends a write statement is closed.
//!   Turning it on closes every open connection too, as the primary going away does;
//! - [`Refusal::Silence`], a half-open link: a write statement gets no answer, ever, and nothing
//!   more passes on its connection either way. Turning it on silences every open connection.
//!
//! Either way a client has to connect again, and prepare its statements again, which is where
//! the proxy sees them.
//!
//! It reads the MySQL protocol from the client just enough for that: whole packets are
//! forwarded, and a command packet (sequence 0) that is a query or a statement to prepare
//! whose SQL starts with `INSERT`, `UPDATE`, `DELETE` or `REPLACE` is a write. No TLS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with a write statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It passes, as everything else.
    Pass,
    /// Its connection is closed.
    Close,
    /// Its connection goes silent both ways, and stays open.
    Silence,
}

pub struct WriteRefusingProxy {
    pub port: u16,
    refusing: watch::Sender<Refusal>,
    refused: Arc<AtomicU64>,
    silent: Arc<AtomicU64>,
    went_silent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl WriteRefusingProxy {
    /// Proxies 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream`, passing everything until
    /// told to refuse writes (call inside a tokio runtime).
    pub async fn start(upstream: u16) -> anyhow::Result<WriteRefusingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (refusing, watching) = watch::channel(Refusal::Pass);
        let refused = Arc::new(AtomicU64::new(0));
        let silent = Arc::new(AtomicU64::new(0));
        let went_silent = Arc::new(AtomicU64::new(0));
        let counters = Counters {
            refused: Arc::clone(&refused),
            silent: Arc::clone(&silent),
            went_silent: Arc::clone(&went_silent),
        };
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, watching.clone(), counters.clone()));
            }
        });
        Ok(WriteRefusingProxy { port, refusing, refused, silent, went_silent, task })
    }

    /// Starts refusing writes (closing or silencing every connection open now), or stops.
    pub fn refuse_writes(&self, how: Refusal) {
        self.refusing.send_replace(how);
    }

    /// How many write statements it refused.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// How many connections went silent on a write and are still open: the client waits on
    /// them still, or keeps them.
    pub fn silent_and_open(&self) -> u64 {
        self.silent.load(Ordering::Relaxed)
    }

    /// How many connections went silent in all: on a write, or open when silence began (a link
    /// that dies under connections the client holds, whether it uses them or not).
    pub fn went_silent(&self) -> u64 {
        self.went_silent.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Counters {
    refused: Arc<AtomicU64>,
    silent: Arc<AtomicU64>,
    went_silent: Arc<AtomicU64>,
}

/// Counts a connection silenced on a write as open until its relay ends.
struct SilentWhileOpen(Option<Arc<AtomicU64>>);

impl SilentWhileOpen {
    fn count(&mut self, counters: &Counters) {
        if self.0.is_none() {
            counters.silent.fetch_add(1, Ordering::Relaxed);
            counters.went_silent.fetch_add(1, Ordering::Relaxed);
            self.0 = Some(Arc::clone(&counters.silent));
        }
    }
}

impl Drop for SilentWhileOpen {
    fn drop(&mut self) {
        if let Some(silent) = self.0.take() {
            silent.fetch_sub(1, Ordering::Relaxed);
        }
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

async fn relay(client: TcpStream, upstream: u16, refusing: watch::Receiver<Refusal>, counters: Counters) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // Set once the connection is silenced: from then on nothing passes either way.
    let silent = Arc::new(AtomicBool::new(false));
    // Only a change from now on closes or silences this connection.
    let mut failover = refusing.clone();
    failover.borrow_and_update();
    let silenced = Arc::clone(&silent);
    let failover_counters = counters.clone();
    let upward = async move {
        // Dropped with this future, when the connection ends.
        let mut silent_while_open = SilentWhileOpen(None);
        let mut pending = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) if silenced.load(Ordering::Relaxed) => continue,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
            while let Some(length) = whole_packet(&pending) {
                let refusal = *refusing.borrow();
                if refusal != Refusal::Pass && is_write(&pending[..length]) {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    if refusal == Refusal::Close {
                        return;
                    }
                    silenced.store(true, Ordering::Relaxed);
                    silent_while_open.count(&counters);
                    break;
                }
                if server_write.write_all(&pending[..length]).await.is_err() {
                    return;
                }
                pending.drain(..length);
            }
        }
    };
    let silenced = Arc::clone(&silent);
    let downward = async move {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match server_read.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) if silenced.load(Ordering::Relaxed) => {}
                Ok(n) => {
                    if client_write.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let failing_over = async move {
        while failover.changed().await.is_ok() {
            match *failover.borrow() {
                Refusal::Pass => {}
                Refusal::Close => return,
                Refusal::Silence => {
                    silent.store(true, Ordering::Relaxed);
                    failover_counters.went_silent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        std::future::pending().await
    };
    // Whichever ends first ends the connection: both sockets are dropped, and closed, with it.
    // A silenced one ends when its client gives up on it.
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
