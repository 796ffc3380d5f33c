//! The alerts that ship (`monitoring/mqtt-gateway.rules.yml`) on a real Prometheus scraping a
//! real gateway: the holding alert fires while MariaDB is stopped and resolves once it is back,
//! and (for `prometheus.rs`, which loads the rules beside the dashboard) every rule evaluates,
//! every alert says what to do first and has a panel of the dashboard showing what it looks at.

use crate::harness::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::{MariaDb, Prometheus, Publisher};

pub const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/monitoring/mqtt-gateway.rules.yml");
const README: &str = include_str!("../../README.md");

/// A Prometheus API answer's `data`, or what went wrong.
pub async fn api(prometheus: &Prometheus, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
    mqtt_gateway::tls::install_crypto_provider();
    let url = url::Url::parse_with_params(&prometheus.url(path), params).map_err(|e| e.to_string())?;
    let body = reqwest::get(url.as_str())
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    let answer: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if answer["status"] == "success" {
        Ok(answer["data"].clone())
    } else {
        Err(body)
    }
}

/// Every rule Prometheus loaded, with its health and last error.
pub async fn loaded_rules(prometheus: &Prometheus) -> Vec<Value> {
    let data = api(prometheus, "/api/v1/rules", &[]).await.unwrap_or_else(|e| panic!("/api/v1/rules: {e}"));
    let groups = data["groups"].as_array().cloned().unwrap_or_default();
    groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect()
}

/// The names an expression reads: the gateway's series, the recording rules' and `up`.
fn names_read(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("mqtt_gateway") || *word == "up")
        .map(str::to_owned)
        .collect()
}

/// The anchors GitHub gives the README's headings.
fn readme_anchors() -> BTreeSet<String> {
    README
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| {
            heading
                .trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

/// What every rule of the shipped file must satisfy once Prometheus has evaluated it on a
/// gateway under traffic; an empty list when all is well.
pub async fn rule_problems(prometheus: &Prometheus, dashboard: &Value) -> Vec<String> {
    let shipped = std::fs::read_to_string(RULES).unwrap();
    let in_file = shipped
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:") || l.trim_start().starts_with("- record:"))
        .count();
    let rules = loaded_rules(prometheus).await;
    let mut problems = Vec::new();
    if rules.len() != in_file {
        problems.push(format!("Prometheus loaded {} rules, the file has {in_file}", rules.len()));
    }
    let anchors = readme_anchors();
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or_default();
        let query = rule["query"].as_str().unwrap_or_default();
        if rule["health"] != "ok" {
            problems.push(format!("{name}: health {} {}", rule["health"], rule["lastError"]));
        }
        if let Err(error) = api(prometheus, "/api/v1/query", &[("query", query)]).await {
            problems.push(format!("{name}: {query} does not evaluate: {error}"));
        }
        if rule["type"] != "alerting" {
            continue;
        }
        let annotations = &rule["annotations"];
        let description = annotations["description"].as_str().unwrap_or_default();
        if annotations["summary"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{name}: no summary"));
        }
        if !description.contains("journalctl -u mqtt-gateway") || !description.contains("`mqtt-gateway ") {
            problems.push(format!("{name}: the description names no journalctl line or CLI command"));
        }
        let anchor = annotations["runbook_url"].as_str().and_then(|url| url.split_once("README.md#"));
        if !anchor.is_some_and(|(_, anchor)| anchors.contains(anchor)) {
            problems.push(format!(
                "{name}: runbook_url {} is no heading of the README",
                annotations["runbook_url"]
            ));
        }
        // The dashboard's panel for the alert (it names the alert in its description) shows
        // every series the alert reads.
        let panels: Vec<&Value> = dashboard["panels"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                let text = p["description"].as_str().unwrap_or_default();
                text.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| word == name)
            })
            .collect();
        let shown: BTreeSet<String> = panels
            .iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .flat_map(|t| names_read(t["expr"].as_str().unwrap_or_default()))
            .collect();
        let missing: Vec<String> = names_read(query).difference(&shown).cloned().collect();
        if panels.is_empty() || !missing.is_empty() {
            problems.push(format!("{name}: no dashboard panel names it and shows {missing:?}"));
        }
    }
    problems
}

/// The shipped rules with each `for:` in minutes turned into the same number of seconds, and
/// nothing else changed: an alert that waits 3 minutes in production waits 3 s here.
fn rules_with_for_in_seconds(dir: &Path) -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(RULES).unwrap();
    let mut scaled = String::new();
    let mut changed = 0;
    for line in shipped.lines() {
        match line.trim_start().strip_prefix("for: ").and_then(|d| d.strip_suffix('m')) {
            Some(minutes) => {
                let indent = &line[..line.len() - line.trim_start().len()];
                scaled.push_str(&format!("{indent}for: {minutes}s\n"));
                changed += 1;
            }
            None => {
                scaled.push_str(line);
                scaled.push('\n');
            }
        }
    }
    assert_eq!(changed, shipped.matches("for: ").count(), "every for: is in minutes");
    let path = dir.join("mqtt-gateway.rules.yml");
    std::fs::write(&path, scaled).unwrap();
    path
}

/// The holding alert's state in Prometheus (`pending`, `firing`) with its labels, if it is active.
async fn holding_alert(prometheus: &Prometheus) -> Option<(String, Value)> {
    let data = api(prometheus, "/api/v1/alerts", &[]).await.ok()?;
    data["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == "MqttGatewayDatabaseHolding")
        .map(|a| (a["state"].as_str().unwrap_or_default().to_owned(), a.clone()))
}

/// `for:` of the holding alert as loaded, and Prometheus's scrape interval (testkit: 1 s).
const HOLDING_FOR: Duration = Duration::from_secs(3);
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
const SLACK: Duration = Duration::from_secs(10);

#[tokio::test]
async fn the_holding_alert_fires_while_the_database_is_down_and_resolves_when_it_is_back() {
    let mut server = MariaDb::start(Durability::Relaxed).unwrap();
    let mut env = TestEnv::on(&server).await;
    let topic = env.topic("held");
    env.add_flow("S", &topic, "STORE_DB", "{}", None).await;
    let port = testkit::free_port();
    env.set("METRICS_ADDR", format!("127.0.0.1:{port}"));
    let gateway = env.start().await;
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_with_for_in_seconds(rules_dir.path());
    let prometheus = Prometheus::start_with_rules(&format!("127.0.0.1:{port}"), &[&rules]).unwrap();
    let prometheus = &prometheus;
    let loaded = loaded_rules(prometheus).await;
    let holding =
        loaded.iter().find(|r| r["name"] == "MqttGatewayDatabaseHolding").expect("the rule is loaded");
    assert_eq!(holding["duration"].as_f64(), Some(HOLDING_FOR.as_secs_f64()), "{holding}");

    // A reading every 50 ms, so that there is always a batch to write.
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let publishing = tokio::spawn(async move {
        let mut publisher = Publisher::connect(shared().broker.port).await.expect("publisher");
        let mut sent = 0u32;
        while !stopped.load(Ordering::Relaxed) {
            sent += 1;
            publisher.publish(&topic, format!(r#"{{"i": {sent}}}"#)).await.expect("publish");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        publisher.flush(Duration::from_secs(120)).await.expect("broker acks");
        sent
    });
    env.wait_distinct("S", 20, WAIT).await;
    poll_until("Prometheus to scrape the gateway", WAIT, || async move {
        let up = api(prometheus, "/api/v1/query", &[("query", r#"up{job="mqtt-gateway"} == 1"#)]).await?;
        if up["result"].as_array().is_some_and(|r| !r.is_empty()) {
            Ok(())
        } else {
            Err(format!("{up}"))
        }
    })
    .await;
    assert_eq!(holding_alert(prometheus).await, None, "nothing holds yet");

    server.stop();
    wait_log(&gateway, "Database cannot take writes").await;
    let held = Instant::now();
    let bound = HOLDING_FOR + SCRAPE_INTERVAL + SLACK;
    let alert = poll_until("the holding alert to fire", bound, || async move {
        match holding_alert(prometheus).await {
            Some((state, alert)) if state == "firing" => Ok(alert),
            other => Err(format!("{other:?}; the gateway exports:\n{}", holding_lines(port).await)),
        }
    })
    .await;
    let labels = &alert["labels"];
    let fired = held.elapsed();
    eprintln!(
        "the holding alert fired {:.1} s after the gateway began holding: {labels}",
        fired.as_secs_f64()
    );
    assert!(fired >= HOLDING_FOR, "it waited its for: ({fired:?})");
    assert_eq!(labels["severity"], "critical", "{labels}");
    assert_eq!(labels["instance"], format!("127.0.0.1:{port}"), "{labels}");
    // One alert whatever the error, which its summary names as the gateway's gauge labels it
    // (the error may have changed since the evaluation: any code the gauge has held with).
    let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
    let code = summary.rsplit_once('(').and_then(|(_, code)| code.strip_suffix(')')).unwrap_or_default();
    assert!(
        !code.is_empty() && holding_lines(port).await.contains(&format!("code=\"{code}\"}}")),
        "{summary}"
    );

    server.restart().unwrap();
    wait_log(&gateway, "Database takes writes again").await;
    let back = Instant::now();
    poll_until("the holding alert to resolve", SCRAPE_INTERVAL + SLACK, || async move {
        match holding_alert(prometheus).await {
            None => Ok(()),
            Some(state) => Err(format!("{state:?}")),
        }
    })
    .await;
    eprintln!("resolved {:.1} s after the database took writes again", back.elapsed().as_secs_f64());

    stop.store(true, Ordering::Relaxed);
    let sent = publishing.await.unwrap();
    env.wait_distinct("S", i64::from(sent), Duration::from_secs(60)).await;
    assert_eq!(env.distinct_i("S").await, (i64::from(sent), i64::from(sent)), "nothing lost while held");
}

/// The holding gauge's lines of `/metrics`, for a failure message.
async fn holding_lines(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let text = match reqwest::get(url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(error) => return error.to_string(),
    };
    text.lines().filter(|l| l.starts_with("mqtt_gateway_database_holding")).collect::<Vec<_>>().join("\n")
}
