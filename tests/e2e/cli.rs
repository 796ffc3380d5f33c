//! The command line against the real database, broker and endpoint.

use crate::harness::*;

#[tokio::test]
async fn flows_can_be_added_listed_shown_enabled_and_disabled() {
    let env = TestEnv::new().await;
    let topic = env.topic("sensors/aht10");
    let (code, out, err) = env.command(&[
        "flows",
        "add",
        "AHT10",
        &topic,
        "STORE_DB",
        "--schema",
        r#"{"temperature": "float"}"#,
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("added flow AHT10"), "{out}");
    let (_, listed, _) = env.command(&["flows", "list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["code"], "AHT10");
    assert_eq!(listed[0]["enabled"], true);
    assert_eq!(listed[0]["problem"], serde_json::Value::Null);

    let (code, _, err) = env.command(&["flows", "add", "AHT10", &topic, "STORE_DB"]);
    assert_eq!((code, err.trim()), (1, "error: a flow with code \"AHT10\" exists already"));
    let (code, _, err) = env.command(&["flows", "add", "BAD", "a/#/b", "STORE_DB"]);
    assert_eq!(code, 1);
    assert!(err.starts_with("error: flow BAD not added: invalid topic filter"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    let (code, _, err) = env.command(&["flows", "add", "NOURL", "x", "POST_ENDPOINT"]);
    assert!(code == 1 && err.contains("needs an endpoint_url"), "{err}");

    assert_eq!(env.command(&["flows", "disable", "AHT10"]).0, 0);
    let (_, shown, _) = env.command(&["flows", "show", "AHT10"]);
    assert!(shown.contains("enabled:        false"), "{shown}");
    assert_eq!(env.command(&["flows", "enable", "AHT10"]).0, 0);
    let (_, shown, _) = env.command(&["flows", "show", "AHT10", "--json"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&shown).unwrap()["enabled"], true);
    let (code, _, err) = env.command(&["flows", "enable", "NOPE"]);
    assert!(code == 1 && err.contains("no flow with code \"NOPE\""), "{err}");

    // A gateway runs the flow added by the CLI.
    let _gateway = env.start().await;
    publish(&topic, &[br#"{"temperature": 20.5}"#]).await;
    env.wait_counter("AHT10", 1).await;
}

#[tokio::test]
async fn migrate_creates_the_tables() {
    let env = TestEnv::empty().await;
    let (code, out, err) = env.command(&["migrate"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("up to date"));
    let tables: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() \
         AND table_name IN ('flows', 'data', 'mqtt_servers', 'gateway_outbox', 'gateway_flow_stats')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(tables, 5);
}

#[tokio::test]
async fn status_and_outbox_show_and_retry_dead_requests() {
    let mut env = TestEnv::new().await;
    env.set("HTTP_RETRY_MAX_DELAY_SECONDS", "0.2");
    let path = format!("/status/400/{}", env.name);
    let topic = env.topic("t");
    env.add_flow("REJECTED", &topic, "POST_ENDPOINT", "{}", Some(&shared().echo.url(&path))).await;
    let gateway = env.start().await;
    publish(&topic, &[br#"{"v": 1}"#]).await;
    wait_log(&gateway, "Giving up on request").await;

    let (_, status, _) = env.command(&["status", "--interval", "0.1", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["flows"][0]["last_msg_id"], 1);
    assert_eq!(status["flows"][0]["outbox_dead"], 1);
    assert_eq!(status["flows"][0]["messages_per_second"], 0.0);
    let last = status["flows"][0]["last_message_at_utc"].as_str().expect("a last message time");
    let last = chrono::NaiveDateTime::parse_from_str(last, "%Y-%m-%d %H:%M:%S%.f").unwrap();
    assert!((chrono::Utc::now().naive_utc() - last).num_seconds() < 60, "{last}");
    let (_, dead, _) = env.command(&["outbox", "list", "--dead", "--json"]);
    let dead: serde_json::Value = serde_json::from_str(&dead).unwrap();
    assert_eq!(dead[0]["attempts"], 3);
    assert!(dead[0]["last_error"].as_str().unwrap().starts_with("400 Client Error"));

    let (code, _, err) = env.command(&["outbox", "retry"]);
    assert!(code == 1 && err.contains("--all"), "{err}");
    let (code, out, _) = env.command(&["outbox", "retry", "--all"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("1 dead requests queued again"), "{out}");
    eventually("three more attempts", || shared().echo.count(&path) >= 6).await;
}

#[tokio::test]
async fn check_names_every_problem_and_passes_once_fixed() {
    let env = TestEnv::new().await;
    env.exec(&format!(
        "INSERT INTO mqtt_servers (host, port, username, password, enabled, is_default) VALUES ('127.0.0.1', {}, NULL, NULL, TRUE, TRUE)",
        shared().broker.port
    ))
    .await;
    env.add_flow("GOOD", &env.topic("a"), "STORE_DB", "{}", None).await;
    env.add_flow("BROKEN", "a/#/b", "STORE_DB", "{}", None).await;
    let dead_port = testkit::free_port();
    env.add_flow(
        "DOWN",
        &env.topic("b"),
        "POST_ENDPOINT",
        "{}",
        Some(&format!("http://127.0.0.1:{dead_port}/x")),
    )
    .await;
    let (code, out, _) = env.command(&["check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("problem: flow BROKEN: invalid topic filter"), "{out}");
    assert!(out.contains("problem: flow DOWN: endpoint"), "{out}");
    assert!(!out.contains("GOOD"), "{out}");

    env.exec("UPDATE flows SET enabled = FALSE WHERE code IN ('BROKEN', 'DOWN')").await;
    let (code, out, err) = env.command(&["check", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["ok"], true);
}

#[tokio::test]
async fn a_subcommand_error_is_one_line_and_non_zero() {
    let mut env = TestEnv::empty().await;
    env.unset("DB_HOST");
    let (code, out, err) = env.command(&["flows", "list"]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(err.trim(), "error: missing environment variable DB_HOST (or DB_SOCKET)");
}

#[tokio::test]
async fn status_measures_each_flows_rate() {
    let env = TestEnv::new().await;
    let topic = env.topic("t");
    env.add_flow("BUSY", &topic, "STORE_DB", "{}", None).await;
    env.add_flow("IDLE", &env.topic("idle"), "STORE_DB", "{}", None).await;
    let _gateway = env.start().await;
    let vars = env.vars.clone();
    let measuring =
        tokio::task::spawn_blocking(move || run_cli(&vars, &["status", "--interval", "2", "--json"]).1);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let payloads: Vec<String> = (1..=20).map(|i| format!(r#"{{"i": {i}}}"#)).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(|p| p.as_bytes()).collect();
    publish(&topic, &refs).await;
    let status: serde_json::Value = serde_json::from_str(&measuring.await.unwrap()).unwrap();
    let flows = status["flows"].as_array().unwrap();
    let rate = |code: &str| {
        flows.iter().find(|f| f["code"] == code).unwrap()["messages_per_second"].as_f64().unwrap()
    };
    assert!(rate("BUSY") >= 5.0, "20 messages within the 2 s window: {status}");
    assert_eq!(rate("IDLE"), 0.0);
}
