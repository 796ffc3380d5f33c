//! POST_ENDPOINT: the request body is rendered once, then written to the outbox in the same
//! transaction as the counter increment. The `outbox` module sends it; nothing here waits on
//! an endpoint, so a slow or dead endpoint never holds up messages.

use crate::pyfmt;
use serde_json::{Map, Value};
use sqlx::{MySql, QueryBuilder, Transaction};

/// Stays far below MySQL's 65,535 placeholders per statement (5 per row).
const ROWS_PER_INSERT: usize = 1_000;

/// The body `requests.post(url, json=payload)` sent, or why it could not be built (the
/// original then logged a posting error, with the counter already incremented).
pub fn body(payload: &Map<String, Value>) -> Result<String, pyfmt::RenderError> {
    pyfmt::request_body_of(payload)
}

/// One request to queue.
pub struct OutboxRow<'a> {
    pub flow_id: i32,
    pub flow_code: &'a str,
    pub url: &'a str,
    pub body: &'a str,
    pub msg_id: i32,
}

/// Queues requests, due at once.
pub async fn enqueue(tx: &mut Transaction<'_, MySql>, rows: &[OutboxRow<'_>]) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        let mut insert: QueryBuilder<MySql> = QueryBuilder::new(
            "INSERT INTO gateway_outbox (flow_id, flow_code, endpoint_url, body, msg_id, created_at, \
             attempts, next_attempt_at, last_error, dead) ",
        );
        insert.push_values(chunk, |mut row, request| {
            row.push_bind(request.flow_id)
                .push_bind(request.flow_code)
                .push_bind(request.url)
                .push_bind(request.body)
                .push_bind(request.msg_id)
                .push("UTC_TIMESTAMP(3), 0, UTC_TIMESTAMP(3), NULL, FALSE");
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(())
}
