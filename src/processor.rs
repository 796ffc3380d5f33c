//! The processor: takes each message the broker session hands over, decodes it, finds the flows
//! whose topic filter matches, validates the payload against each flow's schema and passes it to
//! that flow's sink; then acknowledges the message to the broker.
//!
//! It runs on its own task, fed by a bounded channel, so that database and HTTP latency never
//! reach the MQTT event loop (where the original processed messages, stalling its keepalive).
//! Messages are handled one after another in arrival order, so counters are assigned in that
//! order and acknowledgements leave in the order MQTT requires.

use crate::flows::{Action, Flow, FlowSet};
use crate::sinks::{PostEndpoint, SinkError, StoreDb};
use rumqttc::{AsyncClient, Publish};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Deeper payloads are refused as invalid. Python's json module gives up near 1,000 levels
/// (its recursion limit); a legitimate sensor payload is a few levels deep. The bound keeps
/// parsing, formatting and dropping a value well inside a worker thread's stack.
pub const MAX_DEPTH: usize = 512;

/// Why a payload is not a JSON object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidPayload {
    #[error("payload is not valid UTF-8: {0}")]
    NotUtf8(String),
    #[error("payload nests JSON deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object, got {0}")]
    NotAnObject(&'static str),
}

/// Decodes a payload the way the original accepted it: UTF-8 text holding a JSON object.
pub fn decode(payload: &[u8]) -> Result<Map<String, Value>, InvalidPayload> {
    let text = std::str::from_utf8(payload).map_err(|e| InvalidPayload::NotUtf8(e.to_string()))?;
    if nesting_depth(text.as_bytes()) > MAX_DEPTH {
        return Err(InvalidPayload::TooDeep);
    }
    let mut de = serde_json::Deserializer::from_str(text);
    // The depth was bounded above; serde_json's own limit (128) would refuse payloads Python
    // accepted.
    de.disable_recursion_limit();
    let value = Value::deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v))
        .map_err(|e| InvalidPayload::NotJson(e.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        Value::Array(_) => Err(InvalidPayload::NotAnObject("an array")),
        Value::String(_) => Err(InvalidPayload::NotAnObject("a string")),
        Value::Number(_) => Err(InvalidPayload::NotAnObject("a number")),
        Value::Bool(_) => Err(InvalidPayload::NotAnObject("a boolean")),
        Value::Null => Err(InvalidPayload::NotAnObject("null")),
    }
}

/// The deepest bracket nesting in `text`, ignoring brackets inside strings. Linear and
/// allocation-free, so a hostile payload costs no more than reading it.
fn nesting_depth(text: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Why one flow did not take one message.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

pub struct Processor {
    flows: watch::Receiver<Arc<FlowSet>>,
    store: StoreDb,
    post: PostEndpoint,
    /// Acknowledgements go out through the broker session's request queue.
    acks: AsyncClient,
}

impl Processor {
    pub fn new(
        flows: watch::Receiver<Arc<FlowSet>>,
        store: StoreDb,
        post: PostEndpoint,
        acks: AsyncClient,
    ) -> Processor {
        Processor {
            flows,
            store,
            post,
            acks,
        }
    }

    /// Runs until the session closes the channel (at shutdown), then lets queued POSTs finish.
    pub async fn run(self, mut messages: mpsc::Receiver<Publish>) {
        while let Some(publish) = messages.recv().await {
            self.handle(&publish).await;
            // QoS 0 messages need no acknowledgement; rumqttc ignores them. An error means the
            // session is gone, and the broker will redeliver.
            let _ = self.acks.ack(&publish).await;
        }
        self.post.close().await;
    }

    async fn handle(&self, publish: &Publish) {
        let topic = publish.topic.as_str();
        let payload = match decode(&publish.payload) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(topic, "Invalid payload in topic {topic}: {error}");
                return;
            }
        };
        let flows = Arc::clone(&self.flows.borrow());
        for flow in flows.matching(topic) {
            match self.apply(flow, &payload).await {
                Ok(msg_id) => tracing::debug!(
                    flow_code = %flow.code,
                    msg_id,
                    "Flow {} took message {msg_id} from {topic}",
                    flow.code
                ),
                Err(error) => tracing::error!(
                    flow_code = %flow.code,
                    topic,
                    "Error processing topic {topic} (flow_id={}): {error}",
                    flow.id
                ),
            }
        }
    }

    async fn apply(&self, flow: &Flow, payload: &Map<String, Value>) -> Result<i32, FlowError> {
        flow.schema.validate(payload).map_err(FlowError::Invalid)?;
        let msg_id = match flow.action {
            Action::StoreDb => self.store.store(flow, payload).await?,
            Action::PostEndpoint { .. } => self.post.accept(flow, payload).await?,
        };
        Ok(msg_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case(b"\xff\xfe".as_slice(), "not valid UTF-8")]
    #[case(b"{not json".as_slice(), "not valid JSON")]
    #[case(b"[1, 2]".as_slice(), "got an array")]
    #[case(b"42".as_slice(), "got a number")]
    #[case(b"".as_slice(), "not valid JSON")]
    #[case(b"{} trailing".as_slice(), "not valid JSON")]
    fn bad_payloads_are_explained(#[case] payload: &[u8], #[case] reason: &str) {
        let error = decode(payload).unwrap_err().to_string();
        assert!(error.contains(reason), "{error}");
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(decode(deep.as_bytes()), Err(InvalidPayload::TooDeep));
    }

    #[test]
    fn nesting_up_to_the_limit_is_accepted() {
        let n = MAX_DEPTH - 1;
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(decode(ok.as_bytes()).is_ok());
    }

    #[test]
    fn brackets_inside_strings_do_not_count() {
        let text = format!("{{\"a\":\"{}\\\"{}\"}}", "[".repeat(1000), "{".repeat(1000));
        assert_eq!(nesting_depth(text.as_bytes()), 1);
    }

    #[test]
    fn duplicate_keys_keep_first_position_and_last_value_like_python() {
        let map = decode(br#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(serde_json::to_string(&map).unwrap(), r#"{"a":3,"b":2}"#);
    }
}
