//! Metrics and health over HTTP, opt-in with `METRICS_ADDR`: `/metrics` in the Prometheus text
//! format, `/healthz` (the process answers) and `/readyz` (broker connected, database
//! reachable, flows loaded; 503 with the reason otherwise).
//!
//! The other modules record with the `metrics` macros, which cost next to nothing when no
//! recorder is installed (no `METRICS_ADDR`).

use crate::flows::FlowSet;
use crate::health::Health;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::MySqlPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Buckets for every histogram: seconds (commit, HTTP) and message counts (batch size) share
/// them well enough from a millisecond to a few thousand.
const BUCKETS: [f64; 16] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 50.0, 100.0, 500.0, 2000.0];

#[derive(Clone)]
struct Endpoints {
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    pool: MySqlPool,
}

/// Installs the recorder; call before anything records. The unlabelled series exist from the
/// start, at zero, so that dashboards and alerts see them before the first event.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new().set_buckets(&BUCKETS)?.install_recorder()?;
    for counter in [
        "mqtt_gateway_messages_received_total",
        "mqtt_gateway_messages_invalid_total",
        "mqtt_gateway_broker_reconnects_total",
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for gauge in ["mqtt_gateway_broker_connected", "mqtt_gateway_outbox_pending", "mqtt_gateway_outbox_dead"]
    {
        metrics::gauge!(gauge).set(0.0);
    }
    Ok(handle)
}

/// Serves until shutdown.
pub async fn serve(
    addr: SocketAddr,
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    pool: MySqlPool,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("Metrics and health on http://{addr}/metrics, /healthz, /readyz");
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoints { prometheus, health, pool: pool.clone() });
    tokio::spawn(refresh_outbox_depth(pool.clone(), shutdown.clone()));
    Ok(tokio::spawn(async move {
        let stop = async move { shutdown.cancelled().await };
        if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!("Metrics listener failed: {error}");
        }
    }))
}

async fn render(State(endpoints): State<Endpoints>) -> String {
    endpoints.prometheus.render()
}

async fn ready(State(endpoints): State<Endpoints>) -> (StatusCode, String) {
    let reason = if !endpoints.health.is_ready() {
        Some("starting: not subscribed yet".to_owned())
    } else if !endpoints.health.broker_connected() {
        Some("the MQTT broker is not connected".to_owned())
    } else if let Some(filter) = endpoints.health.refused().first() {
        Some(format!("the MQTT broker refused the subscription to {filter}"))
    } else if let Some(what) = endpoints.health.waiting_for() {
        Some(format!("waiting for {what}"))
    } else {
        let ping =
            tokio::time::timeout(Duration::from_secs(2), sqlx::query("SELECT 1").execute(&endpoints.pool))
                .await;
        match ping {
            Ok(Ok(_)) => None,
            Ok(Err(error)) => Some(format!("the database is not reachable: {error}")),
            Err(_) => Some("the database did not answer within 2 s".to_owned()),
        }
    };
    match reason {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}

/// The flow gauges, after each load.
pub fn record_flows(flows: &FlowSet) {
    metrics::gauge!("mqtt_gateway_flows_loaded").set(flows.flows.len() as f64);
    metrics::gauge!("mqtt_gateway_flows_broken").set(flows.broken.len() as f64);
}

/// The outbox gauges come from the table, which several instances may share.
async fn refresh_outbox_depth(pool: MySqlPool, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let depth = sqlx::query_as::<_, (i64, i64)>(
            "SELECT CAST(COALESCE(SUM(NOT dead), 0) AS SIGNED), CAST(COALESCE(SUM(dead), 0) AS SIGNED) FROM gateway_outbox",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((pending, dead)) = depth {
            metrics::gauge!("mqtt_gateway_outbox_pending").set(pending as f64);
            metrics::gauge!("mqtt_gateway_outbox_dead").set(dead as f64);
        }
    }
}
