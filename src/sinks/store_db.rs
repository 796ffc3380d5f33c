//! STORE_DB: one `data` row per top-level key of the payload, sharing one `received_at` and the
//! message's `last_msg_id`, written in the same transaction as the counter increment so that a
//! counter never points at rows that are not there.

use crate::pyfmt;
use chrono::NaiveDateTime;
use serde_json::{Map, Value};
use sqlx::{MySql, QueryBuilder, Transaction};

/// `TEXT` holds 65,535 bytes. Checked here so that the outcome does not depend on the server's
/// `sql_mode` (a non-strict server would silently truncate).
const MAX_VALUE_BYTES: usize = 65_535;
/// `attribute_name` is `VARCHAR(255)`, counted in characters.
const MAX_NAME_CHARS: usize = 255;
/// Stays far below MySQL's 65,535 placeholders per statement (5 per row).
const ROWS_PER_INSERT: usize = 2_000;

/// One attribute, rendered as Python rendered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub value: String,
}

/// One `data` row to insert.
pub struct DataRow<'a> {
    pub flow_code: &'a str,
    pub attribute: &'a Attribute,
    pub msg_id: i32,
}

/// Renders every top-level key, or says why the message cannot be stored.
pub fn attributes(payload: &Map<String, Value>) -> Result<Vec<Attribute>, String> {
    payload
        .iter()
        .map(|(name, value)| {
            let chars = name.chars().count();
            if chars > MAX_NAME_CHARS {
                return Err(format!(
                    "attribute name of {chars} characters exceeds the {MAX_NAME_CHARS} of data.attribute_name"
                ));
            }
            let value = pyfmt::attribute_value(value);
            if value.len() > MAX_VALUE_BYTES {
                return Err(format!(
                    "value of attribute '{name}' is {} bytes, more than the {MAX_VALUE_BYTES} data.attribute_value holds",
                    value.len()
                ));
            }
            Ok(Attribute { name: name.clone(), value })
        })
        .collect()
}

/// Inserts rows with multi-row statements, all with the batch's `received_at`.
pub async fn insert(
    tx: &mut Transaction<'_, MySql>,
    received_at: NaiveDateTime,
    rows: &[DataRow<'_>],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT INTO data (received_at, flow_code, attribute_name, attribute_value, last_msg_id) ",
        );
        insert.push_values(chunk, |mut row, data| {
            row.push_bind(received_at)
                .push_bind(data.flow_code)
                .push_bind(&data.attribute.name)
                .push_bind(&data.attribute.value)
                .push_bind(data.msg_id);
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}
