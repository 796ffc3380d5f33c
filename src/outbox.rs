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

use crate::backoff;
use crate::config::DeliverySettings;
use sqlx::{MySql, MySqlPool, QueryBuilder, Row};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify, Semaphore};
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
/// How often the table is checked when nothing wakes the outbox.
const IDLE_POLL: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A permanent failure (say, 400) may be a deployment in progress; a few attempts, not more.
const PERMANENT_ATTEMPTS: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One queued request.
struct Request {
    id: i64,
    flow_code: String,
    url: String,
    /// Shared with the HTTP client, which sends it without a copy.
    body: bytes::Bytes,
    attempts: u32,
    age: Duration,
    /// Time until it is due; `None` when due now.
    wait: Option<Duration>,
}

/// Why an attempt failed, and what that means for the next one.
struct Failure {
    error: PostError,
    permanent: bool,
    retry_after: Option<Duration>,
}

/// How the processor tells the outbox which flows it just wrote requests for.
#[derive(Default)]
pub struct OutboxSignal {
    written: Mutex<HashSet<i32>>,
    notify: Notify,
}

impl OutboxSignal {
    /// Called after a commit that wrote requests for these flows.
    pub fn requests_written(&self, flows: impl IntoIterator<Item = i32>) {
        self.written.lock().unwrap_or_else(|p| p.into_inner()).extend(flows);
        self.notify.notify_one();
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
    pool: MySqlPool,
    http: reqwest::Client,
    settings: DeliverySettings,
    /// This instance's name in lease rows: its MQTT client id, stable across restarts, so a
    /// restarted instance takes its flows back at once.
    owner: String,
    signal: Arc<OutboxSignal>,
    /// Per endpoint URL, what sending to it needs, worked out once.
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Per origin (scheme, host, port): its `HTTP_CONCURRENCY` limit.
    origins: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// An endpoint URL, parsed once: parsing (with its IDNA step) and labelling the metrics on
/// every request cost a tenth of a POST's CPU.
struct Endpoint {
    url: Option<reqwest::Url>,
    limit: Arc<Semaphore>,
    seconds: metrics::Histogram,
    /// `mqtt_gateway_http_responses_total` per class, in the order of [`RESPONSE_CLASSES`].
    responses: Vec<metrics::Counter>,
}

const RESPONSE_CLASSES: [&str; 5] = ["2xx", "4xx", "5xx", "other", "error"];

impl Outbox {
    pub fn new(
        pool: MySqlPool,
        settings: DeliverySettings,
        owner: String,
        signal: Arc<OutboxSignal>,
    ) -> Result<Outbox, reqwest::Error> {
        let mut http =
            reqwest::Client::builder().timeout(settings.timeout).pool_max_idle_per_host(settings.concurrency);
        if let Some(pem) = &settings.extra_roots_pem {
            // HTTP_CA_FILE adds to the system's roots; it does not replace them.
            http = http.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        let http = http.build()?;
        Ok(Outbox {
            pool,
            http,
            settings,
            owner,
            signal,
            endpoints: Mutex::default(),
            origins: Mutex::default(),
        })
    }

    /// `(pending, dead)` request counts.
    pub async fn depth(&self) -> Result<(i64, i64), sqlx::Error> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(NOT dead), 0) AS SIGNED), CAST(COALESCE(SUM(dead), 0) AS SIGNED) FROM gateway_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Delivers until shutdown, then lets requests in progress finish (each bounded by the
    /// HTTP timeout). What is still queued stays in the table for the next start.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut active: JoinSet<(i32, Option<Duration>)> = JoinSet::new();
        let mut running: HashSet<i32> = HashSet::new();
        let mut not_before: HashMap<i32, Instant> = HashMap::new();
        let mut next_scan = Instant::now();
        loop {
            if !shutdown.is_cancelled() {
                let now = Instant::now();
                // The processor names the flows it wrote requests for; the whole table is read
                // only once per IDLE_POLL, for requests left by an earlier run or an instance
                // that died. Reading it on every commit made delivery slow down as it grew.
                let mut candidates = if now >= next_scan {
                    next_scan = now + IDLE_POLL;
                    self.flows_with_requests().await
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
                    match self.acquire(flow).await {
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
    async fn flows_with_requests(&self) -> HashSet<i32> {
        match sqlx::query_scalar("SELECT DISTINCT flow_id FROM gateway_outbox WHERE dead = FALSE")
            .fetch_all(&self.pool)
            .await
        {
            Ok(flows) => flows.into_iter().collect(),
            Err(error) => {
                tracing::warn!("Outbox cannot read pending requests: {error}");
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
        let delivery = self.deliver(&lease, shutdown);
        let keeper = lease.keep(self);
        tokio::pin!(delivery, keeper);
        // The keeper ends only when the lease is lost; the delivery then stops at once, since
        // it waits on the same news.
        let wait = tokio::select! {
            wait = &mut delivery => wait,
            () = &mut keeper => delivery.await,
        };
        self.release(flow).await;
        wait
    }

    /// `None` when nothing is due or the lease was lost; otherwise the wait until the next due
    /// request.
    async fn deliver(&self, lease: &Lease, shutdown: &CancellationToken) -> Option<Duration> {
        let flow = lease.flow;
        // Reading from the smallest id not yet settled, rather than from the start of the flow,
        // skips the rows just deleted: InnoDB keeps them as delete-marked until purged, and a
        // scan from the start would step over all of them on every round. The cursor goes back
        // to the start now and then, for a request another instance committed with a smaller id.
        let mut cursor = 0i64;
        let mut rewind_at = Instant::now() + CURSOR_REWIND;
        // Unordered: the soonest retry among the requests passed over because they are not due.
        let mut passed_over: Option<Duration> = None;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            if Instant::now() >= rewind_at {
                (cursor, rewind_at) = (0, Instant::now() + CURSOR_REWIND);
            }
            let requests = match self.fetch(flow, cursor).await {
                Ok(requests) => requests,
                Err(error) => {
                    tracing::warn!("Outbox cannot read the requests of flow {flow}: {error}");
                    return Some(FIRST_RETRY);
                }
            };
            let Some(head) = requests.first() else {
                return passed_over;
            };
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
            Ok(None) => Err(lease.lost_on_record()),
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
            Ok(None) => lease.lost_on_record(),
            Err(error) => {
                tracing::warn!("Outbox cannot record deliveries of flow {}: {error}", lease.flow);
                Round::DbError
            }
        }
    }

    async fn send(&self, request: &Request) -> Result<(), Failure> {
        let endpoint = self.endpoint(&request.url);
        let _permit = endpoint.limit.acquire().await.expect("endpoint semaphores are never closed");
        let started = std::time::Instant::now();
        let result = post(&self.http, endpoint.url.as_ref(), &request.url, request.body.clone()).await;
        let class = match &result {
            Ok(()) => 0,
            Err(Failure { error: PostError::Status { code, .. }, .. }) if *code >= 500 => 2,
            Err(Failure { error: PostError::Status { code, .. }, .. }) if *code >= 400 => 1,
            Err(Failure { error: PostError::Status { .. }, .. }) => 3,
            Err(_) => 4,
        };
        endpoint.seconds.record(started.elapsed().as_secs_f64());
        endpoint.responses[class].increment(1);
        result
    }

    fn endpoint(&self, url: &str) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = endpoints.get(url) {
            return Arc::clone(endpoint);
        }
        let parsed = reqwest::Url::parse(url).ok();
        let host = parsed.as_ref().and_then(|u| u.host_str()).unwrap_or_default().to_owned();
        let origin = parsed.as_ref().map(|u| u.origin().ascii_serialization()).unwrap_or_default();
        let limit = Arc::clone(
            self.origins
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(origin)
                .or_insert_with(|| Arc::new(Semaphore::new(self.settings.concurrency))),
        );
        let seconds = metrics::histogram!("mqtt_gateway_http_request_seconds", "host" => host.clone());
        // Flows rarely change their URL; a table that grew without bound over months of
        // edits is still cleared now and then.
        if endpoints.len() >= 10_000 {
            endpoints.clear();
        }
        let responses = RESPONSE_CLASSES
            .iter()
            .map(|class| {
                metrics::counter!("mqtt_gateway_http_responses_total", "host" => host.clone(), "class" => *class)
            })
            .collect();
        let endpoint = Arc::new(Endpoint { url: parsed, limit, seconds, responses });
        endpoints.insert(url.to_owned(), Arc::clone(&endpoint));
        endpoint
    }

    async fn fetch(&self, flow: i32, from_id: i64) -> Result<Vec<Request>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, flow_code, endpoint_url, body, attempts, \
             TIMESTAMPDIFF(MICROSECOND, created_at, UTC_TIMESTAMP(3)), \
             TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(3), next_attempt_at) \
             FROM gateway_outbox WHERE dead = FALSE AND flow_id = ? AND id >= ? ORDER BY id LIMIT ?",
        )
        .bind(flow)
        .bind(from_id)
        .bind(FETCH)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| {
                let micros = |i: usize| u64::try_from(row.get::<i64, _>(i)).ok().map(Duration::from_micros);
                Request {
                    id: row.get(0),
                    flow_code: row.get(1),
                    url: row.get(2),
                    body: row.get::<String, _>(3).into(),
                    attempts: row.get::<i32, _>(4).max(0) as u32,
                    age: micros(5).unwrap_or_default(),
                    wait: micros(6).filter(|w| !w.is_zero()),
                }
            })
            .collect())
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
        let mut settled: HashSet<i64> = delivered.iter().copied().collect();
        if !delivered.is_empty() {
            // Fenced by a join on our lease row, in the same statement.
            let mut delete: QueryBuilder<MySql> = QueryBuilder::new(
                "DELETE o FROM gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 WHERE l.owner = ",
            );
            delete.push_bind(&self.owner).push(" AND o.flow_id = ").push_bind(flow).push(" AND o.id IN (");
            let mut ids = delete.separated(", ");
            for id in &delivered {
                ids.push_bind(*id);
            }
            delete.push(")");
            let done = delete.build().execute(&self.pool).await?;
            if done.rows_affected() < delivered.len() as u64 {
                return Ok(None);
            }
        }
        for (request, result) in results {
            let Err(failure) = result else { continue };
            let attempts = request.attempts + 1;
            tracing::error!(
                flow_code = %request.flow_code,
                error_kind = "post_failed",
                "Error posting flow {} to endpoint {}: {}",
                request.flow_code,
                redacted_str(&request.url),
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
            let done = sqlx::query(
                "UPDATE gateway_outbox AS o JOIN gateway_outbox_leases AS l ON l.flow_id = o.flow_id \
                 SET o.attempts = ?, o.last_error = ?, o.dead = ?, \
                 o.next_attempt_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND \
                 WHERE l.owner = ? AND o.id = ?",
            )
            .bind(attempts as i32)
            .bind(failure.error.to_string())
            .bind(dead)
            .bind(delay.as_micros() as i64)
            .bind(&self.owner)
            .bind(request.id)
            .execute(&self.pool)
            .await?;
            if done.rows_affected() == 0 {
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

    /// Takes the flow's lease if it is free, expired, or already ours; returns until when it
    /// surely holds, timed from before the request so that it never outlives the row's
    /// `expires_at`.
    async fn acquire(&self, flow: i32) -> Result<Option<Instant>, sqlx::Error> {
        let sent = Instant::now();
        // MariaDB evaluates the assignments left to right, so `owner` in the second one is the
        // value the first one just set.
        sqlx::query(
            "INSERT INTO gateway_outbox_leases (flow_id, owner, expires_at) \
             VALUES (?, ?, UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND) \
             ON DUPLICATE KEY UPDATE \
             owner = IF(expires_at < UTC_TIMESTAMP(3) OR owner = VALUES(owner), VALUES(owner), owner), \
             expires_at = IF(owner = VALUES(owner), VALUES(expires_at), expires_at)",
        )
        .bind(flow)
        .bind(&self.owner)
        .bind(self.settings.lease.as_micros() as i64)
        .execute(&self.pool)
        .await?;
        let owner: Option<String> =
            sqlx::query_scalar("SELECT owner FROM gateway_outbox_leases WHERE flow_id = ?")
                .bind(flow)
                .fetch_optional(&self.pool)
                .await?;
        Ok((owner.as_deref() == Some(self.owner.as_str())).then(|| sent + self.settings.lease))
    }

    /// Extends the lease if this instance still owns it (an expired lease nobody took is still
    /// ours: nobody else sent anything meanwhile).
    async fn renew(&self, flow: i32) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE gateway_outbox_leases SET expires_at = UTC_TIMESTAMP(3) + INTERVAL ? MICROSECOND \
             WHERE flow_id = ? AND owner = ?",
        )
        .bind(self.settings.lease.as_micros() as i64)
        .bind(flow)
        .bind(&self.owner)
        .execute(&self.pool)
        .await?;
        // sqlx asks for found rows, so an unchanged `expires_at` still counts.
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, flow: i32) {
        let _ = sqlx::query("DELETE FROM gateway_outbox_leases WHERE flow_id = ? AND owner = ?")
            .bind(flow)
            .bind(&self.owner)
            .execute(&self.pool)
            .await;
    }
}

/// What a delivery round ended with.
enum Round {
    Settled(HashSet<i64>),
    Lost,
    DbError,
}

/// This instance's hold on one flow's lease, as far as it can prove it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Held {
    Until(Instant),
    Lost,
}

/// A flow's lease during one delivery: kept alive by [`Lease::keep`], consulted before and
/// during every request.
struct Lease {
    flow: i32,
    length: Duration,
    held: watch::Sender<Held>,
}

impl Lease {
    fn new(flow: i32, length: Duration, until: Instant) -> Lease {
        Lease { flow, length, held: watch::Sender::new(Held::Until(until)) }
    }

    /// Renews every third of the lease until it is lost. Each renewal is timed from before it
    /// is sent, and one that cannot be made before the lease runs out loses it: from then on
    /// another instance may have taken the flow.
    async fn keep(&self, outbox: &Outbox) {
        loop {
            let Held::Until(until) = *self.held.borrow() else { return };
            tokio::time::sleep_until(until - self.length * 2 / 3).await;
            let sent = Instant::now();
            match tokio::time::timeout_at(until, outbox.renew(self.flow)).await {
                Ok(Ok(true)) => {
                    self.held.send_replace(Held::Until(sent + self.length));
                }
                Ok(Ok(false)) => {
                    tracing::warn!("Outbox lost the lease of flow {} to another instance", self.flow);
                    self.held.send_replace(Held::Lost);
                    return;
                }
                Ok(Err(error)) if Instant::now() < until => {
                    tracing::warn!("Outbox cannot renew the lease of flow {}: {error}", self.flow);
                    tokio::time::sleep((self.length / 10).min(Duration::from_secs(1))).await;
                }
                Ok(Err(_)) | Err(_) => {
                    tracing::warn!("Outbox could not renew the lease of flow {} in time", self.flow);
                    self.held.send_replace(Held::Lost);
                    return;
                }
            }
        }
    }

    /// Runs `work` (a request) if the lease holds for another third of its length, and
    /// abandons it the moment the lease is lost: `None` then.
    async fn while_held<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        let mut held = self.held.subscribe();
        let third = self.length / 3;
        // A renewal in progress may be about to extend it; the keeper says Lost at worst when
        // the lease runs out, so this wait is bounded.
        let ready = held
            .wait_for(|h| match h {
                Held::Until(until) => until.saturating_duration_since(Instant::now()) >= third,
                Held::Lost => true,
            })
            .await
            .map(|h| *h != Held::Lost)
            .unwrap_or(false);
        if !ready {
            return None;
        }
        tokio::select! {
            output = work => Some(output),
            _ = held.wait_for(|h| *h == Held::Lost) => None,
        }
    }

    /// A fenced write changed nothing: another instance owns the flow now.
    fn lost_on_record(&self) -> Round {
        tracing::warn!("Outbox lost the lease of flow {} to another instance", self.flow);
        self.held.send_replace(Held::Lost);
        Round::Lost
    }
}

/// The original's call, `requests.post(url, json=payload, timeout=...)` then
/// `raise_for_status()`, with the body already rendered as `requests` rendered it.
///
/// `parsed` is `url` parsed, or `None` when it does not parse: the client then refuses it with
/// the same error as before.
async fn post(
    http: &reqwest::Client,
    parsed: Option<&reqwest::Url>,
    url: &str,
    body: bytes::Bytes,
) -> Result<(), Failure> {
    let builder = match parsed {
        Some(parsed) => http.post(parsed.clone()),
        None => http.post(url),
    };
    let send = builder.header(reqwest::header::CONTENT_TYPE, "application/json").body(body).send().await;
    let response = match send {
        Ok(response) => response,
        Err(error) => {
            return Err(Failure {
                // A URL the client refuses will never work; anything else (refused, reset,
                // timed out) may.
                permanent: error.is_builder(),
                error: PostError::Send(error_chain(&error.without_url())),
                retry_after: None,
            });
        }
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    let retry_after = matches!(code, 429 | 503).then(|| retry_after(response.headers())).flatten();
    Err(Failure {
        permanent: !(status.is_server_error() || code == 408 || code == 429),
        error: PostError::Status {
            code,
            kind: if status.is_client_error() { "Client" } else { "Server" },
            reason: status.canonical_reason().unwrap_or("Unknown").to_owned(),
            url: redacted_str(url),
        },
        retry_after,
    })
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error("{0}")]
    Send(String),
    /// Worded as `requests`' `raise_for_status()`, which the original logged.
    #[error("{code} {kind} Error: {reason} for url: {url}")]
    Status { code: u16, kind: &'static str, reason: String, url: String },
}

/// reqwest's top-level message ("error sending request") hides the cause an operator needs
/// (connection refused, timed out, certificate ...), which sits further down the chain.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A URL as logged: a password in its user info is masked.
pub fn redacted_str(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&soon).unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(80) && parsed <= Duration::from_secs(90), "{parsed:?}");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(redacted_str("http://u:secret@h/p?q=1"), "http://u:***@h/p?q=1");
        assert_eq!(redacted_str("http://h/p"), "http://h/p");
    }
}
