//! Flow reload: reads the enabled flows again every `FLOWS_RELOAD_INTERVAL_SECONDS` and at once
//! on SIGHUP, subscribes filters that are new, unsubscribes those no flow uses any more, and
//! publishes the new set to the processor.

use crate::flows::{self, BrokenFlow, FlowSet};
use crate::health::Health;
use crate::mqtt::SubscriptionHandle;
use crate::systemd;
use sqlx::MySqlPool;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::Signal;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a reload waits for the broker to confirm changed subscriptions.
const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);

pub struct Reloader {
    pool: MySqlPool,
    flows: watch::Sender<Arc<FlowSet>>,
    subscriber: SubscriptionHandle,
    /// Broken rows already reported, so each is logged once, and again only when it changes.
    reported: HashSet<(i32, String)>,
    health: Arc<Health>,
}

impl Reloader {
    pub fn new(
        pool: MySqlPool,
        flows: watch::Sender<Arc<FlowSet>>,
        subscriber: SubscriptionHandle,
        health: Arc<Health>,
    ) -> Reloader {
        Reloader { pool, flows, subscriber, reported: HashSet::new(), health }
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
        let next = FlowSet::from_rows(flows::table::enabled(&self.pool).await?);
        crate::metrics::record_flows(&next);
        self.report_broken(&next.broken);
        let before = self.flows.borrow().filters();
        let after = next.filters();
        // New filters first, so the set published below never matches a message that the
        // broker was not yet asked for; a removed filter's stragglers simply match no flow.
        if !after.is_subset(&before) {
            let both = before.union(&after).cloned().collect();
            if !self.subscriber.want(both, SUBSCRIBE_WAIT).await {
                tracing::warn!(
                    "The broker has not confirmed the new subscriptions within {SUBSCRIBE_WAIT:?}; \
                     they are sent once it is connected"
                );
            }
        }
        self.flows.send_replace(Arc::new(next));
        if after != before {
            // The session logs what the broker confirms ("Subscribed to", "Unsubscribed from").
            let _ = self.subscriber.want(after, SUBSCRIBE_WAIT).await;
        }
        Ok(())
    }
}
