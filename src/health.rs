//! Health: what the pipeline says about itself. The broker session and the processor beat
//! here as they make progress; the processor counts what it wrote and says what it is waiting
//! for. The systemd watchdog and status lines read it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often an idle session or processor beats anyway, to show it is not wedged.
pub const BEAT: Duration = Duration::from_millis(250);

pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of each part's last turn of its loop.
    session: AtomicU64,
    processor: AtomicU64,
    processed: AtomicU64,
    waiting_for: Mutex<Option<String>>,
    broker_connected: AtomicBool,
    /// Topic filters the broker refused on the current connection.
    refused: Mutex<Vec<String>>,
    /// Startup is complete: subscribed, flows loaded.
    ready: AtomicBool,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            started: Instant::now(),
            session: AtomicU64::new(0),
            processor: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            waiting_for: Mutex::new(None),
            broker_connected: AtomicBool::new(false),
            refused: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
        }
    }
}

impl Health {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn beat_session(&self) {
        self.session.store(self.now(), Ordering::Relaxed);
    }

    pub fn beat_processor(&self) {
        self.processor.store(self.now(), Ordering::Relaxed);
    }

    pub fn add_processed(&self, messages: u64) {
        self.processed.fetch_add(messages, Ordering::Relaxed);
    }

    pub fn processed(&self) -> u64 {
        self.processed.load(Ordering::Relaxed)
    }

    /// What the gateway waits for (say, the database), or `None` when it waits for nothing.
    pub fn set_waiting_for(&self, what: Option<String>) {
        *self.waiting_for.lock().unwrap_or_else(|p| p.into_inner()) = what;
    }

    pub fn waiting_for(&self) -> Option<String> {
        self.waiting_for.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
        metrics::gauge!("mqtt_gateway_broker_connected").set(if connected { 1.0 } else { 0.0 });
    }

    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
    }

    pub fn set_refused(&self, filters: Vec<String>) {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = filters;
    }

    pub fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Which part, if any, has not turned its loop within `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<&'static str> {
        let now = self.now();
        let limit = limit.as_millis() as u64;
        if now.saturating_sub(self.session.load(Ordering::Relaxed)) > limit {
            Some("the MQTT session")
        } else if now.saturating_sub(self.processor.load(Ordering::Relaxed)) > limit {
            Some("the processor")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_that_stops_beating_is_named() {
        let health = Health::default();
        health.beat_session();
        health.beat_processor();
        assert_eq!(health.stalled(Duration::from_secs(5)), None);
        std::thread::sleep(Duration::from_millis(30));
        health.beat_session();
        assert_eq!(health.stalled(Duration::from_millis(10)), Some("the processor"));
    }
}
