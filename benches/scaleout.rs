//! `cargo bench --bench scaleout`: STORE_DB messages per second with 1, 2 and 3 gateway
//! instances in one shared group, side by side in one run, on one MariaDB server and on a
//! three-node MariaDB Galera cluster (instance `i` writing through node `i`), for one hot flow
//! (every message advances the same counter row) and for messages spread over six flows.
//!
//! Prints a table and writes `target/bench/scaleout.json`. `BENCH_MESSAGES` (default 20000)
//! sets the messages per run; a run that has not finished after `RUN_LIMIT` reports the rate
//! it reached.

use mqtt_gateway::flows::{self, FlowRow};
use serde_json::json;
use sqlx::MySqlPool;
use std::time::{Duration, Instant};
use testkit::mariadb::Durability;
use testkit::{GaleraCluster, Gateway, GatewayDb, Login, MariaDb, Mosquitto, Publisher, SqlServer};

const LOGIN: Login = Login { database: "bench", user: "bench", password: "bench-password" };
const SPREAD_FLOWS: usize = 6;
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The database side of a run: the SQL port each instance writes through.
struct Engine {
    name: &'static str,
    ports: Vec<u16>,
    pool: MySqlPool,
    /// What every gateway is started with; `DB_PORT` is set per instance.
    env: Vec<(String, String)>,
}

struct Run {
    engine: &'static str,
    flows: usize,
    instances: usize,
    target: u64,
    done: u64,
    seconds: f64,
    /// Times an instance found its commit refused (deadlock or certification conflict) and
    /// started waiting it out.
    conflicts: usize,
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let messages: u64 = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let broker = Mosquitto::start_with(
            "allow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 10000000\n",
        )?;
        let mut runs = Vec::new();
        {
            let db = MariaDb::start(Durability::Full)?;
            let engine = Engine::new("one MariaDB", &db, vec![db.port], &broker).await?;
            runs.extend(engine.runs(&broker, messages).await?);
        }
        {
            let cluster = GaleraCluster::start(3)?;
            let ports = (0..cluster.len()).map(|i| cluster.node(i).port).collect();
            let engine = Engine::new("Galera, 3 nodes", &cluster, ports, &broker).await?;
            runs.extend(engine.runs(&broker, messages).await?);
        }
        report(&runs)
    })
}

impl Engine {
    async fn new(
        name: &'static str,
        server: &impl SqlServer,
        ports: Vec<u16>,
        broker: &Mosquitto,
    ) -> anyhow::Result<Engine> {
        let GatewayDb { pool, env } = GatewayDb::create(server, LOGIN, broker.port).await?;
        mqtt_gateway::db::migrate(&pool).await?;
        Ok(Engine { name, ports, pool, env })
    }

    async fn runs(&self, broker: &Mosquitto, messages: u64) -> anyhow::Result<Vec<Run>> {
        let mut runs = Vec::new();
        for flows in [1, SPREAD_FLOWS] {
            for instances in 1..=3 {
                runs.push(self.run(broker, flows, instances, messages).await?);
            }
        }
        Ok(runs)
    }

    /// Fresh flows, topics and shared group per run, so no earlier session or queue interferes.
    async fn run(
        &self,
        broker: &Mosquitto,
        flows: usize,
        instances: usize,
        messages: u64,
    ) -> anyhow::Result<Run> {
        let tag = format!("r{}x{}x{}", self.ports.len(), flows, instances);
        let mut ids = Vec::new();
        let mut topics = Vec::new();
        for k in 0..flows {
            let topic = format!("scale/{tag}/{k}");
            let row = FlowRow {
                id: 0,
                code: format!("{tag}_{k}"),
                topic: topic.clone(),
                action: "STORE_DB".to_owned(),
                payload_schema: Some("{}".to_owned()),
                endpoint_url: None,
            };
            ids.push(flows::table::add(&self.pool, &row, "benchmark", true).await? as i32);
            topics.push(topic);
        }
        let gateways: Vec<Gateway> =
            (0..instances).map(|i| self.gateway(&format!("{tag}-{i}"), &tag, i)).collect::<Result<_, _>>()?;
        for gateway in &gateways {
            if !testkit::wait_until(Duration::from_secs(30), || gateway.count("Gateway ready") > 0) {
                anyhow::bail!("a gateway did not start:\n{}", gateway.logs());
            }
        }
        let started = Instant::now();
        let publisher = tokio::spawn(publish(broker.port, topics, messages));
        let mut done = 0;
        while done < messages && started.elapsed() < RUN_LIMIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
            done = self.written(&ids).await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        publisher.abort();
        let conflicts = gateways.iter().map(|g| g.count("Database unavailable")).sum();
        eprintln!(
            "{}: {flows} flow(s), {instances} instance(s): {done} messages in {seconds:.1}s, {conflicts} conflicts",
            self.name
        );
        Ok(Run { engine: self.name, flows, instances, target: messages, done, seconds, conflicts })
    }

    fn gateway(&self, client_id: &str, group: &str, i: usize) -> anyhow::Result<Gateway> {
        let mut env = self.env.clone();
        for (name, value) in [
            ("DB_PORT", self.ports[i % self.ports.len()].to_string()),
            ("MQTT_CLIENT_ID", client_id.to_owned()),
            ("MQTT_SHARED_GROUP", group.to_owned()),
        ] {
            testkit::set_var(&mut env, name, value);
        }
        Gateway::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_mqtt-gateway")), &env)
    }

    async fn written(&self, flows: &[i32]) -> anyhow::Result<u64> {
        let mut total = 0;
        for flow in flows {
            let counter: i32 = sqlx::query_scalar("SELECT last_msg_id FROM flows WHERE id = ?")
                .bind(flow)
                .fetch_one(&self.pool)
                .await?;
            total += counter as u64;
        }
        Ok(total)
    }
}

/// Publishes `messages` round-robin over the topics, as fast as the broker takes them.
async fn publish(port: u16, topics: Vec<String>, messages: u64) -> anyhow::Result<()> {
    let mut publisher = Publisher::connect(port).await?;
    for seq in 0..messages {
        let topic = &topics[seq as usize % topics.len()];
        publisher.publish(topic, format!(r#"{{"seq": {seq}, "temperature": 21.5}}"#)).await?;
    }
    publisher.flush(RUN_LIMIT).await?;
    Ok(())
}

fn report(runs: &[Run]) -> anyhow::Result<()> {
    println!("| database | flows | 1 instance | 2 instances | 3 instances |");
    println!("|---|---:|---:|---:|---:|");
    let mut rows: Vec<(&str, usize)> = runs.iter().map(|r| (r.engine, r.flows)).collect();
    rows.dedup();
    for (engine, flows) in rows {
        let cells: Vec<String> = runs
            .iter()
            .filter(|r| r.engine == engine && r.flows == flows)
            .map(|r| {
                let rate = r.done as f64 / r.seconds;
                let partial = if r.done < r.target { " (unfinished)" } else { "" };
                format!("{rate:.0} msg/s, {} conflicts{partial}", r.conflicts)
            })
            .collect();
        println!("| {engine} | {flows} | {} |", cells.join(" | "));
    }
    let json: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            json!({"database": r.engine, "flows": r.flows, "instances": r.instances, "messages": r.done,
                   "seconds": r.seconds, "msg_per_s": r.done as f64 / r.seconds, "conflicts": r.conflicts})
        })
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("scaleout.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}
