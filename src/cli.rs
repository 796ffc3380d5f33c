//! The command line: `mqtt-gateway` alone runs the service as before; subcommands let an
//! operator check the setup, manage flows and look at counters and the outbox without SQL.
//! Every subcommand reads the same environment variables as the service.

use crate::config::Settings;
use crate::flows::{Flow, FlowRow, FlowSet};
use crate::{db, mqtt, tls};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;
use sqlx::{MySqlPool, Row};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mqtt-gateway",
    version,
    about = "Takes MQTT messages off a broker and, per flow, stores them in MariaDB or POSTs them",
    long_about = "Takes MQTT messages off a broker and, per flow, stores them in MariaDB or POSTs them.\n\
                  Without a subcommand it runs the service. Configuration comes from the environment \
                  (DB_HOST, DB_NAME, DB_USER, DB_PASSWORD, ...; see the README)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service (the default)
    Run,
    /// Create or update the tables, then exit
    ///
    /// Example: DB_HOST=db DB_NAME=gw DB_USER=gw DB_PASSWORD=... mqtt-gateway migrate
    Migrate,
    /// Check the configuration, the database, the broker and every flow; exit 1 if anything would not work
    ///
    /// Example: mqtt-gateway check --json
    Check {
        #[arg(long)]
        json: bool,
    },
    /// List, show, add, enable or disable flows
    #[command(subcommand)]
    Flows(FlowsCommand),
    /// Per flow: the counter, the last message time and the current rate; the outbox's pending
    /// and dead requests
    ///
    /// Example: mqtt-gateway status --interval 5 --json
    Status {
        /// Seconds over which the rate is measured
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long)]
        json: bool,
    },
    /// List or retry POST_ENDPOINT requests that are pending or dead
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

#[derive(Subcommand)]
pub enum FlowsCommand {
    /// Every flow, enabled or not
    ///
    /// Example: mqtt-gateway flows list
    List {
        #[arg(long)]
        json: bool,
    },
    /// One flow in full, with what is wrong with it, if anything
    ///
    /// Example: mqtt-gateway flows show AHT10_SENSOR
    Show {
        code: String,
        #[arg(long)]
        json: bool,
    },
    /// Add a flow, checked before it is written; running gateways pick it up at their next
    /// reload, or at once on `systemctl reload mqtt-gateway` (SIGHUP)
    ///
    /// Example: mqtt-gateway flows add AHT10_SENSOR sensors/aht10 STORE_DB --schema '{"temperature": "float"}'
    Add {
        code: String,
        topic: String,
        /// STORE_DB or POST_ENDPOINT
        action: String,
        /// The payload schema, as JSON
        #[arg(long, default_value = "{}")]
        schema: String,
        /// The endpoint, for POST_ENDPOINT
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// Add it disabled
        #[arg(long)]
        disabled: bool,
    },
    /// Enable a flow
    Enable { code: String },
    /// Disable a flow
    Disable { code: String },
}

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Requests not delivered yet (or, with --dead, given up on)
    ///
    /// Example: mqtt-gateway outbox list --dead
    List {
        #[arg(long)]
        dead: bool,
        #[arg(long)]
        json: bool,
    },
    /// Send dead requests again: the ones named, or all with --all
    ///
    /// Example: mqtt-gateway outbox retry --all
    Retry {
        ids: Vec<i64>,
        #[arg(long)]
        all: bool,
    },
}

/// Runs a subcommand other than `run`; returns the process exit code.
pub async fn execute(settings: Settings, command: Command) -> anyhow::Result<i32> {
    tls::install_crypto_provider();
    let pool = db::connect(&settings.db).await.context("cannot connect to the database")?;
    let code = match command {
        Command::Run => unreachable!("main runs the service itself"),
        Command::Migrate => {
            db::migrate(&pool).await.context("cannot migrate")?;
            println!("the schema is up to date");
            0
        }
        Command::Check { json } => check(&settings, &pool, json).await?,
        Command::Flows(flows) => flows_command(&pool, flows).await?,
        Command::Status { interval, json } => status(&pool, interval, json).await?,
        Command::Outbox(outbox) => outbox_command(&pool, outbox).await?,
    };
    pool.close().await;
    Ok(code)
}

#[derive(sqlx::FromRow)]
struct FlowListing {
    id: i32,
    code: String,
    description: String,
    topic: String,
    action: String,
    payload_schema: Option<String>,
    endpoint_url: Option<String>,
    last_msg_id: i32,
    enabled: bool,
}

impl FlowListing {
    fn problem(&self) -> Option<String> {
        let row = FlowRow {
            id: self.id,
            code: self.code.clone(),
            topic: self.topic.clone(),
            action: self.action.clone(),
            payload_schema: self.payload_schema.clone(),
            endpoint_url: self.endpoint_url.clone(),
        };
        Flow::try_from(row).err().map(|broken| broken.reason)
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "id": self.id, "code": self.code, "description": self.description, "topic": self.topic,
            "action": self.action, "payload_schema": self.payload_schema,
            "endpoint_url": self.endpoint_url.as_deref().map(shown_url),
            "last_msg_id": self.last_msg_id, "enabled": self.enabled, "problem": self.problem(),
        })
    }
}

async fn all_flows(pool: &MySqlPool) -> anyhow::Result<Vec<FlowListing>> {
    Ok(sqlx::query_as(
        "SELECT id, code, description, topic, action, CAST(payload_schema AS CHAR) AS payload_schema, \
         endpoint_url, last_msg_id, enabled <> 0 AS enabled FROM flows ORDER BY id",
    )
    .fetch_all(pool)
    .await?)
}

async fn flows_command(pool: &MySqlPool, command: FlowsCommand) -> anyhow::Result<i32> {
    match command {
        FlowsCommand::List { json } => {
            let flows = all_flows(pool).await?;
            if json {
                println!("{}", serde_json::Value::Array(flows.iter().map(FlowListing::to_json).collect()));
            } else {
                println!(
                    "{:>4}  {:<24} {:<14} {:<8} {:>10}  topic",
                    "id", "code", "action", "enabled", "last_msg_id"
                );
                for f in &flows {
                    let mark = if f.problem().is_some() { "  (broken: see flows show)" } else { "" };
                    println!(
                        "{:>4}  {:<24} {:<14} {:<8} {:>10}  {}{mark}",
                        f.id, f.code, f.action, f.enabled, f.last_msg_id, f.topic
                    );
                }
            }
            Ok(0)
        }
        FlowsCommand::Show { code, json } => {
            let Some(flow) = all_flows(pool).await?.into_iter().find(|f| f.code == code) else {
                bail!("no flow with code {code:?}; `mqtt-gateway flows list` shows them");
            };
            if json {
                println!("{}", flow.to_json());
            } else {
                println!("id:             {}", flow.id);
                println!("code:           {}", flow.code);
                println!("description:    {}", flow.description);
                println!("topic:          {}", flow.topic);
                println!("action:         {}", flow.action);
                println!("payload_schema: {}", flow.payload_schema.as_deref().unwrap_or("NULL"));
                println!("endpoint_url:   {}", flow.endpoint_url.as_deref().map_or("NULL".into(), shown_url));
                println!("enabled:        {}", flow.enabled);
                println!("last_msg_id:    {}", flow.last_msg_id);
                println!("problem:        {}", flow.problem().as_deref().unwrap_or("none"));
            }
            Ok(0)
        }
        FlowsCommand::Add { code, topic, action, schema, url, description, disabled } => {
            let row = FlowRow {
                id: 0,
                code: code.clone(),
                topic: topic.clone(),
                action: action.trim().to_ascii_uppercase(),
                payload_schema: Some(schema.clone()),
                endpoint_url: url.clone(),
            };
            if let Err(broken) = Flow::try_from(row.clone()) {
                bail!("flow {code} not added: {}", broken.reason);
            }
            // The schema column is JSON: store it normalised, as the check parsed it.
            let schema: serde_json::Value = serde_json::from_str(&schema)?;
            let added = sqlx::query(
                "INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) \
                 VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
            )
            .bind(&code)
            .bind(&description)
            .bind(&topic)
            .bind(&row.action)
            .bind(schema.to_string())
            .bind(&url)
            .bind(!disabled)
            .execute(pool)
            .await
            .map_err(|e| match e.as_database_error().and_then(|d| d.code()) {
                Some(state) if state == "23000" => anyhow::anyhow!("a flow with code {code:?} exists already"),
                _ => anyhow::Error::new(e),
            })?;
            println!(
                "added flow {code} (id {}); running gateways take it at their next reload, \
                 or at once on SIGHUP (systemctl reload mqtt-gateway)",
                added.last_insert_id()
            );
            Ok(0)
        }
        FlowsCommand::Enable { code } => set_enabled(pool, &code, true).await,
        FlowsCommand::Disable { code } => set_enabled(pool, &code, false).await,
    }
}

async fn set_enabled(pool: &MySqlPool, code: &str, enabled: bool) -> anyhow::Result<i32> {
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT id FROM flows WHERE code = ?").bind(code).fetch_optional(pool).await?;
    if exists.is_none() {
        bail!("no flow with code {code:?}; `mqtt-gateway flows list` shows them");
    }
    sqlx::query("UPDATE flows SET enabled = ? WHERE code = ?").bind(enabled).bind(code).execute(pool).await?;
    let word = if enabled { "enabled" } else { "disabled" };
    println!("flow {code} {word}; running gateways apply it at their next reload, or at once on SIGHUP");
    Ok(0)
}

async fn status(pool: &MySqlPool, interval: f64, json: bool) -> anyhow::Result<i32> {
    // Written so that NaN fails too; an hour at most keeps the sleep inside `Duration`.
    if !(interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be a number of seconds above 0 and at most 3600, not {interval:?}");
    }
    let before = all_flows(pool).await?;
    tokio::time::sleep(Duration::from_secs_f64(interval)).await;
    let flows = all_flows(pool).await?;
    let rate = |f: &FlowListing| -> f64 {
        let earlier = before.iter().find(|b| b.id == f.id).map_or(f.last_msg_id, |b| b.last_msg_id);
        f64::from(f.last_msg_id - earlier) / interval
    };
    let last: Vec<(i32, String)> =
        sqlx::query_as("SELECT flow_id, CAST(last_message_at AS CHAR) FROM gateway_flow_stats")
            .fetch_all(pool)
            .await?;
    let last_at = |id: i32| last.iter().find(|(f, _)| *f == id).map(|(_, at)| at.clone());
    let outbox = sqlx::query(
        "SELECT flow_code, CAST(SUM(NOT dead) AS SIGNED), CAST(SUM(dead) AS SIGNED) FROM gateway_outbox GROUP BY flow_code",
    )
    .fetch_all(pool)
    .await?;
    let depth = |code: &str| -> (i64, i64) {
        outbox
            .iter()
            .find(|r| r.get::<String, _>(0) == code)
            .map(|r| (r.get::<i64, _>(1), r.get::<i64, _>(2)))
            .unwrap_or((0, 0))
    };
    if json {
        let rows: Vec<_> = flows
            .iter()
            .map(|f| {
                let (pending, dead) = depth(&f.code);
                json!({"code": f.code, "enabled": f.enabled, "last_msg_id": f.last_msg_id,
                       "last_message_at_utc": last_at(f.id), "messages_per_second": rate(f),
                       "outbox_pending": pending, "outbox_dead": dead})
            })
            .collect();
        println!("{}", json!({ "flows": rows }));
    } else {
        println!(
            "{:<24} {:<8} {:>12} {:<24} {:>8} {:>15} {:>12}",
            "flow", "enabled", "last_msg_id", "last message (UTC)", "msg/s", "outbox pending", "outbox dead"
        );
        for f in &flows {
            let (pending, dead) = depth(&f.code);
            println!(
                "{:<24} {:<8} {:>12} {:<24} {:>8.1} {:>15} {:>12}",
                f.code,
                f.enabled,
                f.last_msg_id,
                last_at(f.id).unwrap_or_else(|| "-".into()),
                rate(f),
                pending,
                dead
            );
        }
    }
    Ok(0)
}

async fn outbox_command(pool: &MySqlPool, command: OutboxCommand) -> anyhow::Result<i32> {
    match command {
        OutboxCommand::List { dead, json } => {
            let rows = sqlx::query(
                "SELECT id, flow_code, msg_id, attempts, CAST(created_at AS CHAR), last_error, endpoint_url FROM gateway_outbox \
                 WHERE dead = ? ORDER BY id LIMIT 1000",
            )
            .bind(dead)
            .fetch_all(pool)
            .await?;
            let entries: Vec<_> = rows
                .iter()
                .map(|r| {
                    json!({"id": r.get::<i64, _>(0), "flow_code": r.get::<String, _>(1), "msg_id": r.get::<i32, _>(2),
                           "attempts": r.get::<i32, _>(3), "created_at": r.get::<String, _>(4),
                           "last_error": r.get::<Option<String>, _>(5),
                           "endpoint_url": shown_url(&r.get::<String, _>(6))})
                })
                .collect();
            if json {
                println!("{}", serde_json::Value::Array(entries));
            } else {
                for e in &entries {
                    println!(
                        "{:>8}  {:<24} msg {:<8} attempts {:<4} {}  {}  {}",
                        e["id"],
                        e["flow_code"].as_str().unwrap_or_default(),
                        e["msg_id"],
                        e["attempts"],
                        e["created_at"].as_str().unwrap_or_default(),
                        e["endpoint_url"].as_str().unwrap_or_default(),
                        e["last_error"].as_str().unwrap_or("-")
                    );
                }
                println!("{} {} requests", entries.len(), if dead { "dead" } else { "pending" });
            }
            Ok(0)
        }
        OutboxCommand::Retry { ids, all } => {
            if ids.is_empty() && !all {
                bail!(
                    "name the requests to retry, or use --all; `mqtt-gateway outbox list --dead` shows them"
                );
            }
            let mut query = sqlx::QueryBuilder::<sqlx::MySql>::new(
                "UPDATE gateway_outbox SET dead = FALSE, attempts = 0, next_attempt_at = UTC_TIMESTAMP(3) WHERE dead",
            );
            if !all {
                query.push(" AND id IN (");
                let mut list = query.separated(", ");
                for id in &ids {
                    list.push_bind(*id);
                }
                query.push(")");
            }
            let done = query.build().execute(pool).await?;
            println!(
                "{} dead requests queued again; a running gateway sends them within a second",
                done.rows_affected()
            );
            Ok(0)
        }
    }
}

/// Everything that would stop the gateway from working, found without starting it.
async fn check(settings: &Settings, pool: &MySqlPool, json: bool) -> anyhow::Result<i32> {
    let mut problems: Vec<String> = Vec::new();
    let rows = all_flows(pool).await?;
    let set = FlowSet::from_rows(crate::flows::table::enabled(pool).await.context("cannot read flows")?);
    for broken in &set.broken {
        problems.push(format!("flow {}: {}", broken.code, broken.reason));
    }
    for flow in &set.flows {
        if let crate::flows::Action::PostEndpoint { url } = &flow.action {
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
            json!({"ok": problems.is_empty(), "flows": rows.iter().map(FlowListing::to_json).collect::<Vec<_>>(), "problems": problems})
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

/// An endpoint URL as every CLI output shows it: with its password masked exactly as the
/// service's log masks it. A value that is not a URL at all cannot be masked reliably, so when
/// it could hold user info it is not shown (its flow's problem says what is wrong with it).
fn shown_url(raw: &str) -> String {
    if url::Url::parse(raw.trim()).is_err() && raw.contains('@') {
        return "(not a valid URL; not shown, as it may hold a password)".to_owned();
    }
    crate::outbox::redacted_str(raw)
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

async fn broker_reachable(
    settings: &crate::config::MqttSettings,
    broker: &db::BrokerRow,
) -> anyhow::Result<()> {
    let options = mqtt::options(settings, broker)?;
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let outcome = tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await;
    let _ = client.disconnect().await;
    match outcome {
        Err(_) => bail!("no answer within 10 s"),
        Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => bail!("connection refused: {code:?}"),
        Ok(Err(error)) => bail!("{error}"),
        Ok(Ok(_)) => Ok(()),
    }
}
