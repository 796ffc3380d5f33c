//! Retained messages, stored once. The broker sets RETAIN=1 only on a message it sends because
//! of a subscription (MQTT 3.1.1 §3.3.1.3; version 5 too, since the gateway never asks for
//! Retain As Published): a live message always arrives with RETAIN=0, even one its publisher
//! retained. And the gateway subscribes every filter again on every connection, since the
//! broker's session is the truth and may have lost a subscription. With 3.1.1 the broker then
//! resends every retained message; with version 5 (Retain Handling 1) only for a subscription
//! it had lost.
//!
//! So a RETAIN=1 message is a resend when its payload is one its flow already stored for that
//! topic: the last message stored there (a retained value first received live, as RETAIN=0),
//! or the last retained one. It is acknowledged and not stored again. A changed value is
//! stored. What each flow last stored per topic is kept in `gateway_retained`, written in the
//! batch's transaction with the rows themselves, so it survives restarts and is shared by every
//! instance. Only hashes are kept (SHA-256), whatever the sizes.
//!
//! One case still stores a resend twice: a topic whose publisher retains one value and then
//! publishes others without retaining them; the resend of the retained value then matches
//! neither the last message nor a retained one the flow stored.

use crate::db::StatementBounds;
use crate::sinks::Item;
use sha2::{Digest, Sha256};
use sqlx::{MySql, QueryBuilder, Row, Transaction};
use std::collections::{BTreeMap, HashMap};

/// Keys per SELECT.
const KEYS: usize = 1_000;

/// What the commit needs to know of a message to recognise a resend: its topic and payload,
/// hashed, and whether the broker sent it as retained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub topic_hash: [u8; 32],
    pub payload_hash: [u8; 32],
    pub retain: bool,
}

impl Fingerprint {
    pub fn of(topic: &str, payload: &[u8], retain: bool) -> Fingerprint {
        Fingerprint {
            topic_hash: Sha256::digest(topic.as_bytes()).into(),
            payload_hash: Sha256::digest(payload).into(),
            retain,
        }
    }
}

type Key = (i32, [u8; 32]);

/// What a flow last stored on a topic.
#[derive(Debug, Clone, Copy, Default)]
struct Last {
    any: Option<[u8; 32]>,
    retained: Option<[u8; 32]>,
}

/// Which of `items` (indexes into `all`, in arrival order) are resends of what their flow
/// already stored. A message earlier in the same batch counts as stored. The rows read are
/// locked, so two instances cannot both store the same resend.
pub async fn resends(
    tx: &mut Transaction<'_, MySql>,
    all: &[Item],
    items: &[usize],
) -> Result<Vec<usize>, sqlx::Error> {
    let keys: Vec<Key> = items
        .iter()
        .filter(|&&i| all[i].fingerprint.retain)
        .map(|&i| (all[i].flow.id, all[i].fingerprint.topic_hash))
        .collect();
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut last: HashMap<Key, Last> = HashMap::new();
    for chunk in keys.chunks(KEYS) {
        let mut select = QueryBuilder::<MySql>::new(
            "SELECT flow_id, topic_hash, last_hash, retained_hash FROM gateway_retained WHERE (flow_id, topic_hash) IN (",
        );
        let mut list = select.separated(", ");
        for (flow, topic) in chunk {
            list.push("(").push_bind_unseparated(*flow).push_unseparated(", ");
            list.push_bind_unseparated(topic.as_slice()).push_unseparated(")");
        }
        select.push(") FOR UPDATE");
        for row in select.build().fetch_all(&mut **tx).await? {
            let hash = |i: usize| -> Result<Option<[u8; 32]>, sqlx::Error> {
                let bytes: Option<Vec<u8>> = row.try_get(i)?;
                Ok(bytes.and_then(|b| b.try_into().ok()))
            };
            let Some(topic) = hash(1)? else { continue };
            last.insert((row.try_get(0)?, topic), Last { any: hash(2)?, retained: hash(3)? });
        }
    }
    let mut resent = Vec::new();
    for &i in items {
        let print = &all[i].fingerprint;
        let seen = last.entry((all[i].flow.id, print.topic_hash)).or_default();
        let payload = Some(print.payload_hash);
        if print.retain && (seen.any == payload || seen.retained == payload) {
            resent.push(i);
            continue;
        }
        seen.any = payload;
        if print.retain {
            seen.retained = payload;
        }
    }
    Ok(resent)
}

/// Records what the batch stored, per flow and topic: the last message, and the last retained
/// one. One statement for the batch, whatever its size in flows and topics; keys in one order,
/// so that instances writing the same keys never deadlock each other.
pub async fn remember<'a>(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    stored: impl Iterator<Item = &'a Item>,
) -> Result<(), sqlx::Error> {
    let mut latest: BTreeMap<Key, (&Item, Option<[u8; 32]>)> = BTreeMap::new();
    for item in stored {
        let print = &item.fingerprint;
        let entry = latest.entry((item.flow.id, print.topic_hash)).or_insert((item, None));
        entry.0 = item;
        if print.retain {
            entry.1 = Some(print.payload_hash);
        }
    }
    if latest.is_empty() {
        return Ok(());
    }
    let rows: Vec<(&Item, Option<[u8; 32]>)> = latest.into_values().collect();
    for chunk in bounds.chunks(&rows, 6, |(item, _)| crate::db::row_bytes(&[&item.topic], 5)) {
        let mut upsert = QueryBuilder::<MySql>::new(
            "INSERT INTO gateway_retained (flow_id, topic_hash, last_hash, retained_hash, topic, stored_at) ",
        );
        upsert.push_values(chunk, |mut row, (item, retained)| {
            row.push_bind(item.flow.id)
                .push_bind(item.fingerprint.topic_hash.as_slice())
                .push_bind(item.fingerprint.payload_hash.as_slice())
                .push_bind(retained.as_ref().map(|h| h.as_slice()))
                .push_bind(&*item.topic)
                .push("UTC_TIMESTAMP(3)");
        });
        upsert.push(
            " ON DUPLICATE KEY UPDATE last_hash = VALUES(last_hash), \
             retained_hash = COALESCE(VALUES(retained_hash), retained_hash), stored_at = VALUES(stored_at)",
        );
        upsert.build().execute(&mut **tx).await?;
    }
    Ok(())
}
