//! No CLI output shows an endpoint's password: every subcommand that prints endpoint URLs masks
//! them as the service's log does (`http://user:***@host/hook`).

use crate::harness::*;

/// Planted in the user info of every endpoint URL of the test.
const PLANTED: &str = "planted-Secret-4711";

#[tokio::test]
async fn no_subcommand_prints_an_endpoints_password() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_RETRY_MAX_DELAY_SECONDS", "0.2");
    let dead_port = testkit::free_port();
    let down = format!("http://user:{PLANTED}@127.0.0.1:{dead_port}/hook");
    let rejected_path = format!("/status/400/{}", env.name);
    let rejected =
        shared().echo.url(&rejected_path).replacen("http://", &format!("http://user:{PLANTED}@"), 1);
    let (down_topic, rejected_topic) = (env.topic("down"), env.topic("rejected"));
    env.add_flow("DOWN", &down_topic, "POST_ENDPOINT", "{}", Some(&down)).await;
    env.add_flow("REJECTED", &rejected_topic, "POST_ENDPOINT", "{}", Some(&rejected)).await;
    // A URL that does not parse cannot be masked; it must not be shown at all.
    env.add_flow(
        "BROKEN",
        &env.topic("broken"),
        "POST_ENDPOINT",
        "{}",
        Some(&format!("http://user:{PLANTED}@host:99999/x")),
    )
    .await;

    // One pending request (the endpoint is down) and one dead one (the endpoint says 400).
    let gateway = env.start().await;
    publish(&down_topic, &[br#"{"v": 1}"#]).await;
    publish(&rejected_topic, &[br#"{"v": 2}"#]).await;
    wait_log(&gateway, "Giving up on request").await;
    wait_log(&gateway, "Error posting flow DOWN").await;

    let runs: &[&[&str]] = &[
        &["check"],
        &["check", "--json"],
        &["flows", "list"],
        &["flows", "list", "--json"],
        &["flows", "show", "DOWN"],
        &["flows", "show", "DOWN", "--json"],
        &["flows", "show", "BROKEN"],
        &["flows", "show", "BROKEN", "--json"],
        &["outbox", "list"],
        &["outbox", "list", "--json"],
        &["outbox", "list", "--dead"],
        &["outbox", "list", "--dead", "--json"],
        &["status", "--interval", "0.1"],
        &["status", "--interval", "0.1", "--json"],
    ];
    let mut masked = 0;
    for args in runs {
        let (code, out, err) = env.command(args);
        assert!(code == 0 || args[0] == "check", "{args:?} failed ({code}): {err}");
        assert!(
            !out.contains(PLANTED) && !err.contains(PLANTED),
            "{args:?} printed the password:\n{out}{err}"
        );
        if out.contains("user:***@") {
            masked += 1;
        }
    }
    // Every run but the text `flows list`, `flows show BROKEN` and `status` (no URLs there)
    // shows a masked URL.
    assert_eq!(masked, 9, "masked URLs were expected in check, flows show and outbox list");

    let (_, out, _) = env.command(&["check"]);
    assert!(
        out.contains(&format!(
            "problem: flow DOWN: endpoint http://user:***@127.0.0.1:{dead_port}/hook unreachable"
        )),
        "{out}"
    );
    let (_, out, _) = env.command(&["outbox", "list", "--dead", "--json"]);
    let dead: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(dead[0]["endpoint_url"].as_str().unwrap().starts_with("http://user:***@127.0.0.1:"), "{out}");
    let (_, out, _) = env.command(&["flows", "show", "BROKEN"]);
    assert!(out.contains("endpoint_url:   (not a valid URL; not shown"), "{out}");
    assert!(!gateway.logs().contains(PLANTED), "the service logged the password:\n{}", gateway.logs());
}
