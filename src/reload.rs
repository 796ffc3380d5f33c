//! Flow reload: reads the enabled flows again every `FLOWS_RELOAD_INTERVAL_SECONDS` and at once
//! on SIGHUP, subscribes filters that are new, unsubscribes those no flow uses any more, and
//! publishes the new set to the processor.

use crate::db;
use crate::flows::{BrokenFlow, FlowSet};
use crate::health::Health;
use crate::mqtt::{self, Subscriptions};
use crate::systemd;
use rumqttc::AsyncClient;
use sqlx::MySqlPool;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::Signal;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Reloader {
    pool: MySqlPool,
    flows: watch::Sender<Arc<FlowSet>>,
    client: AsyncClient,
    subscriptions: Subscriptions,
    /// Broken rows already reported, so each is logged once, and again only when it changes.
    reported: HashSet<(i32, String)>,
    health: Arc<Health>,
}

impl Reloader {
    pub fn new(
        pool: MySqlPool,
        flows: watch::Sender<Arc<FlowSet>>,
        client: AsyncClient,
        subscriptions: Subscriptions,
        health: Arc<Health>,
    ) -> Reloader {
        Reloader { pool, flows, client, subscriptions, reported: HashSet::new(), health }
    }

    /// Logs the broken rows of a set not yet reported.
    pub fn report_broken(&mut self, broken: &[BrokenFlow]) {
        let now: HashSet<(i32, String)> = broken.iter().map(|b| (b.id, b.reason.clone())).collect();
        for flow in broken {
            if !self.reported.contains(&(flow.id, flow.reason.clone())) {
                tracing::error!(
                    flow_code = %flow.code,
                    "Skipping flow {} (flow_id={}): {}",
                    flow.code,
                    flow.id,
                    flow.reason
                );
            }
        }
        self.reported = now;
    }

    /// Runs until shutdown: one reload per interval, and one per SIGHUP.
    pub async fn run(mut self, interval: Duration, mut hangup: Signal, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP received: reloading flows");
                    systemd::reloading();
                    self.reload_logged().await;
                    systemd::ready(&systemd::describe(&self.health, &self.flows.borrow()));
                    continue;
                }
            }
            self.reload_logged().await;
        }
    }

    async fn reload_logged(&mut self) {
        if let Err(error) = self.reload().await {
            tracing::error!("Error reloading flows: {error}");
        }
    }

    pub async fn reload(&mut self) -> Result<(), sqlx::Error> {
        let next = FlowSet::from_rows(db::enabled_flows(&self.pool).await?);
        crate::metrics::record_flows(&next);
        self.report_broken(&next.broken);
        let before = self.flows.borrow().filters();
        let after = next.filters();
        // New filters first, so the set published below never matches a message that the
        // broker was not yet asked for; a removed filter's stragglers simply match no flow.
        let added: Vec<_> = after.difference(&before).cloned().collect();
        for filter in &added {
            if let Err(error) =
                self.client.subscribe(self.subscriptions.broker_filter(filter), self.subscriptions.qos).await
            {
                tracing::error!("Cannot subscribe to {filter}: {error}");
            }
        }
        self.flows.send_replace(Arc::new(next));
        let removed: Vec<_> = before.difference(&after).cloned().collect();
        for filter in &removed {
            if let Err(error) = self.client.unsubscribe(self.subscriptions.broker_filter(filter)).await {
                tracing::error!("Cannot unsubscribe from {filter}: {error}");
            }
        }
        if !added.is_empty() {
            tracing::info!("Subscribed to {}", mqtt::join(&added.into_iter().collect()));
        }
        if !removed.is_empty() {
            tracing::info!("Unsubscribed from {}", mqtt::join(&removed.into_iter().collect()));
        }
        Ok(())
    }
}
