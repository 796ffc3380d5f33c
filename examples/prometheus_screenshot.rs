//! `cargo run --example prometheus_screenshot -- docs/prometheus-throughput.png`: the README's
//! picture of what an operator sees, made again from scratch.
//!
//! Starts MariaDB, Mosquitto, the echo server and a Prometheus server (scraping the gateway every
//! second) in temporary directories on free ports, runs the gateway with three flows, publishes
//! at rates that change every minute for three minutes, then opens Prometheus's own web UI in
//! headless Chromium on the Grafana dashboard's throughput query and saves the screenshot.
//! Needs the Debian packages `prometheus` and `chromium` besides the demo's.

use mqtt_gateway::flows::{self, FlowRow};
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::{EchoServer, Gateway, GatewayDb, Login, MariaDb, Mosquitto, Prometheus, Publisher};

/// The dashboard's "Messages processed per second, by flow" panel.
const QUERY: &str = "sum by (flow) (rate(mqtt_gateway_messages_processed_total[1m]))";
/// Messages per second per topic in each minute.
const SCHEDULE: [[(&str, u32); 3]; 3] = [
    [("sensors/aht10", 40), ("sensors/bme280", 10), ("alerts/door", 5)],
    [("sensors/aht10", 80), ("sensors/bme280", 30), ("alerts/door", 5)],
    [("sensors/aht10", 60), ("sensors/bme280", 60), ("alerts/door", 20)],
];

fn main() -> anyhow::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "docs/prometheus-throughput.png".to_owned());
    testkit::require_program("chromium", "chromium")?;
    testkit::require_program("prometheus", "prometheus")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (prometheus, _services) = runtime.block_on(run_traffic())?;
    let url = url::Url::parse_with_params(
        &prometheus.url("/graph"),
        [("g0.expr", QUERY), ("g0.tab", "0"), ("g0.range_input", "4m"), ("g0.stacked", "0")],
    )?;
    println!("screenshot of {url} ...");
    testkit::screenshot(url.as_str(), std::path::Path::new(&out), 1400, 900)?;
    println!("saved {out}");
    Ok(())
}

/// Everything that must outlive the traffic until the screenshot is taken.
struct Services {
    _db: MariaDb,
    _broker: Mosquitto,
    _echo: EchoServer,
    _gateway: Gateway,
}

async fn run_traffic() -> anyhow::Result<(Prometheus, Services)> {
    println!("starting MariaDB, Mosquitto, an HTTP echo server and the gateway ...");
    let db = MariaDb::start(Durability::Relaxed)?;
    let broker = Mosquitto::start()?;
    let echo = EchoServer::start()?;
    let login = Login { database: "shot", user: "shot", password: "shot-password" };
    let shot_db = GatewayDb::create(&db, login, broker.port).await?;
    let pool = shot_db.pool.clone();
    mqtt_gateway::db::migrate(&pool).await?;
    let endpoint = echo.url("/door");
    for (code, topic, action, url) in [
        ("AHT10_SENSOR", "sensors/aht10", "STORE_DB", None),
        ("BME280_SENSOR", "sensors/bme280", "STORE_DB", None),
        ("DOOR_ALERTS", "alerts/door", "POST_ENDPOINT", Some(endpoint.as_str())),
    ] {
        let row = FlowRow {
            id: 0,
            code: code.to_owned(),
            topic: topic.to_owned(),
            action: action.to_owned(),
            payload_schema: Some("{}".to_owned()),
            endpoint_url: url.map(str::to_owned),
        };
        flows::table::add(&pool, &row, "screenshot flow", true).await?;
    }
    let metrics_port = testkit::free_port();
    let env = shot_db.env_with(&[("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))]);
    let binary = std::env::current_exe()?.parent().and_then(|d| d.parent()).map(|d| d.join("mqtt-gateway"));
    let binary = binary
        .filter(|b| b.is_file())
        .ok_or_else(|| anyhow::anyhow!("build the gateway first: cargo build"))?;
    let gateway = Gateway::spawn(&binary, &env)?;
    anyhow::ensure!(
        testkit::wait_until(Duration::from_secs(30), || gateway.count("Gateway ready") > 0),
        "the gateway did not start:\n{}",
        gateway.logs()
    );
    let prometheus = Prometheus::start(&format!("127.0.0.1:{metrics_port}"))?;
    println!("Prometheus on {}; publishing for three minutes ...", prometheus.url("/"));

    let mut publisher = Publisher::connect(broker.port).await?;
    let started = Instant::now();
    let mut sent = 0u64;
    for (minute, rates) in SCHEDULE.iter().enumerate() {
        println!("minute {}: {rates:?} messages/s", minute + 1);
        for second in 0..60u64 {
            let tick = started + Duration::from_secs(minute as u64 * 60 + second);
            tokio::time::sleep_until(tick.into()).await;
            for (topic, rate) in rates {
                for i in 0..*rate {
                    sent += 1;
                    let value = 20.0 + f64::from(i % 50) / 10.0;
                    publisher
                        .publish(topic, format!(r#"{{"temperature": {value:.1}, "seq": {sent}}}"#))
                        .await?;
                }
            }
        }
    }
    publisher.flush(Duration::from_secs(30)).await?;
    // Two more scrapes, so the last minute is on the graph.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("published {sent} messages");
    Ok((prometheus, Services { _db: db, _broker: broker, _echo: echo, _gateway: gateway }))
}
