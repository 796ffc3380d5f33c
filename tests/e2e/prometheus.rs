//! `/metrics` as a real Prometheus sees it: `promtool check metrics` accepts a scrape taken under
//! traffic, and every query of the Grafana dashboard in `docs/grafana/` parses and returns data
//! from a real Prometheus server scraping the gateway with the shipped rules loaded, which all
//! evaluate (Debian package `prometheus` for both).

use crate::alerts;
use crate::harness::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use testkit::{Gateway, Publisher};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/mqtt-gateway.json");

async fn get(url: &str) -> String {
    mqtt_gateway::tls::install_crypto_provider();
    reqwest::get(url).await.expect("GET").text().await.unwrap()
}

/// A gateway with metrics on, a STORE_DB flow (which refuses `{"v": "x"}`) and a POST_ENDPOINT
/// flow on the same topic.
async fn gateway_with_metrics(env: &mut TestEnv) -> (Gateway, u16, String) {
    let port = testkit::free_port();
    env.set("METRICS_ADDR", format!("127.0.0.1:{port}"));
    env.set("BATCH_MAX_MESSAGES", "50");
    let topic = env.topic("t");
    env.add_flow("STORE", &topic, "STORE_DB", r#"{"v": "int"}"#, None).await;
    let path = format!("/{}/prometheus", env.name);
    env.add_flow("POST", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    (env.start().await, port, topic)
}

/// Publishes until stopped: mostly good messages, some the STORE_DB flow refuses, some that are
/// not JSON, so that every counter moves.
fn traffic(topic: String) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let task = tokio::spawn(async move {
        let mut publisher = Publisher::connect(shared().broker.port).await.expect("publisher");
        let mut i = 0u64;
        while !stopped.load(Ordering::Relaxed) {
            i += 1;
            let payload = match i % 10 {
                3 => r#"{"v": "x"}"#.to_owned(),
                7 => "not json".to_owned(),
                _ => format!(r#"{{"v": {i}}}"#),
            };
            publisher.publish(&topic, payload).await.expect("publish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        publisher.flush(WAIT).await.expect("broker acks");
    });
    (stop, task)
}

#[tokio::test]
async fn promtool_accepts_the_metrics_under_traffic() {
    let promtool = testkit::require_program("promtool", "prometheus").unwrap_or_else(|e| panic!("{e}"));
    let mut env = TestEnv::new().await;
    let (_gateway, port, topic) = gateway_with_metrics(&mut env).await;
    let (stop, task) = traffic(topic);
    let mut text = String::new();
    for _ in 0..(WAIT.as_millis() / 100) {
        text = get(&format!("http://127.0.0.1:{port}/metrics")).await;
        let moved = ["_commit_seconds_bucket", "_batch_messages_bucket", "_http_request_seconds_bucket"];
        if moved.iter().all(|m| text.contains(m)) && text.contains("mqtt_gateway_messages_failed_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();

    let scrape = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(scrape.path(), &text).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(scrape.path()).unwrap())
        .output()
        .expect("run promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\non:\n{text}");

    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap();
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP");
    }
    // Each histogram its own buckets: batch sizes up to BATCH_MAX_MESSAGES, latencies 0.5 ms to 10 s.
    assert!(text.contains(r#"mqtt_gateway_batch_messages_bucket{le="1"}"#), "{text}");
    assert!(text.contains(r#"mqtt_gateway_batch_messages_bucket{le="50"}"#), "{text}");
    assert!(!text.contains(r#"mqtt_gateway_batch_messages_bucket{le="0.001"}"#), "{text}");
    assert!(!text.contains(r#"mqtt_gateway_batch_messages_bucket{le="100"}"#), "{text}");
    assert!(text.contains(r#"mqtt_gateway_commit_seconds_bucket{le="0.0005"}"#), "{text}");
    assert!(text.contains(r#"mqtt_gateway_commit_seconds_bucket{le="10"}"#), "{text}");
    assert!(!text.contains(r#"mqtt_gateway_commit_seconds_bucket{le="2000"}"#), "{text}");
}

/// Every `expr` of every panel of the dashboard.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("an expr").to_owned());
        }
    }
    queries
}

#[tokio::test]
async fn every_dashboard_query_and_every_rule_works_on_a_real_prometheus() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut env = TestEnv::new().await;
    let (_gateway, port, topic) = gateway_with_metrics(&mut env).await;
    let rules = std::path::Path::new(alerts::RULES);
    let prometheus = testkit::Prometheus::start_with_rules(&format!("127.0.0.1:{port}"), &[rules])
        .unwrap_or_else(|e| panic!("{e}"));
    let (stop, task) = traffic(topic);

    // Until every query has data: rate() needs two scrapes of a moved counter, and the panels
    // of the alerts read recording rules, evaluated every second; so a few seconds.
    let mut failing: Vec<(String, String)> = Vec::new();
    let mut rule_problems = Vec::new();
    for _ in 0..60 {
        failing.clear();
        for query in &queries {
            let url =
                url::Url::parse_with_params(&prometheus.url("/api/v1/query"), [("query", query)]).unwrap();
            let answer = get(url.as_str()).await;
            let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            let has_data = parsed["status"] == "success"
                && parsed["data"]["result"].as_array().is_some_and(|r| !r.is_empty());
            if !has_data {
                failing.push((query.clone(), answer));
            }
        }
        rule_problems = alerts::rule_problems(&prometheus, &dashboard).await;
        if failing.is_empty() && rule_problems.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // A gateway that works raises no alert, not even a pending one.
    let active = alerts::api(&prometheus, "/api/v1/alerts", &[]).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    assert!(
        failing.is_empty(),
        "dashboard queries without data after 60 s:\n{failing:#?}\nprometheus log:\n{}",
        prometheus.log()
    );
    assert!(rule_problems.is_empty(), "the shipped rules:\n{}", rule_problems.join("\n"));
    assert_eq!(active["alerts"], serde_json::json!([]), "alerts of a healthy gateway");
}
