//! POST_ENDPOINT: commit the counter increment, then POST the payload as JSON to the flow's
//! `endpoint_url`.
//!
//! The POST itself runs on a delivery task per flow, so that a slow endpoint (up to
//! `HTTP_TIMEOUT_SECONDS` per request) never holds up the database path or other flows, while
//! one flow's requests still leave in the order its messages arrived. Queues are bounded: when
//! an endpoint cannot keep up, the processor waits, and the broker holds the rest.

use super::SinkError;
use crate::db;
use crate::flows::{Action, Flow};
use crate::pyfmt;
use serde_json::{Map, Value};
use sqlx::MySqlPool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use url::Url;

/// Requests waiting per flow before the processor is made to wait.
const QUEUE_PER_FLOW: usize = 256;

/// One request to send.
struct Delivery {
    flow_code: String,
    url: Url,
    payload: Value,
}

pub struct PostEndpoint {
    pool: MySqlPool,
    http: reqwest::Client,
    queues: Mutex<HashMap<i32, mpsc::Sender<Delivery>>>,
    tasks: TaskTracker,
}

impl PostEndpoint {
    pub fn new(pool: MySqlPool, timeout: Duration) -> Result<PostEndpoint, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(PostEndpoint {
            pool,
            http,
            queues: Mutex::default(),
            tasks: TaskTracker::new(),
        })
    }

    /// Commits the counter increment and queues the POST; returns the message's `last_msg_id`.
    pub async fn accept(
        &self,
        flow: &Flow,
        payload: &Map<String, Value>,
    ) -> Result<i32, SinkError> {
        let Action::PostEndpoint { url } = &flow.action else {
            unreachable!("the processor sends only POST_ENDPOINT flows here");
        };
        let mut tx = self.pool.begin().await?;
        let msg_id = db::advance_counter(&mut tx, flow.id, 1).await?;
        tx.commit().await?;
        let delivery = Delivery {
            flow_code: flow.code.clone(),
            url: url.clone(),
            payload: Value::Object(payload.clone()),
        };
        let queue = self.queue_for(flow.id);
        // A closed queue only happens after close(), when no message is accepted any more.
        let _ = queue.send(delivery).await;
        Ok(msg_id)
    }

    fn queue_for(&self, flow_id: i32) -> mpsc::Sender<Delivery> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(flow_id)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_PER_FLOW);
                self.tasks.spawn(deliver_in_order(self.http.clone(), rx));
                tx
            })
            .clone()
    }

    /// Lets every queued request go out (each bounded by the timeout), then returns.
    pub async fn close(&self) {
        self.queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn deliver_in_order(http: reqwest::Client, mut queue: mpsc::Receiver<Delivery>) {
    while let Some(delivery) = queue.recv().await {
        if let Err(error) = post(&http, &delivery).await {
            tracing::error!(
                flow_code = %delivery.flow_code,
                "Error posting flow {} to endpoint {}: {error}",
                delivery.flow_code,
                redacted(&delivery.url)
            );
        }
    }
}

/// The original's call: `requests.post(url, json=payload, timeout=...)` then
/// `raise_for_status()`.
async fn post(http: &reqwest::Client, delivery: &Delivery) -> Result<(), PostError> {
    let body = pyfmt::request_body(&delivery.payload)?;
    let response = http
        .post(delivery.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| PostError::Send(error_chain(&e.without_url())))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    Err(PostError::Status {
        code: status.as_u16(),
        kind: if status.is_client_error() {
            "Client"
        } else {
            "Server"
        },
        reason: status.canonical_reason().unwrap_or("Unknown").to_owned(),
        url: redacted(&delivery.url),
    })
}

#[derive(Debug, thiserror::Error)]
enum PostError {
    #[error(transparent)]
    Render(#[from] pyfmt::RenderError),
    #[error("{0}")]
    Send(String),
    /// Worded as `requests`' `raise_for_status()`, which the original logged.
    #[error("{code} {kind} Error: {reason} for url: {url}")]
    Status {
        code: u16,
        kind: &'static str,
        reason: String,
        url: String,
    },
}

/// reqwest's top-level message ("error sending request") hides the cause an operator needs
/// (connection refused, timed out, certificate ...), which sits further down the chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The URL as logged: a password in its user info is masked.
pub fn redacted(url: &Url) -> String {
    if url.password().is_some() {
        let mut masked = url.clone();
        let _ = masked.set_password(Some("***"));
        masked.to_string()
    } else {
        url.to_string()
    }
}
