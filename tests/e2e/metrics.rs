//! `METRICS_ADDR`: Prometheus metrics, liveness and readiness over HTTP.

use crate::harness::*;
use testkit::Mosquitto;

async fn get(url: &str) -> (u16, String) {
    mqtt_gateway::tls::install_crypto_provider();
    let response = reqwest::get(url).await.expect("GET");
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_health_and_readiness_tell_the_truth() {
    let mut broker = Mosquitto::start_with("allow_anonymous true\n").unwrap();
    let mut env = TestEnv::new().await;
    let port = testkit::free_port();
    env.set("METRICS_ADDR", format!("127.0.0.1:{port}"));
    env.set("MQTT_DEFAULT_PORT", broker.port.to_string());
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", r#"{"v": "int"}"#, None).await;
    let path = format!("/{}/metrics-post", env.name);
    env.add_flow("P", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let _gateway = env.start().await;
    let base = format!("http://127.0.0.1:{port}");

    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&format!("{base}/readyz")).await, (200, "ready\n".to_owned()));

    publish_to(broker.port, &topic, &[br#"{"v": 1}"#, br#"{"v": "x"}"#, b"not json"]).await;
    env.wait_counter("F", 1).await;
    let wanted = [
        "mqtt_gateway_messages_received_total 3",
        "mqtt_gateway_flows_broken 0",
        "mqtt_gateway_messages_invalid_total 1",
        r#"mqtt_gateway_messages_processed_total{flow="F",action="STORE_DB"} 1"#,
        r#"mqtt_gateway_messages_failed_total{flow="F",action="STORE_DB"} 1"#,
        "mqtt_gateway_broker_connected 1",
        "mqtt_gateway_flows_loaded 2",
        "mqtt_gateway_commit_seconds_bucket",
        "mqtt_gateway_batch_messages_bucket",
        "mqtt_gateway_http_request_seconds_bucket",
        r#"class="2xx""#,
        "mqtt_gateway_outbox_pending",
        "mqtt_gateway_broker_reconnects_total 0",
        r#"mqtt_gateway_last_message_timestamp_seconds{flow="F"}"#,
    ];
    let mut text = String::new();
    for _ in 0..100 {
        text = get(&format!("{base}/metrics")).await.1;
        if wanted.iter().all(|w| text.contains(w)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for w in wanted {
        assert!(text.contains(w), "missing {w} in:\n{text}");
    }

    // The Grafana dashboard in the repository queries only series the gateway exports.
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/mqtt-gateway.json"))
            .unwrap();
    let mut names: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("mqtt_gateway_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    // Exported from the first time it happens, which this test does not provoke (the holding
    // tests and the holding alert's test see it).
    let on_event = ["mqtt_gateway_database_holding"];
    for name in names.into_iter().filter(|name| !on_event.contains(name)) {
        assert!(text.contains(name), "the dashboard queries {name}, which /metrics does not have:\n{text}");
    }

    broker.stop();
    let mut answer = (0, String::new());
    for _ in 0..100 {
        answer = get(&format!("{base}/readyz")).await;
        if answer.0 == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(answer, (503, "not ready: the MQTT broker is not connected\n".to_owned()));
}

#[tokio::test]
async fn a_bad_metrics_address_is_fatal_and_named() {
    let mut env = TestEnv::empty().await;
    env.set("METRICS_ADDR", "everywhere");
    env.assert_start_fails("invalid environment variable METRICS_ADDR").await;
}

/// A flow that took messages and is then disabled or deleted reports 0 from the reload on,
/// which the rules read as "gone" (`MqttGatewayFlowQuiet` must not fire for it); a flow that
/// stays keeps its time, and one that never took a message has no series.
#[tokio::test]
async fn a_flow_taken_away_reports_its_last_message_as_zero() {
    let mut env = TestEnv::new().await;
    let port = testkit::free_port();
    env.set("METRICS_ADDR", format!("127.0.0.1:{port}"));
    let (stays, goes, deleted) = (env.topic("stays"), env.topic("goes"), env.topic("deleted"));
    env.add_flow("STAYS", &stays, "STORE_DB", "{}", None).await;
    let goes_id = env.add_flow("GOES", &goes, "STORE_DB", "{}", None).await;
    let deleted_id = env.add_flow("DELETED", &deleted, "STORE_DB", "{}", None).await;
    env.add_flow("IDLE", &env.topic("idle"), "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    for topic in [&stays, &goes, &deleted] {
        publish(topic, &[br#"{"v": 1}"#]).await;
    }
    for code in ["STAYS", "GOES", "DELETED"] {
        env.wait_counter(code, 1).await;
    }
    let url = format!("http://127.0.0.1:{port}/metrics");
    let gauge = |text: &str, code: &str| -> Option<f64> {
        let prefix = format!(r#"mqtt_gateway_last_message_timestamp_seconds{{flow="{code}"}} "#);
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map(|v| v.parse().unwrap())
    };
    poll_until("every time reported", WAIT, || async {
        let text = get(&url).await.1;
        match ["STAYS", "GOES", "DELETED"].iter().all(|c| gauge(&text, c).is_some_and(|v| v > 0.0)) {
            true => Ok(()),
            false => Err(text),
        }
    })
    .await;

    env.exec(&format!("UPDATE flows SET enabled = FALSE WHERE id = {goes_id}")).await;
    env.exec(&format!("DELETE FROM flows WHERE id = {deleted_id}")).await;
    gateway.signal(libc::SIGHUP);
    poll_until("the flows taken away to report 0", WAIT, || async {
        let text = get(&url).await.1;
        match (gauge(&text, "GOES"), gauge(&text, "DELETED")) {
            (Some(0.0), Some(0.0)) => Ok(()),
            _ => Err(text),
        }
    })
    .await;
    let text = get(&url).await.1;
    assert!(gauge(&text, "STAYS").is_some_and(|v| v > 1e9), "{text}");
    assert_eq!(gauge(&text, "IDLE"), None, "{text}");
}
