//! What the outbox reads: request bodies bounded by `HTTP_MAX_IN_FLIGHT_BYTES` whatever the
//! backlog, and, with several instances, a body read for each attempt to send it, never for
//! finding out that it is not due.

use crate::harness::*;
use rstest::rstest;
use std::time::Duration;
use testkit::DelayProxy;

const BODY: usize = 4 << 20;
const BUDGET: u64 = 16 << 20;

/// Queues `count` requests of about `bytes` for a flow, as an earlier run would have left them
/// (rendered bodies, their lengths recorded), each due now.
async fn leave_backlog(env: &TestEnv, flow: i32, code: &str, url: &str, count: u32, bytes: usize) {
    for i in 1..=count {
        sqlx::query(
            "INSERT INTO gateway_outbox (flow_id, flow_code, endpoint_url, body, body_bytes, msg_id, created_at, \
             attempts, next_attempt_at, last_error, dead) \
             SELECT ?, ?, ?, b.body, LENGTH(b.body), ?, UTC_TIMESTAMP(3), 0, UTC_TIMESTAMP(3), NULL, FALSE \
             FROM (SELECT CONCAT('{\"i\": ', ?, ', \"pad\": \"', REPEAT('x', ?), '\"}') AS body) AS b",
        )
        .bind(flow)
        .bind(code)
        .bind(url)
        .bind(i as i32)
        .bind(i as i32)
        .bind(bytes as i64)
        .execute(&env.pool)
        .await
        .unwrap();
    }
}

#[rstest]
#[case::in_order(true)]
#[case::unordered(false)]
#[tokio::test]
async fn a_backlog_of_large_bodies_behind_a_503_stays_within_the_byte_budget(#[case] ordered: bool) {
    let mut env = TestEnv::new().await;
    env.set("HTTP_MAX_IN_FLIGHT_BYTES", BUDGET.to_string());
    env.set("HTTP_ORDERED", ordered.to_string());
    env.set("HTTP_RETRY_MAX_DELAY_SECONDS", "1");
    let path = format!("/status/503/{}", env.name);
    let url = shared().echo.url(&path);
    let flow = env.add_flow("BIG", &env.topic("big"), "POST_ENDPOINT", "{}", Some(&url)).await;
    leave_backlog(&env, flow, "BIG", &url, 60, BODY).await;
    let gateway = env.start().await;
    // In order, the head is tried again and again; unordered, every request is tried, twice.
    let attempts = if ordered { 4 } else { 120 };
    eventually_within(Duration::from_secs(60), "the attempts", || shared().echo.count(&path) >= attempts)
        .await;
    let peak = testkit::proc_status_kib(gateway.pid(), "VmHWM");
    eprintln!("ordered={ordered}: peak RSS {} MiB for a budget of {} MiB", peak / 1024, BUDGET >> 20);
    assert!(peak <= (BUDGET + (32 << 20)) / 1024, "peak RSS {peak} KiB, more than the budget plus 32 MiB");
}

#[tokio::test]
async fn two_instances_read_a_backing_off_flows_body_per_attempt_not_per_second() {
    let mut env = TestEnv::new().await;
    env.set("MQTT_SHARED_GROUP", "gateways");
    let db_port: u16 = env.vars.iter().find(|(k, _)| k == "DB_PORT").unwrap().1.parse().unwrap();
    // 503, come back in 2 s: the request waits at least that between attempts.
    let path = format!("/unavailable/1000/2/{}", env.name);
    let topic = env.topic("slow");
    env.add_flow("SLOW", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let mut proxies = Vec::new();
    let mut gateways = Vec::new();
    for i in 0..2 {
        let proxy = DelayProxy::start(db_port, Duration::ZERO).await.unwrap();
        env.set("DB_PORT", proxy.port.to_string());
        env.set("MQTT_CLIENT_ID", format!("{}-{i}", env.name));
        gateways.push(env.start().await);
        proxies.push(proxy);
    }
    let body = format!(r#"{{"pad": "{}"}}"#, "x".repeat(1 << 20));
    publish(&topic, &[body.as_bytes()]).await;
    eventually("the first attempt", || shared().echo.count(&path) >= 1).await;

    let read = || proxies.iter().map(|p| p.bytes_to_clients()).sum::<u64>();
    let (read_before, attempts_before) = (read(), shared().echo.count(&path));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (read_during, attempts) = (read() - read_before, shared().echo.count(&path) - attempts_before);
    eprintln!("{attempts} attempts in 10 s; the database sent the two instances {read_during} bytes");
    assert!(attempts >= 2, "the request is retried: {attempts} attempts");
    let bound = (attempts as u64 + 1) * body.len() as u64 + (256 << 10);
    assert!(
        read_during <= bound,
        "{read_during} bytes read for {attempts} attempts: bodies read when not sent"
    );
}
