//! The record of what this client id may hold at the broker: every form of a filter it
//! subscribed (plain, or under a shared group), kept in `gateway_session_filters` so that it
//! survives restarts and a change of `MQTT_SHARED_GROUP`.
//!
//! It is never smaller than what the broker holds: a form is added when its SUBSCRIBE is sent,
//! before any answer, and removed only after its UNSUBACK. So it may name forms the broker no
//! longer holds (a broker that lost its state, a refused filter), which only costs an
//! UNSUBSCRIBE that changes nothing. It is read for one thing: which forms to unsubscribe
//! because no flow needs them. What to subscribe never comes from here.
//!
//! One task owns the table and applies changes in the order the session makes them (a form
//! removed after its UNSUBACK and added again by the next SUBSCRIBE must end up present), and
//! retries a change the database refuses. The session never waits on it.

use crate::backoff::Backoff;
use sqlx::{MySql, MySqlPool, QueryBuilder};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a connection waits for the record before going on without it.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per statement.
const ROWS: usize = 1_000;

enum Change {
    /// Answer with the forms held now.
    Read(oneshot::Sender<Option<BTreeSet<String>>>),
    Add(Vec<String>),
    Remove(Vec<String>),
}

/// The session's handle on the record.
#[derive(Clone)]
pub struct Held(mpsc::UnboundedSender<Change>);

impl Held {
    /// Starts the task that owns this client id's rows.
    pub fn start(pool: MySqlPool, client_id: String) -> Held {
        let (changes_tx, changes) = mpsc::unbounded_channel();
        tokio::spawn(own(pool, client_id, changes));
        Held(changes_tx)
    }

    /// The forms held now, after every change asked for before (`None` when unreadable).
    pub fn read(&self) -> oneshot::Receiver<Option<BTreeSet<String>>> {
        let (held, answer) = oneshot::channel();
        let _ = self.0.send(Change::Read(held));
        answer
    }

    /// Forms about to be subscribed.
    pub fn add(&self, forms: Vec<String>) {
        if !forms.is_empty() {
            let _ = self.0.send(Change::Add(forms));
        }
    }

    /// Forms whose UNSUBACK came.
    pub fn remove(&self, forms: Vec<String>) {
        if !forms.is_empty() {
            let _ = self.0.send(Change::Remove(forms));
        }
    }
}

async fn own(pool: MySqlPool, client_id: String, mut changes: mpsc::UnboundedReceiver<Change>) {
    // The rows as this task last read or wrote them: it alone writes this client id's rows,
    // so a form already there is not written again at every connection.
    let mut present: Option<BTreeSet<String>> = None;
    let mut next = None;
    loop {
        let change = match next.take() {
            Some(change) => change,
            None => match changes.recv().await {
                Some(change) => change,
                None => return,
            },
        };
        match change {
            Change::Read(answer) => {
                let read = tokio::time::timeout(READ_TIMEOUT, forms(&pool, &client_id)).await;
                present = match read {
                    Ok(Ok(held)) => Some(held),
                    Ok(Err(error)) => {
                        warn_unread(&error.to_string());
                        None
                    }
                    Err(_) => {
                        warn_unread(&format!("no answer within {READ_TIMEOUT:?}"));
                        None
                    }
                };
                let _ = answer.send(present.clone());
            }
            Change::Add(forms) => {
                // Thousands of SUBSCRIBEs at a connection become a few statements.
                let (forms, after) = gather(forms, &mut changes, true);
                next = after;
                let new: Vec<String> = match &present {
                    Some(present) => forms.into_iter().filter(|f| !present.contains(f)).collect(),
                    None => forms,
                };
                persist(&pool, &client_id, &new, true).await;
                if let Some(present) = present.as_mut() {
                    present.extend(new);
                }
            }
            Change::Remove(forms) => {
                let (forms, after) = gather(forms, &mut changes, false);
                next = after;
                persist(&pool, &client_id, &forms, false).await;
                if let Some(present) = present.as_mut() {
                    forms.iter().for_each(|f| {
                        present.remove(f);
                    });
                }
            }
        }
    }
}

/// `forms` and those of the changes of the same kind (adding or removing) queued right behind
/// them; the first change of another kind is handed back, to be applied next, in order.
fn gather(
    mut forms: Vec<String>,
    changes: &mut mpsc::UnboundedReceiver<Change>,
    adding: bool,
) -> (Vec<String>, Option<Change>) {
    while let Ok(change) = changes.try_recv() {
        match change {
            Change::Add(more) if adding => forms.extend(more),
            Change::Remove(more) if !adding => forms.extend(more),
            other => return (forms, Some(other)),
        }
    }
    (forms, None)
}

fn warn_unread(why: &str) {
    tracing::warn!(
        "Cannot read gateway_session_filters ({why}): subscriptions under another shared group or of \
         removed flows are unsubscribed at the next connection"
    );
}

/// Applies one change, again and again until the database takes it: a form left out would be
/// one the gateway never unsubscribes.
async fn persist(pool: &MySqlPool, client_id: &str, forms: &[String], add: bool) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    for chunk in forms.chunks(ROWS) {
        loop {
            let done =
                if add { insert(pool, client_id, chunk).await } else { delete(pool, client_id, chunk).await };
            match done {
                Ok(()) => break,
                Err(error) => {
                    let delay = backoff.step();
                    tracing::warn!(
                        "Cannot update gateway_session_filters, retrying in {:.1}s: {error}",
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

async fn forms(pool: &MySqlPool, client_id: &str) -> Result<BTreeSet<String>, sqlx::Error> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT broker_filter FROM gateway_session_filters WHERE client_id = ?")
            .bind(client_id)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

async fn insert(pool: &MySqlPool, client_id: &str, forms: &[String]) -> Result<(), sqlx::Error> {
    // Not INSERT IGNORE: that would store a form cut short, which could never be unsubscribed.
    let mut insert = QueryBuilder::<MySql>::new(
        "INSERT INTO gateway_session_filters (client_id, broker_filter, added_at) ",
    );
    insert.push_values(forms, |mut row, form| {
        row.push_bind(client_id).push_bind(form).push("UTC_TIMESTAMP(3)");
    });
    insert.push(" ON DUPLICATE KEY UPDATE added_at = added_at");
    insert.build().execute(pool).await.map(drop)
}

async fn delete(pool: &MySqlPool, client_id: &str, forms: &[String]) -> Result<(), sqlx::Error> {
    let mut delete = QueryBuilder::<MySql>::new("DELETE FROM gateway_session_filters WHERE client_id = ");
    delete.push_bind(client_id).push(" AND broker_filter IN (");
    let mut list = delete.separated(", ");
    for form in forms {
        list.push_bind(form);
    }
    delete.push(")");
    delete.build().execute(pool).await.map(drop)
}
