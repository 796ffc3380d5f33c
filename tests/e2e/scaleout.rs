//! Several instances in one shared group: each flow's outbox is delivered by one instance at a
//! time, at every request, even when each request outlasts the lease; a killed holder's flows
//! move on with at most the request in flight sent again.

use crate::harness::*;
use rstest::rstest;
use std::time::Duration;
use testkit::Gateway;

/// Starts `n` instances in one shared group, each with its own client id (its lease owner name).
async fn instances(env: &mut TestEnv, n: usize) -> Vec<Gateway> {
    env.set("MQTT_SHARED_GROUP", "gateways");
    let mut gateways = Vec::new();
    for i in 0..n {
        env.set("MQTT_CLIENT_ID", format!("{}-{i}", env.name));
        gateways.push(env.start().await);
    }
    gateways
}

/// Publishes `{"i": 1..=n}` to each flow, each message committed before the next leaves, so
/// that the order of the counters (the order a flow's requests are kept in) is the order sent.
async fn publish_committed(env: &TestEnv, flows: &[(&str, String)], n: u32) {
    let mut publisher = testkit::Publisher::connect(shared().broker.port).await.unwrap();
    for i in 1..=n {
        for (code, topic) in flows {
            publisher.publish(topic, format!(r#"{{"i": {i}}}"#)).await.unwrap();
            env.wait_counter(code, i as i32).await;
        }
    }
    publisher.flush(WAIT).await.unwrap();
}

fn bodies(path: &str) -> Vec<String> {
    shared().echo.requests(path).iter().map(|r| r.body_text()).collect()
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!(r#"{{"i": {i}}}"#)).collect()
}

async fn outbox_rows(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM gateway_outbox").fetch_one(&env.pool).await.unwrap()
}

#[rstest]
#[case::two_instances(2)]
#[case::three_instances(3)]
#[tokio::test]
async fn instances_sharing_slow_flows_send_each_request_once_in_order(#[case] n: usize) {
    let mut env = TestEnv::new().await;
    // Every request takes longer than the whole lease: only renewals during the request keep
    // the other instances off the flow.
    env.set("OUTBOX_LEASE_SECONDS", "2");
    let flows: Vec<(&str, String)> = vec![("P1", env.topic("p1")), ("P2", env.topic("p2"))];
    for (code, topic) in &flows {
        let path = format!("/sleep/2200/{}/{code}", env.name);
        env.add_flow(code, topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    }
    let gateways = instances(&mut env, n).await;
    let messages = 4;
    publish_committed(&env, &flows, messages).await;

    for (code, _) in &flows {
        let path = format!("/sleep/2200/{}/{code}", env.name);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while shared().echo.count(&path) < messages as usize && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Longer than a request and a lease: a second sender would show by now.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert_eq!(bodies(&path), numbered(1..=messages), "{code}: every request once, in order");
    }
    for _ in 0..100 {
        if outbox_rows(&env).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(outbox_rows(&env).await, 0);
    for gateway in &gateways {
        assert_eq!(gateway.count("lost the lease"), 0, "{}", gateway.logs());
    }
}

#[tokio::test]
async fn a_killed_lease_holder_is_taken_over_with_at_most_one_resend() {
    let mut env = TestEnv::new().await;
    env.set("OUTBOX_LEASE_SECONDS", "2");
    let path = format!("/sleep/400/{}/p", env.name);
    let flow =
        env.add_flow("P", &env.topic("p"), "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let mut gateways = instances(&mut env, 2).await;
    let messages = 20;
    publish_committed(&env, &[("P", env.topic("p"))], messages).await;

    eventually("a few requests delivered", || shared().echo.count(&path) >= 3).await;
    let holder: String = sqlx::query_scalar("SELECT owner FROM gateway_outbox_leases WHERE flow_id = ?")
        .bind(flow)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let index = (0..gateways.len()).find(|i| holder == format!("{}-{i}", env.name)).expect("a holder");
    let victim = &mut gateways[index];
    victim.signal(libc::SIGKILL);
    victim.wait_exit(WAIT).expect("killed");
    let sent_by_victim = shared().echo.count(&path);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while outbox_rows(&env).await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = bodies(&path);
    let mut deduplicated = received.clone();
    deduplicated.dedup();
    assert_eq!(deduplicated, numbered(1..=messages), "every request, in order: {received:?}");
    let resent = received.len() - deduplicated.len();
    eprintln!("holder killed after {sent_by_victim} requests: {resent} sent again");
    assert!(resent <= 1, "only the request in flight may be sent again: {received:?}");
    assert!(gateways[1 - index].is_running(), "the other instance runs on");
}

#[tokio::test]
async fn a_deliverer_that_loses_its_lease_stops_at_once() {
    let mut env = TestEnv::new().await;
    env.set("OUTBOX_LEASE_SECONDS", "3");
    let path = format!("/sleep/1000/{}/p", env.name);
    let flow =
        env.add_flow("P", &env.topic("p"), "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let gateway = env.start().await;
    let messages = 8;
    publish_committed(&env, &[("P", env.topic("p"))], messages).await;
    eventually("two requests", || shared().echo.count(&path) >= 2).await;

    // Someone else owns the flow now, as if this instance had stalled past its lease.
    env.exec(&format!(
        "UPDATE gateway_outbox_leases SET owner = 'thief', expires_at = UTC_TIMESTAMP(3) + INTERVAL 1 HOUR \
         WHERE flow_id = {flow}"
    ))
    .await;
    wait_log(&gateway, "Outbox lost the lease of flow").await;
    let sent = shared().echo.count(&path);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(shared().echo.count(&path), sent, "nothing sent without the lease");

    env.exec(&format!("DELETE FROM gateway_outbox_leases WHERE flow_id = {flow}")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox_rows(&env).await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = bodies(&path);
    let mut deduplicated = received.clone();
    deduplicated.dedup();
    assert_eq!(deduplicated, numbered(1..=messages), "every request, in order: {received:?}");
    assert!(received.len() - deduplicated.len() <= 1, "only the abandoned request again: {received:?}");
}
