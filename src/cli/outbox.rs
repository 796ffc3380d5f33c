//! `mqtt-gateway outbox`: list pending or dead POST_ENDPOINT requests, and send dead ones again;
//! and the outbox's depth per flow for `status`. Every statement on `gateway_outbox` the CLI
//! makes is here.

use super::shown_url;
use anyhow::bail;
use clap::Subcommand;
use serde_json::json;
use sqlx::{MySqlPool, Row};

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

pub(super) async fn run(pool: &MySqlPool, command: OutboxCommand) -> anyhow::Result<i32> {
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

/// Per flow code with requests: how many are pending and how many dead, for `status`.
pub(super) async fn depths(pool: &MySqlPool) -> anyhow::Result<Vec<(String, i64, i64)>> {
    let outbox = sqlx::query(
        "SELECT flow_code, CAST(SUM(NOT dead) AS SIGNED), CAST(SUM(dead) AS SIGNED) FROM gateway_outbox GROUP BY flow_code",
    )
    .fetch_all(pool)
    .await?;
    Ok(outbox.iter().map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2))).collect())
}
