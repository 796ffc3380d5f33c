//! The in-flight window: messages taken from the broker and not yet acknowledged (or given up),
//! counted in messages and in bytes. The connection's reader waits here before each read, so
//! memory follows `MAX_IN_FLIGHT` and `MAX_IN_FLIGHT_BYTES` whatever the broker's own window.

use std::sync::Mutex;
use tokio::sync::Notify;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Used {
    messages: usize,
    bytes: usize,
}

pub struct Window {
    max_messages: usize,
    max_bytes: usize,
    used: Mutex<Used>,
    freed: Notify,
    /// `mqtt_gateway_in_flight_bytes`, found once: it moves with every message.
    gauge: metrics::Gauge,
}

impl Window {
    pub fn new(max_messages: usize, max_bytes: usize) -> Window {
        Window {
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            used: Mutex::default(),
            freed: Notify::new(),
            gauge: metrics::gauge!("mqtt_gateway_in_flight_bytes"),
        }
    }

    fn used(&self) -> std::sync::MutexGuard<'_, Used> {
        self.used.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A message of `bytes` was read.
    pub fn take(&self, bytes: usize) {
        let mut used = self.used();
        used.messages += 1;
        used.bytes += bytes;
        self.gauge.set(used.bytes as f64);
    }

    /// A message of `bytes` was acknowledged or given up.
    pub fn release(&self, bytes: usize) {
        {
            let mut used = self.used();
            used.messages = used.messages.saturating_sub(1);
            used.bytes = used.bytes.saturating_sub(bytes);
            self.gauge.set(used.bytes as f64);
        }
        self.freed.notify_waiters();
    }

    /// Whether reading more may go on, with `buffered` bytes read but not yet a whole message.
    /// An empty window always has room, so one message larger than the whole budget is still
    /// taken, alone.
    pub fn has_room(&self, buffered: usize) -> bool {
        let used = self.used();
        used.messages == 0 || (used.messages < self.max_messages && used.bytes + buffered < self.max_bytes)
    }

    /// Waits until [`has_room`](Self::has_room).
    pub async fn wait_for_room(&self, buffered: usize) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release in between is not missed.
            freed.as_mut().enable();
            if self.has_room(buffered) {
                return;
            }
            freed.await;
        }
    }

    /// Whether reading is paused for want of room (with nothing partly read).
    pub fn is_full(&self) -> bool {
        !self.has_room(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn bytes_and_messages_both_limit() {
        let window = Window::new(3, 100);
        window.take(60);
        assert!(window.has_room(0));
        assert!(!window.has_room(40), "buffered bytes count");
        window.take(50);
        assert!(window.is_full(), "110 bytes of 100");
        window.release(50);
        window.take(1);
        window.take(1);
        assert!(window.is_full(), "three messages of three");
    }

    #[test]
    fn a_message_larger_than_the_budget_is_taken_alone() {
        let window = Window::new(10, 100);
        assert!(window.has_room(10_000));
        window.take(10_000);
        assert!(window.is_full());
        window.release(10_000);
        assert!(window.has_room(0));
    }

    #[tokio::test]
    async fn a_release_wakes_the_reader() {
        let window = Arc::new(Window::new(1, 100));
        window.take(10);
        let waiter = tokio::spawn({
            let window = Arc::clone(&window);
            async move { window.wait_for_room(0).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        window.release(10);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
    }
}
