//! The processor: the loop that takes the messages the broker session hands over, decodes each
//! ([`crate::payload`]), finds the flows whose topic filter matches and validates the payload
//! against each flow's schema ([`crate::flows`]), has each flow's sink render it
//! ([`crate::sinks`]), writes the whole batch ([`crate::commit`]), reports each message's
//! outcome, and only then acknowledges the batch's messages to the broker.
//!
//! It runs on its own task, fed by a channel that the in-flight window bounds, so that
//! database latency never reaches the broker session (the original processed messages in its
//! MQTT callback, stalling its keepalive).
//! Batches are handled one after another in arrival order, so counters are assigned in that
//! order and acknowledgements leave in the order MQTT requires.

use crate::commit::{Commit, Committed, Outcome};
use crate::config::BatchSettings;
use crate::flows::{Flow, FlowSet};
use crate::health::{Health, Part};
use crate::mqtt::{Acker, Message};
use crate::outbox::OutboxSignal;
use crate::payload::decode;
use crate::retained::Fingerprint;
use crate::sinks::{self, AfterCommit, Item};
use chrono::{NaiveDateTime, SubsecRound, Utc};
use sqlx::MySqlPool;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A batch stops growing at this many payload bytes: rendering and writing a batch needs a
/// few times its size in memory, and the in-flight window should be what decides memory.
const BATCH_MAX_BYTES: usize = 4 << 20;

pub struct Processor {
    flows: watch::Receiver<Arc<FlowSet>>,
    batch: BatchSettings,
    /// Told after each commit that wrote outbox requests.
    outbox: Arc<OutboxSignal>,
    /// Acknowledgements go back to the broker session.
    acks: Acker,
    health: Arc<Health>,
    commit: Commit,
}

impl Processor {
    pub fn new(
        flows: watch::Receiver<Arc<FlowSet>>,
        pool: MySqlPool,
        batch: BatchSettings,
        outbox: Arc<OutboxSignal>,
        acks: Acker,
        shutdown: CancellationToken,
        health: Arc<Health>,
    ) -> Processor {
        let commit = Commit::new(pool, shutdown, Arc::clone(&health));
        Processor { flows, batch, outbox, acks, health, commit }
    }

    /// Runs until the session closes the channel (at shutdown) and what it holds is written.
    pub async fn run(mut self, mut messages: mpsc::UnboundedReceiver<Message>) {
        let mut batch = Vec::with_capacity(self.batch.max_messages);
        loop {
            self.health.beat_processor();
            let first = tokio::select! {
                message = messages.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
                // Between batches: no batch of the older set can report a flow after this.
                Ok(()) = self.flows.changed() => {
                    crate::metrics::forget_flows_gone(&self.flows.borrow_and_update());
                    continue;
                }
                // The watchdog asks: coming back to the loop is the answer.
                _ = self.health.poked(Part::Processor) => continue,
            };
            batch.push(first);
            self.fill(&mut batch, &mut messages).await;
            // A fault switch for the watchdog tests: the processor stops turning for good,
            // waiting on nothing that ends (as a lost wakeup or a deadlock would leave it).
            // Compiled out of release builds.
            #[cfg(debug_assertions)]
            if let Ok(topic) = std::env::var("MQTT_GATEWAY_TEST_WEDGE_ON_TOPIC") {
                if batch.iter().any(|m| m.topic == topic) {
                    tracing::warn!(
                        "Wedging the processor on {topic}, as MQTT_GATEWAY_TEST_WEDGE_ON_TOPIC asks"
                    );
                    std::future::pending::<()>().await;
                }
            }
            let settled = self.process(&batch).await;
            self.health.add_processed(settled as u64);
            // In arrival order, as MQTT requires. What was written before a stop is acknowledged
            // too: left unacknowledged, the broker would deliver it again and it would be
            // written twice.
            for message in batch.drain(..settled) {
                self.acks.ack(message.ack);
            }
            if !batch.is_empty() {
                tracing::warn!(
                    "Shutting down with {} messages unwritten; the broker will redeliver them ({settled} written \
                     before them are acknowledged)",
                    batch.len()
                );
                return;
            }
        }
    }

    /// Adds what arrives within the batch delay, up to the batch size in messages and bytes.
    async fn fill(&self, batch: &mut Vec<Message>, messages: &mut mpsc::UnboundedReceiver<Message>) {
        // However long the batch delay, the processor is not stuck while it waits for it.
        let _waiting = self.health.waiting(Part::Processor, self.batch.max_delay);
        let deadline = Instant::now() + self.batch.max_delay;
        let mut bytes: usize = batch.iter().map(|m| m.payload.len()).sum();
        while batch.len() < self.batch.max_messages && bytes < BATCH_MAX_BYTES {
            let message = match messages.try_recv() {
                Ok(message) => message,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, messages.recv()).await {
                        Ok(Some(message)) => message,
                        Ok(None) | Err(_) => return,
                    }
                }
            };
            bytes += message.payload.len();
            batch.push(message);
        }
    }

    /// Decodes, validates and writes a batch. Returns how many of its first messages are settled
    /// (written, or refused for their own data) and may be acknowledged: all of them, unless
    /// shutdown interrupted a wait for the database.
    async fn process(&self, batch: &[Message]) -> usize {
        let received_at: NaiveDateTime = Utc::now().naive_utc().trunc_subsecs(0);
        let items = self.prepare(batch);
        if items.is_empty() {
            return batch.len();
        }
        let (outcomes, settled) = match self.commit.write(received_at, &items).await {
            Committed::Written(outcomes) => (outcomes, batch.len()),
            // The settled items are the first ones, so every message before the one of the
            // first unsettled item is settled whole (the commit splits between messages).
            Committed::ShutDown(outcomes) => {
                let settled = items.get(outcomes.len()).map_or(batch.len(), |item| item.message);
                (outcomes, settled)
            }
        };
        let mut queued: Vec<i32> = Vec::new();
        let mut resent = 0;
        let now = Utc::now().timestamp() as f64;
        for (i, outcome) in outcomes {
            let item = &items[i];
            match outcome {
                Outcome::FlowGone => report(
                    &item.flow,
                    &item.topic,
                    "flow_gone",
                    &format!("flow {} no longer exists", item.flow.id),
                ),
                Outcome::TooBig(reason) => report(&item.flow, &item.topic, "too_big", &reason),
                Outcome::Refused(reason) => report(&item.flow, &item.topic, "refused_by_database", &reason),
                Outcome::AlreadyStored => {
                    resent += 1;
                    metrics::counter!("mqtt_gateway_retained_resent_total").increment(1);
                    tracing::debug!(
                        flow_code = %item.flow.code,
                        "Retained message on {} already stored by flow {}; not stored again",
                        item.topic,
                        item.flow.code
                    );
                }
                Outcome::Written(msg_id) => {
                    item.flow.processed().increment(1);
                    item.flow.last_message().set(now);
                    tracing::debug!(flow_code = %item.flow.code, msg_id, "Flow {} took message {msg_id}", item.flow.code);
                    match item.effect.committed(&item.flow) {
                        AfterCommit::Done => {}
                        AfterCommit::Queued => queued.push(item.flow.id),
                        AfterCommit::NotSent(line) => tracing::error!(flow_code = %item.flow.code, "{line}"),
                    }
                }
            }
        }
        if !queued.is_empty() {
            self.outbox.requests_written(queued);
        }
        if resent > 0 {
            tracing::info!(
                "{resent} retained messages sent again by the broker were already stored; not stored twice"
            );
        }
        settled
    }

    /// Decodes each message and renders it for each matching flow; logs what fails.
    fn prepare(&self, batch: &[Message]) -> Vec<Item> {
        let flows = Arc::clone(&self.flows.borrow());
        let mut items = Vec::new();
        let mut found = Vec::new();
        for (message, Message { topic, payload: payload_bytes, retain, subscription_ids, .. }) in
            batch.iter().enumerate()
        {
            let topic = topic.as_str();
            // A fault switch for the supervision test; compiled out of release builds.
            #[cfg(debug_assertions)]
            if std::env::var("MQTT_GATEWAY_TEST_PANIC_ON_TOPIC").is_ok_and(|t| t == topic) {
                panic!("fault injected for {topic}");
            }
            let payload = match decode(payload_bytes) {
                Ok(payload) => payload,
                Err(error) => {
                    tracing::error!(
                        topic,
                        error_kind = "invalid_payload",
                        "Invalid payload in topic {topic}: {error}"
                    );
                    metrics::counter!("mqtt_gateway_messages_invalid_total").increment(1);
                    continue;
                }
            };
            let shared_topic: Arc<str> = Arc::from(topic);
            let mut fingerprint: Option<Arc<Fingerprint>> = None;
            for flow in flows.routed(topic, subscription_ids, &mut found) {
                match flow.schema.validate(&payload).and_then(|()| sinks::render(flow, &payload)) {
                    Ok(effect) => {
                        items.push(Item {
                            message,
                            flow: Arc::clone(flow),
                            topic: Arc::clone(&shared_topic),
                            effect,
                            fingerprint: Arc::clone(fingerprint.get_or_insert_with(|| {
                                Arc::new(Fingerprint::of(topic, payload_bytes, *retain))
                            })),
                        })
                    }
                    Err(reason) => report(flow, topic, "invalid_for_flow", &reason),
                }
            }
        }
        items
    }
}

/// The original's per-flow failure line; `kind` goes in the journal's `ERROR_KIND` field.
fn report(flow: &Flow, topic: &str, kind: &'static str, reason: &str) {
    flow.failed().increment(1);
    tracing::error!(
        flow_code = %flow.code,
        topic = %topic,
        error_kind = kind,
        "Error processing topic {topic} (flow_id={}): {reason}",
        flow.id
    );
}
