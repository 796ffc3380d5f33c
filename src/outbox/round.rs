//! One delivery round of one flow, with its lease in hand: what the flow's row says first
//! (deleted, held, or an endpoint, perhaps a new one), then its due requests in order
//! (`ordered`) or each on its own (`unordered`), and how each answer is recorded.

use super::http::Failure;
use super::lease::Lease;
use super::queue::{Failed, Queued};
use super::{Destination, Endpoint, Outbox};
use crate::backoff;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Requests read per round trip (their bodies are read as far as the byte budget allows).
pub(super) const PAGE: usize = 200;
/// How often a delivery reads its flow from the start again, for a request another instance
/// committed with a smaller id (or an earlier `next_attempt_at`) than what it read past.
pub(super) const CURSOR_REWIND: Duration = Duration::from_secs(5);
/// How long answered requests may wait to be recorded as such: what a crash can make the next
/// holder send again beside the requests in flight. One durable write per request would cap a
/// fast endpoint at the database's commit rate (1,500 requests/s here instead of 9,000).
pub(super) const RECORD_WINDOW: Duration = Duration::from_millis(20);
/// How long a flow's delivery waits, lease in hand, for more requests once it has sent all:
/// at a steady trickle of messages, taking and giving back the lease for each one cost three
/// statements of the six each request needed. Another instance's requests of the flow wait
/// this long at most, since a lingering delivery reads the table when it ends.
const LINGER: Duration = Duration::from_millis(250);
/// How old the flow's row, as last read, may be when a request leaves: an edit, a disable or a
/// delete applies within this long, even in the middle of a long run of requests to a slow
/// endpoint. One read of one row per second of sending.
pub(super) const FRESH_FOR: Duration = Duration::from_secs(1);
/// The wait after the database failed a delivery's statement.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A permanent failure (say, 400) may be a deployment in progress; a few attempts, not more.
const PERMANENT_ATTEMPTS: u32 = 3;
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What the scheduler should do next about a flow after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Come back after this long: a request waits for its retry.
    Due(Duration),
    /// Nothing due is known: the next read of the schedule (or a new request) says when.
    Idle,
    /// Its requests are held: its flow is disabled or cannot post.
    Held,
}

/// One attempt's answer, waiting to be recorded.
pub(super) struct Answer {
    pub request: Queued,
    /// Where it went.
    pub endpoint: Endpoint,
    pub result: Result<(), Failure>,
}

/// What recording a group of answers settled.
#[derive(Default)]
pub(super) struct Recorded {
    /// Requests that failed and are now dead.
    pub died: HashSet<i64>,
    /// The soonest retry scheduled.
    pub soonest: Option<Duration>,
}

/// The endpoint a round sends to, and when the flow's row last named it.
pub(super) struct Current {
    pub endpoint: Endpoint,
    read_at: Instant,
}

impl Current {
    pub fn new(endpoint: Endpoint) -> Current {
        Current { endpoint, read_at: Instant::now() }
    }
}

/// How waiting for more requests of a flow ended.
pub(super) enum Linger {
    Woken,
    TimedOut,
    /// The lease was lost or shutdown began.
    Stop,
}

impl Outbox {
    /// Delivers a flow's due requests until none is due. The lease is kept alive beside the
    /// delivery, and given back at the end.
    pub(super) async fn deliver_flow(
        &self,
        flow: i32,
        held_until: Instant,
        shutdown: &CancellationToken,
    ) -> Next {
        let lease = Lease::new(flow, self.settings.lease, held_until);
        let wake = self.signal.wake_for(flow);
        let delivery = self.deliver(&lease, &wake, shutdown);
        let keeper = lease.keep(&self.queue);
        tokio::pin!(delivery, keeper);
        // The keeper ends only when the lease is lost; the delivery then stops at once, since
        // it waits on the same news.
        let next = tokio::select! {
            next = &mut delivery => next,
            () = &mut keeper => delivery.await,
        };
        self.signal.forget(flow);
        self.queue.release(flow).await;
        next
    }

    async fn deliver(&self, lease: &Lease, wake: &Notify, shutdown: &CancellationToken) -> Next {
        let flow = lease.flow;
        let endpoint = match self.destination(lease).await {
            Ok(Ok(endpoint)) => endpoint,
            Ok(Err(next)) => return next,
            Err(()) => return Next::Due(FIRST_RETRY),
        };
        // Retries scheduled by what another URL answered are void.
        match self.queue.retried_url(flow).await {
            Ok(Some(tried)) if *tried != *endpoint.raw => match self.queue.void_retries(flow).await {
                Ok(true) => tracing::info!(
                    "The endpoint_url of flow_id={flow} changed: its requests waiting for a retry are due now"
                ),
                Ok(false) => {
                    lease.lost_on_record();
                    return Next::Idle;
                }
                Err(error) => {
                    tracing::warn!("Outbox cannot reschedule the requests of flow {flow}: {error}");
                    return Next::Due(FIRST_RETRY);
                }
            },
            Ok(_) => {}
            Err(error) => {
                tracing::warn!("Outbox cannot read the requests of flow {flow}: {error}");
                return Next::Due(FIRST_RETRY);
            }
        }
        let current = Current::new(endpoint);
        if self.settings.ordered {
            self.deliver_in_order(lease, current, wake, shutdown).await
        } else {
            self.deliver_unordered(lease, current, wake, shutdown).await
        }
    }

    /// The flow's endpoint as its row says now; otherwise what the round ends with (a deleted
    /// flow's requests buried first). `Err` when the database cannot say.
    pub(super) async fn destination(&self, lease: &Lease) -> Result<Result<Endpoint, Next>, ()> {
        let flow = lease.flow;
        let (target, hold_recorded) = self.queue.target(flow).await.map_err(|error| {
            tracing::warn!("Outbox cannot read flow {flow}: {error}");
        })?;
        match Destination::of(&target) {
            Destination::Send(endpoint) => {
                if hold_recorded {
                    // Held requests age again from now on.
                    if let Err(error) = self.queue.note_released(flow).await {
                        tracing::warn!("Outbox cannot note that flow {flow} is no longer held: {error}");
                    }
                }
                Ok(Ok(endpoint))
            }
            Destination::Held(_) => Ok(Err(Next::Held)),
            Destination::Deleted => match self.queue.bury_deleted(flow).await {
                Ok(Some((code, buried))) => {
                    if buried > 0 {
                        tracing::error!(
                            flow_code = %code,
                            "Giving up on {buried} requests of flow {code} (flow_id={flow}): the flow was deleted; \
                             they are kept in gateway_outbox as dead"
                        );
                    }
                    Ok(Err(Next::Idle))
                }
                Ok(None) => {
                    lease.lost_on_record();
                    Ok(Err(Next::Idle))
                }
                Err(error) => {
                    tracing::warn!("Outbox cannot keep the requests of deleted flow {flow} as dead: {error}");
                    Err(())
                }
            },
        }
    }

    /// Reads the flow's row again once `current` is older than [`FRESH_FOR`]. `Err` is what the
    /// round ends with: the flow is held or deleted now, or names another URL (a new round then
    /// starts at once, which voids the retries the old URL's answers scheduled), or the database
    /// cannot say.
    pub(super) async fn still_current(&self, lease: &Lease, current: &mut Current) -> Result<(), Next> {
        if current.read_at.elapsed() < FRESH_FOR {
            return Ok(());
        }
        match self.destination(lease).await {
            Ok(Ok(now)) if now.raw == current.endpoint.raw => {
                current.read_at = Instant::now();
                Ok(())
            }
            Ok(Ok(_)) => Err(Next::Due(Duration::ZERO)),
            Ok(Err(next)) => Err(next),
            Err(()) => Err(Next::Due(FIRST_RETRY)),
        }
    }

    /// Waits up to [`LINGER`] for more requests of the flow.
    pub(super) async fn linger(&self, lease: &Lease, wake: &Notify, shutdown: &CancellationToken) -> Linger {
        tokio::select! {
            _ = lease.lost() => Linger::Stop,
            _ = shutdown.cancelled() => Linger::Stop,
            _ = wake.notified() => Linger::Woken,
            _ = tokio::time::sleep(LINGER) => Linger::TimedOut,
        }
    }

    /// Deletes what was delivered; schedules or buries what failed, logging each failure.
    /// `None` when this instance no longer owns the flow's lease: then nothing is changed, the
    /// new owner decides.
    pub(super) async fn record(
        &self,
        flow: i32,
        answers: &[Answer],
    ) -> Result<Option<Recorded>, sqlx::Error> {
        let delivered: Vec<i64> = answers.iter().filter(|a| a.result.is_ok()).map(|a| a.request.id).collect();
        if !self.queue.delete_delivered(flow, &delivered).await? {
            return Ok(None);
        }
        let mut recorded = Recorded::default();
        for answer in answers {
            let Err(failure) = &answer.result else { continue };
            let request = &answer.request;
            // Attempts count at one URL: what another URL answered says nothing of this one.
            let attempts = if *request.url == *answer.endpoint.raw { request.attempts + 1 } else { 1 };
            tracing::error!(
                flow_code = %request.flow_code,
                error_kind = "post_failed",
                "Error posting flow {} to endpoint {}: {}",
                request.flow_code,
                super::http::redacted_str(answer.endpoint.raw.trim()),
                failure.error
            );
            let dead = attempts >= self.settings.max_attempts
                || (failure.permanent && attempts >= PERMANENT_ATTEMPTS)
                || request.age >= self.settings.max_age;
            let delay = retry_delay(attempts, failure.retry_after, self.settings.max_retry_delay);
            let error = failure.error.to_string();
            let failed = Failed { url: &answer.endpoint.raw, attempts, error: &error, dead, delay };
            if !self.queue.reschedule(flow, request.id, &failed).await? {
                return Ok(None);
            }
            if dead {
                recorded.died.insert(request.id);
                tracing::error!(
                    flow_code = %request.flow_code,
                    "Giving up on request {} of flow {} after {attempts} attempts over {:.0}s; it is kept in gateway_outbox as dead",
                    request.id,
                    request.flow_code,
                    request.age.as_secs_f64()
                );
            } else {
                recorded.soonest = Some(recorded.soonest.map_or(delay, |s| s.min(delay)));
            }
        }
        Ok(Some(recorded))
    }
}

/// The wait before the next attempt after `attempts` failed: the capped exponential backoff,
/// or the endpoint's `Retry-After` when that is longer. An endpoint can ask for more time,
/// never for less: `Retry-After: 0` from an overloaded proxy would otherwise burn every attempt
/// in a few seconds.
pub(super) fn retry_delay(attempts: u32, retry_after: Option<Duration>, cap: Duration) -> Duration {
    let backoff = backoff::after_failures(attempts, FIRST_RETRY, cap);
    retry_after.map_or(backoff, |asked| asked.min(MAX_RETRY_AFTER).max(backoff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_lengthens_the_wait_but_never_shortens_it() {
        let cap = Duration::from_secs(300);
        for attempts in 1..6 {
            let floor = FIRST_RETRY * 2u32.pow(attempts - 1) / 2;
            assert!(retry_delay(attempts, Some(Duration::ZERO), cap) >= floor, "attempt {attempts}");
        }
        assert_eq!(retry_delay(1, Some(Duration::from_secs(600)), cap), Duration::from_secs(600));
        assert_eq!(retry_delay(1, Some(Duration::from_secs(86_400)), cap), MAX_RETRY_AFTER);
    }
}
