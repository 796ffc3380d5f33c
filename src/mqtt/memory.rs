//! The memory of what the broker's session holds: the subscriptions the broker confirmed to
//! this client id, kept in `gateway_subscriptions` so that they survive the gateway's restarts.

use std::collections::BTreeMap;
use tokio::sync::mpsc;

/// What the broker confirmed to this client id, kept in `gateway_subscriptions` so that it
/// survives the gateway's restarts. With a persistent session the broker keeps subscriptions
/// too; subscribing again would make it resend every retained message, which the gateway
/// would store again. So when the broker says the session is present, the filters it is known
/// to hold are not subscribed again. Rows are written after the SUBACK and deleted before the
/// UNSUBSCRIBE: the table never claims more than the broker holds.
pub struct Memory {
    pool: sqlx::MySqlPool,
    client_id: String,
    /// Per topic filter: the filter as sent (with its shared group) and the QoS asked.
    pub(super) known: BTreeMap<String, (String, u8)>,
}

impl Memory {
    pub async fn load(pool: sqlx::MySqlPool, client_id: String) -> Result<Memory, sqlx::Error> {
        let rows = crate::db::remembered_subscriptions(&pool, &client_id).await?;
        let known = rows.into_iter().map(|r| (r.topic_filter, (r.broker_filter, r.qos as u8))).collect();
        Ok(Memory { pool, client_id, known })
    }

    pub(super) fn remember(&mut self, entries: Vec<crate::db::SubscriptionRow>) {
        for row in &entries {
            self.known.insert(row.topic_filter.clone(), (row.broker_filter.clone(), row.qos as u8));
        }
        let (pool, client_id) = (self.pool.clone(), self.client_id.clone());
        tokio::spawn(async move {
            if let Err(error) = crate::db::remember_subscriptions(&pool, &client_id, &entries).await {
                // Harmless: the filters are subscribed again after the next restart.
                tracing::debug!("Cannot record subscriptions: {error}");
            }
        });
    }

    /// Forgets `filters` (all when `None`), then reports on `done` whether it worked.
    pub(super) fn forget(
        &mut self,
        filters: Option<Vec<String>>,
        done: Option<(mpsc::UnboundedSender<Forgotten>, u64)>,
    ) {
        match &filters {
            Some(filters) => filters.iter().for_each(|f| {
                self.known.remove(f);
            }),
            None => self.known.clear(),
        }
        let (pool, client_id) = (self.pool.clone(), self.client_id.clone());
        tokio::spawn(async move {
            let forgotten = crate::db::forget_subscriptions(&pool, &client_id, filters.as_deref()).await;
            if let Err(error) = &forgotten {
                tracing::warn!(
                    "Cannot update gateway_subscriptions, keeping the subscriptions for now: {error}"
                );
            }
            if let (Some((done, connection)), Some(filters)) = (done, filters) {
                let _ = done.send(Forgotten { connection, filters, ok: forgotten.is_ok() });
            }
        });
    }
}

/// Filters forgotten in `gateway_subscriptions`, ready to be unsubscribed.
pub(super) struct Forgotten {
    pub(super) connection: u64,
    pub(super) filters: Vec<String>,
    pub(super) ok: bool,
}
