//! Group commit: the writes of many messages in one transaction.
//!
//! For each flow in a batch the counter moves once (`last_msg_id = last_msg_id + k`), and the
//! batch's messages of that flow get the ids that follow, consecutive and in arrival order;
//! their `data` rows and outbox requests go in with multi-row inserts. Every message still gets
//! its own `last_msg_id`, exactly as if it had been written alone.
//!
//! A database that is down or busy is waited for: the batch is retried with capped backoff and
//! nothing is acknowledged meanwhile, so the broker keeps the messages. An error that retrying
//! cannot cure is isolated by writing the batch's messages one by one, so that one bad message
//! never fails, loses or delays the others.

use crate::db;
use crate::flows::Flow;
use crate::sinks::post_endpoint::{self, OutboxRow};
use crate::sinks::store_db::{self, Attribute, DataRow};
use chrono::NaiveDateTime;
use sqlx::mysql::MySqlDatabaseError;
use sqlx::MySqlPool;
use std::collections::HashMap;
use std::sync::Arc;

/// What one flow writes for one message.
pub enum Effect {
    Store(Vec<Attribute>),
    /// The rendered body, or the error `requests` would have raised before sending.
    Post {
        url: String,
        body: Result<String, crate::pyfmt::RenderError>,
    },
}

/// One message for one flow, validated and rendered.
pub struct Item {
    pub flow: Arc<Flow>,
    pub topic: Arc<str>,
    pub effect: Effect,
}

/// How a written item ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written with this `last_msg_id`.
    Written(i32),
    /// The flow's row was deleted since the flows were loaded.
    FlowGone,
}

/// Whether waiting and retrying can cure a database error.
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|e| {
            matches!(
                e.number(),
                // too many connections, server shutdown, read-only (two codes), lock wait
                // timeout, deadlock, Galera node not ready, connection killed, out of memory
                1040 | 1053 | 1290 | 1836 | 1205 | 1213 | 1047 | 1927 | 1037 | 1041
            )
        }),
        _ => false,
    }
}

/// Records that these flows just took messages, in one statement.
async fn note_activity(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    flows: impl Iterator<Item = i32>,
) -> Result<(), sqlx::Error> {
    let flows: Vec<i32> = flows.collect();
    if flows.is_empty() {
        return Ok(());
    }
    let mut upsert =
        sqlx::QueryBuilder::<sqlx::MySql>::new("INSERT INTO gateway_flow_stats (flow_id, last_message_at) ");
    upsert.push_values(&flows, |mut row, flow| {
        row.push_bind(*flow).push("UTC_TIMESTAMP(3)");
    });
    upsert.push(" ON DUPLICATE KEY UPDATE last_message_at = VALUES(last_message_at)");
    upsert.build().execute(&mut **tx).await?;
    Ok(())
}

/// Writes `items` (indexes into `all`) in one transaction and returns each one's outcome.
pub async fn write(
    pool: &MySqlPool,
    received_at: NaiveDateTime,
    all: &[Item],
    items: &[usize],
) -> Result<Vec<(usize, Outcome)>, sqlx::Error> {
    // Per flow, in order of first appearance: how many of its messages this batch holds.
    let mut counts: Vec<(i32, i32)> = Vec::new();
    for &i in items {
        let id = all[i].flow.id;
        match counts.iter_mut().find(|(flow, _)| *flow == id) {
            Some((_, n)) => *n += 1,
            None => counts.push((id, 1)),
        }
    }
    let mut tx = pool.begin().await?;
    // The next id to hand out per flow; absent when the flow row is gone.
    let mut next_id: HashMap<i32, i32> = HashMap::new();
    for &(flow_id, count) in &counts {
        match db::advance_counter(&mut tx, flow_id, count).await {
            Ok(last) => {
                next_id.insert(flow_id, last - count + 1);
            }
            Err(db::CounterError::FlowGone(_)) => {}
            Err(db::CounterError::Db(e)) => return Err(e),
            // Decode is not transient: retrying cannot make the counter fit.
            Err(overflow @ db::CounterError::Overflow(_)) => {
                return Err(sqlx::Error::Decode(overflow.into()))
            }
        }
    }
    let mut outcomes = Vec::with_capacity(items.len());
    let mut data_rows = Vec::new();
    let mut outbox_rows = Vec::new();
    for &i in items {
        let item = &all[i];
        let Some(next) = next_id.get_mut(&item.flow.id) else {
            outcomes.push((i, Outcome::FlowGone));
            continue;
        };
        let msg_id = *next;
        *next += 1;
        match &item.effect {
            Effect::Store(attributes) => data_rows.extend(attributes.iter().map(|attribute| DataRow {
                flow_code: &item.flow.code,
                attribute,
                msg_id,
            })),
            Effect::Post { url, body: Ok(body) } => outbox_rows.push(OutboxRow {
                flow_id: item.flow.id,
                flow_code: &item.flow.code,
                url,
                body,
                msg_id,
            }),
            Effect::Post { body: Err(_), .. } => {}
        }
        outcomes.push((i, Outcome::Written(msg_id)));
    }
    store_db::insert(&mut tx, received_at, &data_rows).await?;
    post_endpoint::enqueue(&mut tx, &outbox_rows).await?;
    note_activity(&mut tx, next_id.keys().copied()).await?;
    tx.commit().await?;
    Ok(outcomes)
}
