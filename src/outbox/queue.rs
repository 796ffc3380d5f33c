//! The one place that reads and writes `gateway_outbox` (the queued POST_ENDPOINT requests),
//! `gateway_outbox_leases` (which instance delivers which flow) and `gateway_outbox_holds`
//! (since when a flow's requests are held, and since when they age again). The scheduler, the
//! commit, the metrics and the CLI all go through here. What the operator and the commit do
//! (queue, count, list, revive) is in [`admin`], the lease rows in `leases`, the holds in
//! `holds`; this file is what deliverers do with requests.
//!
//! Delivery reads the `flows` table too, joined on `flow_id`: where and whether a request is
//! sent is its flow's row at send time (see [`crate::outbox`]), never a copy.
//!
//! Every change a deliverer makes to a request is fenced on its lease: it joins the flow's
//! lease row and changes nothing unless this instance still owns it, in the same statement,
//! so a deliverer that lost its lease cannot undo what the new owner relies on. A deliverer's
//! writes are run again after a conflict with another instance's write (see [`retrying`]).

mod admin;
mod holds;
mod leases;

pub use admin::*;

// Every write of the outbox: seen in the Galera scenario, a delivery whose DELETE lost a
// certification conflict counted as failed to record, and the next holder sent its requests
// again.
use crate::db::retrying_conflicts as retrying;
use chrono::NaiveDateTime;
use futures_util::TryStreamExt;
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};
use std::collections::HashMap;
use std::time::Duration;

/// Bodies longer than this are read in pieces of this size.
pub const PIECE: u64 = 1 << 20;

/// Characters `gateway_outbox.endpoint_url` holds: as many as `flows.endpoint_url`, whose text
/// it keeps. A flow whose URL is longer (a widened `flows` column) is refused at load.
pub const URL_CHARS: usize = 500;

/// What a flow's row says at one read, as far as its requests are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No `flows` row has the request's `flow_id` any more.
    Deleted,
    Row {
        enabled: bool,
        action: String,
        endpoint_url: Option<String>,
    },
}

/// One flow with requests waiting, as the scheduler reads it.
pub struct Pending {
    pub flow: i32,
    /// Until its earliest request is due; zero when one is due now.
    pub first_due: Duration,
    /// Until its latest request is due. Delivering in order only the head ever waits for a
    /// retry, so this is when an ordered flow may go on.
    pub last_due: Duration,
    pub target: Target,
    /// A request waits for a retry at another URL than its flow's now: the wait is void.
    pub url_changed: bool,
    /// A hold of its requests is on record (see [`Queue::note_held`]).
    pub hold_recorded: bool,
}

/// One queued request without its body, as a deliverer reads it before deciding to send it.
#[derive(Debug, Clone)]
pub struct Queued {
    pub id: i64,
    pub flow_code: String,
    /// The URL its last attempt went to; before any attempt, its flow's when it was queued.
    pub url: String,
    /// Its body's length; `None` for a row a version that did not record it wrote.
    pub bytes: Option<u64>,
    pub attempts: u32,
    /// How long it has been aging: since it was queued, or since its flow's last hold ended.
    pub age: Duration,
    /// Until it is due; zero when due now.
    pub wait: Duration,
    /// Its `next_attempt_at`, for reading on after it (unordered delivery).
    pub due_at: NaiveDateTime,
}

/// The queue as one instance's deliverers see it: reads, and writes fenced on this instance's
/// leases. Requests and leases go through pools of their own (see [`db::Purpose`]).
pub struct Queue {
    pool: MySqlPool,
    leases: MySqlPool,
    /// This instance's name in lease rows: its MQTT client id, stable across restarts, so a
    /// restarted instance takes its flows back at once.
    owner: String,
    lease: Duration,
}

/// The columns of [`Queued`], in order, from `gateway_outbox AS o` and `gateway_outbox_holds
/// AS h`.
const QUEUED: &str = "SELECT o.id, o.flow_code, o.endpoint_url, o.body_bytes, o.attempts, \
     TIMESTAMPDIFF(MICROSECOND, GREATEST(o.created_at, COALESCE(h.aging_from, o.created_at)), UTC_TIMESTAMP(3)), \
     TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), o.next_attempt_at), o.next_attempt_at \
     FROM gateway_outbox AS o LEFT JOIN gateway_outbox_holds AS h ON h.flow_id = o.flow_id ";

fn micros(value: Option<i64>) -> Duration {
    Duration::from_micros(value.unwrap_or(0).max(0) as u64)
}

fn queued(row: &sqlx::mysql::MySqlRow) -> Queued {
    Queued {
        id: row.get(0),
        flow_code: row.get(1),
        url: row.get(2),
        bytes: row.get::<Option<i64>, _>(3).map(|b| b.max(0) as u64),
        attempts: row.get::<i32, _>(4).max(0) as u32,
        age: micros(row.get(5)),
        wait: micros(row.get(6)),
        due_at: row.get(7),
    }
}

impl Queue {
    pub fn new(pool: MySqlPool, leases: MySqlPool, owner: String, lease: Duration) -> Queue {
        Queue { pool, leases, owner, lease }
    }

    /// Every flow with requests not yet delivered or dead, with its schedule and its row. Read
    /// by index, per flow and not per request (the smallest and largest `next_attempt_at` of
    /// each flow), so it costs the same with a backlog of any length.
    pub async fn pending(&self) -> Result<Vec<Pending>, sqlx::Error> {
        // The URL test looks at the request whose retry is furthest away: every request that
        // waits for a retry was last tried at the URL its flow had then (a changed URL makes
        // them all due at once, see `void_retries`), so one of them tells for all.
        let rows = sqlx::query(
            "SELECT s.flow_id, \
             TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), s.first_due), \
             TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), s.last_due), \
             f.id IS NOT NULL, COALESCE(f.enabled, FALSE) <> 0, f.action, f.endpoint_url, \
             s.last_due > UTC_TIMESTAMP(3) AND NOT EXISTS (SELECT 1 FROM gateway_outbox AS p \
                 WHERE p.dead = FALSE AND p.flow_id = s.flow_id AND p.next_attempt_at = s.last_due \
                 AND BINARY p.endpoint_url = BINARY f.endpoint_url), \
             h.held_since IS NOT NULL \
             FROM (SELECT flow_id, MIN(next_attempt_at) AS first_due, MAX(next_attempt_at) AS last_due \
                   FROM gateway_outbox WHERE dead = FALSE GROUP BY flow_id) AS s \
             LEFT JOIN flows AS f ON f.id = s.flow_id \
             LEFT JOIN gateway_outbox_holds AS h ON h.flow_id = s.flow_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| Pending {
                flow: row.get(0),
                first_due: micros(row.get(1)),
                last_due: micros(row.get(2)),
                target: target(row.get::<bool, _>(3), row.get(4), row.get(5), row.get(6)),
                url_changed: row.get::<Option<bool>, _>(7).unwrap_or(false),
                hold_recorded: row.get(8),
            })
            .collect())
    }

    /// A flow's row now, and whether a hold of its requests is on record.
    pub async fn target(&self, flow: i32) -> Result<(Target, bool), sqlx::Error> {
        let row = sqlx::query(
            "SELECT f.enabled <> 0, f.action, f.endpoint_url, h.held_since IS NOT NULL \
             FROM flows AS f LEFT JOIN gateway_outbox_holds AS h ON h.flow_id = f.id WHERE f.id = ?",
        )
        .bind(flow)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => (Target::Deleted, false),
            Some(row) => (target(true, row.get(0), row.get(1), row.get(2)), row.get(3)),
        })
    }

    /// The URL the request of the flow whose retry is furthest away was last tried at, if one
    /// waits for a retry.
    pub async fn retried_url(&self, flow: i32) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT endpoint_url FROM gateway_outbox WHERE dead = FALSE AND flow_id = ? \
             AND next_attempt_at > UTC_TIMESTAMP(3) ORDER BY next_attempt_at DESC LIMIT 1",
        )
        .bind(flow)
        .fetch_optional(&self.pool)
        .await
    }

    /// Up to `limit` live requests of a flow from `from_id` on, oldest first, without bodies.
    pub async fn in_order(&self, flow: i32, from_id: i64, limit: i64) -> Result<Vec<Queued>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "{QUEUED} WHERE o.dead = FALSE AND o.flow_id = ? AND o.id >= ? ORDER BY o.id LIMIT ?"
        ))
        .bind(flow)
        .bind(from_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(queued).collect())
    }

    /// Up to `limit` requests of a flow that are due, soonest due first, after `after` (a
    /// request read before) when given, without bodies.
    pub async fn due(
        &self,
        flow: i32,
        after: Option<(NaiveDateTime, i64)>,
        limit: i64,
    ) -> Result<Vec<Queued>, sqlx::Error> {
        let mut query = QueryBuilder::<MySql>::new(QUEUED);
        query
            .push("WHERE o.dead = FALSE AND o.flow_id = ")
            .push_bind(flow)
            .push(" AND o.next_attempt_at <= UTC_TIMESTAMP(3)");
        if let Some((due_at, id)) = after {
            query
                .push(" AND (o.next_attempt_at > ")
                .push_bind(due_at)
                .push(" OR (o.next_attempt_at = ")
                .push_bind(due_at)
                .push(" AND o.id > ")
                .push_bind(id)
                .push("))");
        }
        query.push(" ORDER BY o.next_attempt_at, o.id LIMIT ").push_bind(limit);
        let rows = query.build().fetch_all(&self.pool).await?;
        Ok(rows.iter().map(queued).collect())
    }

    /// The bodies of these requests (those still queued), by id and recorded length. Small
    /// bodies come in one statement, one row at a time; a body longer than [`PIECE`] (or of an
    /// unknown length) in pieces of that size, so that reading it never holds more than the body
    /// itself and one piece.
    pub async fn bodies(
        &self,
        requests: impl IntoIterator<Item = (i64, Option<u64>)>,
    ) -> Result<HashMap<i64, bytes::Bytes>, sqlx::Error> {
        let (small, large): (Vec<_>, Vec<_>) =
            requests.into_iter().partition(|(_, length)| length.is_some_and(|l| l <= PIECE));
        let mut bodies = HashMap::with_capacity(small.len() + large.len());
        if !small.is_empty() {
            let mut query = QueryBuilder::<MySql>::new("SELECT id, body FROM gateway_outbox WHERE id IN (");
            let mut list = query.separated(", ");
            for (id, _) in &small {
                list.push_bind(*id);
            }
            query.push(")");
            let mut rows = query.build().fetch(&self.pool);
            while let Some(row) = rows.try_next().await? {
                let body: &str = row.try_get(1)?;
                bodies.insert(row.try_get(0)?, bytes::Bytes::copy_from_slice(body.as_bytes()));
            }
        }
        for (id, length) in large {
            if let Some(body) = self.body_in_pieces(id, length).await? {
                bodies.insert(id, body);
            }
        }
        Ok(bodies)
    }

    /// One body, [`PIECE`] characters at a time (bodies are JSON with every non-ASCII character
    /// escaped, so characters are bytes); `None` when the request is gone.
    async fn body_in_pieces(
        &self,
        id: i64,
        length: Option<u64>,
    ) -> Result<Option<bytes::Bytes>, sqlx::Error> {
        let mut body = bytes::BytesMut::with_capacity(length.unwrap_or(PIECE) as usize);
        let mut from = 1u64;
        loop {
            let piece: Option<String> =
                sqlx::query_scalar("SELECT SUBSTRING(body, ?, ?) FROM gateway_outbox WHERE id = ?")
                    .bind(from as i64)
                    .bind(PIECE as i64)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
            let Some(piece) = piece else { return Ok(None) };
            body.extend_from_slice(piece.as_bytes());
            if (piece.chars().count() as u64) < PIECE {
                return Ok(Some(body.freeze()));
            }
            from += PIECE;
        }
    }

    /// Deletes delivered requests of a flow; false (and nothing deleted that the new owner
    /// still counts on) when this instance no longer owns the flow's lease. Fewer rows than
    /// asked is no proof of that: the operator may have deleted or revived some meanwhile.
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
        if done.rows_affected() == ids.len() as u64 {
            return Ok(true);
        }
        self.owns(flow).await
    }

    /// Records a failed attempt at `url`: due again after `delay`, or dead. False when this
    /// instance no longer owns the flow's lease.
    pub async fn reschedule(&self, flow: i32, id: i64, failed: &Failed<'_>) -> Result<bool, sqlx::Error> {
        let done = retrying(|| {
            sqlx::query(
                "UPDATE gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 SET o.endpoint_url = ?, o.attempts = ?, o.last_error = ?, o.dead = ?, \
                 o.next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND \
                 WHERE l.owner = ? AND o.id = ?",
            )
            .bind(failed.url)
            .bind(failed.attempts as i32)
            .bind(failed.error)
            .bind(failed.dead)
            .bind(failed.delay.as_micros() as i64)
            .bind(&self.owner)
            .bind(id)
            .execute(&self.pool)
        })
        .await?;
        if done.rows_affected() != 0 {
            return Ok(true);
        }
        // The request may be gone by the operator's hand rather than the lease.
        self.owns(flow).await
    }

    /// Makes every request of the flow that waits for a retry due now: its flow's URL changed
    /// since, and what the old one answered says nothing about the new one. False when this
    /// instance no longer owns the flow's lease.
    pub async fn void_retries(&self, flow: i32) -> Result<bool, sqlx::Error> {
        let owned = retrying(|| {
            sqlx::query(
                "UPDATE gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 SET o.next_attempt_at = UTC_TIMESTAMP(3) \
                 WHERE l.owner = ? AND o.dead = FALSE AND o.flow_id = ? AND o.next_attempt_at > UTC_TIMESTAMP(3)",
            )
            .bind(&self.owner)
            .bind(flow)
            .execute(&self.pool)
        })
        .await?;
        if owned.rows_affected() > 0 {
            return Ok(true);
        }
        self.owns(flow).await
    }

    /// Keeps the requests of a flow whose row is gone as dead, `last_error = 'flow deleted'`,
    /// if it is still gone; returns its code and how many, or `None` without the lease.
    pub async fn bury_deleted(&self, flow: i32) -> Result<Option<(String, u64)>, sqlx::Error> {
        let code: Option<String> = sqlx::query_scalar(
            "SELECT flow_code FROM gateway_outbox WHERE dead = FALSE AND flow_id = ? LIMIT 1",
        )
        .bind(flow)
        .fetch_optional(&self.pool)
        .await?;
        let done = retrying(|| {
            sqlx::query(
                "UPDATE gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 SET o.dead = TRUE, o.last_error = 'flow deleted' \
                 WHERE l.owner = ? AND o.dead = FALSE AND o.flow_id = ? \
                 AND NOT EXISTS (SELECT 1 FROM flows WHERE id = ?)",
            )
            .bind(&self.owner)
            .bind(flow)
            .bind(flow)
            .execute(&self.pool)
        })
        .await?;
        if done.rows_affected() == 0 && !self.owns(flow).await? {
            return Ok(None);
        }
        sqlx::query("DELETE FROM gateway_outbox_holds WHERE flow_id = ?")
            .bind(flow)
            .execute(&self.pool)
            .await?;
        Ok(Some((code.unwrap_or_default(), done.rows_affected())))
    }
}

/// A failed attempt, as recorded.
pub struct Failed<'a> {
    /// The flow's `endpoint_url` text it went to.
    pub url: &'a str,
    pub attempts: u32,
    pub error: &'a str,
    pub dead: bool,
    pub delay: Duration,
}

fn target(exists: bool, enabled: bool, action: Option<String>, endpoint_url: Option<String>) -> Target {
    match exists {
        false => Target::Deleted,
        true => Target::Row { enabled, action: action.unwrap_or_default(), endpoint_url },
    }
}
