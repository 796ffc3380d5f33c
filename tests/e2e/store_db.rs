//! STORE_DB: rows, counters and values exactly as the Python service wrote them.

use crate::harness::*;
use sqlx::Row;

#[tokio::test]
async fn store_db_writes_one_row_per_key_with_python_values() {
    let env = TestEnv::new().await;
    let topic = env.topic("sensors/aht10");
    env.add_flow("AHT10", &topic, "STORE_DB", r#"{"temperature": "float", "humidity": "float"}"#, None).await;
    let _gateway = env.start().await;

    publish(
        &topic,
        &[
            r#"{"temperature": 100.0, "humidity": 23.5, "tiny": 0.00001, "huge": 1.5e20, "ok": true,
                "none": null, "n": 23, "name": "salle été", "nested": {"a": 1, "b": [1, 2]}, "e": "x\"y"}"#
                .as_bytes(),
            br#"{"temperature": 1, "humidity": false}"#,
        ],
    )
    .await;
    env.wait_counter("AHT10", 2).await;

    let rows = env.rows("AHT10").await;
    let first: Vec<(&str, &str, i32)> =
        rows.iter().take(10).map(|(n, v, id)| (n.as_str(), v.as_str(), *id)).collect();
    assert_eq!(
        first,
        [
            ("temperature", "100.0", 1),
            ("humidity", "23.5", 1),
            ("tiny", "1e-05", 1),
            ("huge", "1.5e+20", 1),
            ("ok", "True", 1),
            ("none", "None", 1),
            ("n", "23", 1),
            ("name", "salle été", 1),
            ("nested", r#"{"a": 1, "b": [1, 2]}"#, 1),
            ("e", "x\"y", 1),
        ]
    );
    assert_eq!(rows[10..], [("temperature".into(), "1".into(), 2), ("humidity".into(), "False".into(), 2)]);
}

#[tokio::test]
async fn rows_of_one_message_share_received_at_in_utc() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"a": 1, "b": 2, "c": 3}"#]).await;
    env.wait_counter("F", 1).await;
    let row = sqlx::query(
        "SELECT COUNT(DISTINCT received_at), MAX(ABS(TIMESTAMPDIFF(SECOND, received_at, UTC_TIMESTAMP()))) \
         FROM data WHERE flow_code = 'F'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>(0), 1, "one received_at per message");
    assert!(row.get::<i64, _>(1) < 60, "received_at is UTC now");
}

#[tokio::test]
async fn a_validation_failure_writes_nothing_for_that_flow_only() {
    let env = TestEnv::new().await;
    let topic = env.topic("sensors/x");
    let strict = env
        .add_flow(
            "STRICT",
            &topic,
            "STORE_DB",
            r#"{"properties": {"temperature": {"type": "number"}}}"#,
            None,
        )
        .await;
    env.add_flow("LOOSE", &env.topic("sensors/+"), "STORE_DB", "{}", None).await;
    let gateway = env.start().await;

    publish(&topic, &[br#"{"temperature": "hot"}"#, br#"{"humidity": 3}"#, br#"{"temperature": 20}"#]).await;
    env.wait_counter("LOOSE", 3).await;
    env.wait_counter("STRICT", 1).await;

    assert_eq!(env.rows("STRICT").await, [("temperature".into(), "20".into(), 1)]);
    assert_eq!(env.rows("LOOSE").await.len(), 3);
    let line = format!("| ERROR | mqtt_gateway | Error processing topic {topic} (flow_id={strict}): ");
    wait_log(&gateway, &line).await;
    assert_eq!(gateway.count(&line), 2, "{}", gateway.logs());
    assert!(gateway.logs().contains("field 'temperature' must be of type number, got string"));
    assert!(gateway.logs().contains("missing required field 'temperature'"));
}

#[tokio::test]
async fn every_matching_flow_processes_the_message() {
    let env = TestEnv::new().await;
    env.add_flow("EXACT", &env.topic("a/b/c"), "STORE_DB", "{}", None).await;
    env.add_flow("PLUS", &env.topic("a/+/c"), "STORE_DB", "{}", None).await;
    env.add_flow("HASH", &env.topic("a/#"), "STORE_DB", "{}", None).await;
    env.add_flow("OTHER", &env.topic("z/#"), "STORE_DB", "{}", None).await;
    let _gateway = env.start().await;
    publish(&env.topic("a/b/c"), &[br#"{"v": 1}"#]).await;
    publish(&env.topic("a/x"), &[br#"{"v": 2}"#]).await;
    env.wait_counter("EXACT", 1).await;
    env.wait_counter("PLUS", 1).await;
    env.wait_counter("HASH", 2).await;
    assert_eq!(env.counter("OTHER").await, 0);
    assert_eq!(env.counter("EXACT").await, 1);
}

#[tokio::test]
async fn a_value_too_long_for_text_fails_only_its_message() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    let flow = env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    let long = format!(r#"{{"blob": "{}"}}"#, "x".repeat(70_000));
    publish(&topic, &[br#"{"n": 1}"#, long.as_bytes(), br#"{"n": 3}"#]).await;
    env.wait_counter("F", 2).await;
    wait_log(
        &gateway,
        &format!("Error processing topic {topic} (flow_id={flow}): value of attribute 'blob' is 70000 bytes"),
    )
    .await;
    assert_eq!(env.rows("F").await, [("n".into(), "1".into(), 1), ("n".into(), "3".into(), 2)]);
}
