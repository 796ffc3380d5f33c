//! The outbox's statements outside delivery: queueing requests in the commit's transaction,
//! counting them for the metrics and `status`, listing and reviving them for the operator.

use super::{target, Target};
use crate::db::StatementBounds;
use sqlx::{MySql, MySqlPool, QueryBuilder, Row, Transaction};

/// One request to queue, in the transaction that moves its flow's counter.
pub struct NewRequest<'a> {
    pub flow_id: i32,
    pub flow_code: &'a str,
    /// Its flow's `endpoint_url` text, as the loaded row held it.
    pub url: &'a str,
    pub body: &'a str,
    pub msg_id: i32,
}

impl NewRequest<'_> {
    /// What its row costs in a statement (see [`crate::db::row_bytes`]).
    pub fn bytes(&self) -> usize {
        row_bytes(self.flow_code, self.url, self.body)
    }
}

/// What one request's row costs in a statement.
pub fn row_bytes(flow_code: &str, url: &str, body: &str) -> usize {
    crate::db::row_bytes(&[flow_code, url, body], 3)
}

/// Queues requests, due at once, with statements bounded by bytes and placeholders. Each row
/// records its body's length, so that deliverers can bound what they read by bytes without
/// reading bodies.
pub async fn insert(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    rows: &[NewRequest<'_>],
) -> Result<(), sqlx::Error> {
    for chunk in bounds.ladder(rows, 6, NewRequest::bytes) {
        let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT INTO gateway_outbox (flow_id, flow_code, endpoint_url, body, body_bytes, msg_id, created_at, \
             attempts, next_attempt_at, last_error, dead) ",
        );
        insert.push_values(chunk, |mut row, request| {
            row.push_bind(request.flow_id)
                .push_bind(request.flow_code)
                .push_bind(request.url)
                .push_bind(request.body)
                .push_bind(request.body.len() as i64)
                .push_bind(request.msg_id)
                .push("UTC_TIMESTAMP(3), 0, UTC_TIMESTAMP(3), NULL, FALSE");
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// `(pending, dead)` request counts over all flows.
pub async fn depth(pool: &MySqlPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT CAST(COALESCE(SUM(NOT dead), 0) AS SIGNED), CAST(COALESCE(SUM(dead), 0) AS SIGNED) FROM gateway_outbox",
    )
    .fetch_one(pool)
    .await
}

/// Per flow code with requests: how many are pending and how many dead.
pub async fn depth_by_flow(pool: &MySqlPool) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT flow_code, CAST(SUM(NOT dead) AS SIGNED), CAST(SUM(dead) AS SIGNED) FROM gateway_outbox GROUP BY flow_code",
    )
    .fetch_all(pool)
    .await
}

/// A request as an operator sees it.
pub struct Listed {
    pub id: i64,
    pub flow_code: String,
    pub msg_id: i32,
    pub attempts: i32,
    pub created_at: String,
    pub last_error: Option<String>,
    /// The URL its last attempt went to (before any, its flow's when queued).
    pub endpoint_url: String,
    pub dead: bool,
    /// Its flow's row now, which says where and whether it is sent.
    pub flow: Target,
}

/// The first `limit` pending (or dead) requests, oldest first, each with its flow's row.
pub async fn listing(pool: &MySqlPool, dead: bool, limit: i64) -> Result<Vec<Listed>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT o.id, o.flow_code, o.msg_id, o.attempts, CAST(o.created_at AS CHAR), o.last_error, \
         o.endpoint_url, f.id IS NOT NULL, COALESCE(f.enabled, FALSE) <> 0, f.action, f.endpoint_url \
         FROM gateway_outbox AS o LEFT JOIN flows AS f ON f.id = o.flow_id \
         WHERE o.dead = ? ORDER BY o.id LIMIT ?",
    )
    .bind(dead)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| Listed {
            id: row.get(0),
            flow_code: row.get(1),
            msg_id: row.get(2),
            attempts: row.get(3),
            created_at: row.get(4),
            last_error: row.get(5),
            endpoint_url: row.get(6),
            dead,
            flow: target(row.get::<bool, _>(7), row.get(8), row.get(9), row.get(10)),
        })
        .collect())
}

/// Makes dead requests (those named, or all with `None`) due again with fresh attempts;
/// returns how many. They go to their flow's URL of the moment they are sent.
pub async fn revive(pool: &MySqlPool, ids: Option<&[i64]>) -> Result<u64, sqlx::Error> {
    let mut query = QueryBuilder::<MySql>::new(
        "UPDATE gateway_outbox SET dead = FALSE, attempts = 0, next_attempt_at = UTC_TIMESTAMP(3) WHERE dead",
    );
    if let Some(ids) = ids {
        query.push(" AND id IN (");
        let mut list = query.separated(", ");
        for id in ids {
            list.push_bind(*id);
        }
        query.push(")");
    }
    Ok(query.build().execute(pool).await?.rows_affected())
}
