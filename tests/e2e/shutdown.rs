//! Graceful shutdown: messages in hand are finished, then the process exits 0.

use crate::harness::*;
use rstest::rstest;

#[rstest]
#[case::sigterm(libc::SIGTERM)]
#[case::sigint(libc::SIGINT)]
#[tokio::test]
async fn a_stop_signal_finishes_the_messages_in_hand_and_exits_zero(#[case] signal: i32) {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    let path = format!("/sleep/300/{}", env.name);
    env.add_flow(
        "POST",
        &topic,
        "POST_ENDPOINT",
        "{}",
        Some(&shared().echo.url(&path)),
    )
    .await;
    env.add_flow("STORE", &topic, "STORE_DB", "{}", None).await;
    let mut gateway = env.start().await;
    let payloads: Vec<String> = (1..=5).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;
    env.wait_counter("POST", 5).await;

    // Four POSTs of 300 ms each are still queued when the signal arrives.
    gateway.signal(signal);
    assert_eq!(exit_code(&mut gateway).await, 0, "{}", gateway.logs());
    assert_eq!(
        shared().echo.requests(&path).len(),
        5,
        "every accepted POST was sent before exit"
    );
    assert_eq!(env.counter("STORE").await, 5);
    assert!(gateway.logs().contains("Gateway stopped"));
}
