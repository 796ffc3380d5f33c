//! `mqtt-gateway outbox`: list pending or dead POST_ENDPOINT requests, and send dead ones
//! again. The statements themselves are `outbox::queue`'s.

use super::shown_url;
use crate::outbox::queue;
use anyhow::bail;
use clap::Subcommand;
use serde_json::json;
use sqlx::MySqlPool;

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
            let entries: Vec<_> = queue::listing(pool, dead, 1000)
                .await?
                .into_iter()
                .map(|r| {
                    json!({"id": r.id, "flow_code": r.flow_code, "msg_id": r.msg_id,
                           "attempts": r.attempts, "created_at": r.created_at,
                           "last_error": r.last_error, "endpoint_url": shown_url(&r.endpoint_url)})
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
            let revived = queue::revive(pool, (!all).then_some(ids.as_slice())).await?;
            println!("{revived} dead requests queued again; a running gateway sends them within a second");
            Ok(0)
        }
    }
}
