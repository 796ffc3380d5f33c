//! The broker session under the conditions that broke it: a slow link, a client id taken over
//! again and again, reading paused for longer than the keepalive, acks pending across a broker
//! restart, and readiness between a reconnect and its SUBACKs.

use crate::harness::*;
use std::time::Duration;
use testkit::mariadb::Durability;
use testkit::{DelayProxy, MariaDb, Mosquitto};

/// What the gateway may need to reconnect after the broker is back: the largest backoff step
/// reached in a short outage, plus a connect over the slow link.
const RECONNECT_BOUND: Duration = Duration::from_secs(20);

async fn readyz(port: u16) -> u16 {
    mqtt_gateway::tls::install_crypto_provider();
    match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// The broker's log since it last started.
fn since_last_start(broker: &Mosquitto) -> String {
    let log = broker.log();
    let start = log.rfind(" starting").map_or(0, |at| log[..at].rfind('\n').map_or(0, |nl| nl + 1));
    log[start..].to_owned()
}

#[tokio::test]
async fn over_a_slow_link_the_gateway_reconnects_after_a_broker_restart_and_loses_nothing() {
    let mut broker = Mosquitto::start().unwrap();
    let proxy = DelayProxy::start(broker.port, Duration::from_millis(500)).await.unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", proxy.port.to_string());
    let metrics = testkit::free_port();
    env.set("METRICS_ADDR", format!("127.0.0.1:{metrics}"));
    let topic = env.topic("slow");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    publish_numbered(broker.port, topic.clone(), 1..=50, "").await;
    env.wait_distinct("S", 50, WAIT).await;
    assert_eq!(readyz(metrics).await, 200);

    broker.stop();
    wait_log(&gateway, "Lost connection to MQTT broker").await;
    broker.restart().unwrap();
    let restarted = tokio::time::Instant::now();
    // Readiness is watched from the restart on: 503 until the new connection's SUBACK is in.
    let watch = tokio::spawn(async move {
        let mut seen = Vec::new();
        while restarted.elapsed() < RECONNECT_BOUND {
            let status = readyz(metrics).await;
            if seen.last() != Some(&status) {
                seen.push(status);
            }
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        seen
    });
    publish_numbered(broker.port, topic.clone(), 51..=400, "").await;
    // Polled asynchronously: the proxy runs on this test's runtime.
    eventually_within(RECONNECT_BOUND, "a reconnect over a 0.5 s link", || {
        gateway.count("Reconnected to MQTT broker") > 0
    })
    .await;
    eprintln!("reconnected {:.1}s after the broker restart", restarted.elapsed().as_secs_f64());
    env.wait_distinct("S", 400, Duration::from_secs(60)).await;
    // Acks still crossing the slow link when the broker stopped were lost with it, so the
    // broker redelivers those messages: only messages of before the restart may come twice.
    let twice: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(attribute_value AS SIGNED) FROM data WHERE flow_code = 'S' AND attribute_name = 'i' \
         GROUP BY attribute_value HAVING COUNT(*) > 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert!(twice.iter().all(|i| *i <= 50), "stored twice after the restart: {twice:?}");
    let seen = watch.await.unwrap();
    assert_eq!(seen.first(), Some(&503), "not ready while disconnected: {seen:?}");
    assert_eq!(seen.last(), Some(&200), "ready again once subscribed: {seen:?}");
    assert!(
        gateway.count(&format!("Subscribed to {topic}")) >= 2,
        "ready only once subscribed:\n{}",
        gateway.logs()
    );
    drop(proxy);
}

#[tokio::test]
async fn a_client_id_taken_over_again_and_again_slows_reconnects_down_and_recovers() {
    let broker = Mosquitto::start_with("allow_anonymous true\nlog_type all\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let client_id = format!("gw-{}", env.name);
    let topic = env.topic("kicked");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;

    // Another client with the same id (keepalive 17, to tell its connections apart) connects
    // every second for ten seconds; each connection takes the id over from the other.
    for _ in 0..10 {
        let mut options = rumqttc::MqttOptions::new(client_id.clone(), "127.0.0.1", broker.port);
        options.set_keep_alive(Duration::from_secs(17));
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
        .await;
    }
    let log = broker.log();
    let gateway_connections =
        log.lines().filter(|l| l.contains(&format!("as {client_id} (")) && l.contains("k60")).count();
    eprintln!("the gateway connected {gateway_connections} times in ten seconds of takeovers");
    assert!(gateway_connections >= 2, "the gateway kept trying:\n{log}");
    assert!(gateway_connections <= 8, "the reconnect delay grows: {gateway_connections} connections in 10 s");

    // Once the other client is gone, the gateway comes back by itself, within its longest
    // reconnect delay. (The other client's clean sessions wiped the gateway's, so what is
    // published while it is away is delivered to no one: publish until one arrives.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while env.distinct_i("S").await.0 == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the gateway did not come back:\n{}", gateway.logs());
        i += 1;
        publish_to(broker.port, &topic, &[format!(r#"{{"i": {i}}}"#).as_bytes()]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(gateway);
}

#[tokio::test]
async fn pings_go_on_while_reading_is_paused_for_longer_than_the_keepalive() {
    let broker =
        Mosquitto::start_with("allow_anonymous true\nlog_type all\nmax_inflight_messages 1000\n").unwrap();
    let server = MariaDb::start(Durability::Relaxed).unwrap();
    let mut env = TestEnv::on(&server).await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_KEEPALIVE", "4");
    env.set("MAX_IN_FLIGHT", "50");
    let topic = env.topic("paused");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;

    server.pause(true);
    publish_numbered(broker.port, topic.clone(), 1..=500, "").await;
    // Three times the keepalive with the window full and the database frozen.
    tokio::time::sleep(Duration::from_secs(12)).await;
    server.pause(false);
    env.wait_distinct("S", 500, Duration::from_secs(60)).await;

    assert_eq!(env.distinct_i("S").await, (500, 500), "nothing redelivered, nothing lost");
    let log = broker.log();
    assert!(!log.contains("exceeded timeout"), "the broker timed the gateway out:\n{log}");
    assert!(log.contains(&format!("Received PINGREQ from gw-{}", env.name)), "pings were sent:\n{log}");
    assert_eq!(gateway.count("Lost connection"), 0, "{}", gateway.logs());
    drop(server);
}

#[tokio::test]
async fn acks_of_an_earlier_connection_never_reach_a_new_session() {
    // No persistence: the restarted broker starts a new session, where packet ids of the old
    // one mean other messages (or nothing).
    let mut broker = Mosquitto::start_with("allow_anonymous true\nlog_type all\n").unwrap();
    let server = MariaDb::start(Durability::Relaxed).unwrap();
    let mut env = TestEnv::on(&server).await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_CLEAN_SESSION", "true");
    let topic = env.topic("stale");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;

    // Messages in hand, their acks pending on the database.
    server.pause(true);
    publish_numbered(broker.port, topic.clone(), 1..=20, "").await;
    eventually("the gateway took the messages", || {
        broker.log().matches("Sending PUBLISH to gw-").count() >= 20
    })
    .await;
    broker.stop();
    broker.restart().unwrap();
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    eventually("resubscribed", || gateway.count(&format!("Subscribed to {topic}")) >= 2).await;
    server.pause(false);
    env.wait_distinct("S", 20, Duration::from_secs(60)).await;
    // The acks are produced now; give them the time to (wrongly) go out.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let log = since_last_start(&broker);
    assert!(
        !log.contains(&format!("Received PUBACK from gw-{}", env.name)),
        "a stale ack reached the new session:\n{log}"
    );
    drop(server);
}

/// (A refusal is in `subscriptions.rs`, with Mosquitto's dynamic-security plugin.)
#[tokio::test]
async fn a_lower_qos_than_asked_is_a_warning_naming_the_flows() {
    let broker = Mosquitto::start_with("allow_anonymous true\nmax_qos 0\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let topic = env.topic("downgraded");
    env.add_flow("LOW", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    wait_log(&gateway, &format!("MQTT broker granted QoS 0 for {topic} where 1 was asked: flows LOW")).await;
}
