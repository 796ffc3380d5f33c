//! POST_ENDPOINT: the request body is rendered once, then written to the outbox in the same
//! transaction as the counter increment (through `outbox::queue`, which owns the table). The
//! `outbox` module sends it; nothing here waits on an endpoint, so a slow or dead endpoint
//! never holds up messages.

use super::{AfterCommit, Effect, Item, Rendered};
use crate::db::StatementBounds;
use crate::flows::{Action, Flow};
use crate::outbox::queue::{self, NewRequest};
use crate::pyfmt;
use serde_json::{Map, Value};
use sqlx::{MySql, Transaction};

/// One request to queue for a message; its flow says where it goes.
pub struct Request {
    /// The body `requests.post(url, json=payload)` sent, or why it could not be built (the
    /// original then logged a posting error, with the counter already incremented).
    body: Result<String, pyfmt::RenderError>,
}

pub fn render(payload: &Map<String, Value>) -> Request {
    Request { body: pyfmt::request_body_of(payload) }
}

/// The flow's `endpoint_url` as its row holds it: what the outbox row keeps (see
/// [`crate::outbox`] for which URL a request goes to).
fn stored_url(flow: &Flow) -> &str {
    match &flow.action {
        Action::PostEndpoint { raw, .. } => raw,
        Action::StoreDb => "",
    }
}

impl Rendered for Request {
    fn too_big(&self, flow: &Flow, bounds: &StatementBounds) -> Option<String> {
        let body = self.body.as_ref().ok()?;
        let bytes = queue::row_bytes(&flow.code, stored_url(flow), body);
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

    fn bytes(&self, flow: &Flow) -> usize {
        self.body.as_ref().map_or(0, |body| queue::row_bytes(&flow.code, stored_url(flow), body))
    }

    fn committed(&self, flow: &Flow) -> AfterCommit {
        match &self.body {
            Ok(_) => AfterCommit::Queued,
            Err(error) => AfterCommit::NotSent(format!(
                "Error posting flow {} to endpoint {}: {error}",
                flow.code,
                crate::outbox::redacted_str(stored_url(flow).trim())
            )),
        }
    }
}

/// Queues the requests of the POST_ENDPOINT items among `written` that have a body, due at
/// once, with statements bounded by bytes and placeholders.
pub async fn write(
    tx: &mut Transaction<'_, MySql>,
    bounds: &StatementBounds,
    written: &[(&Item, i32)],
) -> Result<(), sqlx::Error> {
    let rows: Vec<NewRequest> = written
        .iter()
        .filter_map(|(item, msg_id)| match &item.effect {
            Effect::PostEndpoint(Request { body: Ok(body) }) => Some(NewRequest {
                flow_id: item.flow.id,
                flow_code: &item.flow.code,
                url: stored_url(&item.flow),
                body,
                msg_id: *msg_id,
            }),
            _ => None,
        })
        .collect();
    queue::insert(tx, bounds, &rows).await
}
