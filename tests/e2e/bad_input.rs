//! Bad input of every kind is logged and the next message is processed.

use crate::harness::*;

#[tokio::test]
async fn bad_payloads_are_logged_and_the_next_message_is_processed() {
    let env = TestEnv::new().await;
    let topic = env.topic("in");
    env.add_flow("STORE", &topic, "STORE_DB", "{}", None).await;
    env.add_flow("POST", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&format!("/{}", env.name))))
        .await;
    let gateway = env.start().await;

    let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!(r#"{{"big": "{}", "n": 1}}"#, "y".repeat(1 << 20));
    let bad: Vec<(&[u8], &str)> = vec![
        (b"\xff\xfe{}", "payload is not valid UTF-8"),
        (b"{\"a\": ", "payload is not valid JSON"),
        (b"[1, 2, 3]", "payload must be a JSON object, got an array"),
        (b"\"text\"", "payload must be a JSON object, got a string"),
        (b"", "payload is not valid JSON"),
        (deep.as_bytes(), "payload nests JSON deeper than"),
    ];
    for (payload, _) in &bad {
        publish(&topic, &[payload, br#"{"ok": 1}"#]).await;
    }
    publish(&topic, &[huge.as_bytes(), br#"{"ok": 2}"#]).await;
    env.wait_counter("STORE", bad.len() as i32 + 1).await;

    for (_, reason) in &bad {
        wait_log(&gateway, &format!("| ERROR | mqtt_gateway | Invalid payload in topic {topic}: {reason}"))
            .await;
    }
    // The 1 MiB payload is valid JSON: too long for STORE_DB, fine for POST_ENDPOINT.
    wait_log(&gateway, "value of attribute 'big' is 1048576 bytes").await;
    env.wait_counter("POST", bad.len() as i32 + 2).await;
    let path = format!("/{}", env.name);
    eventually("every POST", || shared().echo.requests(&path).len() == bad.len() + 2).await;
    assert!(shared().echo.requests(&path).iter().any(|r| r.body.len() > 1 << 20));
    let stored: Vec<String> = env.rows("STORE").await.into_iter().map(|(_, v, _)| v).collect();
    assert_eq!(stored.iter().filter(|v| *v == "1").count(), bad.len());
}

#[tokio::test]
async fn broken_flow_rows_are_skipped_and_reported_once() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    env.add_flow("BAD_FILTER", &env.topic("a/#/b"), "STORE_DB", "{}", None).await;
    env.add_flow("BAD_ACTION", &topic, "SEND_SMS", "{}", None).await;
    env.add_flow("NO_URL", &topic, "POST_ENDPOINT", "{}", None).await;
    env.add_flow("BAD_SCHEMA", &topic, "STORE_DB", r#"{"temperature": "celsius"}"#, None).await;
    env.add_flow("GOOD", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("GOOD", 1).await;

    gateway.signal(libc::SIGHUP);
    wait_log(&gateway, "SIGHUP received").await;
    publish(&topic, &[br#"{"v": 2}"#]).await;
    env.wait_counter("GOOD", 2).await;

    for (code, reason) in [
        ("BAD_FILTER", "invalid topic filter"),
        ("BAD_ACTION", "unknown action \"SEND_SMS\""),
        ("NO_URL", "action POST_ENDPOINT needs an endpoint_url"),
        ("BAD_SCHEMA", "invalid payload_schema: field \"temperature\" has unknown type \"celsius\""),
    ] {
        let line = format!("| ERROR | mqtt_gateway | Skipping flow {code} (flow_id=");
        assert_eq!(gateway.count(&line), 1, "{code} reported once:\n{}", gateway.logs());
        assert!(gateway.logs().lines().any(|l| l.contains(&line) && l.contains(reason)), "{code}: {reason}");
        assert_eq!(env.counter(code).await, 0);
    }
}
