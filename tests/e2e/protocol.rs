//! MQTT 5 and 3.1.1: the version asked for, the fall back for a broker that speaks only 3.1.1,
//! what version 5 adds (the broker's reasons, session expiry).

use crate::harness::*;
use std::sync::atomic::Ordering;
use testkit::{Cutter, Mosquitto, Mqtt311Only};

/// How the broker logged the gateway's connections: "p5" for MQTT 5, "p2" for 3.1.1.
fn connections(broker: &Mosquitto, client_id: &str) -> Vec<String> {
    broker
        .log()
        .lines()
        .filter(|l| l.contains(&format!(" as {client_id} (")))
        .filter_map(|l| l.split(" as ").nth(1).map(|rest| rest.to_owned()))
        .collect()
}

#[tokio::test]
async fn mqtt5_is_asked_for_by_default_and_3_1_1_on_request() {
    let broker = Mosquitto::start_with("allow_anonymous true\nlog_type all\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let topic = env.topic("v");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let client_id = format!("gw-{}", env.name);
    for (protocol, seen, n) in [(None, "(p5,", 1), (Some("3.1.1"), "(p2,", 2)] {
        if let Some(protocol) = protocol {
            env.set("MQTT_PROTOCOL", protocol);
        }
        let mut gateway = env.start().await;
        assert!(
            gateway.logs().contains(&format!("(MQTT {})", protocol.unwrap_or("5"))),
            "{}",
            gateway.logs()
        );
        let connected = connections(&broker, &client_id);
        assert!(connected.last().is_some_and(|c| c.contains(seen)), "{connected:?}");
        publish_to(broker.port, &topic, &[br#"{"v": 1}"#]).await;
        env.wait_counter("F", n).await;
        gateway.signal(libc::SIGTERM);
        assert_eq!(exit_code(&mut gateway).await, 0);
    }
}

#[tokio::test]
async fn a_broker_that_speaks_only_3_1_1_gets_it_after_one_warning() {
    let mut broker = Mosquitto::start().unwrap();
    let proxy = Mqtt311Only::start(broker.port).await.unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", proxy.port.to_string());
    let topic = env.topic("old-broker");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    assert!(gateway.logs().contains("(MQTT 3.1.1)"), "{}", gateway.logs());
    let warning = "| WARNING | mqtt_gateway | MQTT broker 127.0.0.1";
    assert_eq!(gateway.count(warning), 1, "{}", gateway.logs());
    assert!(gateway.logs().contains("does not accept MQTT 5"), "{}", gateway.logs());
    publish_to(broker.port, &topic, &[br#"{"i": 1}"#]).await;
    env.wait_counter("F", 1).await;

    // A reconnect goes straight to 3.1.1: no second refusal, no second warning.
    broker.stop();
    broker.restart().unwrap();
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    publish_to(broker.port, &topic, &[br#"{"i": 2}"#]).await;
    env.wait_counter("F", 2).await;
    assert_eq!(proxy.refused.load(Ordering::Relaxed), 1);
    assert_eq!(gateway.count("does not accept MQTT 5"), 1, "{}", gateway.logs());
}

#[tokio::test]
async fn the_reason_the_broker_gives_for_ending_the_connection_is_logged() {
    let mut env = TestEnv::new().await;
    let cutter = Cutter::start(shared().broker.port).await.unwrap();
    env.set("MQTT_DEFAULT_PORT", cutter.port.to_string());
    let topic = env.topic("cut");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    // What EMQX or HiveMQ send when another client takes the id over: DISCONNECT, reason 0x8E,
    // in the shortest form version 5 allows (no properties).
    cutter.cut_with(&[0xE0, 0x01, 0x8E]);
    wait_log(
        &gateway,
        "Lost connection to MQTT broker 127.0.0.1:PORT: the broker ended the connection: session taken over by another client with the same id (0x8E)"
            .replace("PORT", &cutter.port.to_string())
            .as_str(),
    )
    .await;
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    // With a reason string, and the server shutting down.
    let mut packet = vec![0xE0, 0x0A, 0x8B, 0x08, 0x1F, 0x00, 0x05];
    packet.extend_from_slice(b"maint");
    cutter.cut_with(&packet);
    wait_log(&gateway, "the broker ended the connection: server shutting down (0x8B): maint").await;
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("F", 1).await;
}

#[tokio::test]
async fn a_session_expiry_ends_the_queue_of_a_gateway_that_is_gone() {
    let broker = Mosquitto::start_with("allow_anonymous true\nlog_type all\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_SESSION_EXPIRY_SECONDS", "1");
    let topic = env.topic("expiring");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let mut gateway = env.start().await;
    gateway.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut gateway).await, 0);
    let client_id = format!("gw-{}", env.name);
    eventually("the broker to end the session", || {
        broker.log().contains(&format!("Expiring client {client_id}"))
    })
    .await;
    publish_to(broker.port, &topic, &[br#"{"i": 1}"#]).await;
    let _gateway = env.start().await;
    publish_to(broker.port, &topic, &[br#"{"i": 2}"#]).await;
    env.wait_counter("F", 1).await;
    assert_eq!(env.values_of("F", "i").await, vec!["2"], "nothing was queued for the expired session");
}
