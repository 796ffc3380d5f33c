//! An HTTP echo server that records every request. The path chooses the answer:
//! - `/status/503/...` answers 503;
//! - `/sleep/2000/...` answers 200 after two seconds;
//! - `/flaky/3/...` answers 500 to the first three requests on that exact path, then 200;
//! - `/busy/2/1/...` answers 429 with `Retry-After: 1` to the first two, then 200;
//! - `/unavailable/2/600/...` answers 503 with `Retry-After: 600` to the first two, then 200;
//! - `/unavailable-for/3000/0/...` answers 503 with `Retry-After: 0` until 3 s after the first
//!   request on that exact path, then 200;
//! - `/stall/1/8000/...` answers the first request 200 after 8 s, the later ones at once;
//! - anything else 200.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// 503 with `Retry-After` as the path says (1 when it says nothing).
fn unavailable(retry_after: Option<&str>) -> Response {
    let wait = retry_after.unwrap_or("1").to_owned();
    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", wait)], "unavailable").into_response()
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs on its own thread and runtime, so it serves whatever the caller's runtime is doing.
pub struct EchoServer {
    pub port: u16,
    requests: Arc<Mutex<Vec<Recorded>>>,
    /// Requests per exact path, and when the first arrived, so counting never walks the
    /// recorded requests.
    counts: Arc<Mutex<HashMap<String, (usize, Instant)>>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start() -> anyhow::Result<EchoServer> {
        EchoServer::start_on(0)
    }

    /// On a given port (0 for any), for an endpoint that comes back where it was.
    pub fn start_on(port: u16) -> anyhow::Result<EchoServer> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let (stop, stopped) = oneshot::channel::<()>();
        let recorder = (Arc::clone(&requests), Arc::clone(&counts));
        let thread = std::thread::Builder::new().name("echo-server".into()).spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("echo server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("echo listener");
                let app = axum::Router::new().fallback(move |req: Request| {
                    answer(Arc::clone(&recorder.0), Arc::clone(&recorder.1), req)
                });
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        })?;
        Ok(EchoServer { port, requests, counts, stop: Some(stop), thread: Some(thread) })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// How many requests arrived on paths starting with `prefix`, without copying them: the
    /// handlers share this lock, so polling with `requests` would slow the server down.
    pub fn count(&self, prefix: &str) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.iter().filter(|(path, _)| path.starts_with(prefix)).map(|(_, (n, _))| n).sum()
    }

    /// Requests received so far on paths starting with `prefix`.
    pub fn requests(&self, prefix: &str) -> Vec<Recorded> {
        let all = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter(|r| r.path.starts_with(prefix)).cloned().collect()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn answer(
    requests: Arc<Mutex<Vec<Recorded>>>,
    counts: Arc<Mutex<HashMap<String, (usize, Instant)>>>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let path = parts.uri.path().to_owned();
    requests.lock().unwrap_or_else(|p| p.into_inner()).push(Recorded {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    });
    let (seen_before, first_at) = {
        let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
        let (n, first_at) = counts.entry(path.clone()).or_insert((0, Instant::now()));
        *n += 1;
        (*n as u64 - 1, *first_at)
    };
    let mut segments = path.trim_start_matches('/').split('/');
    let kind = segments.next();
    let number = segments.next().and_then(|s| s.parse::<u64>().ok());
    match (kind, number) {
        (Some("status"), Some(code)) => {
            let status = StatusCode::from_u16(code as u16).unwrap_or(StatusCode::IM_A_TEAPOT);
            (status, "status").into_response()
        }
        (Some("sleep"), Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (StatusCode::OK, "slept").into_response()
        }
        (Some("flaky"), Some(failures)) if seen_before < failures => {
            (StatusCode::INTERNAL_SERVER_ERROR, "flaky").into_response()
        }
        (Some("busy"), Some(failures)) if seen_before < failures => {
            let wait = segments.next().unwrap_or("1").to_owned();
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", wait)], "busy").into_response()
        }
        (Some("unavailable"), Some(failures)) if seen_before < failures => unavailable(segments.next()),
        (Some("stall"), Some(stalled)) if seen_before < stalled => {
            let ms = segments.next().and_then(|s| s.parse().ok()).unwrap_or(1_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (StatusCode::OK, "stalled").into_response()
        }
        (Some("unavailable-for"), Some(ms)) if first_at.elapsed() < Duration::from_millis(ms) => {
            unavailable(segments.next())
        }
        _ => (StatusCode::OK, "ok").into_response(),
    }
}
