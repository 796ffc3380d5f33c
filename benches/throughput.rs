//! `cargo xtask bench`: throughput, latency, CPU and memory of the real gateway binary against
//! a real MariaDB (durable settings: `innodb_flush_log_at_trx_commit=1`), a real Mosquitto and
//! an HTTP echo server, all on this machine.
//!
//! Scenarios: STORE_DB with 2 and 8 attributes and POST_ENDPOINT at full publishing speed;
//! end-to-end latency at a fixed 1,000 msg/s for both actions, for STORE_DB beside a 20 MB
//! message every second, and for STORE_DB beside 500 POST_ENDPOINT flows whose endpoint keeps
//! refusing (the outbox retrying beside the commit). Prints a table and writes
//! `target/bench/throughput.json`. Sizes can be scaled with `BENCH_MESSAGES` (default 100000).
//! POST_ENDPOINT is also judged against the endpoint's own ceiling and against the CPU a bare
//! HTTP client spends per request, both measured in the same run.
//!
//! `BENCH_ONLY=post`, `unordered` (POST_ENDPOINT with `HTTP_ORDERED=false`) or `store` runs one
//! full-speed scenario alone, long enough to profile the gateway under it (`perf record -p
//! <gateway pid>`); `BENCH_ONLY=latency` the fixed-rate ones; `BENCH_ONLY=backoff` the one
//! beside 500 flows backing off.
//!
//! A little over 400 lines: a bench target is one file, and the scenarios, the two reference
//! measurements and the report belong together.

use mqtt_gateway::flows::{self, FlowRow};
use serde_json::json;
use sqlx::MySqlPool;
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::measure::cpu_seconds;
use testkit::{EchoServer, Gateway, GatewayDb, Login, MariaDb, Mosquitto, Publisher};

const LOGIN: Login = Login { database: "bench", user: "bench", password: "bench-password" };

struct Bench {
    _db: MariaDb,
    broker: Mosquitto,
    echo: EchoServer,
    pool: MySqlPool,
    /// What every gateway of the benchmark is started with.
    env: Vec<(String, String)>,
}

const BACKOFF: &str = "STORE_DB 1,000/s beside 500 backing off";

/// What runs beside a fixed-rate stream.
#[derive(Clone, Copy)]
enum Beside {
    Nothing,
    /// A message of this many bytes every second, on another flow.
    Large(usize),
    /// This many POST_ENDPOINT flows, each with a request its endpoint keeps refusing (503),
    /// retried every one to two seconds: the outbox reading, scheduling and recording beside the
    /// commit, on the same database.
    BackingOff(usize),
}

/// One scenario's measurements.
#[derive(Default)]
struct Run {
    name: String,
    messages: u64,
    seconds: f64,
    cpu_seconds: f64,
    peak_rss_kib: u64,
    latency_ms: Option<(f64, f64)>,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if let Some(i) = std::env::args().position(|a| a == "--bare-client") {
        let args: Vec<String> = std::env::args().skip(i + 1).collect();
        return bare_client(&args[0], args[1].parse()?);
    }
    let messages: u64 = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let window: u32 = std::env::var("BENCH_BROKER_WINDOW").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let bench = Bench::start(window).await?;
        if std::env::var("BENCH_ONLY").as_deref() == Ok("post") {
            // For profiling the gateway under POST load alone (`perf record -p`).
            let run = bench.full_speed("POST_ENDPOINT, ordered", "POST_ENDPOINT", 2, messages, &[]).await?;
            let floor = bench.bare_client_cpu(messages).await?;
            report(&[run], window)?;
            println!("bare client: {floor:.1} ms CPU per 1,000 requests");
            return Ok(());
        }
        if std::env::var("BENCH_ONLY").as_deref() == Ok("unordered") {
            let unordered = [("HTTP_ORDERED", "false")];
            let name = "POST_ENDPOINT, HTTP_ORDERED=false";
            let run = bench.full_speed(name, "POST_ENDPOINT", 2, messages, &unordered).await?;
            return report(&[run], window);
        }
        if std::env::var("BENCH_ONLY").as_deref() == Ok("latency") {
            let store =
                bench.fixed_rate("STORE_DB at 1,000 msg/s", "STORE_DB", 10_000, Beside::Nothing).await?;
            let post = bench
                .fixed_rate("POST_ENDPOINT at 1,000 msg/s", "POST_ENDPOINT", 10_000, Beside::Nothing)
                .await?;
            let beside = bench
                .fixed_rate("STORE_DB 1,000/s beside 20 MB/s", "STORE_DB", 10_000, Beside::Large(20_000_000))
                .await?;
            let backoff = bench.fixed_rate(BACKOFF, "STORE_DB", 10_000, Beside::BackingOff(500)).await?;
            return report(&[store, post, beside, backoff], window);
        }
        if std::env::var("BENCH_ONLY").as_deref() == Ok("backoff") {
            let backoff = bench.fixed_rate(BACKOFF, "STORE_DB", 10_000, Beside::BackingOff(500)).await?;
            return report(&[backoff], window);
        }
        if std::env::var("BENCH_ONLY").as_deref() == Ok("store") {
            let run = bench.full_speed("STORE_DB, 2 attributes", "STORE_DB", 2, messages, &[]).await?;
            return report(&[run], window);
        }
        let mut runs = Vec::new();
        runs.push(bench.full_speed("STORE_DB, 2 attributes", "STORE_DB", 2, messages, &[]).await?);
        runs.push(bench.full_speed("STORE_DB, 8 attributes", "STORE_DB", 8, messages, &[]).await?);
        runs.push(bench.full_speed("POST_ENDPOINT, ordered", "POST_ENDPOINT", 2, messages / 2, &[]).await?);
        let unordered = [("HTTP_ORDERED", "false")];
        runs.push(
            bench
                .full_speed("POST_ENDPOINT, HTTP_ORDERED=false", "POST_ENDPOINT", 2, messages / 2, &unordered)
                .await?,
        );
        runs.push(bench.fixed_rate("STORE_DB at 1,000 msg/s", "STORE_DB", 10_000, Beside::Nothing).await?);
        runs.push(
            bench
                .fixed_rate("POST_ENDPOINT at 1,000 msg/s", "POST_ENDPOINT", 10_000, Beside::Nothing)
                .await?,
        );
        runs.push(
            bench
                .fixed_rate("STORE_DB 1,000/s beside 20 MB/s", "STORE_DB", 10_000, Beside::Large(20_000_000))
                .await?,
        );
        runs.push(bench.fixed_rate(BACKOFF, "STORE_DB", 10_000, Beside::BackingOff(500)).await?);
        // The endpoint's own ceiling, measured in the same run, so POST_ENDPOINT is judged
        // against what the endpoint could take on this machine now, not against a number.
        let ceilings = [
            ("one request at a time", 1, "POST_ENDPOINT, ordered"),
            ("8 at a time", 8, "POST_ENDPOINT, HTTP_ORDERED=false"),
        ];
        let mut compared = Vec::new();
        for (how, concurrency, scenario) in ceilings {
            let ceiling = bench.echo_ceiling(messages / 2, concurrency).await?;
            compared.push((how, ceiling, scenario));
        }
        let floor = bench.bare_client_cpu(messages / 2).await?;
        report(&runs, window)?;
        println!();
        for (how, ceiling, scenario) in compared {
            let run = runs.iter().find(|r| r.name == scenario).expect("scenario ran");
            let rate = run.messages as f64 / run.seconds;
            println!(
                "endpoint ceiling, {how}: {ceiling:.0} req/s; {scenario}: {rate:.0} msg/s = {:.0} % of it, \
                 {:.1} ms of gateway CPU per 1,000 messages",
                rate / ceiling * 100.0,
                run.cpu_seconds / run.messages as f64 * 1_000_000.0
            );
        }
        let ordered = runs.iter().find(|r| r.name == "POST_ENDPOINT, ordered").expect("scenario ran");
        let cpu = ordered.cpu_seconds / ordered.messages as f64 * 1_000_000.0;
        println!(
            "a bare HTTP client posting one at a time: {floor:.1} ms of CPU per 1,000 requests; \
             POST_ENDPOINT, ordered: {cpu:.1} ms = {:.1}x that",
            cpu / floor
        );
        Ok(())
    })
}

impl Run {
    /// A scenario's run, with what the gateway's process spent on it.
    fn of(
        gateway: &Gateway,
        name: &str,
        messages: u64,
        seconds: f64,
        cpu_before: f64,
        latency_ms: Option<(f64, f64)>,
    ) -> Run {
        Run {
            name: name.to_owned(),
            messages,
            seconds,
            cpu_seconds: cpu_seconds(gateway.pid()) - cpu_before,
            peak_rss_kib: testkit::proc_status_kib(gateway.pid(), "VmHWM"),
            latency_ms,
        }
    }
}

impl Bench {
    /// Requests per second the echo server answers over keep-alive connections, `concurrency`
    /// at a time, with the body the POST_ENDPOINT scenarios send.
    async fn echo_ceiling(&self, requests: u64, concurrency: usize) -> anyhow::Result<f64> {
        mqtt_gateway::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let url = self.echo.url("/ceiling");
        let body = payload(2);
        let started = Instant::now();
        let per_task = requests / concurrency as u64;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tasks.spawn(async move {
                for _ in 0..per_task {
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await?;
                    response.bytes().await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok((per_task * concurrency as u64) as f64 / started.elapsed().as_secs_f64())
    }

    /// CPU per 1,000 requests that a sender can hardly go below: a bare reqwest client in a
    /// process of its own, on a one-thread runtime like the gateway's, posting the same body
    /// one request at a time to the same endpoint. The kernel's work for a loopback round trip
    /// (the receiver's side of it included) is charged to the sender, so this is most of what
    /// a POST costs the gateway.
    async fn bare_client_cpu(&self, requests: u64) -> anyhow::Result<f64> {
        let output = tokio::process::Command::new(std::env::current_exe()?)
            .args(["--bare-client", &self.echo.url("/bare"), &requests.to_string()])
            .output()
            .await?;
        anyhow::ensure!(output.status.success(), "bare client: {}", String::from_utf8_lossy(&output.stderr));
        let seconds: f64 = String::from_utf8(output.stdout)?.trim().parse()?;
        Ok(seconds / requests as f64 * 1_000_000.0)
    }

    async fn start(window: u32) -> anyhow::Result<Bench> {
        let db = MariaDb::start(Durability::Full)?;
        let broker = Mosquitto::start_with(&format!(
            "allow_anonymous true\nmax_inflight_messages {window}\nmax_queued_messages 10000000\n"
        ))?;
        let echo = EchoServer::start()?;
        let GatewayDb { pool, env } = GatewayDb::create(&db, LOGIN, broker.port).await?;
        mqtt_gateway::db::migrate(&pool).await?;
        Ok(Bench { _db: db, broker, echo, pool, env })
    }

    fn gateway(&self, client_id: &str, extra: &[(&str, &str)]) -> anyhow::Result<Gateway> {
        let mut env = self.env.clone();
        testkit::set_var(&mut env, "MQTT_CLIENT_ID", client_id.to_owned());
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let gateway = Gateway::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_mqtt-gateway")), &env)?;
        if !testkit::wait_until(Duration::from_secs(30), || gateway.count("Gateway ready") > 0) {
            anyhow::bail!("the gateway did not start:\n{}", gateway.logs());
        }
        Ok(gateway)
    }

    /// A fresh flow (and gateway) per scenario, so counters and queues start empty.
    async fn flow(&self, code: &str, action: &str) -> anyhow::Result<(i32, String, String)> {
        let topic = format!("bench/{code}");
        let path = format!("/bench/{code}");
        let url = (action == "POST_ENDPOINT").then(|| self.echo.url(&path));
        let row = FlowRow {
            id: 0,
            code: code.to_owned(),
            topic: topic.clone(),
            action: action.to_owned(),
            payload_schema: Some("{}".to_owned()),
            endpoint_url: url,
        };
        let id = flows::table::add(&self.pool, &row, "benchmark", true).await?;
        Ok((id as i32, topic, path))
    }

    async fn counter(&self, flow: i32) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar::<_, i32>("SELECT last_msg_id FROM flows WHERE id = ?")
            .bind(flow)
            .fetch_one(&self.pool)
            .await?
            .into())
    }

    /// Publishes `messages` as fast as the broker takes them and times how long the gateway
    /// needs to have processed them all.
    async fn full_speed(
        &self,
        name: &str,
        action: &str,
        attributes: usize,
        messages: u64,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Run> {
        let code = name.replace([' ', ',', '='], "_");
        let (flow, topic, path) = self.flow(&code, action).await?;
        let gateway = self.gateway(&format!("bench-{code}"), extra)?;
        // The sequence number is one of the attributes.
        let payload = payload(attributes - 1);
        let cpu_before = cpu_seconds(gateway.pid());
        let started = Instant::now();
        let publisher = tokio::spawn(publish(self.broker.port, topic, messages, payload, None));
        let (mut last_done, mut last_progress) = (0, Instant::now());
        loop {
            let done = if action == "POST_ENDPOINT" {
                self.echo.count(&path) as u64
            } else {
                self.counter(flow).await? as u64
            };
            if done >= messages {
                break;
            }
            if done > last_done {
                (last_done, last_progress) = (done, Instant::now());
            } else if last_progress.elapsed() > Duration::from_secs(15) {
                anyhow::bail!(
                    "{name}: stuck at {done} of {messages}; gateway log:\n{}\nbroker log (tail):\n{}",
                    gateway.logs(),
                    tail(&self.broker.log(), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        eprintln!("{name}: {messages} messages in {seconds:.1}s");
        publisher.await??;
        Ok(Run::of(&gateway, name, messages, seconds, cpu_before, None))
    }

    /// Publishes one message per millisecond and measures each one's time to its commit
    /// (STORE_DB: when the counter passes its id, polled every millisecond) or to its arrival
    /// at the endpoint (POST_ENDPOINT).
    ///
    /// With `beside`, a second flow gets a message of that many bytes every second meanwhile:
    /// the gateway decodes and renders on one thread, so this shows what a large message does
    /// to everyone else's latency.
    async fn fixed_rate(
        &self,
        name: &str,
        action: &str,
        messages: u64,
        beside: Beside,
    ) -> anyhow::Result<Run> {
        let code = name.replace([' ', ',', '/', '.'], "_");
        let (flow, topic, path) = self.flow(&code, action).await?;
        let large = match beside {
            Beside::Large(bytes) => Some((self.flow(&format!("{code}_large"), "STORE_DB").await?.1, bytes)),
            _ => None,
        };
        let backing_off = match beside {
            Beside::BackingOff(flows) => Some((self.refusing_flows(&code, flows).await?, flows)),
            _ => None,
        };
        let retrying = [("HTTP_RETRY_MAX_DELAY_SECONDS", "2")];
        let extra: &[(&str, &str)] = if backing_off.is_some() { &retrying } else { &[] };
        let gateway = self.gateway(&format!("bench-{code}"), extra)?;
        if let Some(((topic, refused), flows)) = &backing_off {
            self.start_backing_off(&gateway, topic, refused, *flows).await?;
        }
        let large = large.map(|(topic, bytes)| tokio::spawn(publish_large(self.broker.port, topic, bytes)));
        let cpu_before = cpu_seconds(gateway.pid());
        let started = Instant::now();
        let publisher = tokio::spawn(publish(
            self.broker.port,
            topic,
            messages,
            String::new(),
            Some(Duration::from_millis(1)),
        ));
        let mut committed_at: Vec<Instant> = Vec::with_capacity(messages as usize);
        if action == "STORE_DB" {
            while (committed_at.len() as u64) < messages {
                let now = Instant::now();
                let counter = self.counter(flow).await? as usize;
                while committed_at.len() < counter {
                    committed_at.push(now);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            while (self.echo.count(&path) as u64) < messages {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            committed_at = self.echo.requests(&path).iter().map(|r| r.at).collect();
        }
        let seconds = started.elapsed().as_secs_f64();
        let sent_at = publisher.await??;
        if let Some(large) = large {
            large.abort();
        }
        let mut latencies: Vec<f64> = committed_at
            .iter()
            .zip(&sent_at)
            .map(|(done, sent)| done.saturating_duration_since(*sent).as_secs_f64() * 1e3)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
        if let Some(((_, refused), _)) = &backing_off {
            let attempts = self.echo.count(refused);
            eprintln!("{name}: {attempts} refused attempts in all, the stream's p99 {:.1} ms", pick(0.99));
        }
        Ok(Run::of(&gateway, name, messages, seconds, cpu_before, Some((pick(0.5), pick(0.99)))))
    }

    /// `flows` POST_ENDPOINT flows on one topic, each to a path of its own under one prefix,
    /// where the endpoint answers 503: `(topic, prefix)`.
    async fn refusing_flows(&self, code: &str, flows: usize) -> anyhow::Result<(String, String)> {
        let topic = format!("bench/{code}/refused");
        let prefix = format!("/status/503/{code}/");
        for i in 0..flows {
            let row = FlowRow {
                id: 0,
                code: format!("{code}_{i}"),
                topic: topic.clone(),
                action: "POST_ENDPOINT".to_owned(),
                payload_schema: Some("{}".to_owned()),
                endpoint_url: Some(self.echo.url(&format!("{prefix}{i}"))),
            };
            flows::table::add(&self.pool, &row, "benchmark", true).await?;
        }
        Ok((topic, prefix))
    }

    /// One message for all the refusing flows, and waits until each has been refused once.
    async fn start_backing_off(
        &self,
        gateway: &Gateway,
        topic: &str,
        refused: &str,
        flows: usize,
    ) -> anyhow::Result<()> {
        let mut publisher = Publisher::connect(self.broker.port).await?;
        publisher.publish(topic, r#"{"refused": true}"#.to_owned()).await?;
        publisher.flush(Duration::from_secs(30)).await?;
        let started = Instant::now();
        while self.echo.count(refused) < flows {
            if started.elapsed() > Duration::from_secs(60) {
                anyhow::bail!(
                    "{} of {flows} flows tried; gateway log:\n{}",
                    self.echo.count(refused),
                    gateway.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A sensor-like payload with `attributes` fields.
fn payload(attributes: usize) -> String {
    let fields: Vec<String> = (0..attributes).map(|i| format!(r#""field_{i}": {}.5"#, 20 + i)).collect();
    format!("{{{}}}", fields.join(", "))
}

/// Publishes `messages` payloads (each with its sequence number), optionally paced, and
/// returns when each was handed to the client.
async fn publish(
    port: u16,
    topic: String,
    messages: u64,
    payload: String,
    pace: Option<Duration>,
) -> anyhow::Result<Vec<Instant>> {
    let mut publisher = Publisher::connect(port).await?;
    let mut sent_at = Vec::with_capacity(messages as usize);
    let mut ticker = pace.map(tokio::time::interval);
    for seq in 0..messages {
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        let body = if payload.is_empty() {
            format!(r#"{{"seq": {seq}}}"#)
        } else {
            format!(r#"{{"seq": {seq}, {}"#, &payload[1..])
        };
        sent_at.push(Instant::now());
        publisher.publish(&topic, body).await?;
    }
    publisher.flush(Duration::from_secs(600)).await?;
    Ok(sent_at)
}

/// Publishes a message of about `bytes` (a thousand string attributes) every second until
/// aborted.
async fn publish_large(port: u16, topic: String, bytes: usize) -> anyhow::Result<()> {
    let value = "x".repeat(bytes / 1000);
    let fields: Vec<String> = (0..1000).map(|i| format!(r#""field_{i}": "{value}""#)).collect();
    let body = format!("{{{}}}", fields.join(", "));
    let mut publisher = Publisher::connect(port).await?;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        publisher.publish(&topic, body.clone()).await?;
    }
}

/// The child side of [`Bench::bare_client_cpu`]: prints the CPU seconds its requests took.
fn bare_client(url: &str, requests: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        mqtt_gateway::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let body = payload(2);
        let post = async |n: u64| -> anyhow::Result<()> {
            for _ in 0..n {
                let response = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await?;
                response.error_for_status()?.bytes().await?;
            }
            Ok(())
        };
        post(1_000).await?;
        let before = cpu_seconds(std::process::id());
        post(requests).await?;
        println!("{}", cpu_seconds(std::process::id()) - before);
        Ok(())
    })
}

fn report(runs: &[Run], window: u32) -> anyhow::Result<()> {
    println!();
    println!(
        "{:<32} {:>10} {:>12} {:>14} {:>12} {:>16}",
        "scenario", "messages", "msg/s", "CPU s/10k msg", "peak RSS", "latency p50/p99"
    );
    for run in runs {
        let rate = run.messages as f64 / run.seconds;
        let cpu = run.cpu_seconds / run.messages as f64 * 10_000.0;
        let latency =
            run.latency_ms.map(|(p50, p99)| format!("{p50:.1}/{p99:.1} ms")).unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:>10} {:>12.0} {:>14.3} {:>9.1} MiB {:>16}",
            run.name,
            run.messages,
            rate,
            cpu,
            run.peak_rss_kib as f64 / 1024.0,
            latency
        );
    }
    let results: Vec<serde_json::Value> = runs
        .iter()
        .map(|run| {
            json!({
                "scenario": run.name,
                "messages": run.messages,
                "seconds": run.seconds,
                "messages_per_second": run.messages as f64 / run.seconds,
                "cpu_seconds_per_10k": run.cpu_seconds / run.messages as f64 * 10_000.0,
                "peak_rss_kib": run.peak_rss_kib,
                "latency_p50_ms": run.latency_ms.map(|l| l.0),
                "latency_p99_ms": run.latency_ms.map(|l| l.1),
            })
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("throughput.json");
    let document = json!({ "broker_max_inflight_messages": window, "runs": results });
    std::fs::write(&file, serde_json::to_string_pretty(&document)?)?;
    println!("\nwritten to {}", file.display());
    Ok(())
}
