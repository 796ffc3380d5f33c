//! `HTTP_ORDERED=false`: every request of a flow on its own schedule. The due ones (and only
//! those: the table says which) are sent as soon as the byte budget and `HTTP_CONCURRENCY`
//! allow, each in a task of its own, and each answer is recorded within [`RECORD_WINDOW`] of
//! arriving. So a request refused for a long while (`Retry-After: 600`), or slow to be
//! answered, delays no other, and a crash makes the next holder resend only the requests in
//! flight and those answered in the last 20 ms.

use super::budget::Grant;
use super::lease::Lease;
use super::queue::Queued;
use super::round::{Answer, Current, Linger, Next, CURSOR_REWIND, FIRST_RETRY, PAGE, RECORD_WINDOW};
use super::Outbox;
use chrono::NaiveDateTime;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What woke the round.
enum Event {
    Lost,
    Answered(Box<Answer>),
    /// The budget granted the bytes of the next request waiting.
    Granted(Grant),
    /// New requests of the flow were written.
    Written,
    /// Time to record, or shutdown: the loop's checks say which.
    Tick,
}

/// One flow's requests on their way: read but not sent, in flight, answered but not recorded.
#[derive(Default)]
struct Pipeline {
    waiting: VecDeque<Queued>,
    sending: JoinSet<Answer>,
    /// Sent and not yet recorded: the table still holds them as due, so a page read meanwhile
    /// (after the cursor's rewind) must not send them again.
    in_flight: HashSet<i64>,
    answered: Vec<Answer>,
    /// When the oldest answer not yet recorded arrived.
    oldest: Option<Instant>,
}

impl Pipeline {
    fn idle(&self) -> bool {
        self.waiting.is_empty() && self.sending.is_empty() && self.answered.is_empty()
    }
}

impl Outbox {
    pub(super) async fn deliver_unordered(
        &self,
        lease: &Lease,
        mut current: Current,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> Next {
        let flow = lease.flow;
        let mut pipe = Pipeline::default();
        // Read on after the last request read, soonest due first; from the start again now
        // and then, for a request another instance committed behind what was read.
        let mut after: Option<(NaiveDateTime, i64)> = None;
        let mut rewind_at = Instant::now() + CURSOR_REWIND;
        // No more due requests at the last read: read again once requests are written (or after
        // lingering, for those another instance wrote), not only once those in flight are
        // answered: one slow request must not hold back the ones written after it.
        let mut drained = false;
        let mut lingered_out = false;
        let mut soonest: Option<Duration> = None;
        // Set once the round winds down: nothing more is sent, what is in flight is awaited.
        let mut end: Option<Next> = None;
        let mut grant: Option<Pin<Box<dyn Future<Output = Grant> + Send>>> = None;
        // Made once: the loop turns once per answer, and at thousands of answers a second what
        // it builds each turn shows in the CPU per request.
        let lost = lease.lost();
        let stopping = shutdown.cancelled();
        let record_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(lost, stopping, record_timer);
        let mut timer_set_for: Option<Instant> = None;
        loop {
            if end.is_none() && shutdown.is_cancelled() {
                end = Some(Next::Idle);
            }
            let window_passed = pipe.oldest.is_some_and(|at| at.elapsed() >= RECORD_WINDOW);
            if !pipe.answered.is_empty() && (end.is_some() || pipe.sending.is_empty() || window_passed) {
                match self.record(flow, &pipe.answered).await {
                    Ok(Some(recorded)) => soonest = earliest(soonest, recorded.soonest),
                    Ok(None) => {
                        lease.lost_on_record();
                        pipe.sending.abort_all();
                        return Next::Idle;
                    }
                    Err(error) => {
                        tracing::warn!("Outbox cannot record deliveries of flow {flow}: {error}");
                        end.get_or_insert(Next::Due(FIRST_RETRY));
                    }
                }
                // Recorded (or the round ends): a page read from now on no longer holds them.
                for answer in &pipe.answered {
                    pipe.in_flight.remove(&answer.request.id);
                }
                pipe.answered.clear();
                pipe.oldest = None;
            }
            if let Some(next) = end {
                if pipe.sending.is_empty() && pipe.answered.is_empty() {
                    return match next {
                        Next::Due(wait) => Next::Due(earliest(Some(wait), soonest).unwrap_or(wait)),
                        Next::Idle => soonest.map_or(Next::Idle, Next::Due),
                        Next::Held => Next::Held,
                    };
                }
            }
            if end.is_none() && pipe.waiting.is_empty() && !drained && pipe.sending.len() < PAGE {
                if Instant::now() >= rewind_at {
                    (after, rewind_at) = (None, Instant::now() + CURSOR_REWIND);
                }
                match self.queue.due(flow, after, PAGE as i64).await {
                    Ok(page) => {
                        drained = page.len() < PAGE;
                        if let Some(last) = page.last() {
                            after = Some((last.due_at, last.id));
                            lingered_out = false;
                        }
                        // A request answered but not yet recorded is still in the table, due.
                        pipe.waiting.extend(page.into_iter().filter(|r| !pipe.in_flight.contains(&r.id)));
                    }
                    Err(error) => {
                        tracing::warn!("Outbox cannot read the requests of flow {flow}: {error}");
                        end = Some(Next::Due(FIRST_RETRY));
                    }
                }
                continue;
            }
            if end.is_none() && drained && pipe.idle() {
                if lingered_out {
                    return soonest.map_or(Next::Idle, Next::Due);
                }
                match self.linger(lease, wake, shutdown).await {
                    Linger::Woken => drained = false,
                    // One more read: requests another instance wrote meanwhile.
                    Linger::TimedOut => (drained, lingered_out) = (false, true),
                    Linger::Stop => end = Some(Next::Idle),
                }
                continue;
            }
            // Sent in groups, their bodies read in one statement each: refilled once half the
            // requests in flight are answered, not one by one as each is.
            if end.is_none() && grant.is_none() && pipe.sending.len() <= PAGE / 2 {
                if let Some(next) = pipe.waiting.front() {
                    grant = Some(Box::pin(self.budget.take_owned(next.bytes)));
                }
            }
            let record_at = pipe.oldest.map(|at| at + RECORD_WINDOW);
            if let Some(at) = record_at.filter(|at| timer_set_for != Some(*at)) {
                record_timer.as_mut().reset(at);
                timer_set_for = Some(at);
            }
            let event = tokio::select! {
                _ = &mut lost => Event::Lost,
                Some(joined) = pipe.sending.join_next(), if !pipe.sending.is_empty() => match joined {
                    Ok(answer) => Event::Answered(Box::new(answer)),
                    Err(_) => Event::Tick,
                },
                granted = async { grant.as_mut().expect("checked").await }, if grant.is_some() && end.is_none() => {
                    Event::Granted(granted)
                }
                _ = &mut record_timer, if record_at.is_some() => Event::Tick,
                _ = &mut stopping, if end.is_none() => Event::Tick,
                _ = wake.notified(), if drained && end.is_none() => Event::Written,
            };
            match event {
                Event::Lost => {
                    pipe.sending.abort_all();
                    // If nobody has taken the flow yet, the fence lets this through and spares
                    // the next holder those resends.
                    let _ = self.record(flow, &pipe.answered).await;
                    return Next::Idle;
                }
                Event::Answered(answer) => {
                    pipe.oldest.get_or_insert_with(Instant::now);
                    pipe.answered.push(*answer);
                    // And every other answer already in, without turning the loop for each.
                    while let Some(joined) = pipe.sending.try_join_next() {
                        if let Ok(answer) = joined {
                            pipe.answered.push(answer);
                        }
                    }
                }
                Event::Granted(granted) => {
                    grant = None;
                    if let Err(next) = self.dispatch(lease, &mut current, granted, &mut pipe).await {
                        end = Some(next);
                    }
                }
                Event::Written => drained = false,
                Event::Tick => {}
            }
        }
    }

    /// Sends the first request waiting (its bytes granted) and as many after it as fit the
    /// budget now, their bodies read in one statement, each in a task of its own.
    async fn dispatch(
        &self,
        lease: &Lease,
        current: &mut Current,
        first: Grant,
        pipe: &mut Pipeline,
    ) -> Result<(), Next> {
        self.still_current(lease, current).await?;
        let endpoint = &current.endpoint;
        let mut group = Vec::new();
        group.extend(pipe.waiting.pop_front().map(|request| (request, first)));
        while pipe.sending.len() + group.len() < PAGE {
            let Some(next) = pipe.waiting.front() else { break };
            let Some(grant) = self.budget.try_take(next.bytes) else { break };
            group.extend(pipe.waiting.pop_front().map(|request| (request, grant)));
        }
        if !lease.ready().await {
            return Err(Next::Idle);
        }
        let mut bodies =
            self.queue.bodies(group.iter().map(|(r, _)| (r.id, r.bytes))).await.map_err(|error| {
                tracing::warn!("Outbox cannot read the requests of flow {}: {error}", lease.flow);
                Next::Due(FIRST_RETRY)
            })?;
        for (request, grant) in group {
            // Gone meanwhile: nothing to send.
            let Some(body) = bodies.remove(&request.id) else { continue };
            pipe.in_flight.insert(request.id);
            let sender = Arc::clone(&self.sender);
            let endpoint = endpoint.clone();
            pipe.sending.spawn(async move {
                let result = sender.send(&endpoint.url, body).await;
                // The body is gone with the request: its bytes go back to the budget.
                drop(grant);
                Answer { request, endpoint, result }
            });
        }
        Ok(())
    }
}

fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
