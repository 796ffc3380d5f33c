//! Group commit: the writes of many messages in one transaction.
//!
//! For each flow in a batch the counter moves once (`last_msg_id = last_msg_id + k`), and the
//! batch's messages of that flow get the ids that follow, consecutive and in arrival order;
//! their `data` rows and outbox requests go in with multi-row inserts. Every message still gets
//! its own `last_msg_id`, exactly as if it had been written alone.
//!
//! Statements are bounded by bytes (the server's `max_allowed_packet`) as well as placeholders,
//! so a batch of any size is written; a message too big for any statement is refused alone.
//! What to do when a write fails (hold the stream, or find the one message at fault) is the
//! processor's decision, made from [`WriteError::blame`].

use crate::db::{self, StatementBounds};
use crate::flows::{table, Flow};
use crate::sinks::post_endpoint::{self, OutboxRow};
use crate::sinks::store_db::{self, Attribute, DataRow};
use chrono::NaiveDateTime;
use sqlx::MySqlPool;
use std::collections::{BTreeMap, HashMap};
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

impl Item {
    /// Why this item cannot be written in any statement the server accepts, if so.
    fn too_big(&self, bounds: &StatementBounds) -> Option<String> {
        match &self.effect {
            Effect::Store(attributes) => store_db::too_big(&self.flow.code, attributes, bounds),
            Effect::Post { url, body: Ok(body) } => {
                post_endpoint::too_big(&self.flow.code, url, body, bounds)
            }
            Effect::Post { body: Err(_), .. } => None,
        }
    }
}

/// How a written item ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written with this `last_msg_id`.
    Written(i32),
    /// The flow's row was deleted since the flows were loaded.
    FlowGone,
    /// Too big for any statement the server accepts: refused, nothing of it written.
    TooBig(String),
    /// Refused by the server for its values (see [`db::Blame::Data`]), written alone.
    Refused(String),
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The flow's `last_msg_id` would pass what `INT` holds: about the messages' flow, not the
    /// database, so it fails them as the original did, never holding the stream.
    #[error("last_msg_id of flow {0} no longer fits in INT")]
    CounterOverflow(i32),
}

impl WriteError {
    pub fn blame(&self) -> db::Blame {
        match self {
            WriteError::Db(error) => db::blame(error),
            WriteError::CounterOverflow(_) => db::Blame::Data,
        }
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
/// However many bytes the batch holds, it goes in as many statements as the server's
/// `max_allowed_packet` needs; an item too big for any statement is refused before anything
/// of it (its counter included) is written.
pub async fn write(
    pool: &MySqlPool,
    received_at: NaiveDateTime,
    all: &[Item],
    items: &[usize],
) -> Result<Vec<(usize, Outcome)>, WriteError> {
    let mut tx = pool.begin().await?;
    let bounds = StatementBounds { max_packet: db::max_allowed_packet(&mut tx).await? };
    let mut outcomes = Vec::with_capacity(items.len());
    // Per flow, in flow-id order (so that instances writing the same flows lock their counter
    // rows in one order and never deadlock each other): how many messages this batch holds.
    let mut counts: BTreeMap<i32, i32> = BTreeMap::new();
    let mut writable = Vec::with_capacity(items.len());
    for &i in items {
        match all[i].too_big(&bounds) {
            Some(reason) => outcomes.push((i, Outcome::TooBig(reason))),
            None => {
                *counts.entry(all[i].flow.id).or_default() += 1;
                writable.push(i);
            }
        }
    }
    // The next id to hand out per flow; absent when the flow row is gone.
    let mut next_id: HashMap<i32, i32> = HashMap::new();
    for (&flow_id, &count) in &counts {
        match table::advance_counter(&mut tx, flow_id, count).await {
            Ok(last) => {
                next_id.insert(flow_id, last - count + 1);
            }
            Err(table::CounterError::FlowGone(_)) => {}
            Err(table::CounterError::Db(e)) => return Err(e.into()),
            Err(table::CounterError::Overflow(flow)) => return Err(WriteError::CounterOverflow(flow)),
        }
    }
    let mut data_rows = Vec::new();
    let mut outbox_rows = Vec::new();
    for i in writable {
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
    store_db::insert(&mut tx, &bounds, received_at, &data_rows).await?;
    post_endpoint::enqueue(&mut tx, &bounds, &outbox_rows).await?;
    note_activity(&mut tx, next_id.keys().copied()).await?;
    tx.commit().await?;
    Ok(outcomes)
}
