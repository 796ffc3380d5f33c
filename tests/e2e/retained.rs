//! Retained messages: the broker resends them for every new subscription (with MQTT 3.1.1, for
//! every SUBSCRIBE), and the gateway subscribes on every connection; each is stored once.

use crate::harness::*;
use rstest::rstest;
use testkit::Mosquitto;

/// A broker that saves its state only at a clean stop (or after an hour).
const SAVES_RARELY: &str =
    "allow_anonymous true\npersistence true\npersistence_location {dir}/\nautosave_interval 3600\n";

/// Publishes one retained message and waits for the broker to take it.
async fn publish_retained(port: u16, topic: &str, payload: &str) {
    let mut publisher = testkit::Publisher::connect(port).await.unwrap();
    publisher.publish_retained(topic, payload).await.unwrap();
    publisher.flush(WAIT).await.unwrap();
}

#[rstest]
#[case::mqtt5("5")]
#[case::mqtt311("3.1.1")]
#[tokio::test]
async fn a_retained_message_is_stored_once_across_restarts_and_a_broker_crash(#[case] protocol: &str) {
    let mut broker = Mosquitto::start_with(SAVES_RARELY).unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_PROTOCOL", protocol);
    let topic = env.topic("retained");
    env.add_flow("R", &topic, "STORE_DB", "{}", None).await;
    publish_retained(broker.port, &topic, r#"{"v": 1}"#).await;
    // Saved now, before the gateway ever subscribed.
    broker.stop();
    broker.restart().unwrap();

    let mut gateway = env.start().await;
    env.wait_counter("R", 1).await;
    let mut expected = 1;
    // A live message after each start shows that the gateway is subscribed and caught up.
    let port = broker.port;
    let live = |expected: &mut i32| {
        *expected += 1;
        let payload = format!(r#"{{"live": {expected}}}"#);
        let topic = topic.clone();
        async move { publish_to(port, &topic, &[payload.as_bytes()]).await }
    };
    for signal in [libc::SIGTERM, libc::SIGTERM, libc::SIGKILL] {
        gateway.signal(signal);
        gateway.wait_exit(WAIT).expect("the gateway stopped");
        gateway = env.start().await;
        live(&mut expected).await;
        env.wait_counter("R", expected).await;
    }
    // The broker dies and comes back with the state it saved before the gateway subscribed:
    // the subscription is new to it, so it sends the retained message again.
    broker.crash();
    broker.restart().unwrap();
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    wait_log(&gateway, "retained messages sent again by the broker were already stored").await;
    live(&mut expected).await;
    env.wait_counter("R", expected).await;
    assert_eq!(env.values_of("R", "v").await, vec!["1"], "stored once over 3 restarts and a crash");

    // A new retained value is a new message: stored, and once.
    publish_retained(broker.port, &topic, r#"{"v": 2}"#).await;
    expected += 1;
    env.wait_counter("R", expected).await;
    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(WAIT).expect("the gateway stopped");
    let _gateway = env.start().await;
    live(&mut expected).await;
    env.wait_counter("R", expected).await;
    assert_eq!(env.values_of("R", "v").await, vec!["1", "2"]);
    assert_eq!(env.counter("R").await, expected, "no message counted twice");
}

#[tokio::test]
async fn each_flow_stores_a_retained_message_once_for_itself() {
    // A flow added later has not stored the value yet: it gets it, once; the first flow does
    // not get it again.
    let mut broker = Mosquitto::start_with("allow_anonymous true\n").unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_PROTOCOL", "3.1.1");
    let topic = env.topic("shared-retained");
    env.add_flow("A", &topic, "STORE_DB", "{}", None).await;
    publish_retained(broker.port, &topic, r#"{"v": 7}"#).await;
    let gateway = env.start().await;
    env.wait_counter("A", 1).await;
    env.add_flow("B", &format!("{}/+", env.name), "STORE_DB", "{}", None).await;
    gateway.signal(libc::SIGHUP);
    env.wait_counter("B", 1).await;
    // A reconnect makes a 3.1.1 broker resend it to both subscriptions.
    broker.stop();
    broker.restart().unwrap();
    publish_retained(broker.port, &topic, r#"{"v": 7}"#).await;
    wait_log(&gateway, "Reconnected to MQTT broker").await;
    publish_to(broker.port, &topic, &[br#"{"live": 1}"#]).await;
    env.wait_counter("A", 2).await;
    env.wait_counter("B", 2).await;
    assert_eq!(env.values_of("A", "v").await, vec!["7"]);
    assert_eq!(env.values_of("B", "v").await, vec!["7"]);
}
