//! Graceful shutdown: messages in hand are written, then the process exits 0; POSTs still
//! queued stay in the outbox and go out after the next start. What was written is acknowledged,
//! even when the rest of its batch is held, so nothing is written twice after the restart.

use crate::harness::*;
use rstest::rstest;

#[rstest]
#[case::sigterm(libc::SIGTERM)]
#[case::sigint(libc::SIGINT)]
#[tokio::test]
async fn a_stop_signal_writes_the_messages_in_hand_and_exits_zero(#[case] signal: i32) {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    let path = format!("/sleep/300/{}", env.name);
    env.add_flow("POST", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    env.add_flow("STORE", &topic, "STORE_DB", "{}", None).await;
    let mut gateway = env.start().await;
    let payloads: Vec<String> = (1..=5).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;
    env.wait_counter("POST", 5).await;

    // Most of the five 300 ms POSTs are still queued when the signal arrives.
    gateway.signal(signal);
    assert_eq!(exit_code(&mut gateway).await, 0, "{}", gateway.logs());
    assert!(gateway.logs().contains("Gateway stopped"));
    assert_eq!(env.counter("STORE").await, 5);
    let sent = shared().echo.requests(&path).len();
    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gateway_outbox WHERE NOT dead")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        sent as i64 + queued,
        5,
        "every request was either sent or kept: sent {sent}, queued {queued}"
    );

    let _gateway = env.start().await;
    eventually("the queued POSTs after restart", || shared().echo.requests(&path).len() >= 5).await;
    let bodies: Vec<String> = shared().echo.requests(&path).iter().map(|r| r.body_text()).collect();
    let expected: Vec<String> = (1..=5).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    assert_eq!(bodies, expected, "in order, none twice");
}

#[tokio::test]
async fn a_stop_while_a_split_batch_is_held_acknowledges_what_it_wrote() {
    let mut env = TestEnv::new().await;
    env.set("BATCH_MAX_DELAY_MS", "1000");
    env.exec("ALTER TABLE data MODIFY attribute_value VARCHAR(16) NOT NULL").await;
    let (s_topic, h_topic) = (env.topic("s"), env.topic("h"));
    env.add_flow("S", &s_topic, "STORE_DB", "{}", None).await;
    let h = env.add_flow("H", &h_topic, "STORE_DB", "{}", None).await;
    // H's row of gateway_flow_stats, held by an open transaction: a write of H's messages waits
    // on it when it notes the flow's activity, its counter and rows already written.
    env.exec(&format!(
        "INSERT INTO gateway_flow_stats (flow_id, last_message_at) VALUES ({h}, UTC_TIMESTAMP(3))"
    ))
    .await;
    let mut holder = env.pool.acquire().await.unwrap().detach();
    for statement in ["BEGIN", &format!("SELECT * FROM gateway_flow_stats WHERE flow_id = {h} FOR UPDATE")] {
        sqlx::raw_sql(statement).execute(&mut holder).await.unwrap();
    }
    let mut gateway = env.start().await;

    // One batch: two messages S stores, one too long for its column, then two of H. It fails
    // for the long value and is split: S's two are written, the long one refused, H's two held.
    let long = format!(r#"{{"i": 3, "v": "{}"}}"#, "y".repeat(40));
    let mut publisher = testkit::Publisher::connect(shared().broker.port).await.unwrap();
    for (topic, payload) in [
        (&s_topic, r#"{"i": 1, "v": "ok"}"#),
        (&s_topic, r#"{"i": 2, "v": "ok"}"#),
        (&s_topic, long.as_str()),
        (&h_topic, r#"{"i": 1}"#),
        (&h_topic, r#"{"i": 2}"#),
    ] {
        publisher.publish(topic, payload.to_owned()).await.unwrap();
    }
    publisher.flush(WAIT).await.unwrap();
    wait_log(&gateway, "Database cannot take writes").await;
    assert_eq!(env.counter("S").await, 2, "the first half is written");

    gateway.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut gateway).await, 0, "{}", gateway.logs());
    assert!(gateway.logs().contains("(3 written before them are acknowledged)"), "{}", gateway.logs());
    assert_eq!(gateway.count("Error processing topic"), 1, "the long one refused:\n{}", gateway.logs());
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();

    let gateway = env.start().await;
    env.wait_counter("H", 2).await;
    assert_eq!(env.values_of("S", "i").await, ["1", "2"], "S's messages once each");
    assert_eq!(env.counter("S").await, 2);
    assert_eq!(env.values_of("H", "i").await, ["1", "2"]);
    assert_eq!(gateway.count("Error processing topic"), 0, "the refused one is not delivered again");
}
