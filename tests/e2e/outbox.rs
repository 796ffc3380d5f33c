//! The outbox follows its flow: a request goes to the URL its flow's row names when it is sent,
//! waits while the flow is disabled, and is kept as dead once the flow is deleted.

use crate::harness::*;
use std::time::Duration;
use testkit::EchoServer;
use tokio::time::Instant;

fn bodies(path: &str) -> Vec<String> {
    shared().echo.requests(path).iter().map(|r| r.body_text()).collect()
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!(r#"{{"i": {i}}}"#)).collect()
}

/// `(attempts, dead, last_error)` of every request, oldest first.
async fn requests(env: &TestEnv) -> Vec<(i32, bool, Option<String>)> {
    sqlx::query_as("SELECT attempts, dead, last_error FROM gateway_outbox ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn wait_empty(env: &TestEnv) {
    poll_until("the outbox to be empty", WAIT, || async {
        let left = requests(env).await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    })
    .await
}

#[tokio::test]
async fn a_url_fixed_while_requests_wait_takes_them_all_within_seconds_in_order() {
    let env = TestEnv::new().await;
    let echo = &shared().echo;
    // The old endpoint is overloaded: 503, come back in ten minutes.
    let old = format!("/unavailable/1000/600/{}/old", env.name);
    let new = format!("/{}/new", env.name);
    let topic = env.topic("moved");
    let flow = env.add_flow("MOVED", &topic, "POST_ENDPOINT", "{}", Some(&echo.url(&old))).await;
    let gateway = env.start().await;
    publish_numbered(shared().broker.port, topic, 1..=30, "").await;
    env.wait_counter("MOVED", 30).await;
    eventually("the old endpoint's refusal", || echo.count(&old) >= 1).await;

    sqlx::query("UPDATE flows SET endpoint_url = ? WHERE id = ?")
        .bind(echo.url(&new))
        .bind(flow)
        .execute(&env.pool)
        .await
        .unwrap();
    let reloaded = Instant::now();
    gateway.signal(libc::SIGHUP);
    eventually_within(Duration::from_secs(5), "all 30 requests at the new URL", || echo.count(&new) >= 30)
        .await;
    eprintln!("30 requests delivered {:?} after the reload", reloaded.elapsed());
    assert_eq!(bodies(&new), numbered(1..=30), "every request, in order, once");
    assert_eq!(echo.count(&old), 1, "nothing more went to the old URL");
    wait_empty(&env).await;
}

#[tokio::test]
async fn a_disabled_flows_requests_wait_without_attempts_or_aging_and_go_once_enabled() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_MAX_AGE_SECONDS", "3");
    env.set("HTTP_RETRY_MAX_DELAY_SECONDS", "0.5");
    let port = testkit::free_port();
    let topic = env.topic("paused");
    let url = format!("http://127.0.0.1:{port}/in");
    let flow = env.add_flow("PAUSED", &topic, "POST_ENDPOINT", "{}", Some(&url)).await;
    let gateway = env.start().await;
    publish_numbered(shared().broker.port, topic, 1..=5, "").await;
    env.wait_counter("PAUSED", 5).await;
    eventually("a refused attempt", || gateway.count("Error posting flow PAUSED") >= 1).await;

    env.exec(&format!("UPDATE flows SET enabled = FALSE WHERE id = {flow}")).await;
    let (code, listed, _) = env.command(&["outbox", "list", "--json"]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let states: Vec<&str> = listed.as_array().unwrap().iter().map(|e| e["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["held: its flow is disabled"; 5], "{listed}");
    let (_, text, _) = env.command(&["outbox", "list"]);
    assert!(text.contains("5 pending requests, 5 of them held"), "{text}");
    // Once the outbox has seen the hold, an attempt that was under way has ended.
    poll_until("the hold to be noted", WAIT, || async {
        let noted: Option<i64> =
            sqlx::query_scalar("SELECT COUNT(*) FROM gateway_outbox_holds WHERE held_since IS NOT NULL")
                .fetch_optional(&env.pool)
                .await
                .unwrap();
        if noted == Some(1) {
            Ok(())
        } else {
            Err(format!("{noted:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = gateway.count("Error posting flow PAUSED");
    // Longer than HTTP_MAX_AGE_SECONDS: held requests neither try nor age.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(gateway.count("Error posting flow PAUSED"), attempts, "no attempt while disabled");

    env.exec(&format!("UPDATE flows SET enabled = TRUE WHERE id = {flow}")).await;
    // Still refused once enabled: the requests are older than HTTP_MAX_AGE_SECONDS, but they
    // aged only while their flow was enabled, so they are not dead.
    eventually("an attempt after enabling", || gateway.count("Error posting flow PAUSED") > attempts).await;
    let echo = EchoServer::start_on(port).unwrap();
    eventually("all 5 requests", || echo.count("/in") >= 5).await;
    let received: Vec<String> = echo.requests("/in").iter().map(|r| r.body_text()).collect();
    assert_eq!(received, numbered(1..=5), "every request, in order, once");
    wait_empty(&env).await;
    assert_eq!(gateway.count("Giving up on request"), 0, "none dead:\n{}", gateway.logs());
}

#[tokio::test]
async fn a_deleted_flows_requests_are_kept_dead_with_the_reason() {
    let env = TestEnv::new().await;
    let topic = env.topic("gone");
    let url = format!("http://127.0.0.1:{}/in", testkit::free_port());
    let flow = env.add_flow("GONE", &topic, "POST_ENDPOINT", "{}", Some(&url)).await;
    let gateway = env.start().await;
    publish_numbered(shared().broker.port, topic, 1..=3, "").await;
    env.wait_counter("GONE", 3).await;
    eventually("a refused attempt", || gateway.count("Error posting flow GONE") >= 1).await;

    env.exec(&format!("DELETE FROM flows WHERE id = {flow}")).await;
    poll_until("the requests kept dead", WAIT, || async {
        let rows = requests(&env).await;
        let buried = rows.iter().all(|(_, dead, error)| *dead && error.as_deref() == Some("flow deleted"));
        if rows.len() == 3 && buried {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    wait_log(&gateway, "Giving up on 3 requests of flow GONE").await;
    let (_, listed, _) = env.command(&["outbox", "list", "--dead"]);
    assert!(listed.contains("3 dead requests") && listed.contains("flow deleted"), "{listed}");
}

#[tokio::test]
async fn outbox_retry_after_a_url_fix_sends_to_the_new_url() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_RETRY_MAX_DELAY_SECONDS", "0.2");
    let echo = &shared().echo;
    let old = format!("/status/400/{}/old", env.name);
    let new = format!("/{}/fixed", env.name);
    let topic = env.topic("fix");
    let flow = env.add_flow("FIX", &topic, "POST_ENDPOINT", "{}", Some(&echo.url(&old))).await;
    let mut gateway = env.start().await;
    publish_numbered(shared().broker.port, topic, 1..=3, "").await;
    poll_until("three dead requests", WAIT, || async {
        let rows = requests(&env).await;
        if rows.len() == 3 && rows.iter().all(|(_, dead, _)| *dead) {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;

    sqlx::query("UPDATE flows SET endpoint_url = ? WHERE id = ?")
        .bind(echo.url(&new))
        .bind(flow)
        .execute(&env.pool)
        .await
        .unwrap();
    let (code, out, err) = env.command(&["outbox", "retry", "--all"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually("the retried requests at the new URL", || echo.count(&new) >= 3).await;
    assert_eq!(bodies(&new), numbered(1..=3), "every request, in order, once");
    assert_eq!(echo.count(&old), 9, "three attempts each at the old URL, none since");
    wait_empty(&env).await;
    assert!(gateway.is_running());
}

/// An edit made while a long run of requests is under way applies within about a second: the
/// row is read again as requests leave, not once per page of two hundred.
#[tokio::test]
async fn a_url_edited_in_the_middle_of_a_slow_run_applies_within_seconds() {
    let env = TestEnv::new().await;
    let echo = &shared().echo;
    // Each request takes 200 ms: forty take eight seconds, one at a time.
    let old = format!("/sleep/200/{}/old", env.name);
    let new = format!("/{}/new", env.name);
    let topic = env.topic("slow");
    let flow = env.add_flow("SLOW", &topic, "POST_ENDPOINT", "{}", Some(&echo.url(&old))).await;
    let _gateway = env.start().await;
    publish_numbered(shared().broker.port, topic, 1..=40, "").await;
    eventually("the run under way", || echo.count(&old) >= 3).await;

    sqlx::query("UPDATE flows SET endpoint_url = ? WHERE id = ?")
        .bind(echo.url(&new))
        .bind(flow)
        .execute(&env.pool)
        .await
        .unwrap();
    let at_edit = echo.count(&old);
    eventually("all 40 requests", || echo.count(&old) + echo.count(&new) >= 40).await;
    let to_old = echo.count(&old);
    // A second of requests (five), the one in flight and one read with the row: at most seven.
    assert!(to_old <= at_edit + 7, "{to_old} went to the old URL, {at_edit} of them before the edit");
    let mut all = bodies(&old);
    all.extend(bodies(&new));
    assert_eq!(all, numbered(1..=40), "every request once, in order, across the edit");
    wait_empty(&env).await;
}

/// Unordered, a run longer than the cursor's rewind (5 s): answers not yet recorded when the
/// delivery reads its flow from the start again must not be sent again.
#[tokio::test]
async fn unordered_a_long_run_sends_each_request_once() {
    const MESSAGES: u64 = 7_000;
    let mut env = TestEnv::new().await;
    env.set("HTTP_ORDERED", "false");
    let echo = &shared().echo;
    let path = format!("/{}/unordered", env.name);
    let topic = env.topic("long");
    env.add_flow("LONG", &topic, "POST_ENDPOINT", "{}", Some(&echo.url(&path))).await;
    let _gateway = env.start().await;
    // About 1,000 a second for 7 s: the delivery keeps running across a rewind or two.
    let mut publisher = testkit::Publisher::connect(shared().broker.port).await.unwrap();
    for i in 1..=MESSAGES {
        publisher.publish(&topic, format!(r#"{{"i": {i}}}"#)).await.unwrap();
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    publisher.flush(WAIT).await.unwrap();
    env.wait_counter("LONG", MESSAGES as i32).await;
    wait_empty(&env).await;
    // A copy sent by mistake may still be on its way: give it the time a few requests take.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut sent: Vec<u64> = bodies(&path)
        .iter()
        .map(|b| serde_json::from_str::<serde_json::Value>(b).unwrap()["i"].as_u64().unwrap())
        .collect();
    sent.sort_unstable();
    assert_eq!(sent.len() as u64, MESSAGES, "{} requests sent for {MESSAGES}", sent.len());
    assert_eq!(sent, (1..=MESSAGES).collect::<Vec<u64>>(), "each request once");
}
