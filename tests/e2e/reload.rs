//! Reload: interval and SIGHUP; new filters subscribed, unused ones unsubscribed, changes applied.

use crate::harness::*;

#[tokio::test]
async fn reload_subscribes_new_and_unsubscribes_removed_topics() {
    let mut env = TestEnv::new().await;
    env.set("FLOWS_RELOAD_INTERVAL_SECONDS", "1");
    let old = env.topic("old");
    let new = env.topic("new");
    env.add_flow("OLD", &old, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    publish(&old, &[br#"{"v": 1}"#]).await;
    env.wait_counter("OLD", 1).await;

    env.add_flow("NEW", &new, "STORE_DB", "{}", None).await;
    env.exec("UPDATE flows SET enabled = FALSE WHERE code = 'OLD'").await;
    wait_log(&gateway, &format!("Subscribed to {new}")).await;
    wait_log(&gateway, &format!("Unsubscribed from {old}")).await;

    publish(&old, &[br#"{"v": 2}"#]).await;
    publish(&new, &[br#"{"v": 3}"#]).await;
    env.wait_counter("NEW", 1).await;
    assert_eq!(env.counter("OLD").await, 1, "a disabled flow takes nothing");
}

#[tokio::test]
async fn sighup_reloads_at_once() {
    let env = TestEnv::new().await;
    let gateway = env.start().await;
    let topic = env.topic("late");
    env.add_flow("LATE", &topic, "STORE_DB", "{}", None).await;
    gateway.signal(libc::SIGHUP);
    wait_log(&gateway, &format!("Subscribed to {topic}")).await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("LATE", 1).await;
}

#[tokio::test]
async fn a_changed_flow_takes_effect_on_reload() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", r#"{"a": "int"}"#, None).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"b": 1}"#]).await;
    wait_log(&gateway, "missing required field 'a'").await;

    env.exec(r#"UPDATE flows SET payload_schema = '{"b": "int"}' WHERE code = 'F'"#).await;
    gateway.signal(libc::SIGHUP);
    wait_log(&gateway, "SIGHUP received").await;
    // The reload is done once its flows are used: retry until the new schema applies.
    for _ in 0..50 {
        publish(&topic, &[br#"{"b": 2}"#]).await;
        if env.counter("F").await > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    env.wait_counter("F", 1).await;
}

#[tokio::test]
async fn a_failed_reload_is_logged_and_the_old_flows_keep_working() {
    let mut env = TestEnv::new().await;
    env.set("FLOWS_RELOAD_INTERVAL_SECONDS", "1");
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    env.exec("ALTER TABLE flows RENAME COLUMN topic TO topic_gone").await;
    wait_log(&gateway, "| ERROR | mqtt_gateway | Error reloading flows: ").await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("F", 1).await;
    env.exec("ALTER TABLE flows RENAME COLUMN topic_gone TO topic").await;
}
