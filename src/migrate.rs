//! Schema migrations that any number of gateway instances can run at the same moment.
//!
//! sqlx's own runner is not safe for that on MariaDB: its lock is `GET_LOCK(name, -1)`, which
//! MariaDB answers with NULL at once instead of waiting, and the answer is ignored, so two
//! instances starting together race on `_sqlx_migrations` (`Duplicate entry` or `partially
//! applied`). It also refuses to start for good once a crash left a row with `success = FALSE`.
//!
//! This runner keeps sqlx's files (`migrations/`, embedded by `sqlx::migrate!`) and its
//! bookkeeping table, so the `sqlx` command-line tool still reads the state, but:
//! - one dedicated connection takes `GET_LOCK` with a positive timeout, checks the answer, holds
//!   the lock across the whole pass and releases it after;
//! - a migration left unfinished (`success = FALSE`) is run again: every migration is written to
//!   be re-runnable (see `migrations/README.md`; a test runs each one twice);
//! - a pass that fails for a reason that goes away (a deadlock, a Galera certification conflict,
//!   a node not yet synced, a dropped connection) is retried from the start, which is safe for
//!   the same reason. Galera does not replicate `GET_LOCK`, so instances writing to different
//!   nodes can migrate at once; the retries and re-runnable migrations are what make that work.

use crate::backoff::Backoff;
use sqlx::migrate::{Migration, Migrator};
use sqlx::mysql::{MySqlConnection, MySqlDatabaseError, MySqlPool};
use sqlx::{Connection, Row};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// How long a starting instance waits for another one's migration before giving up.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long passes failing for a passing reason are retried.
const RETRY_FOR: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "another instance held the migration lock for {0:?}: a migration is still running or hung; \
         see SELECT * FROM information_schema.METADATA_LOCK_INFO"
    )]
    LockTimeout(Duration),
    #[error("the server refused the migration lock (GET_LOCK returned NULL)")]
    LockRefused,
    #[error("migration {version} ({description}) failed: {source}")]
    Failed { version: i64, description: String, source: sqlx::Error },
    #[error(
        "migration {0} was changed after it was applied (its checksum differs from the one in \
         _sqlx_migrations); migrations must never be edited once released"
    )]
    Changed(i64),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Every migration this build knows, in order.
pub fn migrations() -> impl Iterator<Item = &'static Migration> {
    MIGRATOR.iter().filter(|m| m.migration_type.is_up_migration())
}

/// Brings the schema up to date, waiting up to [`LOCK_TIMEOUT`] for another instance doing so.
pub async fn run(pool: &MySqlPool) -> Result<(), MigrateError> {
    run_with(pool, LOCK_TIMEOUT).await
}

/// As [`run`], with the time to wait for the lock.
pub async fn run_with(pool: &MySqlPool, lock_timeout: Duration) -> Result<(), MigrateError> {
    let give_up = Instant::now() + RETRY_FOR;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match pass(pool, lock_timeout).await {
            Err(error) if passing(&error) && Instant::now() < give_up => {
                let delay = backoff.step();
                tracing::warn!("Migration interrupted, trying again in {:.1}s: {error}", delay.as_secs_f64());
                tokio::time::sleep(delay).await;
            }
            outcome => return outcome,
        }
    }
}

/// One pass under the lock, on a connection of its own: the lock belongs to the session, so
/// the connection must not go back to the pool while it may still hold it.
async fn pass(pool: &MySqlPool, lock_timeout: Duration) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await?.detach();
    lock(&mut conn, lock_timeout).await?;
    let outcome = apply_missing(&mut conn).await;
    // Closing the session would free the lock too; releasing first lets the next instance in
    // without waiting for the server to notice the disconnect.
    let _ = sqlx::query("SELECT RELEASE_LOCK(CONCAT('mqtt_gateway_migrate.', MD5(DATABASE())))")
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    outcome
}

/// The lock is per database (user locks are server-wide), so gateways of different databases
/// on one server never wait for each other.
async fn lock(conn: &mut MySqlConnection, timeout: Duration) -> Result<(), MigrateError> {
    const GET: &str = "SELECT GET_LOCK(CONCAT('mqtt_gateway_migrate.', MD5(DATABASE())), ?)";
    let at_once: Option<i32> = sqlx::query_scalar(GET).bind(0.0f64).fetch_one(&mut *conn).await?;
    let got = match at_once {
        Some(1) => Some(1),
        Some(_) => {
            tracing::info!(
                "Another instance is migrating the schema; waiting up to {}s for it",
                timeout.as_secs()
            );
            sqlx::query_scalar(GET).bind(timeout.as_secs_f64()).fetch_one(&mut *conn).await?
        }
        None => None,
    };
    match got {
        Some(1) => Ok(()),
        Some(_) => Err(MigrateError::LockTimeout(timeout)),
        None => Err(MigrateError::LockRefused),
    }
}

async fn apply_missing(conn: &mut MySqlConnection) -> Result<(), MigrateError> {
    // The table as sqlx creates it, so that its tools keep working on our databases.
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS _sqlx_migrations (
            version BIGINT PRIMARY KEY,
            description TEXT NOT NULL,
            installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
            success BOOLEAN NOT NULL,
            checksum BLOB NOT NULL,
            execution_time BIGINT NOT NULL
        )",
    )
    .execute(&mut *conn)
    .await?;
    let applied: HashMap<i64, (Vec<u8>, bool)> =
        sqlx::query("SELECT version, checksum, success FROM _sqlx_migrations")
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect();
    // Versions applied by a newer build are left alone: migrations only add, so an older
    // instance still runs on the newer schema during a rolling upgrade.
    for migration in migrations() {
        match applied.get(&migration.version) {
            Some((checksum, true)) if checksum.as_slice() == &*migration.checksum => continue,
            Some((_, true)) => return Err(MigrateError::Changed(migration.version)),
            Some((_, false)) => {
                tracing::warn!(
                    "Migration {} ({}) was left unfinished by an interrupted start; running it again",
                    migration.version,
                    migration.description
                );
            }
            None => {
                // Marked unfinished before it runs: DDL commits on its own in MariaDB, so a
                // crash between the two leaves this row for the next start to find.
                sqlx::query(
                    "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                     VALUES (?, ?, FALSE, ?, -1)",
                )
                .bind(migration.version)
                .bind(&*migration.description)
                .bind(&*migration.checksum)
                .execute(&mut *conn)
                .await?;
            }
        }
        let started = std::time::Instant::now();
        sqlx::raw_sql(&migration.sql).execute(&mut *conn).await.map_err(|source| MigrateError::Failed {
            version: migration.version,
            description: migration.description.to_string(),
            source,
        })?;
        let elapsed = started.elapsed();
        sqlx::query(
            "UPDATE _sqlx_migrations SET success = TRUE, checksum = ?, execution_time = ? WHERE version = ?",
        )
        .bind(&*migration.checksum)
        .bind(elapsed.as_nanos() as i64)
        .bind(migration.version)
        .execute(&mut *conn)
        .await?;
        tracing::info!(
            "Applied migration {} ({}) in {} ms",
            migration.version,
            migration.description,
            elapsed.as_millis()
        );
    }
    Ok(())
}

/// Errors another attempt can get past. A duplicate version row means another instance (on
/// another Galera node, where the lock does not reach) recorded the same migration first.
fn passing(error: &MigrateError) -> bool {
    let (sql, bookkeeping) = match error {
        MigrateError::Db(e) => (e, true),
        MigrateError::Failed { source, .. } => (source, false),
        _ => return false,
    };
    match sql {
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.try_downcast_ref::<MySqlDatabaseError>().is_some_and(|e| {
            // duplicate key, lock wait timeout, deadlock (1467 on an auto-increment lock) or
            // certification conflict, Galera node not ready, server shutting down, too many connections
            matches!(e.number(), 1205 | 1213 | 1467 | 1047 | 1053 | 1040)
                || (bookkeeping && e.number() == 1062)
        }),
        _ => false,
    }
}
