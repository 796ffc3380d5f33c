//! POST_ENDPOINT: the request body is rendered once, then written to the outbox in the same
//! transaction as the counter increment. The `outbox` module sends it; nothing here waits on
//! an endpoint, so a slow or dead endpoint never holds up messages.

use super::{AfterCommit, Effect, Item, Rendered};
use crate::db::{self, StatementBounds};
use crate::flows::Flow;
use crate::pyfmt;
use serde_json::{Map, Value};
use sqlx::{MySql, QueryBuilder, Transaction};

/// One request to queue for a message.
pub struct Request {
    url: String,
    /// The body `requests.post(url, json=payload)` sent, or why it could not be built (the
    /// original then logged a posting error, with the counter already incremented).
    body: Result<String, pyfmt::RenderError>,
}

pub fn render(url: &url::Url, payload: &Map<String, Value>) -> Request {
    Request { url: url.to_string(), body: pyfmt::request_body_of(payload) }
}

impl Rendered for Request {
    fn too_big(&self, flow: &Flow, bounds: &StatementBounds) -> Option<String> {
        let body = self.body.as_ref().ok()?;
        let bytes = row_bytes(&flow.code, &self.url, body);
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

    fn committed(&self, flow: &Flow) -> AfterCommit {
        match &self.body {
            Ok(_) => AfterCommit::Queued,
            Err(error) => AfterCommit::NotSent(format!(
                "Error posting flow {} to endpoint {}: {error}",
                flow.code,
                crate::outbox::redacted_str(&self.url)
            )),
        }
    }
}

/// One request to queue.
struct OutboxRow<'a> {
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

/// Queues the requests of the POST_ENDPOINT items among `written` that have a body, due at
/// once, with statements bounded by bytes and placeholders.
pub async fn write(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    written: &[(&Item, i32)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<OutboxRow> = written
        .iter()
        .filter_map(|(item, msg_id)| match &item.effect {
            Effect::PostEndpoint(Request { url, body: Ok(body) }) => Some(OutboxRow {
                flow_id: item.flow.id,
                flow_code: &item.flow.code,
                url,
                body,
                msg_id: *msg_id,
            }),
            _ => None,
        })
        .collect();
    for chunk in bounds.chunks(&rows, 5, |row| row_bytes(row.flow_code, row.url, row.body)) {
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
