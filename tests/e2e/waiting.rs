//! A wait is not a wedge. A lock held on the database (a backup's `FLUSH TABLES WITH READ
//! LOCK`, `LOCK TABLES`, an operator's open transaction), a proxy refusing writes while it
//! answers reads, or a link that goes silent is the database not taking writes: the gateway
//! holds the stream, says so (log, `/readyz`, `STATUS=`, the holding metric), keeps the systemd
//! watchdog fed, blames no message, and stores everything once writes go through again.

use crate::harness::*;
use crate::holding::{assert_all_stored, assert_one_episode, start_watched, stream, wait_ready_status};
use crate::systemd::NotifySocket;
use rstest::rstest;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::Connection;
use std::time::Duration;
use testkit::mariadb::Durability;
use testkit::{MariaDb, Refusal, WriteRefusingProxy};
use tokio::time::Instant;

/// How long each test keeps the database from taking writes.
const HELD: Duration = Duration::from_secs(20);
/// The watchdog interval the gateway is given.
const WATCHDOG: Duration = Duration::from_secs(4);
/// Messages streamed through each test, 20 a second: longer than the hold.
const STREAMED: u32 = 600;

#[derive(Debug, Clone, Copy)]
enum Lock {
    /// `FLUSH TABLES WITH READ LOCK`, as a backup takes it: every write of the server waits.
    GlobalRead,
    /// `LOCK TABLES data WRITE`.
    DataTable,
    /// An open transaction holding the flow's row in `flows`.
    FlowRow,
}

/// A session holding a lock, and the statement that releases it.
struct Held {
    conn: MySqlConnection,
    release: &'static str,
}

impl Held {
    async fn take(lock: Lock, env: &TestEnv, server: Option<&MariaDb>) -> Held {
        let (mut conn, statements, release) = match lock {
            Lock::GlobalRead => {
                let socket = &server.expect("a server of the test's own").socket;
                let root = MySqlConnectOptions::new().socket(socket).username("root");
                let conn = MySqlConnection::connect_with(&root).await.expect("root on the socket");
                (conn, &["FLUSH TABLES WITH READ LOCK"][..], "UNLOCK TABLES")
            }
            Lock::DataTable => (gateway_user(env).await, &["LOCK TABLES data WRITE"][..], "UNLOCK TABLES"),
            Lock::FlowRow => (
                gateway_user(env).await,
                &["BEGIN", "SELECT id FROM flows WHERE code = 'S' FOR UPDATE"][..],
                "ROLLBACK",
            ),
        };
        for statement in statements {
            sqlx::raw_sql(statement).execute(&mut conn).await.unwrap_or_else(|e| panic!("{statement}: {e}"));
        }
        Held { conn, release }
    }

    async fn release(mut self) {
        sqlx::raw_sql(self.release).execute(&mut self.conn).await.expect("release the lock");
    }
}

/// A connection of the test's own pool, taken out of it.
async fn gateway_user(env: &TestEnv) -> MySqlConnection {
    env.pool.acquire().await.expect("a connection").detach()
}

async fn metrics(port: u16) -> String {
    mqtt_gateway::tls::install_crypto_provider();
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.expect("GET /metrics");
    response.text().await.unwrap_or_default()
}

#[rstest]
#[case::flush_tables_with_read_lock(Lock::GlobalRead)]
#[case::lock_tables_data_write(Lock::DataTable)]
#[case::an_open_transaction_holding_a_row_of_flows(Lock::FlowRow)]
#[tokio::test]
async fn a_lock_held_20_s_holds_the_stream_with_the_watchdog_fed(#[case] lock: Lock) {
    // FLUSH TABLES WITH READ LOCK stops every write of the server: a server of the test's own.
    let server = matches!(lock, Lock::GlobalRead).then(|| MariaDb::start(Durability::Relaxed).unwrap());
    let mut env = match &server {
        Some(server) => TestEnv::on(server).await,
        None => TestEnv::new().await,
    };
    let notify = NotifySocket::new();
    env.set("NOTIFY_SOCKET", notify.path.to_str().unwrap());
    env.set("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    let topic = env.topic("locked");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let (gateway, port) = start_watched(&mut env).await;
    let publishing = stream(topic, STREAMED, 20, 10);
    env.wait_distinct("S", 40, WAIT).await;

    let held = Held::take(lock, &env, server.as_ref()).await;
    let locked = Instant::now();
    wait_log(&gateway, "Database cannot take writes").await;
    let logs = gateway.logs();
    assert!(logs.contains("(lock wait)") && logs.contains("1205"), "a lock wait, named:\n{logs}");
    let body = wait_ready_status(port, 503).await;
    assert!(body.contains("waiting for the database to take writes (lock wait"), "{body}");
    eventually("STATUS= naming the lock wait", || notify.status_said("Waiting for the database")).await;
    assert!(notify.status_said("lock wait"), "{:?}", notify.messages());
    let scraped = metrics(port).await;
    assert!(scraped.contains(r#"mqtt_gateway_database_holding{code="1205"} 1"#), "{scraped}");
    tokio::time::sleep_until(locked + HELD).await;
    held.release().await;

    publishing.await.unwrap();
    assert_all_stored(&env, &gateway, i64::from(STREAMED)).await;
    assert_one_episode(&gateway);
    wait_log(&gateway, "Database takes writes again").await;
    wait_ready_status(port, 200).await;
    let scraped = metrics(port).await;
    assert!(scraped.contains(r#"mqtt_gateway_database_holding{code="1205"} 0"#), "{scraped}");
    let gap = notify.longest_ping_gap();
    assert!(gap <= WATCHDOG / 2, "the watchdog went {gap:?} without a ping: waiting is not stuck");
    assert_eq!(gateway.count("is stuck"), 0, "{}", gateway.logs());
}

#[tokio::test]
async fn a_proxy_refusing_writes_20_s_holds_the_stream_and_blames_no_message() {
    // Reads answered, every write closing its connection: what MaxScale in front of a
    // failing-over primary does with `master_failure_mode=fail_on_write`.
    let proxy = WriteRefusingProxy::start(shared().db.port).await.unwrap();
    let mut env = TestEnv::new().await;
    env.set("DB_PORT", proxy.port.to_string());
    let topic = env.topic("refused");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let (gateway, port) = start_watched(&mut env).await;
    let publishing = stream(topic, STREAMED, 20, 10);
    env.wait_distinct("S", 40, WAIT).await;

    proxy.refuse_writes(Refusal::Close);
    let refusing = Instant::now();
    wait_log(&gateway, "Database cannot take writes").await;
    let body = wait_ready_status(port, 503).await;
    assert!(body.contains("waiting for the database to take writes"), "{body}");
    tokio::time::sleep_until(refusing + HELD).await;
    let refused = proxy.refused();
    proxy.refuse_writes(Refusal::Pass);
    assert!(
        refused >= 2,
        "the gateway kept trying, and the proxy refused it: {refused} refused\n{}",
        gateway.logs()
    );

    publishing.await.unwrap();
    // Not one message failed: a dropped connection is nobody's data without proof.
    assert_all_stored(&env, &gateway, i64::from(STREAMED)).await;
    wait_log(&gateway, "Database takes writes again").await;
    wait_ready_status(port, 200).await;
}

#[tokio::test]
async fn a_link_silent_on_writes_is_dropped_and_the_batch_written_on_a_fresh_one() {
    // A half-open link: the write, and everything after it on its connection, gets no answer.
    let proxy = WriteRefusingProxy::start(shared().db.port).await.unwrap();
    let mut env = TestEnv::new().await;
    env.set("DB_PORT", proxy.port.to_string());
    let topic = env.topic("silent");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let (gateway, port) = start_watched(&mut env).await;
    let publishing = stream(topic, STREAMED, 20, 10);
    env.wait_distinct("S", 40, WAIT).await;

    proxy.refuse_writes(Refusal::Silence);
    eventually_within(Duration::from_secs(60), "a write given up for want of an answer", || {
        gateway.count("the database did not answer within") > 0
    })
    .await;
    let body = wait_ready_status(port, 503).await;
    assert!(body.contains("waiting for the database to take writes"), "{body}");
    proxy.refuse_writes(Refusal::Pass);
    // Each connection that went silent was closed once its bound ran out, not given back to the
    // pool, where the next use (sqlx pings a connection given back) would wait on it forever.
    eventually_within(Duration::from_secs(40), "the silent connections closed", || {
        proxy.silent_and_open() == 0
    })
    .await;
    assert!(proxy.went_silent() >= 1, "{}", gateway.logs());

    publishing.await.unwrap();
    assert_all_stored(&env, &gateway, i64::from(STREAMED)).await;
    wait_log(&gateway, "Database takes writes again").await;
    wait_ready_status(port, 200).await;
}
