//! STORE_DB: one `data` row per top-level key of the payload, sharing one `received_at` and the
//! message's `last_msg_id`, written in the same transaction as the counter increment so that a
//! counter never points at rows that are not there.

use super::SinkError;
use crate::db;
use crate::flows::Flow;
use crate::pyfmt;
use chrono::{NaiveDateTime, SubsecRound, Utc};
use serde_json::{Map, Value};
use sqlx::{MySql, MySqlPool, QueryBuilder};

/// `TEXT` holds 65,535 bytes. Checked here so that the outcome does not depend on the server's
/// `sql_mode` (a non-strict server would silently truncate).
const MAX_VALUE_BYTES: usize = 65_535;
/// `attribute_name` is `VARCHAR(255)`, counted in characters.
const MAX_NAME_CHARS: usize = 255;
/// Stays far below MySQL's 65,535 placeholders per statement (5 per row).
const ROWS_PER_INSERT: usize = 1_000;

#[derive(Clone)]
pub struct StoreDb {
    pool: MySqlPool,
}

/// One attribute, rendered as Python rendered it.
struct Attribute<'a> {
    name: &'a str,
    value: String,
}

impl StoreDb {
    pub fn new(pool: MySqlPool) -> StoreDb {
        StoreDb { pool }
    }

    /// Writes the message for `flow` and returns its `last_msg_id`.
    pub async fn store(&self, flow: &Flow, payload: &Map<String, Value>) -> Result<i32, SinkError> {
        let attributes = render(payload)?;
        // `data.received_at` is a naive UTC DATETIME; MariaDB drops the fraction PyMySQL sent, so
        // dropping it here gives the same value on every server.
        let received_at: NaiveDateTime = Utc::now().naive_utc().trunc_subsecs(0);
        let mut tx = self.pool.begin().await?;
        let msg_id = db::advance_counter(&mut tx, flow.id, 1).await?;
        for chunk in attributes.chunks(ROWS_PER_INSERT) {
            let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
                "INSERT INTO data (received_at, flow_code, attribute_name, attribute_value, last_msg_id) ",
            );
            insert.push_values(chunk, |mut row, attr| {
                row.push_bind(received_at)
                    .push_bind(&flow.code)
                    .push_bind(attr.name)
                    .push_bind(&attr.value)
                    .push_bind(msg_id);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(msg_id)
    }
}

fn render(payload: &Map<String, Value>) -> Result<Vec<Attribute<'_>>, SinkError> {
    payload
        .iter()
        .map(|(name, value)| {
            if name.chars().count() > MAX_NAME_CHARS {
                return Err(SinkError::Rejected(format!(
                    "attribute name of {} characters exceeds the {MAX_NAME_CHARS} of data.attribute_name",
                    name.chars().count()
                )));
            }
            let value = pyfmt::attribute_value(value);
            if value.len() > MAX_VALUE_BYTES {
                return Err(SinkError::Rejected(format!(
                    "value of attribute '{name}' is {} bytes, more than the {MAX_VALUE_BYTES} data.attribute_value holds",
                    value.len()
                )));
            }
            Ok(Attribute { name, value })
        })
        .collect()
}
