//! `mqtt-gateway check`: everything that would stop the gateway from working, found without
//! starting it: broken flows, unreachable endpoints, no broker or one that does not answer.

use super::{flows, shown_url};
use crate::config::{MqttSettings, Settings};
use crate::flows::{table, Action, FlowSet};
use crate::{db, mqtt};
use anyhow::{bail, Context};
use serde_json::json;
use sqlx::MySqlPool;
use std::time::Duration;

/// Everything that would stop the gateway from working, found without starting it.
pub(super) async fn run(settings: &Settings, pool: &MySqlPool, json: bool) -> anyhow::Result<i32> {
    let mut problems: Vec<String> = Vec::new();
    let rows = table::all(pool).await?;
    let set = FlowSet::from_rows(table::enabled(pool).await.context("cannot read flows")?);
    for broken in &set.broken {
        problems.push(format!("flow {}: {}", broken.code, broken.reason));
    }
    for flow in &set.flows {
        if let Action::PostEndpoint { url, .. } = &flow.action {
            if let Err(error) = reachable(url, settings.http_timeout).await {
                problems.push(format!(
                    "flow {}: endpoint {} unreachable: {error}",
                    flow.code,
                    shown_url(url.as_str())
                ));
            }
        }
    }
    match db::choose_broker(pool).await? {
        None => problems.push("No enabled MQTT server found in mqtt_servers".to_owned()),
        Some(broker) => {
            let mut mqtt_settings = settings.mqtt.clone();
            // A separate id, so that the check never takes the session of a running gateway.
            mqtt_settings.client_id = format!("{}-check-{}", mqtt_settings.client_id, std::process::id());
            mqtt_settings.clean_session = true;
            if let Err(error) = broker_reachable(&mqtt_settings, &broker).await {
                problems.push(format!("broker {}:{}: {error}", broker.host, broker.port.unwrap_or(1883)));
            }
        }
    }
    if json {
        println!(
            "{}",
            json!({"ok": problems.is_empty(), "flows": rows.iter().map(flows::to_json).collect::<Vec<_>>(), "problems": problems})
        );
    } else if problems.is_empty() {
        println!("ok: database, broker and {} enabled flows", set.flows.len());
    } else {
        for problem in &problems {
            println!("problem: {problem}");
        }
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}

/// Opens a TCP connection to the endpoint's host and port; sends nothing.
async fn reachable(url: &url::Url, timeout: Duration) -> anyhow::Result<()> {
    let host = url.host_str().context("no host")?;
    let port = url.port_or_known_default().context("no port")?;
    tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)))
        .await
        .context("timed out")??;
    Ok(())
}

/// Connects as the gateway would, version negotiation included, and disconnects.
async fn broker_reachable(settings: &MqttSettings, broker: &db::BrokerRow) -> anyhow::Result<()> {
    let target = mqtt::target(settings, broker, 1)?;
    match tokio::time::timeout(Duration::from_secs(10), mqtt::probe(target)).await {
        Err(_) => bail!("no answer within 10 s"),
        Ok(Err(error)) => bail!("{error}"),
        Ok(Ok(_)) => Ok(()),
    }
}
