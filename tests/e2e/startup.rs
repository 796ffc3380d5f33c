//! Startup: configuration errors, table creation and adoption, broker seeding and choice.

use crate::harness::*;
use rstest::rstest;
use sqlx::Row;

#[rstest]
#[case::host("DB_HOST", "missing environment variable DB_HOST")]
#[case::name("DB_NAME", "missing environment variable DB_NAME")]
#[case::user("DB_USER", "missing environment variable DB_USER")]
#[case::password("DB_PASSWORD", "missing environment variable DB_PASSWORD")]
#[tokio::test]
async fn a_missing_variable_is_fatal_and_named(#[case] variable: &str, #[case] message: &str) {
    let mut env = TestEnv::empty().await;
    env.unset(variable);
    env.assert_start_fails(&format!("| ERROR | mqtt_gateway | Fatal error during startup: {message}")).await;
}

#[tokio::test]
async fn a_malformed_variable_is_fatal_and_named() {
    let mut env = TestEnv::empty().await;
    env.set("MQTT_KEEPALIVE", "soon");
    env.assert_start_fails("Fatal error during startup: invalid environment variable MQTT_KEEPALIVE").await;
}

#[tokio::test]
async fn a_fresh_database_gets_the_tables_and_the_default_broker() {
    let env = TestEnv::empty().await;
    let _gateway = env.start().await;
    let columns: Vec<(String, String, String)> = sqlx::query(
        "SELECT table_name, column_name, column_type FROM information_schema.columns \
         WHERE table_schema = ? AND table_name IN ('mqtt_servers', 'flows', 'data') \
         ORDER BY table_name, ordinal_position",
    )
    .bind(&env.name)
    .fetch_all(&env.pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1), r.get::<String, _>(2)))
    .collect();
    let names: Vec<String> = columns.iter().map(|(t, c, _)| format!("{t}.{c}")).collect();
    assert_eq!(
        names,
        [
            "data.id",
            "data.received_at",
            "data.flow_code",
            "data.attribute_name",
            "data.attribute_value",
            "data.last_msg_id",
            "flows.id",
            "flows.code",
            "flows.description",
            "flows.topic",
            "flows.action",
            "flows.payload_schema",
            "flows.endpoint_url",
            "flows.last_msg_id",
            "flows.enabled",
            "mqtt_servers.id",
            "mqtt_servers.host",
            "mqtt_servers.port",
            "mqtt_servers.username",
            "mqtt_servers.password",
            "mqtt_servers.enabled",
            "mqtt_servers.is_default",
        ]
    );
    let types: Vec<&str> = columns.iter().map(|(_, _, ty)| ty.as_str()).collect();
    assert_eq!(&types[..6], ["int(11)", "datetime", "varchar(100)", "varchar(255)", "text", "int(11)"]);

    let broker = sqlx::query("SELECT host, port, username, password, enabled, is_default FROM mqtt_servers")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(broker.len(), 1);
    assert_eq!(broker[0].get::<String, _>(0), "127.0.0.1");
    assert_eq!(broker[0].get::<i32, _>(1), i32::from(shared().broker.port));
    assert_eq!(broker[0].get::<Option<String>, _>(2), None);
    assert!(broker[0].get::<bool, _>(4) && broker[0].get::<bool, _>(5));
}

/// The DDL SQLAlchemy's `create_all` emitted for the Python service: no server-side defaults.
pub const PYTHON_SCHEMA: &str = "
CREATE TABLE mqtt_servers (id INTEGER NOT NULL AUTO_INCREMENT, host VARCHAR(255) NOT NULL, port INTEGER NOT NULL,
  username VARCHAR(255), password VARCHAR(255), enabled BOOL NOT NULL, is_default BOOL NOT NULL, PRIMARY KEY (id));
CREATE TABLE flows (id INTEGER NOT NULL AUTO_INCREMENT, code VARCHAR(100) NOT NULL, description VARCHAR(255) NOT NULL,
  topic VARCHAR(255) NOT NULL, action VARCHAR(30) NOT NULL, payload_schema JSON NOT NULL, endpoint_url VARCHAR(500),
  last_msg_id INTEGER NOT NULL, enabled BOOL NOT NULL, PRIMARY KEY (id), UNIQUE (code));
CREATE TABLE data (id INTEGER NOT NULL AUTO_INCREMENT, received_at DATETIME NOT NULL, flow_code VARCHAR(100) NOT NULL,
  attribute_name VARCHAR(255) NOT NULL, attribute_value TEXT NOT NULL, last_msg_id INTEGER NOT NULL, PRIMARY KEY (id));
";

/// The table's definition, without the AUTO_INCREMENT counter that inserting rows moves.
async fn show_create(env: &TestEnv, table: &str) -> String {
    let ddl: String =
        sqlx::query(&format!("SHOW CREATE TABLE {table}")).fetch_one(&env.pool).await.unwrap().get(1);
    ddl.split(' ').filter(|word| !word.starts_with("AUTO_INCREMENT=")).collect::<Vec<_>>().join(" ")
}

#[tokio::test]
async fn a_database_created_by_the_python_service_is_adopted_unchanged() {
    let env = TestEnv::empty().await;
    for statement in PYTHON_SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
        env.exec(statement).await;
    }
    let before = [
        show_create(&env, "mqtt_servers").await,
        show_create(&env, "flows").await,
        show_create(&env, "data").await,
    ];
    env.add_flow(
        "AHT10_SENSOR",
        &env.topic("sensors/aht10"),
        "STORE_DB",
        r#"{"temperature": "float"}"#,
        None,
    )
    .await;

    let _gateway = env.start().await;
    publish(&env.topic("sensors/aht10"), &[br#"{"temperature": 21.5, "humidity": 40}"#]).await;
    env.wait_counter("AHT10_SENSOR", 1).await;

    assert_eq!(
        env.rows("AHT10_SENSOR").await,
        [("temperature".into(), "21.5".into(), 1), ("humidity".into(), "40".into(), 1)]
    );
    let after = [
        show_create(&env, "mqtt_servers").await,
        show_create(&env, "flows").await,
        show_create(&env, "data").await,
    ];
    assert_eq!(before, after, "the Python service's tables must not change");
    let seeded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM mqtt_servers").fetch_one(&env.pool).await.unwrap();
    assert_eq!(seeded, 1, "the default broker row was seeded with every column given");
}

#[tokio::test]
async fn no_enabled_broker_is_fatal() {
    let env = TestEnv::new().await;
    env.exec("INSERT INTO mqtt_servers (host, port, username, password, enabled, is_default) VALUES ('127.0.0.1', 1883, NULL, NULL, FALSE, TRUE)").await;
    env.assert_start_fails(
        "| ERROR | mqtt_gateway | Fatal error during startup: No enabled MQTT server found in mqtt_servers",
    )
    .await;
}

#[tokio::test]
async fn the_broker_is_the_first_enabled_row_defaults_first() {
    let env = TestEnv::new().await;
    let real = shared().broker.port;
    let dead = testkit::free_port();
    env.exec(&format!(
        "INSERT INTO mqtt_servers (id, host, port, username, password, enabled, is_default) VALUES \
         (1, '127.0.0.1', {dead}, NULL, NULL, TRUE, FALSE), \
         (2, '127.0.0.1', {dead}, NULL, NULL, FALSE, TRUE), \
         (3, '127.0.0.1', {real}, NULL, NULL, TRUE, TRUE), \
         (4, '127.0.0.1', {dead}, NULL, NULL, TRUE, TRUE)"
    ))
    .await;
    let gateway = env.start().await;
    assert!(gateway.logs().contains(&format!("broker 127.0.0.1:{real}")), "{}", gateway.logs());
}

#[tokio::test]
async fn an_unreachable_broker_is_fatal() {
    let mut env = TestEnv::empty().await;
    env.set("MQTT_DEFAULT_PORT", testkit::free_port().to_string());
    env.assert_start_fails("Fatal error during startup: cannot connect to MQTT broker").await;
}

#[derive(Debug, Clone, Copy)]
enum PasswordSource {
    Variable,
    File,
    Credential,
}

#[rstest]
#[case(PasswordSource::Variable)]
#[case(PasswordSource::File)]
#[case(PasswordSource::Credential)]
#[tokio::test]
async fn any_password_works_from_any_source(#[case] source: PasswordSource) {
    let mut env = TestEnv::empty().await;
    let dir = tempfile::tempdir().unwrap();
    match source {
        PasswordSource::Variable => {}
        PasswordSource::File => {
            let file = dir.path().join("pw");
            std::fs::write(&file, format!("{DB_PASSWORD}\n")).unwrap();
            env.unset("DB_PASSWORD");
            env.set("DB_PASSWORD_FILE", file.to_str().unwrap());
        }
        PasswordSource::Credential => {
            std::fs::write(dir.path().join("db-password"), DB_PASSWORD).unwrap();
            env.unset("DB_PASSWORD");
            env.set("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap());
        }
    }
    let gateway = env.start().await;
    assert!(!gateway.logs().contains(DB_PASSWORD));
}

#[tokio::test]
async fn a_wrong_password_is_fatal_and_never_logged() {
    let mut env = TestEnv::empty().await;
    let wrong = "wr0ng-S3cret@value";
    env.set("DB_PASSWORD", wrong);
    let gateway = env.assert_start_fails("Fatal error during startup: cannot connect to database").await;
    let logs = gateway.logs();
    assert!(!logs.contains(wrong) && !logs.contains("S3cret"), "{logs}");
}
