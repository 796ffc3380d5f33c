//! POST_ENDPOINT: the request body is rendered once, then written to the outbox in the same
//! transaction as the counter increment. The `outbox` module sends it; nothing here waits on
//! an endpoint, so a slow or dead endpoint never holds up messages.

use crate::db::{self, StatementBounds};
use crate::pyfmt;
use serde_json::{Map, Value};
use sqlx::{MySql, QueryBuilder, Transaction};

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

/// What one request's row costs in a statement (see [`db::row_bytes`]).
pub fn row_bytes(flow_code: &str, url: &str, body: &str) -> usize {
    db::row_bytes(&[flow_code, url, body], 2)
}

/// Why a request cannot be queued in any statement the server accepts, if so.
pub fn too_big(flow_code: &str, url: &str, body: &str, bounds: &StatementBounds) -> Option<String> {
    let bytes = row_bytes(flow_code, url, body);
    (bytes > bounds.row_limit()).then(|| {
        format!(
            "the POST body of {} bytes is more than the {} bytes one statement may carry \
             (the database's max_allowed_packet is {}), so it cannot be queued",
            body.len(),
            bounds.row_limit(),
            bounds.max_packet
        )
    })
}

/// Queues requests, due at once, with statements bounded by bytes and placeholders.
pub async fn enqueue(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    rows: &[OutboxRow<'_>],
) -> Result<(), sqlx::Error> {
    for chunk in bounds.chunks(rows, 5, |row| row_bytes(row.flow_code, row.url, row.body)) {
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
