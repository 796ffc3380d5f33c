//! Real services for mqtt-gateway's tests, benchmark and demo: a MariaDB server, a Mosquitto
//! broker, an HTTP echo server (with a TLS front for HTTPS) and a Prometheus server, each on a
//! free loopback port in its own temporary directory, plus a handle on a running gateway process,
//! a QoS 1 publisher, and TCP proxies that delay a link or refuse database writes. `GatewayDb`
//! is the gateway's own database on such a server with the environment that points a gateway
//! at it; `poll_until` is the one bounded wait.
//!
//! Nothing is mocked. Processes are stopped when their handle drops, and at process exit for
//! the shared ones; a run that was killed leaves directories that the next run sweeps away,
//! killing whatever service was still running in them.

mod cleanup;
mod database;
mod echo;
pub mod galera;
mod gateway;
pub mod mariadb;
pub mod measure;
mod mosquitto;
mod prometheus;
mod proxy;
mod publish;
mod screenshot;
mod tls_front;
mod write_refusing_proxy;

pub use database::{set_var, GatewayDb, Login, SqlServer};
pub use echo::{EchoServer, Recorded};
pub use galera::GaleraCluster;
pub use gateway::Gateway;
pub use mariadb::MariaDb;
pub use mosquitto::Mosquitto;
pub use prometheus::Prometheus;
pub use proxy::{Cutter, DelayProxy, Mqtt311Only};
pub use publish::Publisher;
pub use screenshot::screenshot;
pub use tls_front::TlsFront;
pub use write_refusing_proxy::{Refusal, WriteRefusingProxy};

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// The one PATH search of the project, shared with `cargo xtask` (a dependency-free file).
#[path = "../../../xtask/src/which.rs"]
mod which;
pub use which::find_program;

/// The program, or an error that says how to install it.
pub fn require_program(name: &str, debian_package: &str) -> anyhow::Result<PathBuf> {
    find_program(name).ok_or_else(|| {
        anyhow::anyhow!(
            "`{name}` is not installed. On Debian or Ubuntu: `apt-get install -y {debian_package}`; \
             on NixOS: `nix develop` (the dev shell has it)"
        )
    })
}

/// Polls `check` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `probe` every 20 ms until it returns `Ok`, and returns that. After `limit` it panics
/// naming what was awaited and what the last probe saw (its `Err`). Asynchronous, so services
/// running on the caller's runtime (a proxy, a publisher) go on meanwhile.
pub async fn poll_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match probe().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `kB` field of `/proc/<pid>/status`, such as `VmRSS` (resident now) or `VmHWM` (peak).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
fn wait_for_port(port: u16, limit: Duration) -> bool {
    wait_until(limit, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
}
