//! The database: connection pool, the call into the schema migrations, and the queries on
//! `mqtt_servers` and `flows` that startup and reload need.
//!
//! Connect options are built field by field, never as a URL, so a password with `@`, `/` or `:`
//! (which broke the original's `mysql+pymysql://` string) works as it is and is never formatted
//! into text that could be logged.

use crate::config::DbSettings;
use crate::flows::FlowRow;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::{MySql, Transaction};
use std::time::Duration;

/// The broker to connect to, from `mqtt_servers`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BrokerRow {
    pub host: String,
    pub port: Option<i32>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Opens the pool. `pool_pre_ping` of the original is sqlx's `test_before_acquire`, on by
/// default: a connection the server dropped is replaced rather than failing a message.
pub async fn connect(settings: &DbSettings) -> Result<MySqlPool, sqlx::Error> {
    let options = MySqlConnectOptions::new()
        .host(&settings.host)
        .port(settings.port)
        .username(&settings.user)
        .password(settings.password.expose())
        .database(&settings.name)
        .charset("utf8mb4");
    let options = match &settings.socket {
        Some(socket) => options.socket(socket),
        None => options,
    };
    MySqlPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// Creates the tables that are missing; leaves existing ones as they are. Safe with any number
/// of instances starting at once (see [`crate::migrate`]).
pub async fn migrate(pool: &MySqlPool) -> Result<(), crate::migrate::MigrateError> {
    crate::migrate::run(pool).await
}

/// Seeds one broker row when `mqtt_servers` is empty, in one statement so two instances
/// starting together cannot both seed.
pub async fn seed_default_broker(pool: &MySqlPool, host: &str, port: u16) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO mqtt_servers (host, port, username, password, enabled, is_default) \
         SELECT ?, ?, NULL, NULL, TRUE, TRUE FROM DUAL \
         WHERE NOT EXISTS (SELECT 1 FROM mqtt_servers)",
    )
    .bind(host)
    .bind(i32::from(port))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The original's choice: the first enabled row, default rows first, then by id.
pub async fn choose_broker(pool: &MySqlPool) -> Result<Option<BrokerRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT host, port, username, password FROM mqtt_servers \
         WHERE enabled ORDER BY is_default DESC, id ASC LIMIT 1",
    )
    .fetch_optional(pool)
    .await
}

/// Every enabled flow, in id order. The schema is read as text so that both MariaDB's JSON
/// (a LONGTEXT) and MySQL's native JSON type decode.
pub async fn enabled_flows(pool: &MySqlPool) -> Result<Vec<FlowRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, code, topic, action, CAST(payload_schema AS CHAR) AS payload_schema, \
         endpoint_url FROM flows WHERE enabled ORDER BY id",
    )
    .fetch_all(pool)
    .await
}

/// Adds `count` to a flow's counter and returns the new value, in the caller's transaction.
/// `LAST_INSERT_ID(expr)` hands the new value back with the update, saving a round trip, and
/// the row lock it takes keeps ids distinct however many writers there are.
pub async fn advance_counter(
    tx: &mut Transaction<'_, MySql>,
    flow_id: i32,
    count: i32,
) -> Result<i32, CounterError> {
    let done = sqlx::query("UPDATE flows SET last_msg_id = LAST_INSERT_ID(last_msg_id + ?) WHERE id = ?")
        .bind(count)
        .bind(flow_id)
        .execute(&mut **tx)
        .await?;
    if done.rows_affected() != 1 {
        return Err(CounterError::FlowGone(flow_id));
    }
    i32::try_from(done.last_insert_id()).map_err(|_| CounterError::Overflow(flow_id))
}

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("flow {0} no longer exists")]
    FlowGone(i32),
    #[error("last_msg_id of flow {0} no longer fits in INT")]
    Overflow(i32),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}
