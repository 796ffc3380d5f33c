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
use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::MySqlPool;
use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Latencies (a commit, a POST): from half a millisecond, below which nothing on this path
/// finishes, to ten seconds, the default HTTP timeout.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every series: its name, HELP text and unit. `/metrics` prints the HELP of each, so that
/// `promtool check metrics` accepts it and a reader of the scrape knows what each one counts.
const SERIES: [(&str, Kind, &str); 20] = [
    ("mqtt_gateway_messages_received_total", Kind::Counter, "Messages taken from the broker"),
    (
        "mqtt_gateway_messages_invalid_total",
        Kind::Counter,
        "Messages that were not a UTF-8 JSON object; acknowledged and dropped, as the original did",
    ),
    (
        "mqtt_gateway_messages_processed_total",
        Kind::Counter,
        "Messages a flow stored (STORE_DB) or queued for its endpoint (POST_ENDPOINT), by flow and action",
    ),
    (
        "mqtt_gateway_messages_failed_total",
        Kind::Counter,
        "Messages a flow refused (schema mismatch, unusable payload), by flow and action",
    ),
    (
        "mqtt_gateway_last_message_timestamp_seconds",
        Kind::Gauge,
        "Unix time in seconds of the last message a flow processed",
    ),
    ("mqtt_gateway_batch_messages", Kind::Histogram, "Messages committed per database transaction"),
    (
        "mqtt_gateway_commit_seconds",
        Kind::Histogram,
        "Duration of one batch's database transaction in seconds",
    ),
    (
        "mqtt_gateway_http_request_seconds",
        Kind::Histogram,
        "Duration of one POST to an endpoint in seconds, by endpoint host",
    ),
    (
        "mqtt_gateway_http_responses_total",
        Kind::Counter,
        "POST outcomes by endpoint host and class (2xx, 4xx, 5xx, other, or error when no response came)",
    ),
    ("mqtt_gateway_outbox_pending", Kind::Gauge, "POST_ENDPOINT requests waiting in gateway_outbox"),
    ("mqtt_gateway_outbox_dead", Kind::Gauge, "POST_ENDPOINT requests given up on, kept in gateway_outbox"),
    ("mqtt_gateway_broker_connected", Kind::Gauge, "1 while connected to the MQTT broker, else 0"),
    ("mqtt_gateway_broker_reconnects_total", Kind::Counter, "Connections to the broker after the first"),
    ("mqtt_gateway_flows_loaded", Kind::Gauge, "Enabled flows that work"),
    ("mqtt_gateway_flows_broken", Kind::Gauge, "Enabled flows skipped because their row cannot work"),
    (
        "mqtt_gateway_in_flight_bytes",
        Kind::Gauge,
        "Payload bytes taken from the broker and not yet acknowledged (reading pauses at MAX_IN_FLIGHT_BYTES)",
    ),
    (
        "mqtt_gateway_subscriptions_refused",
        Kind::Gauge,
        "Topic filters the broker refused on the current connection",
    ),
    (
        "mqtt_gateway_commit_conflicts_total",
        Kind::Counter,
        "Commits refused because another writer won a race for the same rows (deadlock, Galera certification), run again at once",
    ),
    (
        "mqtt_gateway_retained_resent_total",
        Kind::Counter,
        "Retained messages the broker sent again for a subscription that their flow had already stored; acknowledged, not stored twice",
    ),
    (
        "mqtt_gateway_database_holding",
        Kind::Gauge,
        "1 while the database cannot take writes and messages are held unacknowledged, by error code",
    ),
];

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone)]
struct Endpoints {
    prometheus: PrometheusHandle,
    health: Arc<Health>,
    pool: MySqlPool,
}

/// Installs the recorder; call before anything records. The unlabelled series exist from the
/// start, at zero, so that dashboards and alerts see them before the first event.
pub fn install(batch_max_messages: usize) -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("mqtt_gateway_batch_messages".into()),
            &batch_buckets(batch_max_messages),
        )?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    for (name, kind, help) in SERIES {
        let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
        match (kind, unit) {
            (Kind::Counter, _) => metrics::describe_counter!(name, help),
            (Kind::Gauge, Some(unit)) => metrics::describe_gauge!(name, unit, help),
            (Kind::Gauge, None) => metrics::describe_gauge!(name, help),
            (Kind::Histogram, Some(unit)) => metrics::describe_histogram!(name, unit, help),
            (Kind::Histogram, None) => metrics::describe_histogram!(name, Unit::Count, help),
        }
    }
    for counter in [
        "mqtt_gateway_messages_received_total",
        "mqtt_gateway_messages_invalid_total",
        "mqtt_gateway_broker_reconnects_total",
        "mqtt_gateway_retained_resent_total",
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for gauge in [
        "mqtt_gateway_broker_connected",
        "mqtt_gateway_outbox_pending",
        "mqtt_gateway_outbox_dead",
        "mqtt_gateway_in_flight_bytes",
        "mqtt_gateway_subscriptions_refused",
    ] {
        metrics::gauge!(gauge).set(0.0);
    }
    Ok(handle)
}

/// Batch sizes from 1 to the largest batch there can be: 1, 2, 5, 10, 20, 50 ... below
/// `BATCH_MAX_MESSAGES`, and `BATCH_MAX_MESSAGES` itself, so a full batch has its own bucket.
fn batch_buckets(max: usize) -> Vec<f64> {
    let max = max.max(1) as f64;
    let mut buckets: Vec<f64> = [1.0, 2.0, 5.0]
        .iter()
        .flat_map(|step| (0..7).map(move |power| step * 10f64.powi(power)))
        .filter(|b| *b < max)
        .collect();
    buckets.push(max);
    buckets.sort_by(f64::total_cmp);
    buckets
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

/// Flow codes whose `mqtt_gateway_last_message_timestamp_seconds` series this process has
/// made: at most the flows that took a message, never the whole table.
static REPORTING: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// The `mqtt_gateway_last_message_timestamp_seconds` series of a flow, made on its first message.
pub fn last_message_gauge(code: &str) -> metrics::Gauge {
    REPORTING.lock().unwrap_or_else(|p| p.into_inner()).insert(code.to_owned());
    metrics::gauge!("mqtt_gateway_last_message_timestamp_seconds", "flow" => code.to_owned())
}

/// Once `flows` is the set messages go to: each flow that reported its last message and is no
/// longer in it (deleted, disabled, broken) reports 0, which the rules read as "gone", so that
/// `MqttGatewayFlowQuiet` does not fire for a flow the operator took away. Called between
/// batches, so that no batch of an older set sets the time again afterwards.
pub fn forget_flows_gone(flows: &FlowSet) {
    let mut reporting = REPORTING.lock().unwrap_or_else(|p| p.into_inner());
    if reporting.is_empty() {
        return;
    }
    let loaded: HashSet<&str> = flows.flows.iter().map(|f| f.code.as_str()).collect();
    reporting.retain(|code| {
        let loaded = loaded.contains(code.as_str());
        if !loaded {
            metrics::gauge!("mqtt_gateway_last_message_timestamp_seconds", "flow" => code.clone()).set(0.0);
        }
        loaded
    });
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
        if let Ok((pending, dead)) = crate::outbox::queue::depth(&pool).await {
            metrics::gauge!("mqtt_gateway_outbox_pending").set(pending as f64);
            metrics::gauge!("mqtt_gateway_outbox_dead").set(dead as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::batch_buckets;

    #[test]
    fn batch_buckets_end_at_the_largest_batch() {
        assert_eq!(batch_buckets(500), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]);
        assert_eq!(batch_buckets(7), [1.0, 2.0, 5.0, 7.0]);
        assert_eq!(batch_buckets(1), [1.0]);
        assert_eq!(batch_buckets(100_000).last(), Some(&100_000.0));
    }
}
