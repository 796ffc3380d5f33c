//! `gateway_outbox_holds`: since when a flow's requests are held (its flow disabled, or unable to
//! post), and since when they age again, so that held requests do not age into dead ones.

use super::Queue;
use sqlx::{MySql, QueryBuilder};

impl Queue {
    /// Notes that these flows' requests are held from now on, unless a hold is on record.
    pub async fn note_held(&self, flows: &[i32]) -> Result<(), sqlx::Error> {
        if flows.is_empty() {
            return Ok(());
        }
        let mut upsert =
            QueryBuilder::<MySql>::new("INSERT INTO gateway_outbox_holds (flow_id, held_since, aging_from) ");
        upsert.push_values(flows, |mut row, flow| {
            row.push_bind(*flow).push("UTC_TIMESTAMP(3), NULL");
        });
        upsert.push(" ON DUPLICATE KEY UPDATE held_since = COALESCE(held_since, VALUES(held_since))");
        upsert.build().execute(&self.pool).await.map(drop)
    }

    /// Notes that a flow's hold ended: its requests age from now on, as if queued now.
    pub async fn note_released(&self, flow: i32) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE gateway_outbox_holds SET held_since = NULL, aging_from = UTC_TIMESTAMP(3) \
             WHERE flow_id = ? AND held_since IS NOT NULL",
        )
        .bind(flow)
        .execute(&self.pool)
        .await
        .map(drop)
    }
}
