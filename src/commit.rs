//! The commit: a batch's writes in one transaction (counters, then each sink's rows), and
//! what happens when that fails: the batch is held while the database cannot write, and split
//! to find the one message at fault when the failure is provably about data.
//!
//! For each flow in a batch the counter moves once (`last_msg_id = last_msg_id + k`), and the
//! batch's messages of that flow get the ids that follow, consecutive and in arrival order;
//! the sinks' rows go in with multi-row inserts. Every message still gets its own
//! `last_msg_id`, exactly as if it had been written alone.
//!
//! Statements are bounded by bytes (the server's `max_allowed_packet`) as well as placeholders,
//! so a batch of any size is written; a message too big for any statement is refused alone.
//! Whose fault a failed write is comes from [`WriteError::blame`], and, for a dropped
//! connection, from a canary write ([`db::takes_writes`]).
//!
//! Every attempt is a bounded wait: the server gives up a lock wait after [`db::LOCK_WAIT`]
//! (error 1205, held and reported like any outage), and the client gives up on a server that
//! does not answer after [`db::ANSWER_WITHIN`] and more for a big batch, closing that
//! connection and trying again on a fresh one. The processor is never stuck in here.

use crate::backoff::Backoff;
use crate::db::{self, StatementBounds};
use crate::flows::table;
use crate::health::{Health, Part};
use crate::sinks::{Item, Rows};
use chrono::NaiveDateTime;
use sqlx::{Connection, MySqlConnection, MySqlPool};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Writes batches for the processor, one at a time.
pub struct Commit {
    pool: MySqlPool,
    /// Cancelled at shutdown: a batch waiting for the database is then given up, unacknowledged.
    shutdown: CancellationToken,
    health: Arc<Health>,
    hold: Hold,
}

/// How a batch's commit ended.
#[derive(Debug)]
pub enum Committed {
    /// Every item written or refused for its own data: its index in the batch, and its outcome.
    Written(Vec<(usize, Outcome)>),
    /// Shutdown came while a group waited for the database. The outcomes are those of the items
    /// settled before (the first groups of a split batch): they are the batch's first items, in
    /// some order, and final; the rest was not written.
    ShutDown(Vec<(usize, Outcome)>),
}

/// How one attempt at a group of items ended.
enum Attempt {
    Written(Vec<(usize, Outcome)>),
    /// The group's data is at fault, for this reason.
    Failed(String),
    ShutDown,
}

impl Commit {
    pub fn new(pool: MySqlPool, shutdown: CancellationToken, health: Arc<Health>) -> Commit {
        Commit { pool, shutdown, health, hold: Hold::default() }
    }

    /// Writes every item exactly once, or refuses it for its own data.
    ///
    /// The invariant: no single message can stop the pipeline, and no message is dropped for
    /// the database's sake. A group whose write fails for its data is split in halves, in
    /// order, until the message at fault stands alone and fails alone; the others are written
    /// with the ids they would have had. A database that cannot write holds the group, however
    /// long that lasts, unless shutdown comes first: then what was settled is returned, and
    /// nothing else may be acknowledged.
    pub async fn write(&self, received_at: NaiveDateTime, items: &[Item]) -> Committed {
        let mut outcomes = Vec::with_capacity(items.len());
        // The next group to write is the last; halves go on in arrival order, so what is
        // settled is always the batch's first items.
        let mut groups: Vec<Vec<usize>> = vec![(0..items.len()).collect()];
        while let Some(group) = groups.pop() {
            match self.write_held(received_at, items, &group).await {
                Attempt::Written(mut written) => outcomes.append(&mut written),
                Attempt::ShutDown => return Committed::ShutDown(outcomes),
                Attempt::Failed(reason) if group.len() == 1 => {
                    outcomes.push((group[0], Outcome::Refused(reason)))
                }
                Attempt::Failed(reason) => {
                    tracing::debug!(
                        "A batch of {} failed ({reason}); splitting it to find the message",
                        group.len()
                    );
                    let messages: Vec<usize> = group.iter().map(|&i| items[i].message).collect();
                    let (first, second) = group.split_at(split_point(&messages));
                    groups.push(second.to_vec());
                    groups.push(first.to_vec());
                }
            }
        }
        Committed::Written(outcomes)
    }

    /// Writes one group, holding it while the database cannot write. [`Attempt::Failed`] when
    /// the error is about the group's data, or when the server keeps dropping the connection
    /// on it while writes of other data go through.
    async fn write_held(&self, received_at: NaiveDateTime, items: &[Item], group: &[usize]) -> Attempt {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut dropped_connection = 0;
        let mut conflicts = 0;
        loop {
            let attempt = Instant::now();
            let error = match self.attempt(received_at, items, group).await {
                Ok(outcomes) => {
                    metrics::histogram!("mqtt_gateway_commit_seconds")
                        .record(attempt.elapsed().as_secs_f64());
                    metrics::histogram!("mqtt_gateway_batch_messages").record(group.len() as f64);
                    self.hold.resume(&self.health);
                    return Attempt::Written(outcomes);
                }
                Err(error) => error,
            };
            if error.blame() == db::Blame::Data {
                return Attempt::Failed(format!("database error: {error}"));
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
                // A dropped connection blames the group only with proof: a write of other data
                // goes through right after. A server or proxy refusing every write (a failover
                // in progress) fails the canary too, and that is an outage: held.
                if db::connection_lost(db_error) && self.canary(items, group).await {
                    dropped_connection += 1;
                    if dropped_connection >= DROPS_BEFORE_SPLIT {
                        return Attempt::Failed(format!(
                            "the database closed the connection each of the {dropped_connection} times this was \
                             written, while a write of other data went through each time: {error}"
                        ));
                    }
                    continue;
                }
            }
            dropped_connection = 0;
            let delay = backoff.step();
            self.hold.hold(&self.health, group.len(), &error, delay);
            // Waiting for the database is healthy as far as the watchdog is concerned: the
            // backoff is a wait with its bound.
            let _waiting = self.health.waiting(Part::Processor, delay);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Attempt::ShutDown,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One try at a group, on a connection of its own, within a bound that grows with the
    /// group's bytes. A server that has not answered by then (frozen, a half-open link) may
    /// still have the statement in hand: its connection is closed, never given back to the
    /// pool, and the next try takes a fresh one.
    async fn attempt(
        &self,
        received_at: NaiveDateTime,
        items: &[Item],
        group: &[usize],
    ) -> Result<Vec<(usize, Outcome)>, WriteError> {
        let bound = answer_bound(items, group);
        let _waiting = self.health.waiting(Part::Processor, db::with_acquire(bound));
        let mut conn = self.pool.acquire().await?;
        match tokio::time::timeout(bound, transaction(&mut conn, received_at, items, group)).await {
            Ok(written) => written,
            Err(_) => {
                db::drop_unanswered(conn);
                Err(WriteError::NoAnswer(bound))
            }
        }
    }

    /// Whether a write of other data goes through now (see [`db::takes_writes`]).
    async fn canary(&self, items: &[Item], group: &[usize]) -> bool {
        let flow = items[group[0]].flow.id;
        let canary = db::takes_writes(&self.pool, flow);
        self.health.within(Part::Processor, db::CANARY_WITHIN, canary).await.unwrap_or(false)
    }
}

/// Where a group of two items or more is split in halves, given the message of each of its
/// items: at the boundary between two messages nearest its middle, so that a message's items
/// (one per flow it matched) stay together and a stop can acknowledge whole messages; in the
/// middle of its items when the group is one message.
fn split_point(messages: &[usize]) -> usize {
    let middle = messages.len() / 2;
    (1..messages.len())
        .filter(|&p| messages[p] != messages[p - 1])
        .min_by_key(|&p| p.abs_diff(middle))
        .unwrap_or(middle)
}

/// The slowest link to the database a write is expected to cross, in bytes per second.
const SLOWEST_LINK: f64 = 256.0 * 1024.0;

/// How long the server may take to answer a group: [`db::ANSWER_WITHIN`], plus the time its
/// bytes take on the slowest link, so that a big batch on a slow link is not taken for a
/// server that does not answer.
fn answer_bound(items: &[Item], group: &[usize]) -> Duration {
    let bytes: usize = group.iter().map(|&i| items[i].effect.bytes(&items[i].flow)).sum();
    db::ANSWER_WITHIN + Duration::from_secs_f64(bytes as f64 / SLOWEST_LINK)
}

/// How a written item ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written with this `last_msg_id`.
    Written(i32),
    /// The flow's row was deleted since the flows were loaded.
    FlowGone,
    /// Too big for any statement the server accepts: refused, nothing of it written.
    TooBig(String),
    /// Refused by the server for its values (see [`db::Blame::Data`]), written alone.
    Refused(String),
    /// A retained message its flow already stored, sent again by the broker for a new
    /// subscription: acknowledged, not stored again (see [`crate::retained`]).
    AlreadyStored,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The server did not answer within the bound: frozen, or the link is half-open.
    #[error("the database did not answer within {0:.1?}; the connection was closed")]
    NoAnswer(Duration),
    /// The flow's `last_msg_id` would pass what `INT` holds: about the messages' flow, not the
    /// database, so it fails them as the original did, never holding the stream.
    #[error("last_msg_id of flow {0} no longer fits in INT")]
    CounterOverflow(i32),
}

impl WriteError {
    pub fn blame(&self) -> db::Blame {
        match self {
            WriteError::Db(error) => db::blame(error),
            WriteError::NoAnswer(_) => db::Blame::Database,
            WriteError::CounterOverflow(_) => db::Blame::Data,
        }
    }

    /// What the wait looks like to an operator, in a few words (`/readyz`, the status line).
    pub fn kind(&self) -> &'static str {
        match self {
            WriteError::Db(error) if db::lock_wait(error) => "lock wait",
            WriteError::Db(error) if db::connection_lost(error) => "connection lost on writes",
            WriteError::Db(sqlx::Error::PoolTimedOut) => "no connection",
            WriteError::NoAnswer(_) => "no answer",
            WriteError::Db(_) | WriteError::CounterOverflow(_) => "error",
        }
    }

    /// The label of `mqtt_gateway_database_holding`.
    fn label(&self) -> String {
        match self {
            WriteError::Db(error) => db::error_label(error),
            WriteError::NoAnswer(_) => "no_answer".to_owned(),
            WriteError::CounterOverflow(_) => "counter".to_owned(),
        }
    }
}

/// Writes `items` (indexes into `all`) in one transaction and returns each one's outcome.
/// However many bytes the batch holds, it goes in as many statements as the server's
/// `max_allowed_packet` needs; an item too big for any statement is refused before anything
/// of it (its counter included) is written.
async fn transaction(
    conn: &mut MySqlConnection,
    received_at: NaiveDateTime,
    all: &[Item],
    items: &[usize],
) -> Result<Vec<(usize, Outcome)>, WriteError> {
    let mut tx = conn.begin().await?;
    let bounds = StatementBounds { max_packet: db::max_allowed_packet(&mut tx).await? };
    let mut outcomes = Vec::with_capacity(items.len());
    // Per flow, in flow-id order (so that instances writing the same flows lock their counter
    // rows in one order and never deadlock each other): how many messages this batch holds.
    let mut counts: BTreeMap<i32, i32> = BTreeMap::new();
    let mut writable = Vec::with_capacity(items.len());
    for &i in items {
        match all[i].effect.too_big(&all[i].flow, &bounds) {
            Some(reason) => outcomes.push((i, Outcome::TooBig(reason))),
            None => writable.push(i),
        }
    }
    let resent = crate::retained::resends(&mut tx, all, &writable).await?;
    if !resent.is_empty() {
        writable.retain(|i| !resent.contains(i));
        outcomes.extend(resent.into_iter().map(|i| (i, Outcome::AlreadyStored)));
    }
    for &i in &writable {
        *counts.entry(all[i].flow.id).or_default() += 1;
    }
    // The next id to hand out per flow; absent when the flow row is gone.
    let mut next_id: HashMap<i32, i32> = match table::advance_counters(&mut tx, &counts).await {
        Ok(last) => last.into_iter().map(|(flow, last)| (flow, last - counts[&flow] + 1)).collect(),
        Err(table::CounterError::FlowGone(_)) => HashMap::new(),
        Err(table::CounterError::Db(e)) => return Err(e.into()),
        Err(table::CounterError::Overflow(flow)) => return Err(WriteError::CounterOverflow(flow)),
    };
    let mut rows = Rows::default();
    for i in writable {
        let item = &all[i];
        let Some(next) = next_id.get_mut(&item.flow.id) else {
            outcomes.push((i, Outcome::FlowGone));
            continue;
        };
        let msg_id = *next;
        *next += 1;
        rows.push(item, msg_id);
        outcomes.push((i, Outcome::Written(msg_id)));
    }
    rows.write(&mut tx, &bounds, received_at).await?;
    crate::retained::remember(&mut tx, &bounds, rows.items()).await?;
    crate::flows::table::note_activity(&mut tx, next_id.keys().copied()).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Conflicts retried at once before they count as the database being unable to write.
const CONFLICT_RETRIES: u32 = 5;

/// How many times in a row a group may make the server drop the connection, each time while a
/// canary write goes through, before the group is judged to be the cause (split, or failed when
/// alone).
const DROPS_BEFORE_SPLIT: u32 = 3;

/// Whether the commit is holding the stream for the database, and since when: one ERROR when
/// holding starts and one line when it ends, never a line per retry.
#[derive(Default)]
struct Hold {
    since: std::sync::Mutex<Option<(Instant, String)>>,
}

impl Hold {
    fn hold(&self, health: &Health, messages: usize, error: &WriteError, delay: Duration) {
        let label = error.label();
        let waiting_for = format!("the database to take writes ({}: {error})", error.kind());
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match &*since {
            None => {
                tracing::error!(
                    error_code = %label,
                    error_kind = "database_holding",
                    "Database cannot take writes, holding {messages} messages unacknowledged until it can ({}): {error}",
                    error.kind()
                );
                health.set_waiting_for(Some(waiting_for));
                metrics::gauge!("mqtt_gateway_database_holding", "code" => label.clone()).set(1.0);
                *since = Some((Instant::now(), label));
            }
            Some((_, previous)) if *previous != label => {
                tracing::error!(
                    error_code = %label,
                    "Database still cannot take writes, now for another reason ({}): {error}",
                    error.kind()
                );
                health.set_waiting_for(Some(waiting_for));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_split_between_messages_nearest_the_middle() {
        assert_eq!(split_point(&[0, 1, 2, 3]), 2);
        assert_eq!(split_point(&[0, 1, 2]), 1);
        // Message 1 has three items (three flows): they stay together.
        assert_eq!(split_point(&[0, 1, 1, 1, 2, 3]), 4);
        assert_eq!(split_point(&[0, 0, 0, 1]), 3);
        assert_eq!(split_point(&[4, 4, 4, 4]), 2, "one message: its items are split");
    }
}
