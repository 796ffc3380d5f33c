//! The processor: takes the messages the broker session hands over, decodes each, finds the
//! flows whose topic filter matches, validates the payload against each flow's schema, renders
//! what each flow's sink writes, writes a whole batch in one transaction, and only then
//! acknowledges the batch's messages to the broker.
//!
//! It runs on its own task, fed by a bounded channel, so that database and HTTP latency never
//! reach the MQTT event loop (where the original processed messages, stalling its keepalive).
//! Batches are handled one after another in arrival order, so counters are assigned in that
//! order and acknowledgements leave in the order MQTT requires.

use crate::backoff::Backoff;
use crate::batch::{self, Effect, Item, Outcome, WriteError};
use crate::config::BatchSettings;
use crate::db;
use crate::flows::{Action, FlowSet};
use crate::health::{self, Health};
use crate::mqtt::{Acker, Message};
use crate::outbox::OutboxSignal;
use crate::payload::decode;
use crate::sinks::{post_endpoint, store_db};
use chrono::{NaiveDateTime, SubsecRound, Utc};
use sqlx::MySqlPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A batch stops growing at this many payload bytes: rendering and writing a batch needs a
/// few times its size in memory, and the in-flight window should be what decides memory.
const BATCH_MAX_BYTES: usize = 4 << 20;

pub struct Processor {
    flows: watch::Receiver<Arc<FlowSet>>,
    pool: MySqlPool,
    batch: BatchSettings,
    /// Told after each commit that wrote outbox requests.
    outbox: Arc<OutboxSignal>,
    /// Acknowledgements go back to the broker session.
    acks: Acker,
    /// Cancelled at shutdown: a batch waiting for the database is then given up, unacknowledged.
    shutdown: CancellationToken,
    health: Arc<Health>,
    hold: Hold,
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
        Processor { flows, pool, batch, outbox, acks, shutdown, health, hold: Hold::default() }
    }

    /// Runs until the session closes the channel (at shutdown) and what it holds is written.
    pub async fn run(self, mut messages: mpsc::UnboundedReceiver<Message>) {
        let mut batch = Vec::with_capacity(self.batch.max_messages);
        let mut beat = tokio::time::interval(health::BEAT);
        loop {
            self.health.beat_processor();
            let first = tokio::select! {
                message = messages.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
                _ = beat.tick() => continue,
            };
            batch.push(first);
            self.fill(&mut batch, &mut messages).await;
            if !self.process(&batch).await {
                tracing::warn!(
                    "Shutting down with {} messages unwritten; the broker will redeliver them",
                    batch.len()
                );
                return;
            }
            self.health.add_processed(batch.len() as u64);
            // In arrival order, as MQTT requires.
            for message in batch.drain(..) {
                self.acks.ack(message.ack);
            }
        }
    }

    /// Adds what arrives within the batch delay, up to the batch size in messages and bytes.
    async fn fill(&self, batch: &mut Vec<Message>, messages: &mut mpsc::UnboundedReceiver<Message>) {
        let deadline = Instant::now() + self.batch.max_delay;
        let mut bytes: usize = batch.iter().map(|m| m.publish.payload.len()).sum();
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
            bytes += message.publish.payload.len();
            batch.push(message);
        }
    }

    /// Decodes, validates and writes a batch. False when shutdown interrupted a wait for the
    /// database: nothing of the batch may be acknowledged then.
    async fn process(&self, batch: &[Message]) -> bool {
        let received_at: NaiveDateTime = Utc::now().naive_utc().trunc_subsecs(0);
        let items = self.prepare(batch);
        if items.is_empty() {
            return true;
        }
        let Some(outcomes) = self.write_isolating(received_at, &items).await else {
            return false;
        };
        let mut queued: Vec<i32> = Vec::new();
        for (i, outcome) in outcomes {
            let item = &items[i];
            match outcome {
                Outcome::FlowGone => {
                    report(item, "flow_gone", &format!("flow {} no longer exists", item.flow.id))
                }
                Outcome::TooBig(reason) => report(item, "too_big", &reason),
                Outcome::Refused(reason) => report(item, "refused_by_database", &reason),
                Outcome::Written(msg_id) => {
                    metrics::counter!("mqtt_gateway_messages_processed_total", "flow" => item.flow.code.clone(), "action" => item.flow.action.name())
                        .increment(1);
                    metrics::gauge!("mqtt_gateway_last_message_timestamp_seconds", "flow" => item.flow.code.clone())
                        .set(Utc::now().timestamp() as f64);
                    tracing::debug!(flow_code = %item.flow.code, msg_id, "Flow {} took message {msg_id}", item.flow.code);
                    match &item.effect {
                        Effect::Post { url, body: Err(error) } => tracing::error!(
                            flow_code = %item.flow.code,
                            "Error posting flow {} to endpoint {}: {error}",
                            item.flow.code,
                            crate::outbox::redacted_str(url)
                        ),
                        Effect::Post { .. } => queued.push(item.flow.id),
                        Effect::Store(_) => {}
                    }
                }
            }
        }
        if !queued.is_empty() {
            self.outbox.requests_written(queued);
        }
        true
    }

    /// Decodes each message and renders it for each matching flow; logs what fails.
    fn prepare(&self, batch: &[Message]) -> Vec<Item> {
        let flows = Arc::clone(&self.flows.borrow());
        let mut items = Vec::new();
        for Message { publish, .. } in batch {
            let topic = publish.topic.as_str();
            // A fault switch for the supervision test; compiled out of release builds.
            #[cfg(debug_assertions)]
            if std::env::var("MQTT_GATEWAY_TEST_PANIC_ON_TOPIC").is_ok_and(|t| t == topic) {
                panic!("fault injected for {topic}");
            }
            let payload = match decode(&publish.payload) {
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
            for flow in flows.matching(topic) {
                let effect = flow.schema.validate(&payload).and_then(|()| match &flow.action {
                    Action::StoreDb => store_db::attributes(&payload).map(Effect::Store),
                    Action::PostEndpoint { url } => {
                        Ok(Effect::Post { url: url.to_string(), body: post_endpoint::body(&payload) })
                    }
                });
                let item = |effect| Item { flow: Arc::clone(flow), topic: Arc::clone(&shared_topic), effect };
                match effect {
                    Ok(effect) => items.push(item(effect)),
                    Err(reason) => report(&item(Effect::Store(Vec::new())), "invalid_for_flow", &reason),
                }
            }
        }
        items
    }

    /// Writes every item exactly once, or refuses it for its own data.
    ///
    /// The invariant: no single message can stop the pipeline, and no message is dropped for
    /// the database's sake. A group whose write fails for its data is split in halves, in
    /// order, until the message at fault stands alone and fails alone; the others are written
    /// with the ids they would have had. A database that cannot write holds the group, however
    /// long that lasts. `None` when shutdown interrupted a wait: nothing may be acknowledged.
    async fn write_isolating(
        &self,
        received_at: NaiveDateTime,
        items: &[Item],
    ) -> Option<Vec<(usize, Outcome)>> {
        let mut outcomes = Vec::with_capacity(items.len());
        // The next group to write is the last; halves go on in arrival order.
        let mut groups: Vec<Vec<usize>> = vec![(0..items.len()).collect()];
        while let Some(group) = groups.pop() {
            match self.write_held(received_at, items, &group).await? {
                Ok(mut written) => outcomes.append(&mut written),
                Err(reason) if group.len() == 1 => outcomes.push((group[0], Outcome::Refused(reason))),
                Err(reason) => {
                    tracing::debug!(
                        "A batch of {} failed ({reason}); splitting it to find the message",
                        group.len()
                    );
                    let (first, second) = group.split_at(group.len() / 2);
                    groups.push(second.to_vec());
                    groups.push(first.to_vec());
                }
            }
        }
        Some(outcomes)
    }

    /// Writes one group, holding it while the database cannot write. `Some(Err(reason))` when
    /// the error is about the group's data (or, for a group of one, when the server keeps
    /// dropping the connection on it while answering otherwise).
    async fn write_held(
        &self,
        received_at: NaiveDateTime,
        items: &[Item],
        group: &[usize],
    ) -> Option<Result<Vec<(usize, Outcome)>, String>> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut dropped_connection = 0;
        let mut conflicts = 0;
        loop {
            let attempt = Instant::now();
            let error = match batch::write(&self.pool, received_at, items, group).await {
                Ok(outcomes) => {
                    metrics::histogram!("mqtt_gateway_commit_seconds")
                        .record(attempt.elapsed().as_secs_f64());
                    metrics::histogram!("mqtt_gateway_batch_messages").record(group.len() as f64);
                    self.hold.resume(&self.health);
                    return Some(Ok(outcomes));
                }
                Err(error) => error,
            };
            if error.blame() == db::Blame::Data {
                return Some(Err(format!("database error: {error}")));
            }
            if let WriteError::Db(db_error) = &error {
                if db::conflict(db_error) && conflicts < CONFLICT_RETRIES {
                    // Another writer won the race (several instances, a Galera cluster): run
                    // the transaction again at once, after a little jitter; no outage to report.
                    conflicts += 1;
                    metrics::counter!("mqtt_gateway_commit_conflicts_total").increment(1);
                    tracing::debug!("Commit conflict ({error}); writing the batch again");
                    let jitter = rand::random_range(5..50);
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    continue;
                }
                if db::connection_lost(db_error) && db::answers(&self.pool).await {
                    dropped_connection += 1;
                    if dropped_connection >= DROPS_BEFORE_SPLIT {
                        return Some(Err(format!(
                            "the database closed the connection each of the {dropped_connection} times this was \
                             written, while answering otherwise: {error}"
                        )));
                    }
                    continue;
                }
            }
            dropped_connection = 0;
            let delay = backoff.step();
            self.hold.hold(&self.health, group.len(), &error, delay);
            // Waiting for the database is healthy as far as the watchdog is concerned: keep
            // beating while the backoff runs.
            let until = Instant::now() + delay;
            while Instant::now() < until {
                self.health.beat_processor();
                tokio::select! {
                    _ = self.shutdown.cancelled() => return None,
                    _ = tokio::time::sleep_until(until.min(Instant::now() + health::BEAT)) => {}
                }
            }
        }
    }
}

/// Conflicts retried at once before they count as the database being unable to write.
const CONFLICT_RETRIES: u32 = 5;

/// How many times in a row a group may make the server drop the connection, while it answers
/// pings, before the group is judged to be the cause (split, or failed when alone).
const DROPS_BEFORE_SPLIT: u32 = 3;

/// Whether the processor is holding the stream for the database, and since when: one ERROR when
/// holding starts and one line when it ends, never a line per retry.
#[derive(Default)]
struct Hold {
    since: std::sync::Mutex<Option<(Instant, String)>>,
}

impl Hold {
    fn hold(&self, health: &Health, messages: usize, error: &WriteError, delay: Duration) {
        let label = match error {
            WriteError::Db(error) => db::error_label(error),
            WriteError::CounterOverflow(_) => "counter".to_owned(),
        };
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match &*since {
            None => {
                tracing::error!(
                    error_code = %label,
                    error_kind = "database_holding",
                    "Database cannot take writes, holding {messages} messages unacknowledged until it can: {error}"
                );
                health.set_waiting_for(Some(format!("the database to take writes ({error})")));
                metrics::gauge!("mqtt_gateway_database_holding", "code" => label.clone()).set(1.0);
                *since = Some((Instant::now(), label));
            }
            Some((_, previous)) if *previous != label => {
                tracing::error!(
                    error_code = %label,
                    "Database still cannot take writes, now for another reason: {error}"
                );
                health.set_waiting_for(Some(format!("the database to take writes ({error})")));
                metrics::gauge!("mqtt_gateway_database_holding", "code" => previous.clone()).set(0.0);
                metrics::gauge!("mqtt_gateway_database_holding", "code" => label.clone()).set(1.0);
                *since = Some((Instant::now(), label));
            }
            Some(_) => tracing::debug!("Database still cannot take writes, retrying in {delay:?}: {error}"),
        }
    }

    fn resume(&self, health: &Health) {
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((when, label)) = since.take() {
            tracing::error!(
                "Database takes writes again after {:.1}s; resuming",
                when.elapsed().as_secs_f64()
            );
            health.set_waiting_for(None);
            metrics::gauge!("mqtt_gateway_database_holding", "code" => label).set(0.0);
        }
    }
}

/// The original's per-flow failure line; `kind` goes in the journal's `ERROR_KIND` field.
fn report(item: &Item, kind: &'static str, reason: &str) {
    metrics::counter!("mqtt_gateway_messages_failed_total", "flow" => item.flow.code.clone(), "action" => item.flow.action.name())
        .increment(1);
    tracing::error!(
        flow_code = %item.flow.code,
        topic = %item.topic,
        error_kind = kind,
        "Error processing topic {} (flow_id={}): {reason}",
        item.topic,
        item.flow.id
    );
}
