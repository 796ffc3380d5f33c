//! `HTTP_ORDERED=true`: a flow's requests one at a time, oldest first, so they arrive in the
//! order their messages did. A request waiting for its retry holds the later ones back, so the
//! flow is due when its head is.
//!
//! Bodies are read ahead only as far as the endpoint has shown it takes requests: one at the
//! start of a round, twice as many after each group it took, up to a page; a request already
//! refused is read alone. So an endpoint that keeps refusing costs one body read per attempt.

use super::lease::Lease;
use super::queue::Queued;
use super::round::{
    Answer, Current, Linger, Next, Recorded, CURSOR_REWIND, FIRST_RETRY, PAGE, RECORD_WINDOW,
};
use super::Outbox;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes of bodies read at once by one flow, at most (or the budget, if smaller).
const GROUP_BYTES: u64 = 4 << 20;

/// How sending a run of due requests in order ended.
enum Run {
    /// All sent and recorded.
    Done,
    /// The head failed and waits this long for its retry, holding the rest back.
    Failed(std::time::Duration),
    /// Shutdown: what was sent is recorded.
    Stopped,
    /// The flow's row changed under the run (held, deleted, another URL): what was sent is
    /// recorded, and the round ends with this.
    Ended(Next),
    Lost,
    DbError,
}

impl Outbox {
    pub(super) async fn deliver_in_order(
        &self,
        lease: &Lease,
        mut current: Current,
        wake: &Notify,
        shutdown: &CancellationToken,
    ) -> Next {
        let flow = lease.flow;
        // Reading from the smallest id not yet settled, rather than from the start of the flow,
        // skips the rows just deleted: InnoDB keeps them as delete-marked until purged, and a
        // scan from the start would step over all of them on every round.
        let mut cursor = 0i64;
        let mut rewind_at = Instant::now() + CURSOR_REWIND;
        let mut ahead = 1usize;
        let mut lingered_out = false;
        loop {
            if shutdown.is_cancelled() {
                return Next::Idle;
            }
            if Instant::now() >= rewind_at {
                (cursor, rewind_at) = (0, Instant::now() + CURSOR_REWIND);
            }
            let page = match self.queue.in_order(flow, cursor, PAGE as i64).await {
                Ok(page) => page,
                Err(error) => {
                    tracing::warn!("Outbox cannot read the requests of flow {flow}: {error}");
                    return Next::Due(FIRST_RETRY);
                }
            };
            let Some(head) = page.first() else {
                if lingered_out {
                    return Next::Idle;
                }
                match self.linger(lease, wake, shutdown).await {
                    Linger::Woken => {}
                    // One more read: requests another instance wrote meanwhile.
                    Linger::TimedOut => lingered_out = true,
                    Linger::Stop => return Next::Idle,
                }
                continue;
            };
            lingered_out = false;
            let due = page.iter().take_while(|r| r.wait.is_zero()).count();
            if due == 0 {
                return Next::Due(head.wait);
            }
            match self.send_in_order(lease, &mut current, &page[..due], &mut ahead, shutdown).await {
                Run::Done => cursor = page[due - 1].id + 1,
                Run::Ended(next) => return next,
                Run::Failed(wait) => return Next::Due(wait),
                Run::Stopped | Run::Lost => return Next::Idle,
                Run::DbError => return Next::Due(FIRST_RETRY),
            }
        }
    }

    /// One at a time; stops at the first failure that leaves its request alive, which holds
    /// the flow's later requests back.
    ///
    /// Outcomes are recorded before the next request leaves whenever the last request took
    /// [`RECORD_WINDOW`] or more, or the oldest unrecorded one is that old; so a crash makes the
    /// next holder resend the request in flight and at most the ones answered in the window
    /// before it, by requests each faster than the window.
    async fn send_in_order(
        &self,
        lease: &Lease,
        current: &mut Current,
        due: &[Queued],
        ahead: &mut usize,
        shutdown: &CancellationToken,
    ) -> Run {
        let flow = lease.flow;
        let mut unrecorded: Vec<Answer> = Vec::new();
        let mut oldest = Instant::now();
        let mut rest = due;
        while !rest.is_empty() {
            let take = self.group(rest, *ahead);
            let (group, tail) = rest.split_at(take);
            rest = tail;
            let _grant = self.budget.take(group.iter().map(|r| r.bytes)).await;
            let mut bodies = match self.queue.bodies(group.iter().map(|r| (r.id, r.bytes))).await {
                Ok(bodies) => bodies,
                Err(error) => {
                    tracing::warn!("Outbox cannot read the requests of flow {flow}: {error}");
                    let _ = self.record(flow, &unrecorded).await;
                    return Run::DbError;
                }
            };
            for request in group {
                // Gone meanwhile (revived and delivered by the operator's hand, say): nothing to send.
                let Some(body) = bodies.remove(&request.id) else { continue };
                if let Err(next) = self.still_current(lease, current).await {
                    return match self.record_run(lease, &mut unrecorded).await {
                        Ok(_) => Run::Ended(next),
                        Err(run) => run,
                    };
                }
                let endpoint = &current.endpoint;
                let started = Instant::now();
                let Some(result) = lease.while_held(self.sender.send(&endpoint.url, body)).await else {
                    // Still worth recording: if nobody has taken the flow yet, the fence lets it
                    // through and spares the next holder those resends.
                    let _ = self.record(flow, &unrecorded).await;
                    return Run::Lost;
                };
                let failed = result.is_err();
                if unrecorded.is_empty() {
                    oldest = Instant::now();
                }
                unrecorded.push(Answer { request: request.clone(), endpoint: endpoint.clone(), result });
                let slow = started.elapsed() >= RECORD_WINDOW || oldest.elapsed() >= RECORD_WINDOW;
                if !(slow || failed || shutdown.is_cancelled()) {
                    continue;
                }
                let recorded = match self.record_run(lease, &mut unrecorded).await {
                    Ok(recorded) => recorded,
                    Err(run) => return run,
                };
                if failed && !recorded.died.contains(&request.id) {
                    return Run::Failed(recorded.soonest.unwrap_or(FIRST_RETRY));
                }
                if shutdown.is_cancelled() {
                    return Run::Stopped;
                }
            }
            *ahead = (*ahead * 2).min(PAGE);
        }
        match self.record_run(lease, &mut unrecorded).await {
            Ok(_) => Run::Done,
            Err(run) => run,
        }
    }

    /// How many of `rest` to read at once: up to `ahead`, within [`GROUP_BYTES`] and the
    /// budget, at least one; a request already refused alone.
    fn group(&self, rest: &[Queued], ahead: usize) -> usize {
        if rest[0].attempts > 0 {
            return 1;
        }
        let limit = GROUP_BYTES.min(self.budget.bytes());
        let mut bytes = 0u64;
        let fits = rest.iter().take(ahead).take_while(|r| match r.bytes {
            Some(length) if bytes + length <= limit => {
                bytes += length;
                true
            }
            _ => false,
        });
        fits.count().max(1)
    }

    /// Records and forgets `unrecorded`; the round's end otherwise.
    async fn record_run(&self, lease: &Lease, unrecorded: &mut Vec<Answer>) -> Result<Recorded, Run> {
        if unrecorded.is_empty() {
            return Ok(Default::default());
        }
        let recorded = self.record(lease.flow, unrecorded).await;
        unrecorded.clear();
        match recorded {
            Ok(Some(recorded)) => Ok(recorded),
            Ok(None) => {
                lease.lost_on_record();
                Err(Run::Lost)
            }
            Err(error) => {
                tracing::warn!("Outbox cannot record deliveries of flow {}: {error}", lease.flow);
                Err(Run::DbError)
            }
        }
    }
}
