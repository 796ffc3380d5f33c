//! A QoS 1 publisher that knows when the broker has taken each message.

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Publisher {
    client: AsyncClient,
    sent: u64,
    acked: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to the broker on 127.0.0.1:`port` (call inside a tokio runtime).
    pub async fn connect(port: u16) -> anyhow::Result<Publisher> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = format!("testkit-pub-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_max_packet_size(64 << 20, 64 << 20).set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(options, 1_000);
        // Wait for the CONNACK so the first publish cannot race a refused connection.
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => anyhow::bail!("publisher cannot connect to port {port}: {e}"),
                Err(_) => anyhow::bail!("publisher got no CONNACK from port {port}"),
            }
        }
        let acked = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&acked);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Publisher { client, sent: 0, acked, task })
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, false, payload.into()).await?;
        self.sent += 1;
        Ok(())
    }

    /// Publishes a message the broker keeps for every future subscriber (`retain`).
    pub async fn publish_retained(&mut self, topic: &str, payload: impl Into<Vec<u8>>) -> anyhow::Result<()> {
        self.client.publish(topic, QoS::AtLeastOnce, true, payload.into()).await?;
        self.sent += 1;
        Ok(())
    }

    /// Waits until the broker acknowledged everything published so far.
    pub async fn flush(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.acked.load(Ordering::Relaxed) < self.sent {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "broker acknowledged {} of {} messages",
                    self.acked.load(Ordering::Relaxed),
                    self.sent
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}
