//! STORE_DB: one `data` row per top-level key of the payload, sharing one `received_at` and the
//! message's `last_msg_id`, written in the same transaction as the counter increment so that a
//! counter never points at rows that are not there.

use super::{AfterCommit, Effect, Item, Rendered};
use crate::db::{self, StatementBounds};
use crate::flows::Flow;
use crate::pyfmt;
use chrono::NaiveDateTime;
use serde_json::{Map, Value};
use sqlx::{MySql, QueryBuilder, Transaction};

/// `TEXT` holds 65,535 bytes. Checked here so that the outcome does not depend on the server's
/// `sql_mode` (a non-strict server would silently truncate).
const MAX_VALUE_BYTES: usize = 65_535;
/// `attribute_name` is `VARCHAR(255)`, counted in characters.
const MAX_NAME_CHARS: usize = 255;

/// One attribute, rendered as Python rendered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub name: String,
    pub value: String,
}

/// A message's attributes, one `data` row each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes(pub Vec<Attribute>);

/// One `data` row to insert.
struct DataRow<'a> {
    pub flow_code: &'a str,
    pub attribute: &'a Attribute,
    pub msg_id: i32,
}

/// Renders every top-level key, or says why the message cannot be stored.
pub fn render(payload: &Map<String, Value>) -> Result<Attributes, String> {
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
        .collect::<Result<_, _>>()
        .map(Attributes)
}

impl Rendered for Attributes {
    /// Rows of one message may span statements (they share the transaction), so only the
    /// largest row matters.
    fn too_big(&self, flow: &Flow, bounds: &StatementBounds) -> Option<String> {
        let (largest, attribute) =
            self.0.iter().map(|a| (row_bytes(&flow.code, a), a)).max_by_key(|(bytes, _)| *bytes)?;
        (largest > bounds.row_limit()).then(|| {
            format!(
                "the row of attribute '{}' takes {largest} bytes, more than the {} bytes one statement \
                 may carry (the database's max_allowed_packet is {})",
                attribute.name,
                bounds.row_limit(),
                bounds.max_packet
            )
        })
    }

    fn committed(&self, _flow: &Flow) -> AfterCommit {
        AfterCommit::Done
    }

    fn bytes(&self, flow: &Flow) -> usize {
        self.0.iter().map(|attribute| row_bytes(&flow.code, attribute)).sum()
    }
}

/// What one row costs in a statement (see [`db::row_bytes`]).
pub fn row_bytes(flow_code: &str, attribute: &Attribute) -> usize {
    db::row_bytes(&[flow_code, &attribute.name, &attribute.value], 2)
}

/// Inserts the rows of the STORE_DB items among `written`, with multi-row statements bounded
/// by bytes and placeholders, all with the batch's `received_at`.
pub async fn write(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    received_at: NaiveDateTime,
    written: &[(&Item, i32)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<DataRow> = written
        .iter()
        .filter_map(|(item, msg_id)| match &item.effect {
            Effect::StoreDb(attributes) => Some((&item.flow.code, attributes, *msg_id)),
            _ => None,
        })
        .flat_map(|(flow_code, attributes, msg_id)| {
            attributes.0.iter().map(move |attribute| DataRow { flow_code, attribute, msg_id })
        })
        .collect();
    for chunk in bounds.ladder(&rows, 5, |row| row_bytes(row.flow_code, row.attribute)) {
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
