//! The broker's session is the truth: what it holds after a crash, after a change of shared
//! group, what it refuses, and what several instances learn of a new flow. Each scenario runs
//! with both MQTT versions where they behave differently on the wire.

use crate::harness::*;
use rstest::rstest;
use std::time::Duration;
use testkit::Mosquitto;

/// A broker that saves its state only at a clean stop (or after an hour): a crash loses every
/// subscription made since its last start.
const SAVES_RARELY: &str =
    "allow_anonymous true\npersistence true\npersistence_location {dir}/\nautosave_interval 3600\n";

#[rstest]
#[case::mqtt5("5")]
#[case::mqtt311("3.1.1")]
#[tokio::test]
async fn a_flow_added_before_the_broker_crashed_gets_every_message(#[case] protocol: &str) {
    let mut broker = Mosquitto::start_with(SAVES_RARELY).unwrap();
    let mut env = TestEnv::new().await;
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_PROTOCOL", protocol);
    let (old, new) = (env.topic("old"), env.topic("new"));
    env.add_flow("OLD", &old, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    // A clean restart: the broker saves the session with OLD's subscription.
    broker.stop();
    broker.restart().unwrap();
    eventually("subscribed again after the restart", || subscribed(&gateway, &old) >= 2).await;

    env.add_flow("NEW", &new, "STORE_DB", "{}", None).await;
    gateway.signal(libc::SIGHUP);
    eventually("NEW subscribed", || subscribed(&gateway, &new) >= 1).await;
    // Killed before it saved NEW's subscription: it comes back with the session of before.
    broker.crash();
    broker.restart().unwrap();
    eventually("NEW subscribed again", || subscribed(&gateway, &new) >= 2).await;

    publish_numbered(broker.port, new.clone(), 1..=20, "").await;
    publish_numbered(broker.port, old.clone(), 1..=5, "").await;
    env.wait_distinct("NEW", 20, WAIT).await;
    env.wait_distinct("OLD", 5, WAIT).await;
    assert_eq!(env.distinct_i("NEW").await, (20, 20), "every message once");
}

#[tokio::test]
async fn after_a_change_of_shared_group_each_message_is_stored_once() {
    let mut env = TestEnv::new().await;
    let topic = env.topic("shared");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let start = |env: &mut TestEnv, group: &str| {
        env.set("MQTT_SHARED_GROUP", group);
        let mut started = Vec::new();
        for i in 0..2 {
            env.set("MQTT_CLIENT_ID", format!("{}-{i}", env.name));
            started.push(env.spawn());
        }
        started
    };
    for gateway in start(&mut env, "g1") {
        wait_log(&gateway, "Gateway ready").await;
        gateway.signal(libc::SIGTERM);
        let mut gateway = gateway;
        assert_eq!(exit_code(&mut gateway).await, 0);
    }
    // Restarted with the same client ids in a new group: the sessions still hold $share/g1/...
    let gateways = start(&mut env, "g2");
    for gateway in &gateways {
        wait_log(gateway, "Gateway ready").await;
        assert!(
            gateway.logs().contains(&format!("Unsubscribed from $share/g1/{topic}")),
            "the old group's subscription is dropped:\n{}",
            gateway.logs()
        );
    }
    publish_numbered(shared().broker.port, topic.clone(), 1..=200, "").await;
    env.wait_distinct("F", 200, WAIT).await;
    // Late copies through the old group would arrive within moments.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.distinct_i("F").await, (200, 200), "each message stored once");
    assert_eq!(env.counter("F").await, 200, "the counter counts each message once");
}

/// A broker whose dynamic-security plugin denies subscriptions under `denied/`, for anyone.
fn broker_denying(pattern: &str) -> Mosquitto {
    let plugin = ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"]
        .iter()
        .map(|dir| format!("{dir}/mosquitto_dynamic_security.so"))
        .find(|path| std::path::Path::new(path).exists())
        .expect("mosquitto_dynamic_security.so (Debian package mosquitto)");
    let rules = format!(
        r#"{{
  "defaultACLAccess": {{"publishClientSend": true, "publishClientReceive": true, "subscribe": true, "unsubscribe": true}},
  "clients": [],
  "groups": [{{"groupname": "anonymous", "roles": [{{"rolename": "deny"}}]}}],
  "roles": [{{"rolename": "deny", "acls": [{{"acltype": "subscribePattern", "topic": "{pattern}", "priority": 0, "allow": false}}]}}],
  "anonymousGroup": "anonymous"
}}"#
    );
    let config = format!(
        "allow_anonymous true\nplugin {plugin}\nplugin_opt_config_file {{dir}}/dynamic-security.json\n"
    );
    Mosquitto::start_with_files(&config, &[("dynamic-security.json", &rules)]).unwrap()
}

#[rstest]
#[case::mqtt5("5", "(not authorized, reason code 0x87)")]
#[case::mqtt311("3.1.1", "(refused; MQTT 3.1.1 gives no reason, reason code 0x80)")]
#[tokio::test]
async fn a_denied_subscription_names_its_flow_and_reason_and_keeps_the_gateway_unready(
    #[case] protocol: &str,
    #[case] reason: &str,
) {
    let mut env = TestEnv::new().await;
    let broker = broker_denying(&format!("{}/denied/#", env.name));
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    env.set("MQTT_PROTOCOL", protocol);
    let metrics = testkit::free_port();
    env.set("METRICS_ADDR", format!("127.0.0.1:{metrics}"));
    let (denied, allowed) = (env.topic("denied/x"), env.topic("allowed"));
    env.add_flow("DENIED", &denied, "STORE_DB", "{}", None).await;
    env.add_flow("ALLOWED", &allowed, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;

    let line = format!("| ERROR | mqtt_gateway | MQTT broker refused the subscription to {denied} {reason}: flows DENIED receive nothing");
    wait_log(&gateway, &line).await;
    mqtt_gateway::tls::install_crypto_provider();
    let readyz = reqwest::get(format!("http://127.0.0.1:{metrics}/readyz")).await.unwrap();
    assert_eq!(readyz.status().as_u16(), 503);
    let why = readyz.text().await.unwrap();
    assert!(why.contains(&format!("refused the subscription to {denied}")), "{why}");
    let scrape =
        reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await.unwrap().text().await.unwrap();
    assert!(scrape.contains("mqtt_gateway_subscriptions_refused 1"), "{scrape}");
    // The other flow works.
    publish_to(broker.port, &allowed, &[br#"{"v": 1}"#]).await;
    env.wait_counter("ALLOWED", 1).await;
}

#[tokio::test]
async fn several_instances_apply_a_new_flow_within_seconds_of_each_other() {
    let mut env = TestEnv::new().await;
    let topic = env.topic("fleet");
    env.add_flow("FIRST", &topic, "STORE_DB", "{}", None).await;
    env.set("MQTT_SHARED_GROUP", "fleet");
    let mut gateways = Vec::new();
    for i in 0..2 {
        env.set("MQTT_CLIENT_ID", format!("{}-{i}", env.name));
        gateways.push(env.start().await);
    }
    // A second flow on the same filter, applied by one instance (SIGHUP); the other one follows
    // the flows version instead of waiting for its own hourly reload.
    env.add_flow("SECOND", &topic, "STORE_DB", "{}", None).await;
    gateways[0].signal(libc::SIGHUP);
    wait_log(&gateways[0], "SIGHUP received").await;
    // The version moves once the first instance applied the change; the other follows it.
    wait_log(&gateways[1], "Applied flows version").await;
    publish_numbered(shared().broker.port, topic.clone(), 1..=100, "").await;
    env.wait_distinct("FIRST", 100, WAIT).await;
    env.wait_distinct("SECOND", 100, WAIT).await;
    assert_eq!(env.distinct_i("SECOND").await, (100, 100), "every message once, whichever instance took it");
}

#[rstest]
#[case::one_instance(1)]
#[case::two_instances_in_a_shared_group(2)]
#[tokio::test]
async fn with_overlapping_filters_each_flow_stores_a_message_once(#[case] instances: usize) {
    // MQTT 5 lets the broker send a copy per matching subscription (Mosquitto does): each copy
    // names its Subscription Identifier, and goes to that filter's flows alone.
    let mut env = TestEnv::new().await;
    let topic = env.topic("a/b/c");
    env.add_flow("EXACT", &topic, "STORE_DB", "{}", None).await;
    env.add_flow("PLUS", &env.topic("a/+/c"), "STORE_DB", "{}", None).await;
    env.add_flow("HASH", &env.topic("a/#"), "STORE_DB", "{}", None).await;
    env.add_flow("HASH_TOO", &env.topic("a/#"), "STORE_DB", "{}", None).await;
    if instances > 1 {
        env.set("MQTT_SHARED_GROUP", "overlap");
    }
    let mut gateways = Vec::new();
    for i in 0..instances {
        env.set("MQTT_CLIENT_ID", format!("{}-{i}", env.name));
        gateways.push(env.start().await);
    }
    publish_numbered(shared().broker.port, topic.clone(), 1..=50, "").await;
    for code in ["EXACT", "PLUS", "HASH", "HASH_TOO"] {
        env.wait_distinct(code, 50, WAIT).await;
    }
    // Late copies would arrive within moments.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for code in ["EXACT", "PLUS", "HASH", "HASH_TOO"] {
        assert_eq!(env.distinct_i(code).await, (50, 50), "{code}: each message once");
    }
}
