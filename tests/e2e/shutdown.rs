//! Graceful shutdown: messages in hand are written, then the process exits 0; POSTs still
//! queued stay in the outbox and go out after the next start.

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
