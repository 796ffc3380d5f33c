//! The outbox: sends the POST_ENDPOINT requests that the processor committed to
//! `gateway_outbox`, retries them until the endpoint takes them, and keeps the ones it never
//! will take as dead.
//!
//! **The flow decides, at send time.** A request goes to its flow's `endpoint_url` as the
//! `flows` row holds it when the request is sent, not when it was queued (an endpoint is
//! addressed by its flow, as webhook services address theirs by identity). So:
//! - an edited URL applies to every pending request, and voids the retries scheduled by what
//!   the old URL answered: they are due at once, and their attempts count again from one;
//! - while the flow is disabled (or its row names no URL it could post to) its requests are
//!   held: no attempt, and they do not age (`HTTP_MAX_AGE_SECONDS` counts from the end of the
//!   last hold);
//! - once the flow's row is deleted its requests are kept as dead, `last_error = 'flow deleted'`.
//!
//! **The schedule is in the table** (`next_attempt_at`), so every instance keeps it: each
//! instance reads, once a second and by index, when each flow is next due (per flow, not per
//! request), and delivers a flow only then. A body is read only to be sent.
//!
//! Each flow's requests are sent by one task at a time (see `round`). With `HTTP_ORDERED=true`
//! they go oldest first, one at a time, so they arrive in the order their messages did, and a
//! request waiting for its retry holds the later ones back (`ordered`); with `false` every
//! request has its own schedule and is sent as soon as it is due (`unordered`). Which instance
//! sends a flow is decided by a lease row in `gateway_outbox_leases` (`OUTBOX_LEASE_SECONDS`),
//! held at every request:
//! - while a flow is being delivered its lease is renewed every third of its length, beside the
//!   requests, however long each of them takes;
//! - a request is started only while the lease is known to hold for another third of its
//!   length, and is abandoned at once when a renewal finds it lost;
//! - outcomes are recorded within 20 ms of the answer (in order, before the next request
//!   leaves once a request takes that long); recording is fenced: a row is deleted (or
//!   rescheduled) only while this instance still owns the lease, so a deliverer that lost it
//!   changes nothing the new owner relies on.
//!
//! So with several instances nothing is sent twice and each flow stays in order; after a crash
//! of the holder, another instance takes over once the lease has run out, and resends the
//! requests that were in flight, plus, for an endpoint faster than 20 ms, those answered in the
//! 20 ms before the crash. Requests to one endpoint (scheme, host, port) are in flight
//! `HTTP_CONCURRENCY` at a time at most, over pooled keep-alive connections, and the bodies read
//! and not yet answered take `HTTP_MAX_IN_FLIGHT_BYTES` at most (`budget`).
//!
//! A failed attempt logs the original's `Error posting flow ...` line and is retried after a
//! capped exponential backoff, or the endpoint's `Retry-After` on 429 and 503 when that is
//! longer (it can lengthen the wait, never shorten it). A request that fails permanently (a
//! 4xx other than 408 and 429) gets three attempts; any request is dead after
//! `HTTP_MAX_ATTEMPTS` attempts or once older than `HTTP_MAX_AGE_SECONDS`.
//!
//! This file is the scheduler (which flow is delivered when); `round` is one flow's delivery
//! with its lease in hand, `queue` the SQL, `lease` one delivery's hold on its flow, `http` one
//! POST and how its failure is judged.

mod budget;
mod http;
mod lease;
mod ordered;
pub mod queue;
mod round;
mod unordered;

pub(crate) use http::error_chain;
pub use http::redacted_str;

use crate::config::DeliverySettings;
use crate::db;
use crate::health::{Health, Part};
use budget::Budget;
use http::Sender;
use queue::{Queue, Target};
use round::Next;
use sqlx::MySqlPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the schedule is read from the table when nothing wakes the outbox: how late a
/// retry another instance scheduled, or a change to a flow's row, is noticed at most.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// How the processor tells the outbox which flows it just wrote requests for.
#[derive(Default)]
pub struct OutboxSignal {
    written: Mutex<HashSet<i32>>,
    /// The flows were reloaded: an edited URL or a disabled flow is looked at now, not at the
    /// next periodic read of the schedule.
    flows_changed: std::sync::atomic::AtomicBool,
    notify: Notify,
    /// The deliveries lingering for more requests of their flow, woken directly.
    lingering: Mutex<HashMap<i32, Arc<Notify>>>,
}

impl OutboxSignal {
    /// Called after a reload applied changed flows.
    pub fn flows_changed(&self) {
        self.flows_changed.store(true, std::sync::atomic::Ordering::Relaxed);
        self.notify.notify_one();
    }

    fn take_flows_changed(&self) -> bool {
        self.flows_changed.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Called after a commit that wrote requests for these flows.
    pub fn requests_written(&self, flows: impl IntoIterator<Item = i32>) {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let lingering = self.lingering.lock().unwrap_or_else(|p| p.into_inner());
        for flow in flows {
            if let Some(delivery) = lingering.get(&flow) {
                delivery.notify_one();
            }
            written.insert(flow);
        }
        self.notify.notify_one();
    }

    /// What wakes the delivery of `flow` when requests of that flow are written, until
    /// [`OutboxSignal::forget`].
    fn wake_for(&self, flow: i32) -> Arc<Notify> {
        let mut lingering = self.lingering.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(lingering.entry(flow).or_default())
    }

    fn forget(&self, flow: i32) {
        self.lingering.lock().unwrap_or_else(|p| p.into_inner()).remove(&flow);
    }

    /// The flows signalled since the last call, except those being delivered now: a running
    /// delivery may already have read past the new requests, so they are kept for when it ends.
    fn take(&self, running: &HashSet<i32>) -> HashSet<i32> {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let (busy, ready): (HashSet<i32>, HashSet<i32>) = written.drain().partition(|f| running.contains(f));
        *written = busy;
        ready
    }
}

/// Where a flow's requests go now, as its row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Send(Endpoint),
    /// They wait, making no attempt, for this reason.
    Held(String),
    /// They are kept as dead.
    Deleted,
}

/// A flow's endpoint at one read of its row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as sent to.
    pub url: Arc<str>,
    /// The row's text: logged as the original logged it (its password masked), and kept with
    /// each attempt to tell when the row names another URL.
    pub raw: Arc<str>,
}

impl Destination {
    /// By the same rules as a flow's row is checked at load (`flows::endpoint`).
    pub fn of(target: &Target) -> Destination {
        match target {
            Target::Deleted => Destination::Deleted,
            Target::Row { enabled: false, .. } => Destination::Held("its flow is disabled".to_owned()),
            Target::Row { action, .. } if !action.trim().eq_ignore_ascii_case("POST_ENDPOINT") => {
                Destination::Held(format!("its flow's action is {action:?}, not POST_ENDPOINT"))
            }
            Target::Row { endpoint_url, .. } => match crate::flows::endpoint(endpoint_url.as_deref()) {
                Ok(url) => Destination::Send(Endpoint {
                    url: url.as_str().into(),
                    raw: endpoint_url.as_deref().unwrap_or_default().into(),
                }),
                Err(reason) => Destination::Held(format!("its flow cannot post: {reason}")),
            },
        }
    }
}

pub struct Outbox {
    queue: Queue,
    sender: Arc<Sender>,
    budget: Budget,
    settings: DeliverySettings,
    signal: Arc<OutboxSignal>,
}

/// What the scheduler knows of a flow with requests.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// When it is next worth delivering.
    due_at: Instant,
    held: bool,
}

impl Outbox {
    /// `owner` names this instance in lease rows: its MQTT client id, stable across restarts,
    /// so a restarted instance takes its flows back at once. `pool` is the gateway's; the
    /// outbox opens pools of its own beside it, so that the commit never waits behind it.
    pub fn new(
        pool: &MySqlPool,
        settings: DeliverySettings,
        owner: String,
        signal: Arc<OutboxSignal>,
    ) -> Result<Outbox, reqwest::Error> {
        let requests = crate::db::pool_beside(pool, crate::db::Purpose::OutboxRequests);
        let leases = crate::db::pool_beside(pool, crate::db::Purpose::OutboxLeases);
        Ok(Outbox {
            queue: Queue::new(requests, leases, owner, settings.lease),
            sender: Arc::new(Sender::new(&settings)?),
            budget: Budget::new(settings.max_in_flight_bytes),
            settings,
            signal,
        })
    }

    /// Delivers until shutdown, then lets requests in progress finish (each bounded by the
    /// HTTP timeout). What is still queued stays in the table for the next start. The loop
    /// beats `health` on every turn, and its database calls are bounded waits.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, health: Arc<Health>) {
        let mut active: JoinSet<(i32, Next)> = JoinSet::new();
        let mut running: HashSet<i32> = HashSet::new();
        let mut known: HashMap<i32, Known> = HashMap::new();
        let mut next_scan = Instant::now();
        loop {
            health.beat(Part::Outbox);
            if !shutdown.is_cancelled() {
                let now = Instant::now();
                // The processor names the flows it wrote requests for; the schedule of every
                // flow is read once per IDLE_POLL, for retries (this instance's or another's),
                // requests left by an earlier run or an instance that died, and edited flows.
                // Taken whatever the time, or it would bring a second scan on the next turn.
                let flows_changed = self.signal.take_flows_changed();
                if now >= next_scan || flows_changed {
                    next_scan = now + IDLE_POLL;
                    match health.within(Part::Outbox, db::ANSWER_WITHIN, self.read_schedule()).await {
                        Some(Some(read)) => known = read,
                        Some(None) => {}
                        None => tracing::warn!("Outbox cannot read pending requests: {}", no_answer()),
                    }
                }
                for flow in self.signal.take(&running) {
                    // New requests are due at once; in order they still wait behind a head that
                    // waits for its retry.
                    let entry = known.entry(flow).or_insert(Known { due_at: now, held: false });
                    if !self.settings.ordered {
                        entry.due_at = entry.due_at.min(now);
                    }
                }
                for (&flow, entry) in known.iter_mut() {
                    if entry.held || entry.due_at > now || running.contains(&flow) {
                        continue;
                    }
                    let Some(acquired) =
                        health.within(Part::Outbox, db::ANSWER_WITHIN, self.queue.acquire(flow)).await
                    else {
                        tracing::warn!("Outbox cannot take the lease of flow {flow}: {}", no_answer());
                        entry.due_at = next_scan;
                        continue;
                    };
                    match acquired {
                        Ok(Some(held_until)) => {
                            running.insert(flow);
                            let outbox = Arc::clone(&self);
                            let shutdown = shutdown.clone();
                            active.spawn(async move {
                                (flow, outbox.deliver_flow(flow, held_until, &shutdown).await)
                            });
                        }
                        // Another instance delivers it: its schedule says when to look again.
                        Ok(None) => entry.due_at = next_scan,
                        Err(error) => {
                            tracing::warn!("Outbox cannot take the lease of flow {flow}: {error}");
                            entry.due_at = next_scan;
                        }
                    }
                }
            }
            let wake_at = known
                .iter()
                .filter(|(flow, k)| !k.held && !running.contains(flow))
                .map(|(_, k)| k.due_at)
                .min()
                .map_or(next_scan, |due_at| due_at.min(next_scan));
            tokio::select! {
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                // The watchdog asks: coming back to the loop is the answer.
                _ = health.poked(Part::Outbox) => {}
                _ = self.signal.notify.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                Some(done) = active.join_next(), if !active.is_empty() => {
                    if let Ok((flow, next)) = done {
                        running.remove(&flow);
                        match next {
                            Next::Due(wait) => {
                                known.insert(flow, Known { due_at: Instant::now() + wait, held: false });
                            }
                            Next::Idle => {
                                known.remove(&flow);
                            }
                            Next::Held => {
                                known.insert(flow, Known { due_at: next_scan, held: true });
                            }
                        }
                    }
                }
            }
            if shutdown.is_cancelled() {
                while active.join_next().await.is_some() {}
                return;
            }
        }
    }

    /// Every flow with requests, and when each is next due; `None` when the table cannot be
    /// read now. Notes holds that began or ended, so that held requests do not age.
    async fn read_schedule(&self) -> Option<HashMap<i32, Known>> {
        let pending = match self.queue.pending().await {
            Ok(pending) => pending,
            Err(error) => {
                tracing::warn!("Outbox cannot read pending requests: {error}");
                return None;
            }
        };
        let now = Instant::now();
        let mut newly_held = Vec::new();
        let mut known = HashMap::with_capacity(pending.len());
        for flow in pending {
            let destination = Destination::of(&flow.target);
            let held = matches!(destination, Destination::Held(_));
            if held && !flow.hold_recorded {
                newly_held.push(flow.flow);
            }
            if !held && flow.hold_recorded {
                if let Err(error) = self.queue.note_released(flow.flow).await {
                    tracing::warn!("Outbox cannot note that flow {} is no longer held: {error}", flow.flow);
                }
            }
            let wait = match destination {
                Destination::Deleted => Duration::ZERO,
                _ if flow.url_changed => Duration::ZERO,
                _ if self.settings.ordered => flow.last_due,
                _ => flow.first_due,
            };
            known.insert(flow.flow, Known { due_at: now + wait, held });
        }
        if let Err(error) = self.queue.note_held(&newly_held).await {
            tracing::warn!("Outbox cannot note held flows: {error}");
        }
        Some(known)
    }
}

fn no_answer() -> String {
    format!("the database did not answer within {:?}", db::ANSWER_WITHIN)
}
