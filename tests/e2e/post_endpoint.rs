//! POST_ENDPOINT: the counter commits, then the body Python's `requests` would send is POSTed;
//! failures are logged word for word and the counter stays.

use crate::harness::*;
use rstest::rstest;

#[tokio::test]
async fn post_endpoint_sends_the_python_json_body() {
    let env = TestEnv::new().await;
    let topic = env.topic("sensors/aht10");
    let path = format!("/{}/ingest", env.name);
    env.add_flow(
        "AHT10_ENDPOINT",
        &topic,
        "POST_ENDPOINT",
        r#"{"temperature": "float"}"#,
        Some(&shared().echo.url(&path)),
    )
    .await;
    let _gateway = env.start().await;

    publish(&topic, &[r#"{"temperature":21.0,"name":"été 😀","list":[1,2.50,null]}"#.as_bytes()]).await;
    env.wait_counter("AHT10_ENDPOINT", 1).await;
    eventually("the POST", || !shared().echo.requests(&path).is_empty()).await;

    let request = &shared().echo.requests(&path)[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.body_text(),
        r#"{"temperature": 21.0, "name": "\u00e9t\u00e9 \ud83d\ude00", "list": [1, 2.5, null]}"#
    );
}

#[tokio::test]
async fn one_flow_posts_in_arrival_order() {
    let env = TestEnv::new().await;
    let topic = env.topic("seq");
    let path = format!("/{}/seq", env.name);
    env.add_flow("SEQ", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let _gateway = env.start().await;
    let payloads: Vec<String> = (1..=30).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;
    eventually("30 POSTs", || shared().echo.requests(&path).len() == 30).await;
    let bodies: Vec<String> = shared().echo.requests(&path).iter().map(|r| r.body_text()).collect();
    let expected: Vec<String> = (1..=30).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    assert_eq!(bodies, expected);
    assert_eq!(env.counter("SEQ").await, 30);
}

#[derive(Debug, Clone, Copy)]
enum Failure {
    ServerError,
    ClientError,
    Refused,
    Timeout,
}

#[rstest]
#[case::server_error(Failure::ServerError, "500 Server Error: Internal Server Error for url: ")]
#[case::client_error(Failure::ClientError, "404 Client Error: Not Found for url: ")]
#[case::refused(Failure::Refused, "Connection refused")]
#[case::timeout(Failure::Timeout, "timed out")]
#[tokio::test]
async fn a_failed_post_is_logged_and_the_counter_stays(#[case] failure: Failure, #[case] reason: &str) {
    let mut env = TestEnv::new().await;
    env.set("HTTP_TIMEOUT_SECONDS", "1");
    let echo = &shared().echo;
    let url = match failure {
        Failure::ServerError => echo.url(&format!("/status/500/{}", env.name)),
        Failure::ClientError => echo.url(&format!("/status/404/{}", env.name)),
        Failure::Refused => format!("http://127.0.0.1:{}/x", testkit::free_port()),
        Failure::Timeout => echo.url(&format!("/sleep/3000/{}", env.name)),
    };
    let topic = env.topic("t");
    env.add_flow("EP", &topic, "POST_ENDPOINT", "{}", Some(&url)).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    env.wait_counter("EP", 1).await;
    let line = format!("| ERROR | mqtt_gateway | Error posting flow EP to endpoint {url}: ");
    wait_log(&gateway, &line).await;
    let logged = gateway.logs();
    let error_line = logged.lines().find(|l| l.contains(&line)).unwrap();
    assert!(error_line.contains(reason), "{error_line}");
    assert_eq!(env.counter("EP").await, 1);
}

#[tokio::test]
async fn credentials_in_an_endpoint_url_are_masked_in_logs() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    let url = format!("http://user:hunter2@127.0.0.1:{}/status/500/{}", shared().echo.port, env.name);
    env.add_flow("EP", &topic, "POST_ENDPOINT", "{}", Some(&url)).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    wait_log(&gateway, "Error posting flow EP to endpoint http://user:***@127.0.0.1").await;
    assert!(!gateway.logs().contains("hunter2"));
}

#[tokio::test]
async fn a_slow_endpoint_does_not_hold_up_store_db() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_TIMEOUT_SECONDS", "30");
    let topic = env.topic("t");
    let slow = format!("/sleep/8000/{}", env.name);
    env.add_flow("SLOW", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&slow))).await;
    env.add_flow("STORE", &topic, "STORE_DB", "{}", None).await;
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#, br#"{"v": 2}"#, br#"{"v": 3}"#]).await;
    // The endpoint takes 8 s per request; all three messages are stored while the first POST
    // is still waiting for its answer.
    env.wait_counter("STORE", 3).await;
    assert!(shared().echo.requests(&slow).len() <= 1, "the slow endpoint has answered nothing yet");
    assert_eq!(env.counter("SLOW").await, 3);
}

#[tokio::test]
async fn unordered_a_request_waiting_for_its_retry_holds_back_no_newer_one() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_ORDERED", "false");
    let topic = env.topic("unordered");
    // The first request to this path gets 429 with `Retry-After: 5`, every later one 200.
    let path = format!("/busy/1/5/{}/unordered", env.name);
    env.add_flow("U", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"i": 1}"#]).await;
    eventually("the first attempt", || shared().echo.count(&path) >= 1).await;

    let payloads: Vec<String> = (2..=10).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;
    eventually("the newer requests", || shared().echo.count(&path) >= 10).await;
    let bodies = || shared().echo.requests(&path).iter().map(|r| r.body_text()).collect::<Vec<_>>();
    let first = r#"{"i": 1}"#;
    let sent = bodies();
    assert_eq!(sent[0], first);
    assert!(sent[1..10].iter().all(|b| b != first), "the newer ones went out before the retry: {sent:?}");
    // And the first one goes out again once its `Retry-After` has passed.
    eventually("the retry", || bodies().len() >= 11).await;
    assert_eq!(bodies()[10], first);
}

#[tokio::test]
async fn unordered_a_request_refused_for_ten_minutes_delays_no_other() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_ORDERED", "false");
    let topic = env.topic("unordered");
    // The first request gets 503 with `Retry-After: 600`, every later one 200.
    let path = format!("/unavailable/1/600/{}/unordered", env.name);
    env.add_flow("U", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"i": 0}"#]).await;
    eventually("the refused attempt", || shared().echo.count(&path) >= 1).await;

    let mut publisher = testkit::Publisher::connect(shared().broker.port).await.unwrap();
    let mut sent_at = Vec::new();
    for i in 1..=20 {
        sent_at.push(std::time::Instant::now());
        publisher.publish(&topic, format!(r#"{{"i": {i}}}"#)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    publisher.flush(WAIT).await.unwrap();
    eventually("the 20 others", || shared().echo.count(&path) >= 21).await;
    let requests = shared().echo.requests(&path);
    for (i, sent) in sent_at.iter().enumerate() {
        let body = format!(r#"{{"i": {}}}"#, i + 1);
        let arrived = requests.iter().find(|r| r.body_text() == body).expect("arrived").at;
        let took = arrived.saturating_duration_since(*sent);
        // Waiting behind the refused one would take ten minutes; a loaded CI machine, seconds.
        assert!(took <= std::time::Duration::from_secs(5), "request {} took {took:?}", i + 1);
    }
    let refused = requests.iter().filter(|r| r.body_text() == r#"{"i": 0}"#).count();
    assert_eq!(refused, 1, "the refused one waits for its ten minutes");
}

#[tokio::test]
async fn unordered_a_request_in_flight_for_seconds_delays_no_other() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_ORDERED", "false");
    env.set("HTTP_TIMEOUT_SECONDS", "30");
    let topic = env.topic("unordered");
    // The first request is answered after 8 s, every later one at once.
    let path = format!("/stall/1/8000/{}/unordered", env.name);
    env.add_flow("U", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"i": 0}"#]).await;
    eventually("the slow request under way", || shared().echo.count(&path) >= 1).await;
    let started = std::time::Instant::now();
    let payloads: Vec<String> = (1..=10).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;
    eventually("the 10 others", || shared().echo.count(&path) >= 11).await;
    let took = started.elapsed();
    // Waiting for the slow one would take its 8 s; a loaded CI machine adds a second or two.
    assert!(took < std::time::Duration::from_secs(6), "the others waited {took:?} for the slow one");
}

#[tokio::test]
async fn a_long_non_ascii_url_is_posted_to_though_it_percent_encodes_past_500_characters() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    let prefix = format!("/{}/", env.name);
    let url = shared().echo.url(&format!("{prefix}{}", "é".repeat(200)));
    assert!(url::Url::parse(&url).unwrap().as_str().len() > 1_000, "encoded it is long");
    env.add_flow("LONG", &topic, "POST_ENDPOINT", "{}", Some(&url)).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"i": 1}"#, br#"{"i": 2}"#]).await;
    eventually("both POSTs", || shared().echo.count(&prefix) >= 2).await;
    assert_eq!(gateway.count("Error processing topic"), 0, "{}", gateway.logs());
    let path = &shared().echo.requests(&prefix)[0].path;
    assert!(path.ends_with(&"%C3%A9".repeat(200)), "{path}");
}
