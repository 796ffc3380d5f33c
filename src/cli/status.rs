//! `mqtt-gateway status`: per flow, the counter, the last message time and the rate measured
//! over an interval, with the outbox's pending and dead requests.

use crate::flows::table::{self, FlowListing};
use crate::outbox::queue;
use anyhow::bail;
use serde_json::json;
use sqlx::MySqlPool;
use std::time::Duration;

pub(super) async fn run(pool: &MySqlPool, interval: f64, json: bool) -> anyhow::Result<i32> {
    // Written so that NaN fails too; an hour at most keeps the sleep inside `Duration`.
    if !(interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be a number of seconds above 0 and at most 3600, not {interval:?}");
    }
    let before = table::all(pool).await?;
    tokio::time::sleep(Duration::from_secs_f64(interval)).await;
    let flows = table::all(pool).await?;
    let rate = |f: &FlowListing| -> f64 {
        let earlier = before.iter().find(|b| b.row.id == f.row.id).map_or(f.last_msg_id, |b| b.last_msg_id);
        f64::from(f.last_msg_id - earlier) / interval
    };
    let last = table::last_message_times(pool).await?;
    let last_at = |id: i32| last.iter().find(|(f, _)| *f == id).map(|(_, at)| at.clone());
    let outbox = queue::depth_by_flow(pool).await?;
    let depth = |code: &str| -> (i64, i64) {
        outbox
            .iter()
            .find(|(flow, ..)| flow == code)
            .map(|(_, pending, dead)| (*pending, *dead))
            .unwrap_or((0, 0))
    };
    if json {
        let rows: Vec<_> = flows
            .iter()
            .map(|f| {
                let (pending, dead) = depth(&f.row.code);
                json!({"code": f.row.code, "enabled": f.enabled, "last_msg_id": f.last_msg_id,
                       "last_message_at_utc": last_at(f.row.id), "messages_per_second": rate(f),
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
            let (pending, dead) = depth(&f.row.code);
            println!(
                "{:<24} {:<8} {:>12} {:<24} {:>8.1} {:>15} {:>12}",
                f.row.code,
                f.enabled,
                f.last_msg_id,
                last_at(f.row.id).unwrap_or_else(|| "-".into()),
                rate(f),
                pending,
                dead
            );
        }
    }
    Ok(0)
}
