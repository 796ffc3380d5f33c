//! The notification socket as service managers name it: a path or, with a leading `@`, a name
//! in Linux's abstract namespace (systemd in containers); and `WATCHDOG_PID`, which says whose
//! watchdog `WATCHDOG_USEC` is.

use crate::harness::*;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};

/// An abstract-namespace notification socket that records what arrives.
struct AbstractSocket {
    name: String,
    received: Arc<Mutex<Vec<String>>>,
}

impl AbstractSocket {
    fn new(tag: &str) -> AbstractSocket {
        let name = format!("mqtt-gateway-e2e-{}-{tag}", std::process::id());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock().unwrap().push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        AbstractSocket { name, received }
    }

    /// The value of `NOTIFY_SOCKET` that names it.
    fn env_value(&self) -> String {
        format!("@{}", self.name)
    }

    fn count(&self, line: &str) -> usize {
        self.received.lock().unwrap().iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

#[tokio::test]
async fn ready_reaches_an_abstract_notify_socket() {
    let mut env = TestEnv::new().await;
    let notify = AbstractSocket::new("ready");
    env.set("NOTIFY_SOCKET", notify.env_value());
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.spawn();
    eventually("READY=1 on the abstract socket", || notify.count("READY=1") == 1).await;
    assert_eq!(gateway.count("Cannot notify systemd"), 0, "{}", gateway.logs());
}

#[tokio::test]
async fn the_watchdog_of_another_pid_is_not_pinged() {
    // Two gateways started together, a watchdog of 200 ms each: one told the watchdog is
    // process 1's, the other not told whose. The second pinging shows the first had the time.
    let mut theirs = TestEnv::new().await;
    let mut ours = TestEnv::new().await;
    let their_socket = AbstractSocket::new("theirs");
    let our_socket = AbstractSocket::new("ours");
    theirs.set("NOTIFY_SOCKET", their_socket.env_value());
    theirs.set("WATCHDOG_USEC", "200000");
    theirs.set("WATCHDOG_PID", "1");
    ours.set("NOTIFY_SOCKET", our_socket.env_value());
    ours.set("WATCHDOG_USEC", "200000");
    let _theirs = theirs.spawn();
    let _ours = ours.spawn();
    eventually("READY=1 from both", || {
        their_socket.count("READY=1") == 1 && our_socket.count("READY=1") == 1
    })
    .await;
    let pinged = our_socket.count("WATCHDOG=1");
    eventually("five more pings from the gateway whose watchdog it is", || {
        our_socket.count("WATCHDOG=1") >= pinged + 5
    })
    .await;
    assert_eq!(their_socket.count("WATCHDOG=1"), 0, "pinged a watchdog that WATCHDOG_PID gives to process 1");
}
