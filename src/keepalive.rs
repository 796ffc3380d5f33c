//! TCP keepalive on the database connections, which sqlx 0.8 cannot set for MySQL (upstream
//! has it as an open pull request): without it, a connection whose server vanished without a
//! word (a failover, a dropped NAT entry, a host powered off) waits for an answer forever, and
//! an idle one in the pool is found dead only when used.
//!
//! sqlx gives no access to its socket, so after each new connection every TCP socket of this
//! process whose peer is the database's address, and that has no keepalive yet, gets it: a
//! probe after 10 s of silence, every 5 s, 3 unanswered probes and the kernel closes it; and
//! data unacknowledged for 20 s closes it too (`TCP_USER_TIMEOUT`). The sockets are found
//! in `/proc/self/fd`; anything that cannot be read or set is skipped (keepalive is a second
//! line: every database wait has its own bound).

use socket2::{SockRef, TcpKeepalive, Type};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

const IDLE: Duration = Duration::from_secs(10);
const INTERVAL: Duration = Duration::from_secs(5);
const PROBES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// Turns keepalive on for this process's connections to `host`:`port` that lack it; returns how
/// many it turned on.
pub async fn arm_to(host: &str, port: u16) -> usize {
    match tokio::net::lookup_host((host, port)).await {
        Ok(addresses) => arm(&addresses.map(canonical).collect()),
        Err(error) => {
            tracing::debug!("Cannot resolve {host} to turn TCP keepalive on: {error}");
            0
        }
    }
}

/// Turns keepalive on for this process's TCP sockets connected to one of `peers`.
fn arm(peers: &HashSet<SocketAddr>) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return 0 };
    let settings = TcpKeepalive::new().with_time(IDLE).with_interval(INTERVAL).with_retries(PROBES);
    let mut armed = 0;
    for fd in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok()) {
        // SAFETY: only socket options are read and set through this borrow. The descriptor may
        // be closed by another thread meanwhile (the calls then fail) or even reused; a reused
        // one is checked like any other before anything is set.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        let ours = socket.r#type().is_ok_and(|t| t == Type::STREAM)
            && socket
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| peers.contains(&canonical(a)));
        if !ours || socket.keepalive().unwrap_or(true) {
            continue;
        }
        let set = socket
            .set_tcp_keepalive(&settings)
            .and_then(|()| socket.set_keepalive(true))
            .and_then(|()| socket.set_tcp_user_timeout(Some(USER_TIMEOUT)));
        match set {
            Ok(()) => armed += 1,
            Err(error) => tracing::debug!("Cannot turn TCP keepalive on for a database connection: {error}"),
        }
    }
    armed
}

/// IPv4 addresses seen through an IPv6 socket compare as IPv4.
fn canonical(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => address,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn only_connections_to_the_database_get_keepalive() {
        let database = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let to_database = TcpStream::connect(database.local_addr().unwrap()).unwrap();
        let to_other = TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let peers = HashSet::from([database.local_addr().unwrap()]);

        assert!(arm(&peers) >= 1);
        let armed = SockRef::from(&to_database);
        assert!(armed.keepalive().unwrap());
        assert_eq!(armed.tcp_keepalive_time().unwrap(), IDLE);
        assert_eq!(armed.tcp_keepalive_interval().unwrap(), INTERVAL);
        assert_eq!(armed.tcp_keepalive_retries().unwrap(), PROBES);
        assert_eq!(armed.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(!SockRef::from(&to_other).keepalive().unwrap());
        // Already armed: left alone.
        assert_eq!(arm(&peers), 0);
    }
}
