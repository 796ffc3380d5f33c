//! The `flows` table and its companions `gateway_flow_stats` and `gateway_flows_version`: every
//! statement on them, for the service (load the enabled flows, advance a counter, note when a
//! flow last took a message, follow the flows version) and for the operator's CLI (list, add,
//! enable, disable, last message times).

use super::{Flow, FlowRow};
use sqlx::{MySql, MySqlPool, QueryBuilder, Transaction};
use std::collections::BTreeMap;

/// Every enabled flow, in id order. The schema is read as text so that both MariaDB's JSON
/// (a LONGTEXT) and MySQL's native JSON type decode.
pub async fn enabled(pool: &MySqlPool) -> Result<Vec<FlowRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, code, topic, action, CAST(payload_schema AS CHAR) AS payload_schema, \
         endpoint_url FROM flows WHERE enabled ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Adds `count` to a flow's counter and returns the new value, in the caller's transaction.
/// `LAST_INSERT_ID(expr)` hands the new value back with the update, saving a round trip, and
/// the row lock it takes keeps ids distinct however many writers there are.
async fn advance_counter(
    tx: &mut Transaction<'_, MySql>,
    flow_id: i32,
    count: i32,
) -> Result<i32, CounterError> {
    let done = sqlx::query("UPDATE flows SET last_msg_id = LAST_INSERT_ID(last_msg_id + ?) WHERE id = ?")
        .bind(count)
        .bind(flow_id)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() != 1 {
        return Err(CounterError::FlowGone(flow_id));
    }
    i32::try_from(done.last_insert_id()).map_err(|_| CounterError::Overflow(flow_id))
}

/// Adds each flow's count to its counter, in the caller's transaction, and returns each flow's
/// new counter; a flow missing from the answer no longer exists. Whatever the number of flows
/// it costs two statements: one reads and locks their rows (in id order, so that instances
/// writing the same flows never deadlock each other), one writes them all.
pub async fn advance_counters(
    tx: &mut Transaction<'_, MySql>,
    counts: &BTreeMap<i32, i32>,
) -> Result<BTreeMap<i32, i32>, CounterError> {
    if counts.is_empty() {
        return Ok(BTreeMap::new());
    }
    if let (1, Some((&flow, &count))) = (counts.len(), counts.first_key_value()) {
        // One flow: one statement.
        return match advance_counter(tx, flow, count).await {
            Ok(last) => Ok(BTreeMap::from([(flow, last)])),
            Err(CounterError::FlowGone(_)) => Ok(BTreeMap::new()),
            Err(error) => Err(error),
        };
    }
    let mut select = QueryBuilder::<MySql>::new("SELECT id, last_msg_id FROM flows WHERE id IN (");
    let mut ids = select.separated(", ");
    for flow in counts.keys() {
        ids.push_bind(*flow);
    }
    select.push(") ORDER BY id FOR UPDATE");
    let rows: Vec<(i32, i32)> = select.build_query_as().fetch_all(&mut **tx).await?;
    let mut advanced = BTreeMap::new();
    for (flow, last) in rows {
        let next = last.checked_add(counts[&flow]).ok_or(CounterError::Overflow(flow))?;
        advanced.insert(flow, next);
    }
    if advanced.is_empty() {
        return Ok(advanced);
    }
    let mut update = QueryBuilder::<MySql>::new("UPDATE flows SET last_msg_id = CASE id");
    for (flow, next) in &advanced {
        update.push(" WHEN ").push_bind(*flow).push(" THEN ").push_bind(*next);
    }
    update.push(" END WHERE id IN (");
    let mut ids = update.separated(", ");
    for flow in advanced.keys() {
        ids.push_bind(*flow);
    }
    update.push(")");
    update.build().execute(&mut **tx).await?;
    Ok(advanced)
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("flow {0} no longer exists")]
    FlowGone(i32),
    #[error("last_msg_id of flow {0} no longer fits in INT")]
    Overflow(i32),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// A `flows` row as the operator sees it: the row the service reads, and the columns only the
/// operator looks at.
#[derive(Debug, sqlx::FromRow)]
pub struct FlowListing {
    #[sqlx(flatten)]
    pub row: FlowRow,
    pub description: String,
    pub last_msg_id: i32,
    pub enabled: bool,
}

impl FlowListing {
    /// Why the service would skip this flow, if it would.
    pub fn problem(&self) -> Option<String> {
        Flow::try_from(self.row.clone()).err().map(|broken| broken.reason)
    }
}

/// Every flow, enabled or not, in id order.
pub async fn all(pool: &MySqlPool) -> Result<Vec<FlowListing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, code, description, topic, action, CAST(payload_schema AS CHAR) AS payload_schema, \
         endpoint_url, last_msg_id, enabled <> 0 AS enabled FROM flows ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("a flow with code {0:?} exists already")]
    Exists(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Inserts a flow with its counter at 0 and returns its id. The caller checks the row first.
pub async fn add(pool: &MySqlPool, row: &FlowRow, description: &str, enabled: bool) -> Result<u64, AddError> {
    let added = sqlx::query(
        "INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) \
         VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
    )
    .bind(&row.code)
    .bind(description)
    .bind(&row.topic)
    .bind(&row.action)
    .bind(&row.payload_schema)
    .bind(&row.endpoint_url)
    .bind(enabled)
    .execute(pool)
    .await
    .map_err(|e| match e.as_database_error().and_then(|d| d.code()) {
        // Integrity constraint violation: the unique key on `code`.
        Some(state) if state == "23000" => AddError::Exists(row.code.clone()),
        _ => AddError::Db(e),
    })?;
    bump_version(pool).await?;
    Ok(added.last_insert_id())
}

/// Enables or disables the flow with this code; false when there is none.
pub async fn set_enabled(pool: &MySqlPool, code: &str, enabled: bool) -> Result<bool, sqlx::Error> {
    let exists: Option<i32> =
        sqlx::query_scalar("SELECT id FROM flows WHERE code = ?").bind(code).fetch_optional(pool).await?;
    if exists.is_none() {
        return Ok(false);
    }
    sqlx::query("UPDATE flows SET enabled = ? WHERE code = ?").bind(enabled).bind(code).execute(pool).await?;
    bump_version(pool).await?;
    Ok(true)
}

/// The flows version: moved by whoever makes or applies a change to the flows (this CLI, a
/// gateway's reload that found one), and followed by every running gateway, so that several
/// instances apply a change within seconds of each other, not each at its own reload.
pub async fn version(pool: &MySqlPool) -> Result<i64, sqlx::Error> {
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM gateway_flows_version WHERE id = 1")
        .fetch_optional(pool)
        .await?;
    Ok(version.unwrap_or(0))
}

/// Moves the flows version on and returns it.
pub async fn bump_version(pool: &MySqlPool) -> Result<i64, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO gateway_flows_version (id, version, changed_at) VALUES (1, LAST_INSERT_ID(1), UTC_TIMESTAMP(3)) \
         ON DUPLICATE KEY UPDATE version = LAST_INSERT_ID(version + 1), changed_at = VALUES(changed_at)",
    )
    .execute(pool)
    .await?;
    Ok(i64::try_from(done.last_insert_id()).unwrap_or(i64::MAX))
}

/// Records that these flows just took messages, in one statement.
pub async fn note_activity(
    tx: &mut Transaction<'_, MySql>,
    flows: impl Iterator<Item = i32>,
) -> Result<(), sqlx::Error> {
    let flows: Vec<i32> = flows.collect();
    if flows.is_empty() {
        return Ok(());
    }
    let mut upsert =
        sqlx::QueryBuilder::<MySql>::new("INSERT INTO gateway_flow_stats (flow_id, last_message_at) ");
    upsert.push_values(&flows, |mut row, flow| {
        row.push_bind(*flow).push("UTC_TIMESTAMP(3)");
    });
    upsert.push(" ON DUPLICATE KEY UPDATE last_message_at = VALUES(last_message_at)");
    upsert.build().execute(&mut **tx).await?;
    Ok(())
}

/// When each flow last took a message (`gateway_flow_stats`), as the database prints it.
pub async fn last_message_times(pool: &MySqlPool) -> Result<Vec<(i32, String)>, sqlx::Error> {
    sqlx::query_as("SELECT flow_id, CAST(last_message_at AS CHAR) FROM gateway_flow_stats")
        .fetch_all(pool)
        .await
}
