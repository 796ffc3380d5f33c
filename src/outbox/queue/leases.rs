//! `gateway_outbox_leases`: which instance delivers which flow. Taken, renewed and given back on
//! the leases' own pool, so that a renewal never waits behind deliveries.

use super::{retrying, Queue};
use sqlx::MySqlPool;
use tokio::time::Instant;

impl Queue {
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
        .execute(&self.leases)
        .await?;
        Ok(self.owns_on(&self.leases, flow).await?.then(|| sent + self.lease))
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
        .execute(&self.leases)
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
                .execute(&self.leases)
        })
        .await;
    }

    /// Whether this instance owns the flow's lease, for a fenced write that changed no row.
    pub(super) async fn owns(&self, flow: i32) -> Result<bool, sqlx::Error> {
        self.owns_on(&self.pool, flow).await
    }

    async fn owns_on(&self, pool: &MySqlPool, flow: i32) -> Result<bool, sqlx::Error> {
        let owner: Option<String> =
            sqlx::query_scalar("SELECT owner FROM gateway_outbox_leases WHERE flow_id = ?")
                .bind(flow)
                .fetch_optional(pool)
                .await?;
        Ok(owner.as_deref() == Some(self.owner.as_str()))
    }
}
