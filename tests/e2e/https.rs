//! HTTPS endpoints: a private CA trusted through `HTTP_CA_FILE` (besides the system's roots),
//! and an untrusted certificate failing as any other delivery failure: the original's
//! `Error posting flow ...` line with the reason, and a retry.

use crate::certs::Ca;
use crate::harness::*;
use testkit::TlsFront;

/// An HTTPS endpoint in front of the shared echo server, with a certificate for 127.0.0.1
/// signed by `ca`.
fn https_endpoint(dir: &std::path::Path, ca: &Ca) -> TlsFront {
    let (cert, key) = ca.issue(dir, "endpoint", &["127.0.0.1"], false);
    let read = |path: std::path::PathBuf| std::fs::read_to_string(path).unwrap();
    TlsFront::start(shared().echo.port, &read(cert), &read(key)).expect("start the TLS front")
}

#[tokio::test]
async fn an_endpoint_signed_by_the_ca_in_http_ca_file_gets_its_posts() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("endpoint CA");
    let endpoint = https_endpoint(dir.path(), &ca);
    let mut env = TestEnv::new().await;
    env.set("HTTP_CA_FILE", ca.write(dir.path(), "ca.pem").to_str().unwrap());
    let path = format!("/{}/https", env.name);
    let topic = env.topic("t");
    env.add_flow("SECURE", &topic, "POST_ENDPOINT", "{}", Some(&endpoint.url(&path))).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#, br#"{"v": 2}"#]).await;
    eventually("two POSTs over HTTPS", || shared().echo.count(&path) >= 2).await;
    let bodies: Vec<String> = shared().echo.requests(&path).iter().map(|r| r.body_text()).collect();
    assert_eq!(bodies, [r#"{"v": 1}"#, r#"{"v": 2}"#]);
    assert_eq!(gateway.count("Error posting flow"), 0, "{}", gateway.logs());
}

#[tokio::test]
async fn an_untrusted_endpoint_certificate_is_logged_with_the_reason_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = https_endpoint(dir.path(), &Ca::new("a CA nobody trusts"));
    let mut env = TestEnv::new().await;
    env.set("HTTP_CA_FILE", Ca::new("another CA").write(dir.path(), "other.pem").to_str().unwrap());
    env.set("HTTP_RETRY_MAX_DELAY_SECONDS", "0.2");
    let path = format!("/{}/untrusted", env.name);
    let topic = env.topic("t");
    env.add_flow("UNTRUSTED", &topic, "POST_ENDPOINT", "{}", Some(&endpoint.url(&path))).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;

    let line =
        format!("Error posting flow UNTRUSTED to endpoint https://127.0.0.1:{}{path}: ", endpoint.port);
    eventually("a second attempt", || gateway.count(&line) >= 2).await;
    let logs = gateway.logs();
    let first = logs.lines().find(|l| l.contains(&line)).unwrap();
    assert!(first.contains("invalid peer certificate") && first.contains("UnknownIssuer"), "{first}");
    assert_eq!(shared().echo.count(&path), 0, "nothing passes an untrusted handshake");
    let (pending, dead): (i64, i64) = sqlx::query_as(
        "SELECT CAST(SUM(NOT dead) AS SIGNED), CAST(SUM(dead) AS SIGNED) FROM gateway_outbox WHERE flow_code = 'UNTRUSTED'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((pending, dead), (1, 0), "kept for a retry, as any failure");
}

#[tokio::test]
async fn an_http_ca_file_without_a_certificate_is_fatal_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let mut env = TestEnv::empty().await;
    env.set("HTTP_CA_FILE", empty.to_str().unwrap());
    env.assert_start_fails("Fatal error during startup: invalid environment variable HTTP_CA_FILE: ").await;
}
