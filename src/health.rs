//! Health: what the pipeline says about itself. The broker session, the processor and the
//! outbox loop beat here each time they come back to their loop, and say when they wait on
//! something bounded (a database call with its timeout); the processor counts what it wrote and
//! says what it is waiting for. The systemd watchdog and status lines read it.
//!
//! A part is *stuck* when it has not come back to its loop within a limit although nothing it
//! waits on is outstanding: a bounded wait counts as a turn at the moment it must end by, so a
//! part waiting on the database (for a lock, say) is never stuck before its bound has run out.
//!
//! An idle part does not wake up on a timer to show it is alive: the watchdog pokes it
//! ([`Health::poke_quiet`]) when it checks, and a part that is not stuck comes back to its loop for
//! the poke. So an idle gateway wakes a few times per watchdog check, not several times a
//! second, and a stuck part is still found: it does not answer.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The parts that turn a loop of their own, and that the watchdog watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Session,
    Processor,
    Outbox,
}

impl Part {
    const ALL: [Part; 3] = [Part::Session, Part::Processor, Part::Outbox];

    pub fn name(self) -> &'static str {
        match self {
            Part::Session => "the MQTT session",
            Part::Processor => "the processor",
            Part::Outbox => "the outbox",
        }
    }
}

pub struct Health {
    started: Instant,
    /// Per part, milliseconds since `started` of its last turn of its loop.
    turned: [AtomicU64; 3],
    /// Per part, milliseconds since `started` by which the bounded wait it is in must end, or 0.
    waiting_until: [AtomicU64; 3],
    processed: AtomicU64,
    waiting_for: Mutex<Option<String>>,
    broker_connected: AtomicBool,
    /// Topic filters the broker refused on the current connection.
    refused: Mutex<Vec<String>>,
    /// Startup is complete: subscribed, flows loaded.
    ready: AtomicBool,
    /// Per part, the watchdog's request to come back to its loop.
    pokes: [Notify; 3],
}

impl Default for Health {
    fn default() -> Health {
        Health {
            started: Instant::now(),
            turned: Default::default(),
            waiting_until: Default::default(),
            processed: AtomicU64::new(0),
            waiting_for: Mutex::new(None),
            broker_connected: AtomicBool::new(false),
            refused: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            pokes: Default::default(),
        }
    }
}

/// A bounded wait in progress; the part counts as turning until its bound, and turns when the
/// wait ends.
pub struct Waiting<'h> {
    health: &'h Health,
    part: Part,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // The turn first, and published with the end of the wait: the watchdog never sees the
        // wait gone and the turn not yet there (see `stalled_at`).
        self.health.beat(self.part);
        self.health.waiting_until[self.part as usize].store(0, Ordering::Release);
    }
}

impl Health {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// `part` came back to its loop.
    pub fn beat(&self, part: Part) {
        self.turned[part as usize].store(self.now(), Ordering::Relaxed);
    }

    pub fn beat_session(&self) {
        self.beat(Part::Session);
    }

    pub fn beat_processor(&self) {
        self.beat(Part::Processor);
    }

    /// Asks every part that has not turned for `quiet` to come back to its loop (and so beat)
    /// once: what the watchdog does before it checks again. A part busy now keeps the request
    /// for its next wait.
    pub fn poke_quiet(&self, quiet: Duration) {
        let now = self.now();
        for part in Part::ALL {
            if now.saturating_sub(self.turned[part as usize].load(Ordering::Relaxed))
                >= quiet.as_millis() as u64
            {
                self.pokes[part as usize].notify_one();
            }
        }
    }

    /// Resolves when `part` is poked: each part waits on this beside its own work.
    pub async fn poked(&self, part: Part) {
        self.pokes[part as usize].notified().await
    }

    /// `part` waits on something that ends by itself within `bound` (a timeout enforces it),
    /// until the returned guard is dropped. A part is in one such wait at a time.
    pub fn waiting(&self, part: Part, bound: Duration) -> Waiting<'_> {
        let until = self.now().saturating_add(bound.as_millis() as u64).max(1);
        self.waiting_until[part as usize].store(until, Ordering::Relaxed);
        Waiting { health: self, part }
    }

    /// Awaits `work` for at most `bound`, `part` counting as waiting meanwhile: `None` when the
    /// bound ran out first (and `work` was dropped).
    pub async fn within<T>(&self, part: Part, bound: Duration, work: impl Future<Output = T>) -> Option<T> {
        let _waiting = self.waiting(part, bound);
        tokio::time::timeout(bound, work).await.ok()
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

    /// Which part, if any, is stuck: it has not turned its loop within `limit`, counting a
    /// bounded wait as a turn at the moment the wait must end by.
    pub fn stalled(&self, limit: Duration) -> Option<&'static str> {
        self.stalled_at(self.now(), limit)
    }

    fn stalled_at(&self, now: u64, limit: Duration) -> Option<&'static str> {
        let limit = limit.as_millis() as u64;
        Part::ALL.into_iter().find_map(|part| {
            let waiting_until = self.waiting_until[part as usize].load(Ordering::Acquire);
            let turned = self.turned[part as usize].load(Ordering::Relaxed);
            (now.saturating_sub(turned.max(waiting_until)) > limit).then_some(part.name())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets when each part last turned, in milliseconds since start.
    fn turned(health: &Health, at: [u64; 3]) {
        for (i, ms) in at.into_iter().enumerate() {
            health.turned[i].store(ms, Ordering::Relaxed);
        }
    }

    const LIMIT: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn only_quiet_parts_are_poked() {
        let health = Health { started: Instant::now() - Duration::from_secs(20), ..Health::default() };
        let now = health.now();
        turned(&health, [now, now - 10_000, now]);
        health.poke_quiet(Duration::from_secs(5));
        let poked = |part| tokio::time::timeout(Duration::from_millis(20), health.poked(part));
        assert!(poked(Part::Processor).await.is_ok(), "quiet for 10 s: poked");
        assert!(poked(Part::Session).await.is_err(), "just turned: left to sleep");
        assert!(poked(Part::Outbox).await.is_err());
    }

    #[test]
    fn a_part_that_stops_turning_is_named() {
        let health = Health::default();
        turned(&health, [1_000, 1_000, 1_000]);
        assert_eq!(health.stalled_at(1_400, LIMIT), None);
        turned(&health, [1_400, 1_000, 1_400]);
        assert_eq!(health.stalled_at(1_600, LIMIT), Some("the processor"));
        turned(&health, [1_400, 1_400, 1_000]);
        assert_eq!(health.stalled_at(1_600, LIMIT), Some("the outbox"));
        turned(&health, [1_000, 1_400, 1_400]);
        assert_eq!(health.stalled_at(1_600, LIMIT), Some("the MQTT session"));
    }

    #[test]
    fn a_bounded_wait_is_not_stuck_until_its_bound_has_passed() {
        let health = Health::default();
        turned(&health, [0, 0, 0]);
        let waiting = health.waiting(Part::Outbox, Duration::from_secs(3_600));
        let until = health.waiting_until[Part::Outbox as usize].load(Ordering::Relaxed);
        turned(&health, [until + 600, until + 600, 0]);
        assert_eq!(health.stalled_at(until / 2, LIMIT), None, "waiting within its bound");
        assert_eq!(health.stalled_at(until + 400, LIMIT), None, "just past its bound");
        assert_eq!(health.stalled_at(until + 600, LIMIT), Some("the outbox"), "its bound and the limit past");
        drop(waiting);
        assert_eq!(health.waiting_until[Part::Outbox as usize].load(Ordering::Relaxed), 0);
        assert!(
            health.turned[Part::Outbox as usize].load(Ordering::Relaxed) < until,
            "the wait ended: a turn now"
        );
    }

    #[tokio::test]
    async fn within_gives_up_at_its_bound() {
        let health = Health::default();
        let never = std::future::pending::<()>();
        assert_eq!(health.within(Part::Processor, Duration::from_millis(20), never).await, None);
        assert_eq!(health.within(Part::Processor, Duration::from_secs(5), async { 7 }).await, Some(7));
        assert_eq!(health.waiting_until[Part::Processor as usize].load(Ordering::Relaxed), 0);
    }
}
