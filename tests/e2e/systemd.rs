//! systemd integration, through a real notification socket: readiness only once subscribed,
//! reload and stop notifications, watchdog pings that stop only when a part of the pipeline is
//! stuck (not when it waits); structured logs; the database over its Unix socket.

use crate::harness::*;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::MariaDb;

/// A `NOTIFY_SOCKET` that records every notification with the time it arrived.
pub(crate) struct NotifySocket {
    pub(crate) path: std::path::PathBuf,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub(crate) fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket { path, received, _dir: dir }
    }

    pub(crate) fn messages(&self) -> Vec<String> {
        self.received.lock().unwrap().iter().map(|(_, m)| m.clone()).collect()
    }

    fn position(&self, needle: &str) -> Option<usize> {
        self.messages().iter().position(|m| m.lines().any(|l| l == needle))
    }

    pub(crate) fn pings_since(&self, since: Instant) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, m)| *at >= since && m.contains("WATCHDOG=1"))
            .count()
    }

    /// The longest time between two watchdog pings, or between the last one and now.
    pub(crate) fn longest_ping_gap(&self) -> Duration {
        let pings: Vec<Instant> = self
            .received
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect();
        let last = pings.last().map(|at| at.elapsed()).unwrap_or(Duration::MAX);
        pings.windows(2).map(|w| w[1] - w[0]).chain([last]).max().unwrap_or(Duration::MAX)
    }

    /// Whether a `STATUS=` line containing `needle` arrived.
    pub(crate) fn status_said(&self, needle: &str) -> bool {
        self.messages().iter().any(|m| m.lines().any(|l| l.starts_with("STATUS=") && l.contains(needle)))
    }
}

#[tokio::test]
async fn ready_comes_after_the_subscriptions_then_reloading_and_stopping() {
    let mut env = TestEnv::new().await;
    let notify = NotifySocket::new();
    env.set("NOTIFY_SOCKET", notify.path.to_str().unwrap());
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let mut gateway = env.spawn();
    eventually("READY=1", || notify.position("READY=1").is_some()).await;
    // Published the moment systemd would call the unit active: it must be processed.
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("F", 1).await;
    assert!(
        notify.messages()[notify.position("READY=1").unwrap()].contains("STATUS=1 flows on 1 topic filters")
    );

    gateway.signal(libc::SIGHUP);
    eventually("RELOADING=1", || notify.position("RELOADING=1").is_some()).await;
    let reloading = &notify.messages()[notify.position("RELOADING=1").unwrap()];
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    eventually("READY=1 after the reload", || {
        notify.messages().iter().filter(|m| m.lines().any(|l| l == "READY=1")).count() == 2
    })
    .await;

    gateway.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut gateway).await, 0);
    let stopping = notify.position("STOPPING=1").expect("STOPPING=1 on SIGTERM");
    assert!(stopping > notify.position("RELOADING=1").unwrap());
}

#[tokio::test]
async fn the_watchdog_is_fed_through_a_frozen_database_and_starved_by_a_wedged_processor() {
    let server = MariaDb::start(Durability::Relaxed).unwrap();
    let mut env = TestEnv::on(&server).await;
    let notify = NotifySocket::new();
    let watchdog = Duration::from_secs(2);
    env.set("NOTIFY_SOCKET", notify.path.to_str().unwrap());
    env.set("WATCHDOG_USEC", watchdog.as_micros().to_string());
    let (topic, wedge) = (env.topic("t"), env.topic("wedge"));
    env.set("MQTT_GATEWAY_TEST_WEDGE_ON_TOPIC", wedge.as_str());
    env.add_flow("F", &env.topic("+"), "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    let started = Instant::now();
    eventually("watchdog pings", || notify.pings_since(started) >= 3).await;

    // A frozen database: every wait on it is bounded, so the processor waits, holds the stream
    // and says so, and the watchdog is fed all along.
    server.pause(true);
    publish(&topic, &[br#"{"v": 1}"#]).await;
    eventually_within(Duration::from_secs(40), "the hold reported", || {
        gateway.count("Database cannot take writes") > 0
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.pause(false);
    env.wait_counter("F", 1).await;
    let gap = notify.longest_ping_gap();
    assert!(gap <= watchdog / 2, "{gap:?} without a ping while the database was frozen:\n{}", gateway.logs());
    assert_eq!(gateway.count("is stuck"), 0, "{}", gateway.logs());

    // A wedged processor: it stops turning with nothing outstanding, and the pings stop.
    publish(&wedge, &[br#"{"v": 2}"#]).await;
    wait_log(&gateway, "the processor is stuck").await;
    let stalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(notify.pings_since(stalled), 0, "no WATCHDOG=1 while the processor is wedged");
}

#[tokio::test]
async fn json_logs_carry_the_structured_fields() {
    let mut env = TestEnv::new().await;
    env.set("LOG_FORMAT", "json");
    let topic = env.topic("t");
    env.add_flow("STRICT", &topic, "STORE_DB", r#"{"t": "float"}"#, None).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"t": "hot"}"#]).await;
    wait_log(&gateway, "Error processing topic").await;
    let logs = gateway.logs();
    let line = logs.lines().find(|l| l.contains("Error processing topic")).unwrap();
    let event: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    assert_eq!(event["level"], "ERROR");
    assert_eq!(event["fields"]["flow_code"], "STRICT");
    assert_eq!(event["fields"]["topic"], topic.as_str());
    assert!(event["fields"]["message"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Error processing topic {topic} (flow_id=")));
}

#[tokio::test]
async fn a_bad_log_format_is_fatal_and_named() {
    let mut env = TestEnv::empty().await;
    env.set("LOG_FORMAT", "xml");
    env.assert_start_fails("Fatal error during startup: invalid environment variable LOG_FORMAT").await;
}

#[tokio::test]
async fn the_database_socket_works_with_a_password() {
    let mut env = TestEnv::new().await;
    env.unset("DB_HOST");
    env.set("DB_SOCKET", shared().db.socket.to_str().unwrap());
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("F", 1).await;
}

#[tokio::test]
async fn the_database_socket_works_without_a_password_for_unix_socket_users() {
    // The NixOS module's local database: the service's system user is the database user.
    let server = MariaDb::start(Durability::Relaxed).unwrap();
    let mut env = TestEnv::on(&server).await;
    // SAFETY: getpwuid on our own uid; the name is copied out at once.
    let me = unsafe { std::ffi::CStr::from_ptr((*libc::getpwuid(libc::geteuid())).pw_name) }
        .to_string_lossy()
        .into_owned();
    server
        .sql(&format!(
            "DROP USER IF EXISTS '{me}'@'localhost'; CREATE USER '{me}'@'localhost' IDENTIFIED VIA unix_socket; \
             GRANT ALL ON `{}`.* TO '{me}'@'localhost';",
            env.name
        ))
        .unwrap();
    env.unset("DB_HOST");
    env.unset("DB_PASSWORD");
    env.set("DB_USER", me.as_str());
    env.set("DB_SOCKET", server.socket.to_str().unwrap());
    let _gateway = env.start().await;
}
