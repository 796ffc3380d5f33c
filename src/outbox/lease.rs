//! A flow's lease during one delivery: this instance's hold on it as far as it can prove it,
//! renewed beside the requests and consulted before and during every one of them.

use super::queue::Queue;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// This instance's hold on one flow's lease, as far as it can prove it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Held {
    Until(Instant),
    Lost,
}

/// A flow's lease during one delivery: kept alive by [`Lease::keep`], consulted before and
/// during every request.
pub struct Lease {
    pub flow: i32,
    length: Duration,
    held: watch::Sender<Held>,
}

impl Lease {
    pub fn new(flow: i32, length: Duration, until: Instant) -> Lease {
        Lease { flow, length, held: watch::Sender::new(Held::Until(until)) }
    }

    /// Renews every third of the lease until it is lost. Each renewal is timed from before it
    /// is sent, and one that cannot be made before the lease runs out loses it: from then on
    /// another instance may have taken the flow.
    pub async fn keep(&self, queue: &Queue) {
        loop {
            let Held::Until(until) = *self.held.borrow() else { return };
            tokio::time::sleep_until(until - self.length * 2 / 3).await;
            let sent = Instant::now();
            match tokio::time::timeout_at(until, queue.renew(self.flow)).await {
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
    pub async fn while_held<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        if !self.ready().await {
            return None;
        }
        let mut held = self.held.subscribe();
        tokio::select! {
            output = work => Some(output),
            _ = held.wait_for(|h| *h == Held::Lost) => None,
        }
    }

    /// Whether a request may start: true once the lease holds for another third of its
    /// length, false if it is lost. A renewal in progress may be about to extend it; the keeper
    /// says Lost at worst when the lease runs out, so this wait is bounded.
    pub async fn ready(&self) -> bool {
        let mut held = self.held.subscribe();
        let third = self.length / 3;
        held.wait_for(|h| match h {
            Held::Until(until) => until.saturating_duration_since(Instant::now()) >= third,
            Held::Lost => true,
        })
        .await
        .map(|h| *h != Held::Lost)
        .unwrap_or(false)
    }

    /// Resolves once the lease is known to be lost.
    pub async fn lost(&self) {
        let mut held = self.held.subscribe();
        let _ = held.wait_for(|h| *h == Held::Lost).await;
    }

    /// A fenced write changed nothing: another instance owns the flow now.
    pub fn lost_on_record(&self) {
        tracing::warn!("Outbox lost the lease of flow {} to another instance", self.flow);
        self.held.send_replace(Held::Lost);
    }
}
