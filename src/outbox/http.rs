//! One POST and how its outcome is judged: the original's `requests.post(...)` then
//! `raise_for_status()`, with the failure sorted into retryable or permanent, `Retry-After`
//! read, and the URL's password kept out of every message. Also what the outbox knows per
//! endpoint: its parsed URL, its origin's `HTTP_CONCURRENCY` limit, and its metric handles.

use crate::config::DeliverySettings;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Why an attempt failed, and what that means for the next one.
pub struct Failure {
    pub error: PostError,
    pub permanent: bool,
    pub retry_after: Option<Duration>,
}

/// Sends requests over pooled keep-alive connections, `HTTP_CONCURRENCY` at a time per origin
/// (scheme, host, port) at most.
pub struct Sender {
    http: reqwest::Client,
    concurrency: usize,
    /// Per endpoint URL, what sending to it needs, worked out once.
    endpoints: Mutex<HashMap<String, Arc<Endpoint>>>,
    /// Per origin: its `HTTP_CONCURRENCY` limit.
    origins: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// An endpoint URL, parsed once: parsing (with its IDNA step) and labelling the metrics on
/// every request cost a tenth of a POST's CPU.
struct Endpoint {
    url: Option<reqwest::Url>,
    limit: Arc<Semaphore>,
    seconds: metrics::Histogram,
    /// `mqtt_gateway_http_responses_total` per class, in the order of [`RESPONSE_CLASSES`].
    responses: Vec<metrics::Counter>,
}

const RESPONSE_CLASSES: [&str; 5] = ["2xx", "4xx", "5xx", "other", "error"];

/// Endpoint URLs remembered at most; flows rarely change theirs, but a table that grew
/// without bound over months of edits is cleared when it reaches this.
const ENDPOINTS_KEPT: usize = 10_000;

impl Sender {
    pub fn new(settings: &DeliverySettings) -> Result<Sender, reqwest::Error> {
        let mut http =
            reqwest::Client::builder().timeout(settings.timeout).pool_max_idle_per_host(settings.concurrency);
        if let Some(pem) = &settings.extra_roots_pem {
            // HTTP_CA_FILE adds to the system's roots; it does not replace them.
            http = http.tls_certs_merge(reqwest::Certificate::from_pem_bundle(pem)?);
        }
        Ok(Sender {
            http: http.build()?,
            concurrency: settings.concurrency,
            endpoints: Mutex::default(),
            origins: Mutex::default(),
        })
    }

    /// One attempt, counted in the HTTP metrics.
    pub async fn send(&self, url: &str, body: bytes::Bytes) -> Result<(), Failure> {
        let endpoint = self.endpoint(url);
        let _permit = endpoint.limit.acquire().await.expect("endpoint semaphores are never closed");
        let started = std::time::Instant::now();
        let result = post(&self.http, endpoint.url.as_ref(), url, body).await;
        let class = match &result {
            Ok(()) => 0,
            Err(Failure { error: PostError::Status { code, .. }, .. }) if *code >= 500 => 2,
            Err(Failure { error: PostError::Status { code, .. }, .. }) if *code >= 400 => 1,
            Err(Failure { error: PostError::Status { .. }, .. }) => 3,
            Err(_) => 4,
        };
        endpoint.seconds.record(started.elapsed().as_secs_f64());
        endpoint.responses[class].increment(1);
        result
    }

    fn endpoint(&self, url: &str) -> Arc<Endpoint> {
        let mut endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = endpoints.get(url) {
            return Arc::clone(endpoint);
        }
        let parsed = reqwest::Url::parse(url).ok();
        let host = parsed.as_ref().and_then(|u| u.host_str()).unwrap_or_default().to_owned();
        let origin = parsed.as_ref().map(|u| u.origin().ascii_serialization()).unwrap_or_default();
        let limit = Arc::clone(
            self.origins
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(origin)
                .or_insert_with(|| Arc::new(Semaphore::new(self.concurrency))),
        );
        let seconds = metrics::histogram!("mqtt_gateway_http_request_seconds", "host" => host.clone());
        let responses = RESPONSE_CLASSES
            .iter()
            .map(|class| {
                metrics::counter!("mqtt_gateway_http_responses_total", "host" => host.clone(), "class" => *class)
            })
            .collect();
        if endpoints.len() >= ENDPOINTS_KEPT {
            endpoints.clear();
        }
        let endpoint = Arc::new(Endpoint { url: parsed, limit, seconds, responses });
        endpoints.insert(url.to_owned(), Arc::clone(&endpoint));
        endpoint
    }
}

/// The original's call, `requests.post(url, json=payload, timeout=...)` then
/// `raise_for_status()`, with the body already rendered as `requests` rendered it.
///
/// `parsed` is `url` parsed, or `None` when it does not parse: the client then refuses it with
/// the same error as before.
async fn post(
    http: &reqwest::Client,
    parsed: Option<&reqwest::Url>,
    url: &str,
    body: bytes::Bytes,
) -> Result<(), Failure> {
    let builder = match parsed {
        Some(parsed) => http.post(parsed.clone()),
        None => http.post(url),
    };
    let send = builder.header(reqwest::header::CONTENT_TYPE, "application/json").body(body).send().await;
    let response = match send {
        Ok(response) => response,
        Err(error) => {
            return Err(Failure {
                // A URL the client refuses will never work; anything else (refused, reset,
                // timed out) may.
                permanent: error.is_builder(),
                error: PostError::Send(error_chain(&error.without_url())),
                retry_after: None,
            });
        }
    };
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let code = status.as_u16();
    let retry_after = matches!(code, 429 | 503).then(|| retry_after(response.headers())).flatten();
    Err(Failure {
        permanent: !(status.is_server_error() || code == 408 || code == 429),
        error: PostError::Status {
            code,
            kind: if status.is_client_error() { "Client" } else { "Server" },
            reason: status.canonical_reason().unwrap_or("Unknown").to_owned(),
            url: redacted_str(url),
        },
        retry_after,
    })
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("{0}")]
    Send(String),
    /// Worded as `requests`' `raise_for_status()`, which the original logged.
    #[error("{code} {kind} Error: {reason} for url: {url}")]
    Status { code: u16, kind: &'static str, reason: String, url: String },
}

/// reqwest's top-level message ("error sending request") hides the cause an operator needs
/// (connection refused, timed out, certificate ...), which sits further down the chain.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
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

/// A URL as logged: a password in its user info is masked.
pub fn redacted_str(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&soon).unwrap());
        let parsed = retry_after(&headers).unwrap();
        assert!(parsed > Duration::from_secs(80) && parsed <= Duration::from_secs(90), "{parsed:?}");
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn passwords_in_urls_are_masked() {
        assert_eq!(redacted_str("http://u:secret@h/p?q=1"), "http://u:***@h/p?q=1");
        assert_eq!(redacted_str("http://h/p"), "http://h/p");
    }
}
