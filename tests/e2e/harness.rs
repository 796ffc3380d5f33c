//! What every e2e test needs: the shared services, a database of its own, the gateway's
//! environment, and helpers to add flows, publish and poll the database.

use mqtt_gateway::db;
use sqlx::mysql::MySqlPool;
use sqlx::Row;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;
pub use testkit::poll_until;
use testkit::{EchoServer, Gateway, GatewayDb, Login, MariaDb, Mosquitto, Publisher};

/// Has the characters that broke the original's connection URL.
pub const DB_PASSWORD: &str = "p@ss/w:rd#?%&'1";
pub const DB_USER: &str = "gateway";
/// Generous bounds for polling: they only matter when a test is about to fail.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Shared {
    pub db: MariaDb,
    pub broker: Mosquitto,
    pub echo: EchoServer,
}

pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        db: MariaDb::start(testkit::mariadb::Durability::Relaxed).expect("start MariaDB"),
        broker: Mosquitto::start().expect("start Mosquitto"),
        echo: EchoServer::start().expect("start the echo server"),
    })
}

/// One test's world: its database, its gateway environment, its topic prefix.
pub struct TestEnv {
    pub name: String,
    pub vars: Vec<(String, String)>,
    pub pool: MySqlPool,
    /// The database lives on the shared server, which outlives the test: drop it at the end.
    on_shared_server: bool,
}

impl TestEnv {
    /// A fresh, empty database (no tables yet), and the environment pointing at it.
    pub async fn empty() -> TestEnv {
        TestEnv::empty_on(&shared().db, true).await
    }

    /// A database with the gateway's tables on a server of the test's own.
    pub async fn on(server: &MariaDb) -> TestEnv {
        let env = TestEnv::empty_on(server, false).await;
        db::migrate(&env.pool).await.expect("migrate the test database");
        env
    }

    async fn empty_on(server: &MariaDb, on_shared_server: bool) -> TestEnv {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let shared = shared();
        let name = format!("t{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let login = Login { database: &name, user: DB_USER, password: DB_PASSWORD };
        let db =
            GatewayDb::create(server, login, shared.broker.port).await.expect("create the test database");
        let vars = db.env_with(&[
            ("MQTT_CLIENT_ID", format!("gw-{name}")),
            ("FLOWS_RELOAD_INTERVAL_SECONDS", "3600".to_owned()),
        ]);
        TestEnv { name, vars, pool: db.pool, on_shared_server }
    }

    /// A database with the gateway's tables, as its migrations create them.
    pub async fn new() -> TestEnv {
        let env = TestEnv::empty().await;
        db::migrate(&env.pool).await.expect("migrate the test database");
        env
    }

    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        testkit::set_var(&mut self.vars, name, value.into());
    }

    pub fn unset(&mut self, name: &str) {
        self.vars.retain(|(k, _)| k != name);
    }

    /// A topic under this test's own prefix.
    pub fn topic(&self, rest: &str) -> String {
        format!("{}/{rest}", self.name)
    }

    /// Runs a subcommand to completion: `(exit code, stdout, stderr)`.
    pub fn command(&self, args: &[&str]) -> (i32, String, String) {
        run_cli(&self.vars, args)
    }

    pub fn spawn(&self) -> Gateway {
        Gateway::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_mqtt-gateway")), &self.vars)
            .expect("spawn the gateway")
    }

    /// Starts the gateway and waits until it is subscribed.
    pub async fn start(&self) -> Gateway {
        let gateway = self.spawn();
        wait_log(&gateway, "Gateway ready").await;
        gateway
    }

    /// Starts the gateway and expects it to refuse to start: exit status 1, `line` logged.
    pub async fn assert_start_fails(&self, line: &str) -> Gateway {
        let mut gateway = self.spawn();
        assert_exits_1_logging(&mut gateway, line).await;
        gateway
    }

    /// Inserts a flow, every column given as the original's tables require.
    pub async fn add_flow(
        &self,
        code: &str,
        topic: &str,
        action: &str,
        schema: &str,
        url: Option<&str>,
    ) -> i32 {
        let done = sqlx::query(
            "INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) \
             VALUES (?, ?, ?, ?, ?, ?, 0, TRUE)",
        )
        .bind(code)
        .bind(format!("test flow {code}"))
        .bind(topic)
        .bind(action)
        .bind(schema)
        .bind(url)
        .execute(&self.pool)
        .await
        .expect("insert flow");
        done.last_insert_id() as i32
    }

    pub async fn exec(&self, sql: &str) {
        sqlx::query(sql).execute(&self.pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn counter(&self, code: &str) -> i32 {
        sqlx::query_scalar("SELECT last_msg_id FROM flows WHERE code = ?")
            .bind(code)
            .fetch_one(&self.pool)
            .await
            .expect("read counter")
    }

    /// `(attribute_name, attribute_value, last_msg_id)` of a flow's rows, in insertion order.
    pub async fn rows(&self, code: &str) -> Vec<(String, String, i32)> {
        sqlx::query(
            "SELECT attribute_name, attribute_value, last_msg_id FROM data WHERE flow_code = ? ORDER BY id",
        )
        .bind(code)
        .fetch_all(&self.pool)
        .await
        .expect("read data")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    }

    /// The values a flow stored for one attribute, in insertion order.
    pub async fn values_of(&self, code: &str, attribute: &str) -> Vec<String> {
        self.rows(code)
            .await
            .into_iter()
            .filter(|(name, _, _)| name == attribute)
            .map(|(_, value, _)| value)
            .collect()
    }

    /// How many rows of a flow hold each distinct value of attribute `i`: `(distinct, total)`.
    pub async fn distinct_i(&self, code: &str) -> (i64, i64) {
        let row = sqlx::query(
            "SELECT COUNT(DISTINCT attribute_value), COUNT(*) FROM data WHERE flow_code = ? AND attribute_name = 'i'",
        )
        .bind(code)
        .fetch_one(&self.pool)
        .await
        .expect("count data");
        (row.get(0), row.get(1))
    }

    /// Waits until `n` distinct messages (attribute `i`) of a flow are stored.
    pub async fn wait_distinct(&self, code: &str, n: i64, limit: Duration) {
        poll_until(&format!("{n} distinct messages of {code} stored"), limit, || async move {
            let (distinct, _) = self.distinct_i(code).await;
            if distinct >= n {
                Ok(())
            } else {
                Err(format!("{code}: {distinct} of {n} messages stored"))
            }
        })
        .await
    }

    /// Waits until the flow's counter reaches `n`, and fails the test otherwise.
    pub async fn wait_counter(&self, code: &str, n: i32) {
        poll_until(&format!("the counter of {code} to reach {n}"), WAIT, || async move {
            let last = self.counter(code).await;
            if last >= n {
                Ok(())
            } else {
                Err(format!("counter of {code} is {last}, expected {n}"))
            }
        })
        .await
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !self.on_shared_server {
            return;
        }
        let _ = shared().db.sql(&format!("DROP DATABASE IF EXISTS `{}`", self.name));
    }
}

/// Runs the binary with exactly these variables (and PATH) and arguments, to completion.
pub fn run_cli(vars: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-gateway"));
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    let out = command.envs(vars.iter().map(|(k, v)| (k, v))).args(args).output().expect("run the CLI");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Polls `check` until it holds; panics with `what` after [`WAIT`].
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(WAIT, what, check).await
}

/// [`eventually`] with a bound of its own.
pub async fn eventually_within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    poll_until(what, limit, || std::future::ready(if check() { Ok(()) } else { Err("not yet".to_owned()) }))
        .await
}

/// Lines saying the broker granted a subscription to `filter` (one SUBACK may answer several).
pub fn subscribed(gateway: &Gateway, filter: &str) -> usize {
    gateway
        .logs()
        .lines()
        .filter_map(|line| line.split_once("Subscribed to ").map(|(_, list)| list))
        .filter(|list| list.split(", ").any(|f| f == filter))
        .count()
}

pub async fn wait_log(gateway: &Gateway, needle: &str) {
    poll_until(&format!("a log line with {needle:?}"), WAIT, || async move {
        if gateway.count(needle) > 0 {
            Ok(())
        } else {
            Err(format!("the gateway logged:\n{}", gateway.logs()))
        }
    })
    .await
}

/// Publishes each payload with QoS 1 to the shared broker and waits for the broker's acks.
pub async fn publish(topic: &str, payloads: &[&[u8]]) {
    publish_to(shared().broker.port, topic, payloads).await;
}

pub async fn publish_to(port: u16, topic: &str, payloads: &[&[u8]]) {
    let mut publisher = Publisher::connect(port).await.expect("publisher");
    for payload in payloads {
        publisher.publish(topic, payload.to_vec()).await.expect("publish");
    }
    publisher.flush(WAIT).await.expect("broker acks");
}

/// Publishes `{"i": first}` .. `{"i": last}` (plus `extra` fields) with QoS 1, waiting for the
/// broker to take them all.
pub async fn publish_numbered(
    port: u16,
    topic: String,
    numbers: std::ops::RangeInclusive<u32>,
    extra: &'static str,
) {
    let mut publisher = Publisher::connect(port).await.expect("publisher");
    for i in numbers {
        publisher.publish(&topic, format!(r#"{{"i": {i}{extra}}}"#)).await.expect("publish");
    }
    publisher.flush(Duration::from_secs(120)).await.expect("broker acks");
}

/// Waits for the gateway to exit and returns its status code.
pub async fn exit_code(gateway: &mut Gateway) -> i32 {
    poll_until("the gateway to exit", WAIT, || {
        let exited = gateway.wait_exit(Duration::ZERO).map(|status| status.code().unwrap_or(-1));
        std::future::ready(exited.ok_or_else(|| format!("it is running; it logged:\n{}", gateway.logs())))
    })
    .await
}

/// The gateway stops with the original's fatal exit status, 1, and a log line containing `line`.
pub async fn assert_exits_1_logging(gateway: &mut Gateway, line: &str) {
    assert_eq!(exit_code(gateway).await, 1, "{}", gateway.logs());
    assert!(gateway.logs().contains(line), "no log line with {line:?}:\n{}", gateway.logs());
}
