//! Large messages and bursts of them: statements bounded by the server's `max_allowed_packet`,
//! a message too big for any statement refused alone, memory bounded by the in-flight byte
//! budget while the database is frozen, and small messages on other flows going on meanwhile.

use crate::harness::*;
use std::time::Duration;
use testkit::mariadb::Durability;
use testkit::{MariaDb, Mosquitto, Publisher};

/// `{"i": n, "v0": "...", ..., "v19": "..."}` with twenty values of `value_bytes` each.
fn big_payload(i: u32, value_bytes: usize) -> String {
    let value = char::from(b'a' + (i % 26) as u8).to_string().repeat(value_bytes);
    let fields: Vec<String> = (0..20).map(|k| format!(r#""v{k}": "{value}""#)).collect();
    format!(r#"{{"i": {i}, {}}}"#, fields.join(", "))
}

/// Publishes `count` messages of about 1 MB at full speed, and small ones on `small_topic`
/// between them; waits for the broker to take them all.
async fn burst(port: u16, topic: &str, small_topic: &str, count: u32) {
    let mut publisher = Publisher::connect(port).await.unwrap();
    for i in 1..=count {
        publisher.publish(topic, big_payload(i, 50_000)).await.unwrap();
        publisher.publish(small_topic, format!(r#"{{"i": {i}}}"#)).await.unwrap();
    }
    publisher.flush(Duration::from_secs(120)).await.unwrap();
}

/// Every big message stored whole: 21 rows each, each value of its full length.
async fn assert_stored_intact(env: &TestEnv, count: i64) {
    env.wait_distinct("BIG", count, Duration::from_secs(120)).await;
    let (rows, shortest, longest): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), MIN(LENGTH(attribute_value)), MAX(LENGTH(attribute_value)) FROM data \
         WHERE flow_code = 'BIG' AND attribute_name <> 'i'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows, count * 20, "every value of every message");
    assert_eq!((shortest, longest), (Some(50_000), Some(50_000)), "values intact");
    assert_eq!(env.distinct_i("BIG").await, (count, count), "each message once");
}

async fn bursts_of_large_messages_are_stored_whole(broker_config: &str) {
    let broker = Mosquitto::start_with(broker_config).unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let (topic, small) = (env.topic("big"), env.topic("small"));
    env.add_flow("BIG", &topic, "STORE_DB", "{}", None).await;
    env.add_flow("SMALL", &small, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    burst(broker.port, &topic, &small, 100).await;
    assert_stored_intact(&env, 100).await;
    env.wait_distinct("SMALL", 100, WAIT).await;
    assert_eq!(gateway.count("Error processing topic"), 0, "{}", gateway.logs());
    assert_eq!(gateway.count("Database cannot take writes"), 0, "{}", gateway.logs());
}

#[tokio::test]
async fn a_burst_of_megabyte_messages_is_stored_whole_on_a_default_broker() {
    bursts_of_large_messages_are_stored_whole("allow_anonymous true\n").await;
}

#[tokio::test]
async fn a_burst_of_megabyte_messages_is_stored_whole_with_a_wide_broker_window() {
    bursts_of_large_messages_are_stored_whole("allow_anonymous true\nmax_inflight_messages 1000\n").await;
}

#[tokio::test]
async fn a_message_too_big_for_the_server_fails_alone() {
    // 64 KiB: a 50 KB value still fits TEXT, but not one statement with its row.
    let server =
        MariaDb::start_with(Durability::Relaxed, &["--max-allowed-packet=65536".to_owned()]).unwrap();
    let env = TestEnv::on(&server).await;
    let (store, post, small) = (env.topic("store"), env.topic("post"), env.topic("small"));
    env.add_flow("S", &store, "STORE_DB", "{}", None).await;
    let path = format!("/{}/big-post", env.name);
    env.add_flow("P", &post, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    env.add_flow("SMALL", &small, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;

    let mut publisher = Publisher::connect(shared().broker.port).await.unwrap();
    for i in 1..=9u32 {
        // Message 5 has one 50 KB value: its row cannot go in any statement. The others have
        // ten values of 20 KB, more than one statement holds, so they are split.
        let payload = if i == 5 {
            format!(r#"{{"i": {i}, "v": "{}"}}"#, "z".repeat(50_000))
        } else {
            let values: Vec<String> =
                (0..10).map(|k| format!(r#""v{k}": "{}""#, "y".repeat(20_000))).collect();
            format!(r#"{{"i": {i}, {}}}"#, values.join(", "))
        };
        publisher.publish(&store, payload).await.unwrap();
        // POST bodies: the fifth is 100 KB, too big to queue.
        let pad = if i == 5 { 100_000 } else { 1_000 };
        publisher.publish(&post, format!(r#"{{"i": {i}, "pad": "{}"}}"#, "p".repeat(pad))).await.unwrap();
        publisher.publish(&small, format!(r#"{{"i": {i}}}"#)).await.unwrap();
    }
    publisher.flush(WAIT).await.unwrap();

    env.wait_distinct("S", 8, WAIT).await;
    env.wait_distinct("SMALL", 9, WAIT).await;
    wait_log(&gateway, "the POST body of 100").await;
    let stored = env.values_of("S", "i").await;
    assert!(!stored.contains(&"5".to_owned()), "{stored:?}");
    assert_eq!(env.rows("S").await.len(), 8 * 11, "the others whole, the refused one not at all");
    assert_eq!(env.counter("S").await, 8, "the refused message takes no id");
    let logs = gateway.logs();
    assert!(logs.contains("max_allowed_packet is 65536"), "the reason names the limit:\n{logs}");
    assert_eq!(gateway.count(&format!("Error processing topic {store} (flow_id=")), 1, "{logs}");
    assert_eq!(gateway.count(&format!("Error processing topic {post} (flow_id=")), 1, "{logs}");
    assert_eq!(gateway.count("Database cannot take writes"), 0, "size is never an outage:\n{logs}");
    eventually("eight POSTs delivered", || shared().echo.requests(&path).len() >= 8).await;
    assert_eq!(env.counter("P").await, 8);
}

#[tokio::test]
async fn memory_follows_the_byte_budget_while_the_database_is_frozen() {
    let broker = Mosquitto::start_with("allow_anonymous true\nmax_inflight_messages 1000\n").unwrap();
    let server = MariaDb::start(Durability::Relaxed).unwrap();
    let mut env = TestEnv::on(&server).await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MAX_IN_FLIGHT_BYTES", (32 << 20).to_string());
    let (topic, small) = (env.topic("big"), env.topic("small"));
    env.add_flow("BIG", &topic, "STORE_DB", "{}", None).await;
    env.add_flow("SMALL", &small, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    let before = testkit::proc_status_kib(gateway.pid(), "VmHWM");

    server.pause(true);
    // 200 MB for a 32 MiB budget.
    burst(broker.port, &topic, &small, 200).await;
    let frozen = testkit::proc_status_kib(gateway.pid(), "VmHWM");
    server.pause(false);
    assert_stored_intact(&env, 200).await;
    env.wait_distinct("SMALL", 200, WAIT).await;
    let after = testkit::proc_status_kib(gateway.pid(), "VmHWM");
    eprintln!("peak RSS: {before} KiB at start, {frozen} KiB frozen with 200 MB queued, {after} KiB after");
    // The budget, plus a batch being rendered and written (8 MiB of payload, a few copies),
    // plus the usual ~15 MiB.
    let margin_kib = 64 * 1024;
    assert!(
        after < 32 * 1024 + margin_kib + before,
        "peak {after} KiB for a 32 MiB budget (start {before} KiB)"
    );
}

#[tokio::test]
async fn a_task_that_dies_stops_the_gateway_with_an_error() {
    let mut env = TestEnv::new().await;
    let topic = env.topic("poison");
    env.set("MQTT_GATEWAY_TEST_PANIC_ON_TOPIC", &topic);
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let mut gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    assert_exits_1_logging(&mut gateway, "| ERROR | mqtt_gateway | the processor panicked: fault injected")
        .await;
    assert_eq!(env.counter("F").await, 0);
}

#[tokio::test]
async fn nan_and_infinity_are_stored_and_refused_in_bodies_as_python_does() {
    let env = TestEnv::new().await;
    let topic = env.topic("sensor");
    env.add_flow("SCHEMA", &topic, "STORE_DB", r#"{"temperature": "float", "humidity": "float"}"#, None)
        .await;
    env.add_flow("FREE", &topic, "STORE_DB", "{}", None).await;
    let path = format!("/{}/nan", env.name);
    env.add_flow("P", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let gateway = env.start().await;
    publish(
        &topic,
        &[br#"{"temperature": NaN, "humidity": 40}"#, br#"{"temperature": Infinity, "humidity": -Infinity}"#],
    )
    .await;
    env.wait_counter("SCHEMA", 2).await;
    env.wait_counter("FREE", 2).await;
    let values: Vec<(String, String)> =
        env.rows("SCHEMA").await.into_iter().map(|(name, value, _)| (name, value)).collect();
    let expected = [("temperature", "nan"), ("humidity", "40"), ("temperature", "inf"), ("humidity", "-inf")];
    assert_eq!(values, expected.map(|(n, v)| (n.to_owned(), v.to_owned())));
    env.wait_counter("P", 2).await;
    eventually("two posting errors", || {
        gateway.count("Out of range float values are not JSON compliant") >= 2
    })
    .await;
    assert_eq!(gateway.count("Invalid payload"), 0, "{}", gateway.logs());
}
