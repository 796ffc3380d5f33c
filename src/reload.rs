//! Flow reload: reads the enabled flows again every `FLOWS_RELOAD_INTERVAL_SECONDS`, at once on
//! SIGHUP, and when the flows version moved (another instance or the CLI changed the flows);
//! subscribes filters that are new, unsubscribes those no flow uses any more, and publishes the
//! new set to the processor.
//!
//! Why the version: with several instances in a shared group, a flow added on a filter they
//! all hold gets only the messages of the instances that know it. Each instance would learn of
//! it at its own reload, up to `FLOWS_RELOAD_INTERVAL_SECONDS` later; following the version,
//! every instance applies a change within [`FOLLOW_EVERY`] of the first one that did.

use crate::flows::{self, BrokenFlow, FlowRow, FlowSet};
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
/// How often the flows version is read.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(5);

/// Why a reload runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The interval or SIGHUP: a change found is announced to the other instances.
    Own,
    /// The flows version moved: someone else announced a change already.
    Followed,
}

pub struct Reloader {
    pool: MySqlPool,
    flows: watch::Sender<Arc<FlowSet>>,
    /// The rows the current set was made of, to tell whether a reload changed anything.
    rows: Vec<FlowRow>,
    /// The flows version as last read.
    version: i64,
    subscriber: SubscriptionHandle,
    /// Told when the flows changed, so that delivery follows an edited or disabled flow at once.
    outbox: Arc<crate::outbox::OutboxSignal>,
    /// Broken rows already reported, so each is logged once, and again only when it changes.
    reported: HashSet<(i32, String)>,
    health: Arc<Health>,
}

impl Reloader {
    /// `rows` made the current set; `version` was read before they were.
    pub fn new(
        pool: MySqlPool,
        flows: watch::Sender<Arc<FlowSet>>,
        rows: Vec<FlowRow>,
        version: i64,
        subscriber: SubscriptionHandle,
        outbox: Arc<crate::outbox::OutboxSignal>,
        health: Arc<Health>,
    ) -> Reloader {
        Reloader { pool, flows, rows, version, subscriber, outbox, reported: HashSet::new(), health }
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

    /// Runs until shutdown: one reload per interval, one per SIGHUP, and one whenever the
    /// flows version moved.
    pub async fn run(mut self, interval: Duration, mut hangup: Signal, shutdown: CancellationToken) {
        let mut next = tokio::time::Instant::now() + interval;
        let mut follow = tokio::time::interval(FOLLOW_EVERY);
        follow.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + interval;
                    self.reload_logged(Cause::Own).await;
                }
                _ = hangup.recv() => {
                    tracing::info!("SIGHUP received: reloading flows");
                    systemd::reloading();
                    self.reload_logged(Cause::Own).await;
                    systemd::ready(&systemd::describe(&self.health, &self.flows.borrow()));
                }
                _ = follow.tick() => match flows::table::version(&self.pool).await {
                    // The reload takes the version on once it has applied it: a reload that
                    // fails is tried again on the next tick.
                    Ok(version) if version != self.version => self.reload_logged(Cause::Followed).await,
                    Ok(_) => {}
                    // The next reload reports a database that stays away.
                    Err(error) => tracing::debug!("Cannot read the flows version: {error}"),
                },
            }
        }
    }

    async fn reload_logged(&mut self, cause: Cause) {
        if let Err(error) = self.reload(cause).await {
            tracing::error!("Error reloading flows: {error}");
        }
    }

    pub async fn reload(&mut self, cause: Cause) -> Result<(), sqlx::Error> {
        // Read before the rows, so the rows are at least this version: a change made after
        // this read moves the version past it, and is followed.
        let seen = flows::table::version(&self.pool).await?;
        let rows = flows::table::enabled(&self.pool).await?;
        // Compared and built off the runtime's thread, with the filters to subscribe before and
        // after (each a walk over every flow): with fifty thousand flows the comparison and the
        // build alone are 20 ms and 125 ms the processor and the session would otherwise stand
        // still for.
        let before_rows = std::mem::take(&mut self.rows);
        let current = Arc::clone(&self.flows.borrow());
        let (before_rows, rows, built) = tokio::task::spawn_blocking(move || {
            let built = (rows != before_rows).then(|| {
                let next = FlowSet::from_rows(rows.clone());
                let (before, after) = (current.subscriptions(), next.subscriptions());
                (next, before, after)
            });
            (before_rows, rows, built)
        })
        .await
        .expect("building a flow set does not panic");
        self.rows = before_rows;
        let Some((next, before, after)) = built else {
            // Nothing to rebuild (with fifty thousand flows, the build is what costs); only
            // filters the broker refused are asked for again, in case its ACL was fixed.
            if !self.health.refused().is_empty() {
                let wanted = self.flows.borrow().subscriptions();
                let _ = self.subscriber.want(wanted, SUBSCRIBE_WAIT).await;
            }
            self.version = seen;
            if cause == Cause::Followed {
                tracing::info!("Applied flows version {seen} (the flows were already up to date)");
            }
            return Ok(());
        };
        crate::metrics::record_flows(&next);
        self.report_broken(&next.broken);
        // New filters first, so the set published below never matches a message that the
        // broker was not yet asked for; a removed filter's stragglers simply match no flow.
        if after.iter().any(|(filter, id)| before.get(filter) != Some(id)) {
            let mut both = before.clone();
            both.extend(after.iter().map(|(filter, id)| (filter.clone(), *id)));
            if !self.subscriber.want(both, SUBSCRIBE_WAIT).await {
                tracing::warn!(
                    "The broker has not confirmed the new subscriptions within {SUBSCRIBE_WAIT:?}; \
                     they are sent once it is connected"
                );
            }
        }
        self.flows.send_replace(Arc::new(next));
        self.rows = rows;
        self.outbox.flows_changed();
        // Filters the broker refused are asked for again, in case its ACL was fixed.
        if after != before || !self.health.refused().is_empty() {
            // The session logs what the broker confirms ("Subscribed to", "Unsubscribed from").
            let _ = self.subscriber.want(after, SUBSCRIBE_WAIT).await;
        }
        self.version = seen;
        match cause {
            // Announced once applied here: the others follow within FOLLOW_EVERY. Taken on only
            // if no one else moved the version since it was read: a version skipped here would
            // be a change never followed.
            Cause::Own => {
                let bumped = flows::table::bump_version(&self.pool).await?;
                if bumped == seen + 1 {
                    self.version = bumped;
                }
            }
            Cause::Followed => tracing::info!(
                "Applied flows version {seen} (the flows were changed by another instance or the CLI)"
            ),
        }
        Ok(())
    }
}
