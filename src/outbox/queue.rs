//! The one place that reads and writes `gateway_outbox` (the queued POST_ENDPOINT requests)
//! and `gateway_outbox_leases` (which instance delivers which flow). The scheduler, the
//! commit, the metrics and the CLI all go through here.
//!
//! Every change a deliverer makes to a request is fenced on its lease: it joins the flow's
//! lease row and changes nothing unless this instance still owns it, in the same statement,
//! so a deliverer that lost its lease cannot undo what the new owner relies on. A deliverer's
//! writes are run again after a conflict with another instance's write (see [`retrying`]).

use crate::db::{self, StatementBounds};
use sqlx::{MySql, MySqlPool, QueryBuilder, Row, Transaction};
use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// One queued request, as a deliverer reads it.
pub struct Request {
    pub id: i64,
    pub flow_code: String,
    pub url: String,
    /// Shared with the HTTP client, which sends it without a copy.
    pub body: bytes::Bytes,
    pub attempts: u32,
    pub age: Duration,
    /// Time until it is due; `None` when due now.
    pub wait: Option<Duration>,
}

/// One request to queue, in the transaction that moves its flow's counter.
pub struct NewRequest<'a> {
    pub flow_id: i32,
    pub flow_code: &'a str,
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
    crate::db::row_bytes(&[flow_code, url, body], 2)
}

/// Queues requests, due at once, with statements bounded by bytes and placeholders.
pub async fn insert(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    rows: &[NewRequest<'_>],
) -> Result<(), sqlx::Error> {
    for chunk in bounds.chunks(rows, 5, NewRequest::bytes) {
        let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT INTO gateway_outbox (flow_id, flow_code, endpoint_url, body, msg_id, created_at, \
             attempts, next_attempt_at, last_error, dead) ",
        );
        insert.push_values(chunk, |mut row, request| {
            row.push_bind(request.flow_id)
                .push_bind(request.flow_code)
                .push_bind(request.url)
                .push_bind(request.body)
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
#[derive(sqlx::FromRow)]
pub struct Listed {
    pub id: i64,
    pub flow_code: String,
    pub msg_id: i32,
    pub attempts: i32,
    pub created_at: String,
    pub last_error: Option<String>,
    pub endpoint_url: String,
}

/// The first `limit` pending (or dead) requests, oldest first.
pub async fn listing(pool: &MySqlPool, dead: bool, limit: i64) -> Result<Vec<Listed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, flow_code, msg_id, attempts, CAST(created_at AS CHAR) AS created_at, last_error, endpoint_url \
         FROM gateway_outbox WHERE dead = ? ORDER BY id LIMIT ?",
    )
    .bind(dead)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Makes dead requests (those named, or all with `None`) due again with fresh attempts;
/// returns how many.
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

/// The queue as one instance's deliverers see it: reads, and writes fenced on this instance's
/// leases.
pub struct Queue {
    pool: MySqlPool,
    /// This instance's name in lease rows: its MQTT client id, stable across restarts, so a
    /// restarted instance takes its flows back at once.
    owner: String,
    lease: Duration,
}

impl Queue {
    pub fn new(pool: MySqlPool, owner: String, lease: Duration) -> Queue {
        Queue { pool, owner, lease }
    }

    /// Every flow with requests not yet delivered or dead.
    pub async fn flows_with_requests(&self) -> Result<HashSet<i32>, sqlx::Error> {
        let flows: Vec<i32> =
            sqlx::query_scalar("SELECT DISTINCT flow_id FROM gateway_outbox WHERE dead = FALSE")
                .fetch_all(&self.pool)
                .await?;
        Ok(flows.into_iter().collect())
    }

    /// Up to `limit` live requests of a flow from `from_id` on, oldest first.
    pub async fn fetch(&self, flow: i32, from_id: i64, limit: i64) -> Result<Vec<Request>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, flow_code, endpoint_url, body, attempts, \
             TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(3)), \
             TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), next_attempt_at) \
             FROM gateway_outbox WHERE dead = FALSE AND flow_id = ? AND id >= ? ORDER BY id LIMIT ?",
        )
        .bind(flow)
        .bind(from_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let micros = |i: usize| u64::try_from(row.get::<i64, _>(i)).ok().map(Duration::from_micros);
                Request {
                    id: row.get(0),
                    flow_code: row.get(1),
                    url: row.get(2),
                    body: row.get::<String, _>(3).into(),
                    attempts: row.get::<i32, _>(4).max(0) as u32,
                    age: micros(5).unwrap_or_default(),
                    wait: micros(6).filter(|w| !w.is_zero()),
                }
            })
            .collect())
    }

    /// Deletes delivered requests of a flow; false (and nothing deleted that the new owner
    /// still counts on) when this instance no longer owns the flow's lease.
    pub async fn delete_delivered(&self, flow: i32, ids: &[i64]) -> Result<bool, sqlx::Error> {
        if ids.is_empty() {
            return Ok(true);
        }
        let done = retrying(|| {
            let mut delete: QueryBuilder<MySql> = QueryBuilder::new(
                "DELETE o FROM gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 WHERE l.owner = ",
            );
            delete.push_bind(&self.owner).push(" AND o.flow_id = ").push_bind(flow).push(" AND o.id IN (");
            let mut separated = delete.separated(", ");
            for id in ids {
                separated.push_bind(*id);
            }
            delete.push(")");
            async move { delete.build().execute(&self.pool).await }
        })
        .await?;
        Ok(done.rows_affected() == ids.len() as u64)
    }

    /// Records a failed attempt: due again after `delay`, or dead. False when this instance no
    /// longer owns the flow's lease.
    pub async fn reschedule(
        &self,
        id: i64,
        attempts: u32,
        error: &str,
        dead: bool,
        delay: Duration,
    ) -> Result<bool, sqlx::Error> {
        let done = retrying(|| {
            sqlx::query(
                "UPDATE gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 SET o.attempts = ?, o.last_error = ?, o.dead = ?, \
                 o.next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND \
                 WHERE l.owner = ? AND o.id = ?",
            )
            .bind(attempts as i32)
            .bind(error)
            .bind(dead)
            .bind(delay.as_micros() as i64)
            .bind(&self.owner)
            .bind(id)
            .execute(&self.pool)
        })
        .await?;
        Ok(done.rows_affected() != 0)
    }

    /// Takes the flow's lease if it is free, expired, or already ours; returns until when it
    /// surely holds, timed from before the request so that it never outlives the row's
    /// `expires_at`.
    pub async fn acquire(&self, flow: i32) -> Result<Option<Instant>, sqlx::Error> {
        let sent = Instant::now();
        // MariaDB evaluates the assignments left to right, so `owner` in the second one is the
        // value the first one just set.
        sqlx::query(
            "INSERT INTO gateway_outbox_leases (flow_id, owner, expires_at) \
             VALUES (?, ?, UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE \
             owner = IF(expires_at < UTC_TIMESTAMP(3) OR owner = VALUES(owner), VALUES(owner), owner), \
             expires_at = IF(owner = VALUES(owner), VALUES(expires_at), expires_at)",
        )
        .bind(flow)
        .bind(&self.owner)
        .bind(self.lease.as_micros() as i64)
        .execute(&self.pool)
        .await?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT owner FROM gateway_outbox_leases WHERE flow_id = ?")
                .bind(flow)
                .fetch_optional(&self.pool)
                .await?;
        Ok((owner.as_deref() == Some(self.owner.as_str())).then(|| sent + self.lease))
    }

    /// Extends the lease if this instance still owns it (an expired lease nobody took is still
    /// ours: nobody else sent anything meanwhile).
    pub async fn renew(&self, flow: i32) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE gateway_outbox_leases SET expires_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND \
             WHERE flow_id = ? AND owner = ?",
        )
        .bind(self.lease.as_micros() as i64)
        .bind(flow)
        .bind(&self.owner)
        .execute(&self.pool)
        .await?;
        // sqlx asks for found rows, so an unchanged `expires_at` still counts.
        Ok(done.rows_affected() == 1)
    }

    /// Gives the lease back; one that cannot be given back runs out by itself.
    pub async fn release(&self, flow: i32) {
        let _ = retrying(|| {
            sqlx::query("DELETE FROM gateway_outbox_leases WHERE flow_id = ? AND owner = ?")
                .bind(flow)
                .bind(&self.owner)
                .execute(&self.pool)
        })
        .await;
    }
}

/// Conflicts one statement is run again after.
const CONFLICT_RETRIES: u32 = 5;

/// Runs one autocommitted statement, and again after a conflict (a deadlock, or a Galera
/// certification conflict with another instance's write; the statement was rolled back, so
/// running it again is running it once), up to [`CONFLICT_RETRIES`] times. Seen in the Galera
/// scenario: a delivery whose DELETE lost such a race counted as failed to record, and the
/// next holder sent its requests again.
async fn retrying<T, F, Fut>(mut statement: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    let mut conflicts = 0;
    loop {
        match statement().await {
            Err(error) if db::conflict(&error) && conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                tracing::debug!("Outbox write conflict ({error}); running it again");
                tokio::time::sleep(Duration::from_millis(rand::random_range(5..50))).await;
            }
            done => return done,
        }
    }
}
