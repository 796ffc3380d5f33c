//! `mqtt-gateway outbox`: list pending or dead POST_ENDPOINT requests, and send dead ones
//! again. The statements themselves are `outbox::queue`'s.

use super::shown_url;
use crate::outbox::queue::{self, Listed};
use crate::outbox::Destination;
use anyhow::bail;
use clap::Subcommand;
use serde_json::json;
use sqlx::MySqlPool;

#[derive(Subcommand)]
pub enum OutboxCommand {
    /// Requests not delivered yet, with where each goes now and whether its flow holds it (or,
    /// with --dead, those given up on)
    ///
    /// Example: mqtt-gateway outbox list --dead
    List {
        #[arg(long)]
        dead: bool,
        #[arg(long)]
        json: bool,
    },
    /// Send dead requests again, to their flow's URL of the moment: the ones named, or all with --all
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
            let entries: Vec<_> = queue::listing(pool, dead, 1000).await?.iter().map(entry).collect();
            if json {
                println!("{}", serde_json::Value::Array(entries));
            } else {
                for e in &entries {
                    println!(
                        "{:>8}  {:<24} msg {:<8} attempts {:<4} {}  {}  {}  {}",
                        e["id"],
                        e["flow_code"].as_str().unwrap_or_default(),
                        e["msg_id"],
                        e["attempts"],
                        e["created_at"].as_str().unwrap_or_default(),
                        e["state"].as_str().unwrap_or_default(),
                        e["endpoint_url"].as_str().unwrap_or_default(),
                        e["last_error"].as_str().unwrap_or("-")
                    );
                }
                let held = entries
                    .iter()
                    .filter(|e| e["state"].as_str().is_some_and(|s| s.starts_with("held")))
                    .count();
                match (dead, held) {
                    (true, _) => println!("{} dead requests", entries.len()),
                    (false, 0) => println!("{} pending requests", entries.len()),
                    (false, held) => println!("{} pending requests, {held} of them held", entries.len()),
                }
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

/// A request as listed: where it goes now (its flow's URL; the one it last went to when its
/// flow is gone) and whether it is sent, held, or dead.
fn entry(r: &Listed) -> serde_json::Value {
    let destination = Destination::of(&r.flow);
    let (state, url) = match &destination {
        _ if r.dead => ("dead".to_owned(), r.endpoint_url.clone()),
        Destination::Send(endpoint) => ("pending".to_owned(), endpoint.raw.to_string()),
        Destination::Held(reason) => (format!("held: {reason}"), r.endpoint_url.clone()),
        Destination::Deleted => ("pending: its flow was deleted".to_owned(), r.endpoint_url.clone()),
    };
    json!({"id": r.id, "flow_code": r.flow_code, "msg_id": r.msg_id, "attempts": r.attempts,
           "created_at": r.created_at, "last_error": r.last_error, "state": state,
           "endpoint_url": shown_url(&url)})
}
