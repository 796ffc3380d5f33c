//! The broker connection: refused CONNACKs, restarts, persistent sessions (retained messages
//! and the session's truth are in `retained.rs` and `subscriptions.rs`).

use crate::harness::*;
use testkit::Mosquitto;

#[tokio::test]
async fn a_refused_connection_logs_the_reason_code_and_retries() {
    let broker = Mosquitto::start_with("allow_anonymous false\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let mut gateway = env.spawn();
    let line = "| ERROR | mqtt_gateway | MQTT connection failed with reason code: 5";
    wait_log(&gateway, line).await;
    eventually("a second attempt", || gateway.count(line) >= 2).await;
    assert!(gateway.is_running(), "a refused connection is retried, not fatal");
}

#[tokio::test]
async fn after_a_broker_restart_the_gateway_reconnects_and_resubscribes() {
    // No persistence: the restarted broker remembers no subscription, so only the gateway's
    // own resubscription can bring messages in.
    let mut broker = Mosquitto::start_with("allow_anonymous true\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    publish_to(broker.port, &topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("F", 1).await;

    broker.stop();
    wait_log(&gateway, "Lost connection to MQTT broker").await;
    broker.restart().unwrap();
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    eventually("resubscribed", || gateway.count(&format!("Subscribed to {topic}")) >= 2).await;
    publish_to(broker.port, &topic, &[br#"{"v": 2}"#]).await;
    env.wait_counter("F", 2).await;
}

#[tokio::test]
async fn messages_published_while_the_gateway_is_down_are_delivered() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let mut gateway = env.start().await;
    gateway.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut gateway).await, 0);

    let payloads: Vec<String> = (1..=25).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;

    let _gateway = env.start().await;
    env.wait_counter("F", 25).await;
    let values: Vec<String> = env.rows("F").await.into_iter().map(|(_, v, _)| v).collect();
    let expected: Vec<String> = (1..=25).map(|i| i.to_string()).collect();
    assert_eq!(values, expected, "every message, in order, once");
}

#[tokio::test]
async fn a_flow_added_while_the_gateway_was_down_gets_its_subscription() {
    let env = TestEnv::new().await;
    let (old, new) = (env.topic("old"), env.topic("new"));
    env.add_flow("OLD", &old, "STORE_DB", "{}", None).await;
    let mut gateway = env.start().await;
    gateway.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut gateway).await, 0);

    env.add_flow("NEW", &new, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    // Both subscribed, whatever the session held: the broker's session is the truth.
    assert_eq!((subscribed(&gateway, &old), subscribed(&gateway, &new)), (1, 1), "{}", gateway.logs());
    publish(&old, &[br#"{"v": 1}"#]).await;
    publish(&new, &[br#"{"v": 1}"#]).await;
    env.wait_counter("OLD", 1).await;
    env.wait_counter("NEW", 1).await;
}
