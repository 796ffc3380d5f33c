//! systemd: readiness, status lines, reload and stop notifications, and the watchdog.
//!
//! Each call is a no-op when `NOTIFY_SOCKET` is unset, so the gateway runs the same outside
//! systemd. `READY=1` is sent only once the schema is migrated, the broker has accepted the
//! connection and acknowledged every flow's subscription: a message published as soon as
//! systemd reports the unit active is delivered.
//!
//! The watchdog ping proves more than "the process has a running timer": it is sent only while
//! both the MQTT session loop and the processor have turned within half the watchdog interval.
//! A session stuck on a socket or a processor hung in a database call stops the pings, and
//! systemd restarts the unit; the messages it held were not acknowledged, so the broker
//! delivers them again. It does not prove that messages flow: an idle gateway with no traffic
//! is healthy.

use crate::flows::FlowSet;
use crate::health::Health;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the status line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

fn notify(states: &[NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!("Cannot notify systemd: {error}");
    }
}

pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// Before a reload: `Type=notify-reload` wants the monotonic time with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("Reloading flows")]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("Reloading flows")]),
    }
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("Stopping: finishing the messages in hand")]);
}

/// The status line `systemctl status` shows.
pub fn describe(health: &Health, flows: &FlowSet) -> String {
    match health.waiting_for() {
        Some(what) => format!("Waiting for {what}; {} messages processed", health.processed()),
        None => format!(
            "{} flows on {} topic filters; {} messages processed",
            flows.flows.len(),
            flows.filters().len(),
            health.processed()
        ),
    }
}

/// Pings the watchdog while the pipeline turns, and refreshes the status line, until shutdown.
pub async fn supervise(
    health: Arc<Health>,
    flows: watch::Receiver<Arc<FlowSet>>,
    shutdown: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let ping_every = watchdog.map_or(STATUS_EVERY, |interval| interval / 2);
    let mut ticker = tokio::time::interval(ping_every.min(STATUS_EVERY));
    let mut last_status = tokio::time::Instant::now();
    let mut reported_stall = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if watchdog.is_some() {
            match health.stalled(ping_every) {
                None => {
                    notify(&[NotifyState::Watchdog]);
                    reported_stall = false;
                }
                Some(part) if !reported_stall => {
                    tracing::error!(
                        "{part} has made no progress for {ping_every:?}; not pinging the systemd watchdog"
                    );
                    reported_stall = true;
                }
                Some(_) => {}
            }
        }
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = tokio::time::Instant::now();
            status(&describe(&health, &flows.borrow()));
        }
    }
}
