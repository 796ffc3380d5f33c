//! The outbox's memory: request bodies read from `gateway_outbox` and not yet answered,
//! bounded in bytes over all flows by `HTTP_MAX_IN_FLIGHT_BYTES`. A body is read only once its
//! bytes are granted, and they are given back when its request has been answered; a body
//! larger than the whole budget is still sent, alone.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counted in KiB, so that a budget of up to 2^40 bytes fits a semaphore's `u32` requests.
const UNIT: u64 = 1024;

#[derive(Clone)]
pub struct Budget {
    units: Arc<Semaphore>,
    total: u32,
}

/// Bytes granted; given back when dropped.
pub struct Grant {
    _units: OwnedSemaphorePermit,
}

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let total = (bytes as u64).div_ceil(UNIT).clamp(1, u64::from(u32::MAX)) as u32;
        Budget { units: Arc::new(Semaphore::new(total as usize)), total }
    }

    /// The whole budget in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.total) * UNIT
    }

    /// What bodies of these lengths cost: at least a unit each, the whole budget at most. A
    /// length not recorded (a row written by an older version) costs the whole budget, so that
    /// such a body is read alone.
    fn cost(&self, lengths: impl IntoIterator<Item = Option<u64>>) -> u32 {
        let units = lengths.into_iter().map(|length| match length {
            Some(bytes) => bytes.div_ceil(UNIT).max(1),
            None => u64::from(self.total),
        });
        units.sum::<u64>().min(u64::from(self.total)) as u32
    }

    /// Waits until these bodies fit, first come first served.
    pub async fn take(&self, lengths: impl IntoIterator<Item = Option<u64>>) -> Grant {
        let cost = self.cost(lengths);
        Self::granted(Arc::clone(&self.units), cost).await
    }

    /// [`Budget::take`] for one body, as a future that owns what it needs, so that it can be
    /// kept across the waits of a loop without losing its place in line.
    pub fn take_owned(&self, length: Option<u64>) -> impl Future<Output = Grant> + Send + 'static {
        Self::granted(Arc::clone(&self.units), self.cost([length]))
    }

    async fn granted(units: Arc<Semaphore>, cost: u32) -> Grant {
        let permit = units.acquire_many_owned(cost).await;
        Grant { _units: permit.expect("the outbox budget is never closed") }
    }

    /// This body's bytes if they fit now.
    pub fn try_take(&self, length: Option<u64>) -> Option<Grant> {
        let permit = Arc::clone(&self.units).try_acquire_many_owned(self.cost([length])).ok()?;
        Some(Grant { _units: permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_cost_their_bytes_and_a_body_larger_than_the_budget_costs_all_of_it() {
        let budget = Budget::new(10 << 10);
        assert_eq!(budget.cost([Some(1)]), 1);
        assert_eq!(budget.cost([Some(3000), Some(1024)]), 4);
        assert_eq!(budget.cost([Some(1 << 30)]), 10);
        assert_eq!(budget.cost([None]), 10, "an unknown length is read alone");
        let held = budget.try_take(Some(9 << 10)).expect("fits");
        assert!(budget.try_take(Some(2 << 10)).is_none(), "over the budget");
        assert!(budget.try_take(Some(1)).is_some());
        drop(held);
        assert!(budget.try_take(Some(10 << 10)).is_some());
    }
}
