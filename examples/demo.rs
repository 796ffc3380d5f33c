//! `cargo xtask demo`: the gateway working, in one command.
//!
//! Starts MariaDB, Mosquitto and an HTTP echo server in a temporary directory on free ports,
//! creates the original service's sample flows (`AHT10_SENSOR`, STORE_DB, and
//! `AHT10_ENDPOINT`, POST_ENDPOINT to the echo server), runs the gateway, publishes sample
//! readings and shows the rows, the counters and the POSTs received. It then keeps running
//! until Ctrl-C, so you can publish more yourself; `--check` makes it verify and exit instead.

use mqtt_gateway::flows::{self, FlowRow};
use sqlx::Row;
use std::time::Duration;
use testkit::mariadb::Durability;
use testkit::{EchoServer, Gateway, GatewayDb, Login, MariaDb, Mosquitto, Publisher};

const READINGS: [(f64, f64); 5] = [(21.5, 40.0), (21.7, 41.2), (22.0, 41.0), (22.4, 39.8), (22.1, 40.5)];

fn main() -> anyhow::Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    install_missing()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(demo(check))
}

/// The servers the demo starts, installed with apt-get when possible, or the command to run.
fn install_missing() -> anyhow::Result<()> {
    let missing: Vec<&str> =
        [("mariadbd", "mariadb-server"), ("mariadb", "mariadb-client"), ("mosquitto", "mosquitto")]
            .into_iter()
            .filter(|(program, _)| testkit::find_program(program).is_none())
            .map(|(_, package)| package)
            .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let command = format!("apt-get install -y {}", missing.join(" "));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || testkit::find_program("apt-get").is_none() {
        anyhow::bail!("the demo needs {}; install them with: sudo {command}", missing.join(", "));
    }
    println!("installing {} ...", missing.join(", "));
    let ok = std::process::Command::new("apt-get").arg("update").status()?.success()
        && std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("DEBIAN_FRONTEND=noninteractive {command}"))
            .status()?
            .success();
    anyhow::ensure!(ok, "`{command}` failed");
    Ok(())
}

async fn demo(check: bool) -> anyhow::Result<()> {
    println!("starting MariaDB, Mosquitto and an HTTP echo server ...");
    let db = MariaDb::start(Durability::Relaxed)?;
    let broker = Mosquitto::start()?;
    let echo = EchoServer::start()?;
    let login = Login { database: "demo", user: "demo", password: "demo-password" };
    let demo_db = GatewayDb::create(&db, login, broker.port).await?;
    let pool = demo_db.pool.clone();
    mqtt_gateway::db::migrate(&pool).await?;
    let endpoint = echo.url("/aht10");
    for (code, action, schema, url) in [
        ("AHT10_SENSOR", "STORE_DB", r#"{"temperature": "float", "humidity": "float"}"#, None),
        ("AHT10_ENDPOINT", "POST_ENDPOINT", r#"{"temperature": "float"}"#, Some(endpoint.as_str())),
    ] {
        let row = FlowRow {
            id: 0,
            code: code.to_owned(),
            topic: "sensors/aht10".to_owned(),
            action: action.to_owned(),
            payload_schema: Some(schema.to_owned()),
            endpoint_url: url.map(str::to_owned),
        };
        flows::table::add(&pool, &row, "demo flow", true).await?;
    }

    let metrics_port = testkit::free_port();
    let env = demo_db.env_with(&[
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
        ("FLOWS_RELOAD_INTERVAL_SECONDS", "5".to_owned()),
    ]);
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

    println!("publishing {} readings on sensors/aht10 ...", READINGS.len());
    let mut publisher = Publisher::connect(broker.port).await?;
    for (temperature, humidity) in READINGS {
        publisher
            .publish(
                "sensors/aht10",
                format!(r#"{{"temperature": {temperature:.1}, "humidity": {humidity:.1}}}"#),
            )
            .await?;
    }
    publisher.flush(Duration::from_secs(10)).await?;
    let settled = testkit::wait_until(Duration::from_secs(20), || echo.count("/aht10") >= READINGS.len());

    let rows = sqlx::query("SELECT id, received_at, flow_code, attribute_name, attribute_value, last_msg_id FROM data ORDER BY id")
        .fetch_all(&pool)
        .await?;
    println!("\n== data ({} rows)", rows.len());
    for row in &rows {
        println!(
            "{:>3}  {}  {}  {:<12} {:<8} last_msg_id={}",
            row.get::<i32, _>(0),
            row.get::<chrono::NaiveDateTime, _>(1),
            row.get::<String, _>(2),
            row.get::<String, _>(3),
            row.get::<String, _>(4),
            row.get::<i32, _>(5)
        );
    }
    let counters: Vec<(String, i32)> =
        sqlx::query_as("SELECT code, last_msg_id FROM flows ORDER BY id").fetch_all(&pool).await?;
    println!("\n== flows.last_msg_id");
    for (code, counter) in &counters {
        println!("{code:<16} {counter}");
    }
    let posts = echo.requests("/aht10");
    println!("\n== POSTs received by {endpoint} ({})", posts.len());
    for post in &posts {
        println!("{}", post.body_text());
    }

    if check {
        let expected_rows = READINGS.len() * 2;
        anyhow::ensure!(settled, "the endpoint got {} of {} POSTs", posts.len(), READINGS.len());
        anyhow::ensure!(rows.len() == expected_rows, "{} data rows, expected {expected_rows}", rows.len());
        anyhow::ensure!(
            counters.iter().all(|(_, c)| *c as usize == READINGS.len()),
            "counters {counters:?}, expected {} each",
            READINGS.len()
        );
        println!("\ndemo check: ok");
        return Ok(());
    }
    println!(
        "\nThe gateway keeps running. Publish more with:\n  mosquitto_pub -p {} -t sensors/aht10 -m '{{\"temperature\": 23.0, \"humidity\": 38}}'\n\
         Look at the database with:\n  mariadb --socket={} -uroot demo -e 'SELECT * FROM data'\n\
         Metrics: http://127.0.0.1:{metrics_port}/metrics   readiness: http://127.0.0.1:{metrics_port}/readyz\n\
         Ctrl-C stops everything and removes the temporary files.",
        broker.port,
        db.socket.display()
    );
    tokio::signal::ctrl_c().await?;
    println!("stopping ...");
    Ok(())
}
