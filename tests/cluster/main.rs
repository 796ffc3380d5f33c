//! Scale-out on a real distributed database: three gateway instances in one shared group, each
//! writing to a different node of a three-node MariaDB Galera cluster started by `testkit`,
//! through a gateway crash and a node outage.
//!
//! Its own test binary (`cargo xtask cluster`, part of `cargo xtask ci`), so its three database
//! servers never share the machine with the rest of the end-to-end suite.

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::Row;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use testkit::{EchoServer, GaleraCluster, Gateway, Mosquitto, Publisher};
use tokio::time::Instant;

const DB: &str = "gateway";
const USER: &str = "gateway";
const PASSWORD: &str = "p@ss/w:rd";
const MESSAGES: u32 = 600;
const TOPICS: [&str; 2] = ["a", "b"];

struct World {
    cluster: GaleraCluster,
    broker: Mosquitto,
    echo: EchoServer,
    /// One pool per node.
    pools: Vec<MySqlPool>,
}

impl World {
    fn vars(&self, instance: usize) -> Vec<(String, String)> {
        [
            ("DB_HOST", "127.0.0.1".to_owned()),
            ("DB_PORT", self.cluster.node(instance).port.to_string()),
            ("DB_NAME", DB.to_owned()),
            ("DB_USER", USER.to_owned()),
            ("DB_PASSWORD", PASSWORD.to_owned()),
            ("MQTT_DEFAULT_HOST", "127.0.0.1".to_owned()),
            ("MQTT_DEFAULT_PORT", self.broker.port.to_string()),
            ("MQTT_SHARED_GROUP", "gateways".to_owned()),
            ("MQTT_CLIENT_ID", format!("gateway-{instance}")),
            ("OUTBOX_LEASE_SECONDS", "8".to_owned()),
            ("HTTP_RETRY_MAX_DELAY_SECONDS", "1".to_owned()),
            ("FLOWS_RELOAD_INTERVAL_SECONDS", "3600".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Instance `i`, on node `i`.
    fn spawn(&self, instance: usize) -> Gateway {
        Gateway::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_mqtt-gateway")), &self.vars(instance))
            .expect("spawn a gateway")
    }

    async fn counter(&self, code: &str) -> i32 {
        sqlx::query_scalar("SELECT last_msg_id FROM flows WHERE code = ?")
            .bind(code)
            .fetch_one(&self.pools[0])
            .await
            .expect("read a counter")
    }
}

async fn pool(port: u16) -> MySqlPool {
    let options = MySqlConnectOptions::new()
        .host("127.0.0.1")
        .port(port)
        .username(USER)
        .password(PASSWORD)
        .database(DB);
    MySqlPoolOptions::new().max_connections(2).connect_with(options).await.expect("connect to a node")
}

fn wait_ready(gateway: &Gateway) {
    assert!(gateway.wait_for_log("Gateway ready", Duration::from_secs(60)), "not ready:\n{}", gateway.logs());
}

/// The `i` values of a STORE_DB flow's messages, by `last_msg_id`.
async fn stored(pool: &MySqlPool, code: &str) -> BTreeMap<i32, u32> {
    sqlx::query(
        "SELECT last_msg_id, CAST(attribute_value AS UNSIGNED) FROM data \
         WHERE flow_code = ? AND attribute_name = 'i'",
    )
    .bind(code)
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<i32, _>(0), r.get::<u64, _>(1) as u32))
    .collect()
}

/// How often each `i` reached a POST endpoint.
fn posted(echo: &EchoServer, path: &str) -> BTreeMap<u32, usize> {
    let mut seen = BTreeMap::new();
    for request in echo.requests(path) {
        let body: serde_json::Value = serde_json::from_slice(&request.body).expect("a JSON body");
        *seen.entry(body["i"].as_u64().expect("i") as u32).or_insert(0) += 1;
    }
    seen
}

/// What a node holds, read after it has applied everything the cluster committed before.
async fn fingerprint(pool: &MySqlPool) -> (i64, i64, String) {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET SESSION wsrep_sync_wait = 1").execute(&mut *conn).await.unwrap();
    let data = sqlx::query(
        "SELECT COUNT(*), CAST(COALESCE(SUM(CRC32(CONCAT_WS('|', id, flow_code, attribute_name, \
         attribute_value, last_msg_id))), 0) AS SIGNED) FROM data",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let counters: Vec<String> =
        sqlx::query_scalar("SELECT CONCAT(code, '=', last_msg_id) FROM flows ORDER BY code")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    (data.get(0), data.get(1), counters.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_on_three_galera_nodes_lose_nothing_through_a_crash_and_a_node_outage() {
    let started = Instant::now();
    let cluster =
        tokio::task::spawn_blocking(|| GaleraCluster::start(3)).await.unwrap().expect("start Galera");
    eprintln!("cluster of {} nodes synced after {:.1}s", cluster.len(), started.elapsed().as_secs_f64());
    cluster.create_database(DB, USER, PASSWORD).expect("create the database");
    let mut pools = Vec::new();
    for i in 0..cluster.len() {
        pools.push(pool(cluster.node(i).port).await);
    }
    let mut world = World {
        cluster,
        broker: Mosquitto::start().expect("start Mosquitto"),
        echo: EchoServer::start().expect("start the echo server"),
        pools,
    };

    // Three instances migrate a fresh database at once, each through its own node: the
    // migration lock does not reach across nodes, so this is the hard case.
    let mut gateways: Vec<Gateway> = (0..3).map(|i| world.spawn(i)).collect();
    gateways.iter().for_each(wait_ready);
    for (i, gateway) in gateways.iter().enumerate() {
        assert!(!gateway.logs().contains("Fatal error"), "{}", gateway.logs());
        let migration: Vec<String> =
            gateway.logs().lines().filter(|l| l.contains("igrat")).map(str::to_owned).collect();
        eprintln!("instance {i} migrating through node {}:\n{}", i + 1, migration.join("\n"));
    }
    for topic in TOPICS {
        for (action, code, url) in [
            ("STORE_DB", format!("S_{topic}"), None),
            ("POST_ENDPOINT", format!("P_{topic}"), Some(world.echo.url(&format!("/{topic}")))),
        ] {
            sqlx::query(
                "INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) \
                 VALUES (?, 'cluster test', ?, ?, '{}', ?, 0, TRUE)",
            )
            .bind(&code)
            .bind(format!("cluster/{topic}"))
            .bind(action)
            .bind(url)
            .execute(&world.pools[0])
            .await
            .unwrap();
        }
    }
    // Restarted (gracefully) to load the flows.
    for gateway in &mut gateways {
        gateway.signal(libc::SIGTERM);
        assert!(
            gateway.wait_exit(Duration::from_secs(20)).is_some_and(|s| s.success()),
            "{}",
            gateway.logs()
        );
    }
    let mut gateways: Vec<Gateway> = (0..3).map(|i| world.spawn(i)).collect();
    gateways.iter().for_each(wait_ready);

    let port = world.broker.port;
    let publisher = tokio::spawn(async move {
        let mut publisher = Publisher::connect(port).await.expect("publisher");
        for i in 1..=MESSAGES {
            for topic in TOPICS {
                publisher.publish(&format!("cluster/{topic}"), format!(r#"{{"i": {i}}}"#)).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
        publisher.flush(Duration::from_secs(60)).await.expect("broker acks");
    });

    // Mid-stream: instance 0 crashes, and node 3 (instance 2's) goes away for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    while world.counter("S_a").await < (MESSAGES / 4) as i32 {
        assert!(Instant::now() < deadline, "the stream does not flow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateways[0].signal(libc::SIGKILL);
    gateways[0].wait_exit(Duration::from_secs(10)).expect("killed");
    world.cluster.stop_node(2);
    eprintln!("instance 0 killed, node 3 stopped at {:.1}s", started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_log = gateways[0].logs();
    gateways[0] = world.spawn(0);
    wait_ready(&gateways[0]);
    tokio::task::block_in_place(|| world.cluster.start_node(2)).expect("node 3 rejoins");
    eprintln!("both back at {:.1}s", started.elapsed().as_secs_f64());
    publisher.await.unwrap();

    // Everything arrives.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = true;
        for topic in TOPICS {
            let stored: BTreeSet<u32> =
                stored(&world.pools[0], &format!("S_{topic}")).await.into_values().collect();
            done &= stored.len() == MESSAGES as usize;
            done &= posted(&world.echo, &format!("/{topic}")).len() == MESSAGES as usize;
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "not everything arrived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let a late duplicate show up, and the outbox settle.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // What the outboxes said about leases and recording, for a failure's message.
    let outbox_lines: Vec<String> = std::iter::once(killed_log)
        .chain(gateways.iter().map(Gateway::logs))
        .enumerate()
        .flat_map(|(i, log)| {
            log.lines()
                .filter(|l| l.contains("Outbox"))
                .map(|l| {
                    format!("[{}] {l}", if i == 0 { "killed 0".to_owned() } else { (i - 1).to_string() })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    eprintln!("the outboxes said:\n{}", outbox_lines.join("\n"));
    let all: BTreeSet<u32> = (1..=MESSAGES).collect();
    for topic in TOPICS {
        let (store, post) = (format!("S_{topic}"), format!("P_{topic}"));
        let by_id = stored(&world.pools[0], &store).await;
        let counter = world.counter(&store).await;
        let ids: Vec<i32> = by_id.keys().copied().collect();
        assert_eq!(ids, (1..=counter).collect::<Vec<_>>(), "{store}: one id per message written, no gaps");
        let mut copies: BTreeMap<u32, usize> = BTreeMap::new();
        for i in by_id.values() {
            *copies.entry(*i).or_insert(0) += 1;
        }
        assert_eq!(copies.keys().copied().collect::<BTreeSet<_>>(), all, "{store}: nothing lost");
        let stored_twice: BTreeSet<u32> = copies.iter().filter(|(_, n)| **n > 1).map(|(i, _)| *i).collect();
        assert!(copies.values().all(|n| *n <= 2), "{store}: a message stored more than twice");

        let sent = posted(&world.echo, &format!("/{topic}"));
        assert_eq!(sent.keys().copied().collect::<BTreeSet<_>>(), all, "{post}: every POST delivered");
        // A message the killed instance wrote but had not acknowledged comes again from the
        // broker: it is written (and posted) twice. Beyond that, only the request the killed
        // instance had in flight may be sent a second time.
        let posted_twice: BTreeSet<u32> = sent.iter().filter(|(_, n)| **n > 1).map(|(i, _)| *i).collect();
        // And when the lease holder dies or its own node is the one stopped, the requests it
        // delivered but could not record yet go out again from the next holder: at most one
        // 20 ms recording window of them (see the outbox), however many fit in it at the
        // endpoint's speed. So their first copies all arrived within about that window (a
        // request's own time and a loaded machine's jitter allowed for).
        let resent: Vec<&u32> = posted_twice.difference(&stored_twice).collect();
        let received = world.echo.requests(&format!("/{topic}"));
        let first_arrivals: Vec<std::time::Instant> = resent
            .iter()
            .filter_map(|i| {
                received.iter().find(|r| {
                    serde_json::from_slice::<serde_json::Value>(&r.body).ok().and_then(|b| b["i"].as_u64())
                        == Some(u64::from(**i))
                })
            })
            .map(|r| r.at)
            .collect();
        if let (Some(first), Some(last)) = (first_arrivals.iter().min(), first_arrivals.iter().max()) {
            eprintln!("{post}: {} requests resent, first sent within {:?}", resent.len(), *last - *first);
            assert!(
                *last - *first <= Duration::from_millis(100),
                "{post}: requests sent twice outside a redelivery, first sent over {:?} (more than one \
                 recording window): {resent:?}\nthe outboxes said:\n{}",
                *last - *first,
                outbox_lines.join("\n")
            );
        }
        let requests: usize = sent.values().sum();
        let written = world.counter(&post).await as usize;
        // Each request once, plus the resends counted above (one of them may be a redelivered
        // message's request in flight).
        assert!(
            requests >= written && requests <= written + resent.len() + 1,
            "{post}: {requests} requests for {written} written, {} resent",
            resent.len()
        );
        eprintln!(
            "{topic}: {} stored twice (redelivered after the crash), {} POSTs resent",
            stored_twice.len(),
            resent.len()
        );
    }
    let outbox: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM gateway_outbox").fetch_one(&world.pools[0]).await.unwrap();
    assert_eq!(outbox, 0, "the outbox is empty");

    let prints = [
        fingerprint(&world.pools[0]).await,
        fingerprint(&world.pools[1]).await,
        fingerprint(&world.pools[2]).await,
    ];
    assert!(prints.iter().all(|p| *p == prints[0]), "the nodes disagree: {prints:?}");
    for (i, gateway) in gateways.iter().enumerate() {
        let lines: Vec<String> = gateway
            .logs()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("igration"))
            .map(str::to_owned)
            .collect();
        eprintln!("instance {i}: {} notable lines\n{}", lines.len(), lines.join("\n"));
    }
    eprintln!("scenario done in {:.1}s", started.elapsed().as_secs_f64());
    drop(gateways);
}
