//! `cargo xtask bench` (and `cargo bench --bench flows` alone): what the number of flows costs.
//! The real gateway binary, a durable MariaDB and Mosquitto on this machine, the same publisher
//! for every scenario, ratios read within one run:
//!
//! - STORE_DB on one busy flow beside 0, 5,000 and 50,000 idle flows (each on a topic of its
//!   own): msg/s and gateway CPU per 1,000 messages, as a share of the one-flow run; the time
//!   from start to ready and the RSS once ready, per 10,000 flows.
//! - Traffic spread over 10,000 flows, each message to another one.
//! - `/metrics` with 50,000 flows of which 1,000 took a message: its size and time to serve.
//! - An idle gateway: how often its threads wake up per second, alone and under a 30 s systemd
//!   watchdog (a notify socket of the bench's).
//!
//! `BENCH_MESSAGES` scales the message counts (default 100000); `BENCH_ONLY=idle` runs the
//! wakeup count alone. Prints a table and writes `target/bench/flows.json`.

use serde_json::json;
use sqlx::MySqlPool;
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::measure::{context_switches_by_thread, cpu_seconds};
use testkit::{Gateway, GatewayDb, Login, MariaDb, Mosquitto, Publisher};

const LOGIN: Login = Login { database: "flows_bench", user: "bench", password: "bench-password" };

struct Bench {
    _db: MariaDb,
    broker: Mosquitto,
    pool: MySqlPool,
    env: Vec<(String, String)>,
    messages: u64,
}

/// One full-speed run beside some number of flows.
struct Run {
    name: String,
    flows: usize,
    messages: u64,
    seconds: f64,
    cpu_seconds: f64,
    ready_seconds: f64,
    ready_rss_kib: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
    fn cpu_per_1000_ms(&self) -> f64 {
        self.cpu_seconds / self.messages as f64 * 1_000_000.0
    }
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let messages: u64 = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let bench = Bench::start(messages).await?;
        let idle = (bench.idle_wakeups(false).await?, bench.idle_wakeups(true).await?);
        if std::env::var("BENCH_ONLY").as_deref() == Ok("idle") {
            println!("idle gateway: {:.2} wakeups/s, {:.2} with a 30 s watchdog", idle.0, idle.1);
            return Ok(());
        }
        let mut runs = Vec::new();
        for idle_flows in [0, 5_000, 50_000] {
            bench.set_idle_flows(idle_flows).await?;
            runs.push(bench.busy_flow(idle_flows).await?);
        }
        let spread = bench.spread(10_000).await?;
        let (metrics_bytes, metrics_ms) = bench.metrics_at(50_000, 1_000).await?;
        report(&runs, &spread, idle, metrics_bytes, metrics_ms)
    })
}

impl Bench {
    async fn start(messages: u64) -> anyhow::Result<Bench> {
        let db = MariaDb::start(Durability::Full)?;
        let broker = Mosquitto::start_with(
            "allow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 10000000\n",
        )?;
        let GatewayDb { pool, env } = GatewayDb::create(&db, LOGIN, broker.port).await?;
        mqtt_gateway::db::migrate(&pool).await?;
        Ok(Bench { _db: db, broker, pool, env, messages })
    }

    fn gateway(&self, client_id: &str, extra: &[(&str, String)]) -> anyhow::Result<(Gateway, f64)> {
        let mut env = self.env.clone();
        testkit::set_var(&mut env, "MQTT_CLIENT_ID", client_id.to_owned());
        for (name, value) in extra {
            testkit::set_var(&mut env, name, value.clone());
        }
        let started = Instant::now();
        let gateway = Gateway::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_mqtt-gateway")), &env)?;
        if !testkit::wait_until(Duration::from_secs(120), || gateway.count("Gateway ready") > 0) {
            anyhow::bail!("the gateway did not start:\n{}", gateway.logs());
        }
        Ok((gateway, started.elapsed().as_secs_f64()))
    }

    /// Makes the flows table hold exactly `n` idle flows (`idle/<i>`) besides the others.
    async fn set_idle_flows(&self, n: usize) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM flows WHERE code LIKE 'IDLE\\_%'").execute(&self.pool).await?;
        self.insert_flows("IDLE", "idle", n).await
    }

    /// Inserts `n` STORE_DB flows `<prefix>_<i>` on `<topic>/<i>`, a thousand per statement (an
    /// operator loading a fleet does the same).
    async fn insert_flows(&self, prefix: &str, topic: &str, n: usize) -> anyhow::Result<()> {
        for start in (0..n).step_by(1_000) {
            let mut insert = sqlx::QueryBuilder::<sqlx::MySql>::new(
                "INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) ",
            );
            insert.push_values(start..(start + 1_000).min(n), |mut row, i| {
                row.push_bind(format!("{prefix}_{i}"))
                    .push_bind("benchmark")
                    .push_bind(format!("{topic}/{i}"))
                    .push("'STORE_DB', '{}', NULL, 0, TRUE");
            });
            insert.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn counter_sum(&self, like: &str) -> anyhow::Result<u64> {
        let sum: Option<i64> =
            sqlx::query_scalar("SELECT CAST(SUM(last_msg_id) AS SIGNED) FROM flows WHERE code LIKE ?")
                .bind(like)
                .fetch_one(&self.pool)
                .await?;
        Ok(sum.unwrap_or(0) as u64)
    }

    /// Waits until the flows matching `like` have counted `target` messages in all.
    async fn wait_counted(&self, like: &str, target: u64, gateway: &Gateway) -> anyhow::Result<()> {
        let (mut last, mut progress) = (0, Instant::now());
        loop {
            let done = self.counter_sum(like).await?;
            if done >= target {
                return Ok(());
            }
            if done > last {
                (last, progress) = (done, Instant::now());
            } else if progress.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("stuck at {done} of {target}:\n{}", gateway.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// STORE_DB at full speed on one busy flow, beside the idle flows in the table.
    async fn busy_flow(&self, idle_flows: usize) -> anyhow::Result<Run> {
        let code = format!("BUSY{idle_flows}");
        self.insert_flows(&code, &format!("busy{idle_flows}"), 1).await?;
        let (gateway, ready_seconds) = self.gateway(&format!("bench-busy-{idle_flows}"), &[])?;
        let ready_rss_kib = testkit::proc_status_kib(gateway.pid(), "VmRSS");
        let cpu_before = cpu_seconds(gateway.pid());
        let started = Instant::now();
        let topic = format!("busy{idle_flows}/0");
        let publisher = tokio::spawn(publish(self.broker.port, self.messages, move |_| topic.clone()));
        self.wait_counted(&format!("{code}\\_%"), self.messages, &gateway).await?;
        let seconds = started.elapsed().as_secs_f64();
        publisher.await??;
        let name = format!("STORE_DB, 1 busy flow beside {idle_flows} idle");
        eprintln!("{name}: {} messages in {seconds:.1}s, ready in {ready_seconds:.1}s", self.messages);
        Ok(Run {
            name,
            flows: idle_flows + 1,
            messages: self.messages,
            seconds,
            cpu_seconds: cpu_seconds(gateway.pid()) - cpu_before,
            ready_seconds,
            ready_rss_kib,
        })
    }

    /// STORE_DB at full speed, each message to the next of `n` flows.
    async fn spread(&self, n: usize) -> anyhow::Result<Run> {
        self.set_idle_flows(0).await?;
        self.insert_flows("SPREAD", "spread", n).await?;
        let (gateway, ready_seconds) = self.gateway("bench-spread", &[])?;
        let ready_rss_kib = testkit::proc_status_kib(gateway.pid(), "VmRSS");
        let cpu_before = cpu_seconds(gateway.pid());
        let started = Instant::now();
        let publisher = tokio::spawn(publish(self.broker.port, self.messages, move |seq| {
            format!("spread/{}", seq % n as u64)
        }));
        self.wait_counted("SPREAD\\_%", self.messages, &gateway).await?;
        let seconds = started.elapsed().as_secs_f64();
        publisher.await??;
        sqlx::query("DELETE FROM flows WHERE code LIKE 'SPREAD\\_%'").execute(&self.pool).await?;
        Ok(Run {
            name: format!("STORE_DB, spread over {n} flows"),
            flows: n,
            messages: self.messages,
            seconds,
            cpu_seconds: cpu_seconds(gateway.pid()) - cpu_before,
            ready_seconds,
            ready_rss_kib,
        })
    }

    /// `/metrics` once `active` of `n` flows took a message: its size and the time to serve it.
    async fn metrics_at(&self, n: usize, active: usize) -> anyhow::Result<(usize, f64)> {
        self.set_idle_flows(n).await?;
        let port = testkit::free_port();
        let (gateway, _) = self.gateway("bench-metrics", &[("METRICS_ADDR", format!("127.0.0.1:{port}"))])?;
        let sent = tokio::spawn(publish(self.broker.port, active as u64, |seq| format!("idle/{seq}")));
        sent.await??;
        self.wait_counted("IDLE\\_%", active as u64, &gateway).await?;
        mqtt_gateway::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/metrics");
        client.get(&url).send().await?.text().await?;
        let started = Instant::now();
        let body = client.get(&url).send().await?.text().await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let series = body.lines().filter(|l| l.starts_with("mqtt_gateway_messages_processed_total{")).count();
        anyhow::ensure!(series == active, "{series} per-flow series for {active} active flows");
        Ok((body.len(), ms))
    }

    /// Wakeups per second of a gateway with three flows and no traffic, over ten seconds (thirty with the watchdog, to take in a whole interval).
    /// With `watchdog`, under a service manager's notify socket and a 30 s watchdog, as the
    /// NixOS and Debian units run it.
    async fn idle_wakeups(&self, watchdog: bool) -> anyhow::Result<f64> {
        self.insert_flows("QUIET", "quiet", 3).await?;
        let dir = tempfile::tempdir()?;
        let socket_path = dir.path().join("notify");
        let socket = std::os::unix::net::UnixDatagram::bind(&socket_path)?;
        socket.set_nonblocking(true)?;
        let extra: Vec<(&str, String)> = if watchdog {
            vec![
                ("NOTIFY_SOCKET", socket_path.display().to_string()),
                ("WATCHDOG_USEC", "30000000".to_owned()),
            ]
        } else {
            Vec::new()
        };
        let (gateway, _) =
            self.gateway(if watchdog { "bench-idle-watchdog" } else { "bench-idle" }, &extra)?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = context_switches_by_thread(gateway.pid());
        let window = Duration::from_secs(if watchdog { 30 } else { 10 });
        tokio::time::sleep(window).await;
        let after = context_switches_by_thread(gateway.pid());
        let mut woke = 0;
        for (thread, switches) in &after {
            let earlier = before.iter().find(|(t, _)| t == thread).map_or(0, |(_, n)| *n);
            if switches > &earlier {
                eprintln!(
                    "idle (watchdog {watchdog}): {thread} woke {} times in {window:?}",
                    switches - earlier
                );
            }
            woke += switches - earlier;
        }
        let mut pings = 0;
        let mut buffer = [0u8; 256];
        while let Ok(n) = socket.recv(&mut buffer) {
            pings += usize::from(buffer[..n].windows(10).any(|w| w == b"WATCHDOG=1"));
        }
        anyhow::ensure!(!watchdog || pings > 0, "the gateway never pinged the watchdog");
        sqlx::query("DELETE FROM flows WHERE code LIKE 'QUIET\\_%'").execute(&self.pool).await?;
        Ok(woke as f64 / window.as_secs_f64())
    }
}

/// Publishes `messages` small payloads with QoS 1, message `seq` to `topic(seq)`.
async fn publish(port: u16, messages: u64, topic: impl Fn(u64) -> String) -> anyhow::Result<()> {
    let mut publisher = Publisher::connect(port).await?;
    for seq in 0..messages {
        publisher.publish(&topic(seq), format!(r#"{{"seq": {seq}, "temperature": 21.5}}"#)).await?;
    }
    publisher.flush(Duration::from_secs(600)).await
}

fn report(
    runs: &[Run],
    spread: &Run,
    idle: (f64, f64),
    metrics_bytes: usize,
    metrics_ms: f64,
) -> anyhow::Result<()> {
    let alone = &runs[0];
    println!();
    println!(
        "{:<44} {:>8} {:>10} {:>8} {:>12} {:>8} {:>9} {:>12}",
        "scenario", "flows", "msg/s", "of 1", "CPU ms/1k", "x 1", "ready", "RSS ready"
    );
    for run in runs.iter().chain([spread]) {
        println!(
            "{:<44} {:>8} {:>10.0} {:>7.0}% {:>12.2} {:>7.2}x {:>8.1}s {:>8.1} MiB",
            run.name,
            run.flows,
            run.rate(),
            run.rate() / alone.rate() * 100.0,
            run.cpu_per_1000_ms(),
            run.cpu_per_1000_ms() / alone.cpu_per_1000_ms(),
            run.ready_seconds,
            run.ready_rss_kib as f64 / 1024.0
        );
    }
    let largest = runs.last().expect("runs");
    let per_10k = (largest.ready_rss_kib as f64 - alone.ready_rss_kib as f64)
        / 1024.0
        / (largest.flows as f64 / 10_000.0);
    println!("\nRSS once ready: {per_10k:.1} MiB per 10,000 flows");
    println!("/metrics with 50,000 flows, 1,000 active: {metrics_bytes} bytes, served in {metrics_ms:.1} ms");
    println!(
        "idle gateway (3 flows, no traffic): {:.2} wakeups/s, {:.2} under a 30 s systemd watchdog",
        idle.0, idle.1
    );
    let results: Vec<serde_json::Value> = runs
        .iter()
        .chain([spread])
        .map(|run| {
            json!({
                "scenario": run.name,
                "flows": run.flows,
                "messages": run.messages,
                "messages_per_second": run.rate(),
                "share_of_one_flow": run.rate() / alone.rate(),
                "cpu_ms_per_1000": run.cpu_per_1000_ms(),
                "cpu_vs_one_flow": run.cpu_per_1000_ms() / alone.cpu_per_1000_ms(),
                "ready_seconds": run.ready_seconds,
                "ready_rss_kib": run.ready_rss_kib,
            })
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("flows.json");
    let document = json!({
        "runs": results,
        "rss_mib_per_10k_flows": per_10k,
        "metrics_bytes_50k_flows_1k_active": metrics_bytes,
        "metrics_ms_50k_flows_1k_active": metrics_ms,
        "idle_wakeups_per_second": idle.0,
        "idle_wakeups_per_second_with_watchdog": idle.1,
    });
    std::fs::write(&file, serde_json::to_string_pretty(&document)?)?;
    println!("\nwritten to {}", file.display());
    Ok(())
}
