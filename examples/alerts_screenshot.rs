//! `cargo run --example alerts_screenshot -- docs/prometheus-alert-holding.png`: the README's
//! picture of the holding alert firing, made again from scratch.
//!
//! Starts MariaDB, Mosquitto and a Prometheus server (scraping the gateway every second, the
//! shipped `monitoring/mqtt-gateway.rules.yml` loaded unchanged) in temporary directories on
//! free ports, runs the gateway with a STORE_DB flow under a stream of readings, stops MariaDB,
//! waits until Prometheus reports `MqttGatewayDatabaseHolding` firing (its `for:` is 3 minutes),
//! then opens Prometheus's alerts page in headless Chromium, the firing alert opened, and saves
//! the screenshot. Needs the
//! Debian packages `prometheus` and `chromium` besides the demo's.

use mqtt_gateway::flows::{self, FlowRow};
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::{Gateway, GatewayDb, Login, MariaDb, Mosquitto, Prometheus, Publisher};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/monitoring/mqtt-gateway.rules.yml");
const ALERT: &str = "MqttGatewayDatabaseHolding";
/// The classic alerts page in a frame, with its firing alerts opened and annotations shown, as an
/// operator's two clicks would.
const EXPANDED: &str = r#"<!doctype html>
<html><head><style>html, body, iframe { margin: 0; border: 0; width: 100%; height: 100%; }</style></head>
<body><iframe id="page" src="/classic/alerts"></iframe>
<script>
document.getElementById("page").addEventListener("load", function () {
  var page = this.contentWindow;
  page.$("tr.alert-danger.alert_header").click();
  page.$("div.show-annotations").click();
});
</script></body></html>
"#;

fn main() -> anyhow::Result<()> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "docs/prometheus-alert-holding.png".to_owned());
    testkit::require_program("chromium", "chromium")?;
    testkit::require_program("prometheus", "prometheus")?;
    mqtt_gateway::tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let assets = tempfile::tempdir()?;
    std::fs::write(assets.path().join("alerts.html"), EXPANDED)?;
    let (prometheus, _services) = runtime.block_on(hold_until_the_alert_fires(assets.path()))?;
    // Debian's package, built without the React UI, serves the classic alerts page, where a
    // page of ours beside it (same origin) opens the firing alerts and their annotations;
    // upstream serves its own page at /alerts, which shows them as it is.
    let url = runtime.block_on(async {
        for (page, shown) in [("/classic/alerts", "/user/alerts.html"), ("/alerts", "/alerts")] {
            if reqwest::get(prometheus.url(page)).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(prometheus.url(shown));
            }
        }
        anyhow::bail!("Prometheus serves no alerts page")
    })?;
    println!("screenshot of {url} ...");
    testkit::screenshot(&url, std::path::Path::new(&out), 1400, 1000)?;
    println!("saved {out}");
    Ok(())
}

/// Everything that must outlive the wait until the screenshot is taken.
struct Services {
    _db: MariaDb,
    _broker: Mosquitto,
    _gateway: Gateway,
}

async fn hold_until_the_alert_fires(assets: &std::path::Path) -> anyhow::Result<(Prometheus, Services)> {
    println!("starting MariaDB, Mosquitto and the gateway ...");
    let mut db = MariaDb::start(Durability::Relaxed)?;
    let broker = Mosquitto::start()?;
    let login = Login { database: "shot", user: "shot", password: "shot-password" };
    let shot_db = GatewayDb::create(&db, login, broker.port).await?;
    mqtt_gateway::db::migrate(&shot_db.pool).await?;
    let row = FlowRow {
        id: 0,
        code: "AHT10_SENSOR".to_owned(),
        topic: "sensors/aht10".to_owned(),
        action: "STORE_DB".to_owned(),
        payload_schema: Some("{}".to_owned()),
        endpoint_url: None,
    };
    flows::table::add(&shot_db.pool, &row, "screenshot flow", true).await?;
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
    let prometheus = Prometheus::start_with_args(
        &format!("127.0.0.1:{metrics_port}"),
        &[std::path::Path::new(RULES)],
        &[format!("--web.user-assets={}", assets.display())],
    )?;
    println!("Prometheus on {}", prometheus.url("/"));

    let port = broker.port;
    tokio::spawn(async move {
        let Ok(mut publisher) = Publisher::connect(port).await else { return };
        for i in 0u64.. {
            let reading = format!(r#"{{"temperature": {:.1}, "seq": {i}}}"#, 20.0 + (i % 50) as f64 / 10.0);
            if publisher.publish("sensors/aht10", reading).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!("stopping MariaDB; the alert fires after it has held for 3 minutes ...");
    db.stop();
    anyhow::ensure!(
        testkit::wait_until(Duration::from_secs(60), || gateway.count("Database cannot take writes") > 0),
        "the gateway did not hold:\n{}",
        gateway.logs()
    );
    let held = Instant::now();
    let http = reqwest::Client::new();
    loop {
        let body = http.get(prometheus.url("/api/v1/alerts")).send().await?.text().await?;
        let alerts: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let firing = alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["labels"]["alertname"] == ALERT && a["state"] == "firing");
        if firing {
            break;
        }
        anyhow::ensure!(held.elapsed() < Duration::from_secs(300), "{ALERT} did not fire: {alerts}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("{ALERT} fired {:.0} s after the gateway began holding", held.elapsed().as_secs_f64());
    Ok((prometheus, Services { _db: db, _broker: broker, _gateway: gateway }))
}
