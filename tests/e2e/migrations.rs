//! Migrations under concurrency: instances starting together, a start that died half-way, a
//! lock held too long, and the rule that every migration can run twice.

use crate::harness::*;
use mqtt_gateway::migrate::{self, MigrateError};
use rstest::rstest;
use sqlx::Row;
use std::time::Duration;

/// Every table's definition, without the AUTO_INCREMENT counter.
async fn schema(env: &TestEnv) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY table_name",
    )
    .bind(&env.name)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let mut ddl = Vec::new();
    for table in tables {
        let create: String =
            sqlx::query(&format!("SHOW CREATE TABLE `{table}`")).fetch_one(&env.pool).await.unwrap().get(1);
        ddl.push(
            create.split(' ').filter(|w| !w.starts_with("AUTO_INCREMENT=")).collect::<Vec<_>>().join(" "),
        );
    }
    ddl
}

/// Runs every migration file once more, straight, as a start after a crash would.
async fn run_all(env: &TestEnv, run: u32) {
    for migration in migrate::migrations() {
        sqlx::raw_sql(&migration.sql).execute(&env.pool).await.unwrap_or_else(|e| {
            panic!("migration {} failed on run {run}: {e}; see migrations/README.md", migration.version)
        });
    }
}

#[tokio::test]
async fn every_migration_can_run_twice() {
    let env = TestEnv::empty().await;
    run_all(&env, 1).await;
    let once = schema(&env).await;
    assert!(once.len() >= 5, "{once:?}");
    run_all(&env, 2).await;
    assert_eq!(schema(&env).await, once, "a second run changed the schema");
}

#[derive(Debug, Clone, Copy)]
enum Start {
    Fresh,
    PythonService,
}

#[rstest]
#[case::on_a_fresh_database(Start::Fresh)]
#[case::on_the_python_services_database(Start::PythonService)]
#[tokio::test]
async fn four_instances_starting_at_once_all_run(#[case] start: Start) {
    let mut env = TestEnv::empty().await;
    if let Start::PythonService = start {
        for statement in crate::startup::PYTHON_SCHEMA.split(';').filter(|s| !s.trim().is_empty()) {
            env.exec(statement).await;
        }
    }
    env.set("MQTT_SHARED_GROUP", "gateways");
    let gateways: Vec<_> = (0..4)
        .map(|i| {
            env.set("MQTT_CLIENT_ID", format!("{}-{i}", env.name));
            env.spawn()
        })
        .collect();
    for gateway in &gateways {
        wait_log(gateway, "Gateway ready").await;
    }
    let migrations = migrate::migrations().count();
    let applied: usize = gateways.iter().map(|g| g.count("Applied migration")).sum();
    let logs: Vec<String> = gateways.iter().map(|g| g.logs()).collect();
    assert_eq!(applied, migrations, "each migration applied once, by one instance:\n{}", logs.join("\n--\n"));
    let rows: Vec<(i64, bool)> =
        sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), migrations);
    assert!(rows.iter().all(|(_, success)| *success), "{rows:?}");
    for log in &logs {
        assert!(!log.contains("Fatal error"), "{log}");
    }
}

#[tokio::test]
async fn a_migration_left_unfinished_is_run_again() {
    let env = TestEnv::new().await;
    // What a start killed inside the outbox migration leaves: the row marked unfinished and
    // only part of the migration's tables.
    let version = migrate::migrations().nth(1).unwrap().version;
    env.exec(&format!("UPDATE _sqlx_migrations SET success = FALSE WHERE version = {version}")).await;
    env.exec("DROP TABLE gateway_outbox_leases").await;

    let gateway = env.start().await;
    assert!(
        gateway.logs().contains(&format!("Migration {version} (outbox) was left unfinished")),
        "{}",
        gateway.logs()
    );
    let success: bool = sqlx::query_scalar("SELECT success FROM _sqlx_migrations WHERE version = ?")
        .bind(version)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(success);
    let leases: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM gateway_outbox_leases").fetch_one(&env.pool).await.unwrap();
    assert_eq!(leases, 0, "the table is back");
}

#[tokio::test]
async fn a_start_waits_for_a_migration_in_progress_and_says_so() {
    let env = TestEnv::new().await;
    let lock = "CONCAT('mqtt_gateway_migrate.', MD5(DATABASE()))";
    let mut holder = env.pool.acquire().await.unwrap();
    let got: i32 =
        sqlx::query_scalar(&format!("SELECT GET_LOCK({lock}, 0)")).fetch_one(&mut *holder).await.unwrap();
    assert_eq!(got, 1);

    let error = migrate::run_with(&env.pool, Duration::from_millis(500)).await.unwrap_err();
    assert!(matches!(error, MigrateError::LockTimeout(_)), "{error}");
    assert!(error.to_string().contains("another instance held the migration lock"), "{error}");

    let mut gateway = env.spawn();
    wait_log(&gateway, "Another instance is migrating the schema; waiting").await;
    assert!(gateway.is_running());
    let _: Option<i32> =
        sqlx::query_scalar(&format!("SELECT RELEASE_LOCK({lock})")).fetch_one(&mut *holder).await.unwrap();
    wait_log(&gateway, "Gateway ready").await;
}

/// Instances seeding an empty `mqtt_servers` at the same moment: InnoDB answers the losers of
/// `INSERT ... SELECT ... WHERE NOT EXISTS` with a deadlock, or with 1467 when they met on the
/// auto-increment lock. Neither is about the start; every instance must get past it.
#[tokio::test]
async fn instances_seeding_the_broker_at_the_same_moment_all_start_and_seed_one_row() {
    let env = TestEnv::new().await;
    // A pool each, as separate instances have: one shared pool would queue the statements.
    let options = (*env.pool.connect_options()).clone();
    let mut instances = Vec::new();
    for _ in 0..6 {
        let pool =
            sqlx::mysql::MySqlPoolOptions::new().max_connections(1).connect_with(options.clone()).await;
        instances.push(pool.unwrap());
    }
    for round in 0..300 {
        env.exec("DELETE FROM mqtt_servers").await;
        let seeds =
            instances.iter().map(|pool| mqtt_gateway::db::seed_default_broker(pool, "localhost", 1883));
        let outcomes = futures_util::future::join_all(seeds).await;
        let seeded = outcomes.iter().filter(|o| matches!(o, Ok(true))).count();
        let errors: Vec<String> =
            outcomes.iter().filter_map(|o| o.as_ref().err()).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "round {round}: {errors:?}");
        assert_eq!(seeded, 1, "round {round}: one instance seeds");
        let rows: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM mqtt_servers").fetch_one(&env.pool).await.unwrap();
        assert_eq!(rows, 1, "round {round}");
    }
}

/// The body lengths of an outbox backlog written before `body_bytes` existed are filled in,
/// every row, a few hundred per transaction (the loop must run past its first batch).
#[tokio::test]
async fn body_lengths_of_a_backlog_are_filled_in_batches() {
    let env = TestEnv::new().await;
    env.exec(
        "INSERT INTO gateway_outbox (flow_id, flow_code, endpoint_url, body, msg_id, created_at, next_attempt_at) \
         SELECT 1, 'F', 'http://h/p', REPEAT('é', seq), seq, UTC_TIMESTAMP(3), UTC_TIMESTAMP(3) FROM seq_1_to_1234",
    )
    .await;
    env.exec("UPDATE gateway_outbox SET body_bytes = NULL").await;
    let version = migrate::migrations().find(|m| m.description == "outbox follows flow").unwrap().version;
    env.exec(&format!("UPDATE _sqlx_migrations SET success = FALSE WHERE version = {version}")).await;

    migrate::run(&env.pool).await.unwrap();
    let (rows, wrong): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), CAST(SUM(body_bytes IS NULL OR body_bytes <> LENGTH(body)) AS SIGNED) FROM gateway_outbox",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((rows, wrong), (1234, 0), "every length filled in, in bytes");
}
