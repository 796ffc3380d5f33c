//! The outbox: sends the POST_ENDPOINT requests that the processor committed to
//! `gateway_outbox`, retries them until the endpoint takes them, and keeps the ones it never
//! will take as dead.
//!
//! Each flow's requests are sent by one task at a time, oldest first, so that they arrive in
//! the order their messages did (`HTTP_ORDERED=false` sends a flow's due requests concurrently
//! instead). Which gateway instance sends a flow is decided by a lease row in
//! `gateway_outbox_leases` (`OUTBOX_LEASE_SECONDS`, 30 s by default), held at every request:
//! - while a flow is being delivered its lease is renewed every third of its length, beside the
//!   requests, however long each of them takes;
//! - a request is started only while the lease is known to hold for another third of its
//!   length, and is abandoned at once when a renewal finds it lost;
//! - outcomes are recorded within 20 ms of delivery, and before the next request leaves once a
//!   request takes that long; recording is fenced: a row is deleted (or rescheduled) only
//!   while this instance still owns the lease, so a deliverer that lost it changes nothing
//!   the new owner relies on.
//!
//! So with several instances nothing is sent twice and each flow stays in order; after a crash
//! of the holder, another instance takes over once the lease has run out, and resends the
//! request that was in flight, plus, for an endpoint faster than 20 ms, those delivered in the
//! 20 ms before the crash (with `HTTP_ORDERED=false`, the requests in flight together).
//! Requests to one endpoint (scheme, host, port) are in flight `HTTP_CONCURRENCY` at a time at
//! most, over pooled keep-alive connections.
//!
//! A failed attempt logs the original's `Error posting flow ...` line and is retried after a
//! capped exponential backoff (or the endpoint's `Retry-After` on 429 and 503). A request that
//! fails permanently (a 4xx other than 408 and 429) gets three attempts; any request is dead
//! after `HTTP_MAX_ATTEMPTS` attempts or once older than `HTTP_MAX_AGE_SECONDS`.
//!
//! This file is the scheduler (which flow is delivered when, and in what order) and the
//! delivery rounds, a little over 400 lines because each ordering and recording rule carries
//! its reason; `queue` holds the SQL of both outbox tables, `lease` one delivery's hold on its
//! flow, and `http` one POST and how its failure is judged.

mod http;
mod lease;
pub mod queue;

pub(crate) use http::error_chain;
pub use http::redacted_str;

use crate::backoff;
use crate::config::DeliverySettings;
use crate::db;
use crate::health::{Health, Part};
use http::{Failure, Sender};
use lease::Lease;
use queue::{Queue, Request};
use sqlx::MySqlPool;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a delivery task reads its flow from the start again.
const CURSOR_REWIND: Duration = Duration::from_secs(5);
/// Requests read per round trip.
const FETCH: i64 = 200;
/// How long delivered requests may wait to be recorded as such, in order (see
/// `send_in_order`): what a crash can make the next holder send again.
const RECORD_WINDOW: Duration = Duration::from_millis(20);
/// How long a flow's delivery waits, lease in hand, for more requests once it has sent all:
/// at a steady trickle of messages, taking and giving back the lease for each one cost three
/// statements of the six each request needed. Another instance's requests of the flow wait
/// this long at most, since a lingering delivery reads the table when it ends.
const LINGER: Duration = Duration::from_millis(250);
/// How often the table is checked when nothing wakes the outbox.
const IDLE_POLL: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A permanent failure (say, 400) may be a deployment in progress; a few attempts, not more.
const PERMANENT_ATTEMPTS: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How the processor tells the outbox which flows it just wrote requests for.
#[derive(Default)]
pub struct OutboxSignal {
    written: Mutex<HashSet<i32>>,
    notify: Notify,
    /// The deliveries lingering for more requests of their flow, woken directly.
    lingering: Mutex<HashMap<i32, Arc<Notify>>>,
}

impl OutboxSignal {
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

pub struct Outbox {
    queue: Queue,
    sender: Sender,
    settings: DeliverySettings,
    signal: Arc<OutboxSignal>,
}

impl Outbox {
    /// `owner` names this instance in lease rows: its MQTT client id, stable across restarts,
    /// so a restarted instance takes its flows back at once.
    pub fn new(
        pool: MySqlPool,
        settings: DeliverySettings,
        owner: String,
        signal: Arc<OutboxSignal>,
    ) -> Result<Outbox, reqwest::Error> {
        Ok(Outbox {
            queue: Queue::new(pool, owner, settings.lease),
            sender: Sender::new(&settings)?,
            settings,
            signal,
        })
    }

    /// Delivers until shutdown, then lets requests in progress finish (each bounded by the
    /// HTTP timeout). What is still queued stays in the table for the next start. The loop
    /// beats `health` on every turn, and its database calls are bounded waits.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, health: Arc<Health>) {
        let mut active: JoinSet<(i32, Option<Duration>)> = JoinSet::new();
        let mut running: HashSet<i32> = HashSet::new();
        let mut not_before: HashMap<i32, Instant> = HashMap::new();
        let mut next_scan = Instant::now();
        loop {
            health.beat(Part::Outbox);
            if !shutdown.is_cancelled() {
                let now = Instant::now();
                // The processor names the flows it wrote requests for; the whole table is read
                // only once per IDLE_POLL, for requests left by an earlier run or an instance
                // that died. Reading it on every commit made delivery slow down as it grew.
                let mut candidates = if now >= next_scan {
                    next_scan = now + IDLE_POLL;
                    self.flows_with_requests(&health).await
                } else {
                    self.signal.take(&running)
                };
                not_before.retain(|flow, at| {
                    let due = *at <= now;
                    if due {
                        candidates.insert(*flow);
                    }
                    !due
                });
                for flow in candidates {
                    if running.contains(&flow) || not_before.contains_key(&flow) {
                        continue;
                    }
                    let acquire = self.queue.acquire(flow);
                    let Some(acquired) = health.within(Part::Outbox, db::ANSWER_WITHIN, acquire).await else {
                        tracing::warn!("Outbox cannot take the lease of flow {flow}: {}", no_answer());
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
                        Ok(None) => {}
                        Err(error) => tracing::warn!("Outbox cannot take the lease of flow {flow}: {error}"),
                    }
                }
            }
            let wake_at = not_before.values().copied().min().unwrap_or(next_scan).min(next_scan);
            tokio::select! {
                _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
                // The watchdog asks: coming back to the loop is the answer.
                _ = health.poked(Part::Outbox) => {}
                _ = self.signal.notify.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
                Some(done) = active.join_next(), if !active.is_empty() => {
                    if let Ok((flow, wait)) = done {
                        running.remove(&flow);
                        if let Some(wait) = wait {
                            not_before.insert(flow, Instant::now() + wait);
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

    /// Every flow with requests not yet delivered or dead.
    async fn flows_with_requests(&self, health: &Health) -> HashSet<i32> {
        let read = health.within(Part::Outbox, db::ANSWER_WITHIN, self.queue.flows_with_requests()).await;
        match read {
            Some(Ok(flows)) => flows,
            Some(Err(error)) => {
                tracing::warn!("Outbox cannot read pending requests: {error}");
                HashSet::new()
            }
            None => {
                tracing::warn!("Outbox cannot read pending requests: {}", no_answer());
                HashSet::new()
            }
        }
    }

    /// Sends a flow's due requests until none is due; returns how long until the next one is.
    /// The lease is kept alive beside the delivery, and given back at the end.
    async fn deliver_flow(
        &self,
        flow: i32,
        held_until: Instant,
        shutdown: &CancellationToken,
    ) -> Option<Duration> {
        let lease = Lease::new(flow, self.settings.lease, held_until);
        let wake = self.signal.wake_for(flow);
        let delivery = self.deliver(&lease, &wake, shutdown);
        let keeper = lease.keep(&self.queue);
        tokio::pin!(delivery, keeper);
        // The keeper ends only when the lease is lost; the delivery then stops at once, since
        // it waits on the same news.
        let wait = tokio::select! {
            wait = &mut delivery => wait,
            () = &mut keeper => delivery.await,
        };
        self.signal.forget(flow);
        self.queue.release(flow).await;
        wait
    }

    /// `None` when nothing is due or the lease was lost; otherwise the wait until the next due
    /// request.
    async fn deliver(&self, lease: &Lease, wake: &Notify, shutdown: &CancellationToken) -> Option<Duration> {
        let flow = lease.flow;
        // Reading from the smallest id not yet settled, rather than from the start of the flow,
        // skips the rows just deleted: InnoDB keeps them as delete-marked until purged, and a
        // scan from the start would step over all of them on every round. The cursor goes back
        // to the start now and then, for a request another instance committed with a smaller id.
        let mut cursor = 0i64;
        let mut rewind_at = Instant::now() + CURSOR_REWIND;
        // Unordered: the soonest retry among the requests passed over because they are not due.
        let mut passed_over: Option<Duration> = None;
        let mut lingered_out = false;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            if Instant::now() >= rewind_at {
                (cursor, rewind_at) = (0, Instant::now() + CURSOR_REWIND);
            }
            let requests = match self.queue.fetch(flow, cursor, FETCH).await {
                Ok(requests) => requests,
                Err(error) => {
                    tracing::warn!("Outbox cannot read the requests of flow {flow}: {error}");
                    return Some(FIRST_RETRY);
                }
            };
            let Some(head) = requests.first() else {
                if passed_over.is_some() || lingered_out {
                    return passed_over;
                }
                match self.linger(lease, wake, shutdown).await {
                    Linger::Woken => {}
                    // One more read: requests another instance wrote meanwhile.
                    Linger::TimedOut => lingered_out = true,
                    Linger::Stop => return passed_over,
                }
                continue;
            };
            lingered_out = false;
            let due: Vec<&Request> = if self.settings.ordered {
                // In order: a request waiting for its retry holds the later ones back.
                if let Some(wait) = head.wait {
                    return Some(wait);
                }
                requests.iter().take_while(|r| r.wait.is_none()).collect()
            } else {
                // Unordered: a request waiting for its retry holds nothing back.
                let soonest = requests.iter().filter_map(|r| r.wait).min();
                passed_over = passed_over.into_iter().chain(soonest).min();
                let due: Vec<&Request> = requests.iter().filter(|r| r.wait.is_none()).collect();
                if due.is_empty() {
                    if (requests.len() as i64) < FETCH {
                        return passed_over;
                    }
                    cursor = requests.last().map_or(cursor, |r| r.id + 1);
                    continue;
                }
                due
            };
            let settled = if self.settings.ordered {
                self.send_in_order(lease, &due, shutdown).await
            } else {
                self.send_together(lease, &due).await
            };
            let settled = match settled {
                Round::Settled(settled) => settled,
                Round::Lost => return None,
                Round::DbError => return Some(FIRST_RETRY),
            };
            let last = requests.last().map_or(cursor, |r| r.id + 1);
            cursor = if self.settings.ordered {
                requests.iter().map(|r| r.id).find(|id| !settled.contains(id)).unwrap_or(last)
            } else {
                // Past this page: what failed now waits for its retry, at least FIRST_RETRY
                // away, which the scheduler comes back for, reading from the start again.
                if due.iter().any(|r| !settled.contains(&r.id)) {
                    passed_over = passed_over.into_iter().chain([FIRST_RETRY]).min();
                }
                last
            };
        }
    }

    /// One at a time; stops at the first failure, which holds the flow's later requests back.
    ///
    /// Outcomes are recorded before the next request leaves whenever the last request took
    /// [`RECORD_WINDOW`] or more, or the oldest unrecorded one is that old; so a crash makes the
    /// next holder resend the request in flight and at most the ones delivered in the window
    /// before it, by requests each faster than the window. One durable write per request
    /// would cap a fast endpoint at the database's commit rate (1,500 requests/s here instead
    /// of 9,000).
    async fn send_in_order(&self, lease: &Lease, due: &[&Request], shutdown: &CancellationToken) -> Round {
        let mut settled = HashSet::new();
        let mut unrecorded: Vec<(&Request, Result<(), Failure>)> = Vec::new();
        let mut oldest = Instant::now();
        for request in due {
            let started = Instant::now();
            let Some(result) = lease.while_held(self.send(request)).await else {
                // Still worth recording: if nobody has taken the flow yet, the fence lets it
                // through and spares the next holder those resends.
                let _ = self.record(lease.flow, &unrecorded).await;
                return Round::Lost;
            };
            let failed = result.is_err();
            if unrecorded.is_empty() {
                oldest = Instant::now();
            }
            unrecorded.push((request, result));
            let slow = started.elapsed() >= RECORD_WINDOW || oldest.elapsed() >= RECORD_WINDOW;
            let last = failed || shutdown.is_cancelled();
            if slow || last {
                if let Err(round) = self.record_in_round(lease, &mut unrecorded, &mut settled).await {
                    return round;
                }
            }
            if last {
                break;
            }
        }
        if let Err(round) = self.record_in_round(lease, &mut unrecorded, &mut settled).await {
            return round;
        }
        Round::Settled(settled)
    }

    /// Records and forgets `unrecorded`, adding what is settled; the round's end otherwise.
    async fn record_in_round(
        &self,
        lease: &Lease,
        unrecorded: &mut Vec<(&Request, Result<(), Failure>)>,
        settled: &mut HashSet<i64>,
    ) -> Result<(), Round> {
        if unrecorded.is_empty() {
            return Ok(());
        }
        let recorded = self.record(lease.flow, unrecorded).await;
        unrecorded.clear();
        match recorded {
            Ok(Some(done)) => {
                settled.extend(done);
                Ok(())
            }
            Ok(None) => {
                lease.lost_on_record();
                Err(Round::Lost)
            }
            Err(error) => {
                tracing::warn!("Outbox cannot record deliveries of flow {}: {error}", lease.flow);
                Err(Round::DbError)
            }
        }
    }

    /// All due requests at once (`HTTP_ORDERED=false`), recorded together.
    async fn send_together(&self, lease: &Lease, due: &[&Request]) -> Round {
        let sends = futures_util::future::join_all(due.iter().map(|r| async { (*r, self.send(r).await) }));
        let Some(results) = lease.while_held(sends).await else {
            return Round::Lost;
        };
        match self.record(lease.flow, &results).await {
            Ok(Some(settled)) => Round::Settled(settled),
            Ok(None) => {
                lease.lost_on_record();
                Round::Lost
            }
            Err(error) => {
                tracing::warn!("Outbox cannot record deliveries of flow {}: {error}", lease.flow);
                Round::DbError
            }
        }
    }

    /// Waits up to [`LINGER`] for more requests of the flow.
    async fn linger(&self, lease: &Lease, wake: &Notify, shutdown: &CancellationToken) -> Linger {
        tokio::select! {
            _ = lease.lost() => Linger::Stop,
            _ = shutdown.cancelled() => Linger::Stop,
            _ = wake.notified() => Linger::Woken,
            _ = tokio::time::sleep(LINGER) => Linger::TimedOut,
        }
    }

    async fn send(&self, request: &Request) -> Result<(), Failure> {
        self.sender.send(&request.url, request.body.clone()).await
    }

    /// Deletes what was delivered; schedules or buries what failed, logging each failure.
    /// Returns the ids settled for good (delivered or dead), or `None` when this instance no
    /// longer owns the flow's lease: then nothing is changed, the new owner decides.
    async fn record(
        &self,
        flow: i32,
        results: &[(&Request, Result<(), Failure>)],
    ) -> Result<Option<HashSet<i64>>, sqlx::Error> {
        let delivered: Vec<i64> = results.iter().filter(|(_, r)| r.is_ok()).map(|(req, _)| req.id).collect();
        if !self.queue.delete_delivered(flow, &delivered).await? {
            return Ok(None);
        }
        let mut settled: HashSet<i64> = delivered.into_iter().collect();
        for (request, result) in results {
            let Err(failure) = result else { continue };
            let attempts = request.attempts + 1;
            tracing::error!(
                flow_code = %request.flow_code,
                error_kind = "post_failed",
                "Error posting flow {} to endpoint {}: {}",
                request.flow_code,
                http::redacted_str(&request.url),
                failure.error
            );
            let dead = attempts >= self.settings.max_attempts
                || (failure.permanent && attempts >= PERMANENT_ATTEMPTS)
                || request.age >= self.settings.max_age;
            let delay = failure
                .retry_after
                .unwrap_or_else(|| {
                    backoff::after_failures(attempts, FIRST_RETRY, self.settings.max_retry_delay)
                })
                .min(MAX_RETRY_AFTER);
            let error = failure.error.to_string();
            if !self.queue.reschedule(request.id, attempts, &error, dead, delay).await? {
                return Ok(None);
            }
            if dead {
                settled.insert(request.id);
                tracing::error!(
                    flow_code = %request.flow_code,
                    "Giving up on request {} of flow {} after {attempts} attempts over {:.0}s; it is kept in gateway_outbox as dead",
                    request.id,
                    request.flow_code,
                    request.age.as_secs_f64()
                );
            }
        }
        Ok(Some(settled))
    }
}

fn no_answer() -> String {
    format!("the database did not answer within {:?}", db::ANSWER_WITHIN)
}

/// How waiting for more requests of a flow ended.
enum Linger {
    Woken,
    TimedOut,
    /// The lease was lost or shutdown began.
    Stop,
}

/// What a delivery round ended with.
enum Round {
    Settled(HashSet<i64>),
    Lost,
    DbError,
}
