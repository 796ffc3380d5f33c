//! `mqtt-gateway flows`: list, show, add, enable and disable flows. The statements on the
//! `flows` table are [`crate::flows::table`]'s; this file checks what the operator typed and
//! prints what it found.

use super::shown_url;
use crate::flows::table::{self, FlowListing};
use crate::flows::{Flow, FlowRow};
use anyhow::bail;
use clap::Subcommand;
use serde_json::json;
use sqlx::MySqlPool;

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

pub(super) async fn run(pool: &MySqlPool, command: FlowsCommand) -> anyhow::Result<i32> {
    match command {
        FlowsCommand::List { json } => {
            let flows = table::all(pool).await?;
            if json {
                println!("{}", serde_json::Value::Array(flows.iter().map(to_json).collect()));
            } else {
                println!(
                    "{:>4}  {:<24} {:<14} {:<8} {:>10}  topic",
                    "id", "code", "action", "enabled", "last_msg_id"
                );
                for f in &flows {
                    let mark = if f.problem().is_some() { "  (broken: see flows show)" } else { "" };
                    println!(
                        "{:>4}  {:<24} {:<14} {:<8} {:>10}  {}{mark}",
                        f.row.id, f.row.code, f.row.action, f.enabled, f.last_msg_id, f.row.topic
                    );
                }
            }
            Ok(0)
        }
        FlowsCommand::Show { code, json } => {
            let Some(flow) = table::all(pool).await?.into_iter().find(|f| f.row.code == code) else {
                bail!("no flow with code {code:?}; `mqtt-gateway flows list` shows them");
            };
            if json {
                println!("{}", to_json(&flow));
            } else {
                println!("id:             {}", flow.row.id);
                println!("code:           {}", flow.row.code);
                println!("description:    {}", flow.description);
                println!("topic:          {}", flow.row.topic);
                println!("action:         {}", flow.row.action);
                println!("payload_schema: {}", flow.row.payload_schema.as_deref().unwrap_or("NULL"));
                println!(
                    "endpoint_url:   {}",
                    flow.row.endpoint_url.as_deref().map_or("NULL".into(), shown_url)
                );
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
            let row = FlowRow { payload_schema: Some(schema.to_string()), ..row };
            let id = table::add(pool, &row, &description, !disabled).await?;
            println!(
                "added flow {code} (id {id}); running gateways take it at their next reload, \
                 or at once on SIGHUP (systemctl reload mqtt-gateway)"
            );
            Ok(0)
        }
        FlowsCommand::Enable { code } => set_enabled(pool, &code, true).await,
        FlowsCommand::Disable { code } => set_enabled(pool, &code, false).await,
    }
}

async fn set_enabled(pool: &MySqlPool, code: &str, enabled: bool) -> anyhow::Result<i32> {
    if !table::set_enabled(pool, code, enabled).await? {
        bail!("no flow with code {code:?}; `mqtt-gateway flows list` shows them");
    }
    let word = if enabled { "enabled" } else { "disabled" };
    println!("flow {code} {word}; running gateways apply it at their next reload, or at once on SIGHUP");
    Ok(0)
}

/// A flow as `flows list --json`, `flows show --json` and `check --json` print it.
pub(super) fn to_json(flow: &FlowListing) -> serde_json::Value {
    let row = &flow.row;
    json!({
        "id": row.id, "code": row.code, "description": flow.description, "topic": row.topic,
        "action": row.action, "payload_schema": row.payload_schema,
        "endpoint_url": row.endpoint_url.as_deref().map(shown_url),
        "last_msg_id": flow.last_msg_id, "enabled": flow.enabled, "problem": flow.problem(),
    })
}
