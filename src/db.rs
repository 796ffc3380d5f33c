//! The database: connection pool, the call into the schema migrations, the queries on
//! `mqtt_servers`, whose fault a failed write is ([`blame`]), how big a statement may be
//! ([`StatementBounds`]), and how long a wait on it may last ([`LOCK_WAIT`], [`ANSWER_WITHIN`]).
//! Statements on `flows` live in [`crate::flows::table`].
//!
//! Connect options are built field by field, never as a URL, so a password with `@`, `/` or `:`
//! (which broke the original's `mysql+pymysql://` string) works as it is and is never formatted
//! into text that could be logged.

use crate::config::{DbSettings, DbSslMode};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPool, MySqlPoolOptions, MySqlSslMode};
use sqlx::{ConnectOptions, MySql, Transaction};
use std::time::Duration;

/// How long a statement waits for a lock before the server gives up with error 1205
/// (`lock_wait_timeout` for table and metadata locks, `innodb_lock_wait_timeout` for row locks,
/// set on every connection). The servers' own defaults are a day and 50 s: a write waiting on
/// `FLUSH TABLES WITH READ LOCK`, `LOCK TABLES`, a DDL or an operator's open transaction never
/// came back, and nothing could tell the wait from a hang. A lock held longer than this is the
/// database not taking writes: the stream is held and that is reported.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

/// [`LOCK_WAIT`] for the session, run on every new connection.
const SESSION_LOCK_WAITS: &str = "SET SESSION lock_wait_timeout = 5, SESSION innodb_lock_wait_timeout = 5";

/// How long the client waits for the server's answer to a database call before it drops the
/// connection (a frozen server, a half-open link) and tries again on a fresh one; longer than
/// [`LOCK_WAIT`], so that a lock wait comes back as the server's own error.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// How long taking a connection from the pool may take: checking an idle one, or connecting.
const ACQUIRE_WITHIN: Duration = Duration::from_secs(10);

/// The broker to connect to, from `mqtt_servers`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct BrokerRow {
    pub host: String,
    pub port: Option<i32>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Opens the pool. `pool_pre_ping` of the original is a ping before a connection idle for
/// [`PING_IDLE_AFTER`] is used: a connection the server dropped is replaced rather than failing
/// a message.
/// TLS is sqlx's own (rustls with ring, the system's roots plus `DB_SSL_CA`). Every connection
/// waits at most [`LOCK_WAIT`] for a lock, and has TCP keepalive ([`crate::keepalive`]); taking
/// one from the pool takes at most [`ACQUIRE_WITHIN`].
pub async fn connect(settings: &DbSettings) -> anyhow::Result<MySqlPool> {
    let options = MySqlConnectOptions::new()
        .host(&settings.host)
        .port(settings.port)
        .username(&settings.user)
        .password(settings.password.expose())
        .database(&settings.name)
        .charset("utf8mb4")
        .ssl_mode(match settings.tls.mode {
            DbSslMode::Disabled => MySqlSslMode::Disabled,
            DbSslMode::Preferred => MySqlSslMode::Preferred,
            DbSslMode::Required => MySqlSslMode::Required,
            DbSslMode::VerifyCa => MySqlSslMode::VerifyCa,
            DbSslMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
        });
    let options = match &settings.tls.ca_file {
        Some(ca) => options.ssl_ca(ca),
        None => options,
    };
    let options = match &settings.tls.client_auth {
        Some((cert, key)) => options.ssl_client_cert(cert).ssl_client_key(key),
        None => options,
    };
    let options = match &settings.socket {
        Some(socket) => options.socket(socket),
        None => options,
    };
    // sqlx warns of every statement over a second: each attempt through a lock wait would log
    // one, where holding is reported once.
    let options = options.log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1));
    let tcp_peer = settings.socket.is_none().then(|| (settings.host.clone(), settings.port));
    MySqlPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(ACQUIRE_WITHIN)
        // The original's `pool_pre_ping`, for a connection that sat idle long enough to have
        // been dropped by the server or the network; one used within the last seconds is not
        // pinged first, which would cost every batch a round trip and an idle gateway a wakeup.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    sqlx::Connection::ping(connection).await?;
                }
                Ok(true)
            })
        })
        .after_connect(move |conn, _| {
            let tcp_peer = tcp_peer.clone();
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, SESSION_LOCK_WAITS).await?;
                if let Some((host, port)) = tcp_peer {
                    crate::keepalive::arm_to(&host, port).await;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|error| anyhow::Error::msg(explained(&error)))
}

/// What a pool beside the main one is for; each has its own connections, so that the commit
/// (on the pool of [`connect`]) never waits for a connection behind the outbox's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Reading, recording and scheduling queued requests. Their bodies can be megabytes, so a
    /// connection gives its buffers back when it returns to the pool instead of keeping the
    /// largest body's size for good.
    OutboxRequests,
    /// Taking, renewing and giving back delivery leases: a renewal that waited behind
    /// deliveries could lose a lease that is still being used.
    OutboxLeases,
}

/// A pool of its own for `purpose`, with exactly the connect options and per-connection setup
/// of `pool` (built once, by [`connect`]). It connects when first used.
pub fn pool_beside(pool: &MySqlPool, purpose: Purpose) -> MySqlPool {
    let options = pool.options().clone().min_connections(0);
    let options = match purpose {
        Purpose::OutboxRequests => options.max_connections(4).after_release(|connection, _| {
            Box::pin(async move {
                sqlx::Connection::shrink_buffers(connection);
                Ok(true)
            })
        }),
        Purpose::OutboxLeases => options.max_connections(2),
    };
    options.connect_lazy_with((*pool.connect_options()).clone())
}

/// A connection idle this long is pinged before it is used again.
const PING_IDLE_AFTER: Duration = Duration::from_secs(10);

/// The error in one line, each cause once. rustls names a refused certificate in its own words
/// (`UnknownIssuer`); the operator also needs to know which setting to look at.
fn explained(error: &sqlx::Error) -> String {
    let text = crate::outbox::error_chain(error);
    let hints = [
        (
            "UnknownIssuer",
            "the database server's certificate is not signed by a CA in DB_SSL_CA (or the system's roots)",
        ),
        ("NotValidForName", "the database server's certificate is not valid for DB_HOST"),
        ("not valid for name", "the database server's certificate is not valid for DB_HOST"),
        ("Expired", "the database server's certificate has expired (or this machine's clock is wrong)"),
        (
            "certificate expired",
            "the database server's certificate has expired (or this machine's clock is wrong)",
        ),
        (
            "server does not support TLS",
            "the database server does not offer TLS; DB_SSL_MODE=preferred would fall back to clear text",
        ),
        (
            "CertificateRequired",
            "the database server requires a client certificate: set DB_SSL_CERT and DB_SSL_KEY",
        ),
        ("UnknownCA", "the database server does not trust the client certificate (DB_SSL_CERT)"),
    ];
    match hints.iter().find(|(needle, _)| text.contains(needle)) {
        Some((_, hint)) => format!("{text} ({hint})"),
        None => text,
    }
}

/// Creates the tables that are missing; leaves existing ones as they are. Safe with any number
/// of instances starting at once (see [`crate::migrate`]).
pub async fn migrate(pool: &MySqlPool) -> Result<(), crate::migrate::MigrateError> {
    crate::migrate::run(pool).await
}

/// Seeds one broker row when `mqtt_servers` is empty, in one statement so two instances
/// starting together cannot both seed. Instances that start together do collide on it: InnoDB
/// lets one insert and answers the others with a deadlock, after which they find the row.
pub async fn seed_default_broker(pool: &MySqlPool, host: &str, port: u16) -> Result<bool, sqlx::Error> {
    let done = retrying_conflicts(|| {
        sqlx::query(
            "INSERT INTO mqtt_servers (host, port, username, password, enabled, is_default) \
             SELECT ?, ?, NULL, NULL, TRUE, TRUE FROM DUAL \
             WHERE NOT EXISTS (SELECT 1 FROM mqtt_servers)",
        )
        .bind(host)
        .bind(i32::from(port))
        .execute(pool)
    })
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

/// Whose fault a failed write is: the one question that decides between dropping a message and
/// holding the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The server refused the values written: their size, type or range. Written alone, the
    /// message fails alone; the rest of its batch goes through.
    Data,
    /// Anything else: the database cannot take writes now (down, disk or table full, read-only,
    /// privileges revoked, a table renamed away, a conflict, or a code we do not know). The
    /// batch is held unacknowledged and retried until the condition clears.
    Database,
}

/// MariaDB/MySQL error numbers that are provably about the values of the statement that got
/// them. The list is closed on purpose: a code missing here holds the stream, which costs
/// waiting, never a message.
const DATA_ERRORS: &[u16] = &[
    1153, // ER_NET_PACKET_TOO_LARGE: a statement bigger than max_allowed_packet
    1264, // ER_WARN_DATA_OUT_OF_RANGE
    1265, // WARN_DATA_TRUNCATED
    1292, // ER_TRUNCATED_WRONG_VALUE
    1366, // ER_TRUNCATED_WRONG_VALUE_FOR_FIELD: incorrect string/integer value
    1367, // ER_ILLEGAL_VALUE_FOR_TYPE
    1406, // ER_DATA_TOO_LONG
    1690, // ER_DATA_OUT_OF_RANGE: arithmetic out of range (a counter past INT)
    3819, // ER_CHECK_CONSTRAINT_VIOLATED (MySQL)
    4025, // ER_CONSTRAINT_FAILED: a CHECK constraint (MariaDB)
];

/// The server's error number, when the error came from the server.
pub fn error_code(error: &sqlx::Error) -> Option<u16> {
    match error {
        sqlx::Error::Database(db) => db.try_downcast_ref::<MySqlDatabaseError>().map(|e| e.number()),
        _ => None,
    }
}

/// Judges a failed write: data errors by their closed list, everything else the database's.
pub fn blame(error: &sqlx::Error) -> Blame {
    match error_code(error) {
        Some(code) if DATA_ERRORS.contains(&code) => Blame::Data,
        _ => Blame::Database,
    }
}

/// Whether the connection itself went away during the statement: the server closed it, or
/// something between (a proxy, a failover) did.
pub fn connection_lost(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed)
}

/// A deadlock or a Galera certification conflict (both 1213): another writer won a race for the
/// same rows. Routine with several instances; the transaction is simply run again. InnoDB
/// reports a deadlock met on a table's auto-increment lock (two `INSERT ... SELECT` at once) as
/// 1467, "Failed to read auto-increment value", so that counts too. A lock wait timeout (1205)
/// is not one: a lock held past [`LOCK_WAIT`] is the database not taking writes (see
/// [`lock_wait`]).
pub fn conflict(error: &sqlx::Error) -> bool {
    matches!(error_code(error), Some(1213 | 1467))
}

/// Conflicts one statement is run again after.
const CONFLICT_RETRIES: u32 = 5;

/// Runs one autocommitted statement, and again after a [`conflict`] (the statement was rolled
/// back, so running it again is running it once), up to [`CONFLICT_RETRIES`] times, a few
/// milliseconds apart with jitter so that the writers that collided do not collide again.
pub async fn retrying_conflicts<T, F, Fut>(mut statement: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut conflicts = 0;
    loop {
        match statement().await {
            Err(error) if conflict(&error) && conflicts < CONFLICT_RETRIES => {
                conflicts += 1;
                tracing::debug!("Write conflict ({error}); running it again");
                tokio::time::sleep(Duration::from_millis(rand::random_range(5..50))).await;
            }
            done => return done,
        }
    }
}

/// A write that waited [`LOCK_WAIT`] for a lock someone else holds (`FLUSH TABLES WITH READ
/// LOCK`, `LOCK TABLES`, a DDL, an open transaction on the same rows) and was given up.
pub fn lock_wait(error: &sqlx::Error) -> bool {
    matches!(error_code(error), Some(1205))
}

/// A short label for an error, for the holding metric: the server's number, or the kind.
pub fn error_label(error: &sqlx::Error) -> String {
    match (error_code(error), error) {
        (Some(code), _) => code.to_string(),
        (None, sqlx::Error::Io(_)) => "io".to_owned(),
        (None, sqlx::Error::PoolTimedOut) => "pool_timeout".to_owned(),
        (None, sqlx::Error::Tls(_)) => "tls".to_owned(),
        (None, _) => "other".to_owned(),
    }
}

/// A canary write: whether the database takes a write of other data now, on a connection of
/// its own. It changes nothing (`last_msg_id = last_msg_id` on one flow's row, committed), but it
/// is a write statement, so a server or proxy that refuses writes while answering reads (a
/// read-only replica, MaxScale failing writes over) refuses it too. This, not a ping, is the
/// proof that a connection dropped on a message's write was the message's doing.
pub async fn takes_writes(pool: &MySqlPool, flow_id: i32) -> bool {
    let Ok(Ok(mut conn)) = tokio::time::timeout(ACQUIRE_WITHIN, pool.acquire()).await else {
        return false;
    };
    let write = sqlx::query("UPDATE flows SET last_msg_id = last_msg_id WHERE id = ?").bind(flow_id);
    match tokio::time::timeout(ANSWER_WITHIN, write.execute(&mut *conn)).await {
        Ok(written) => written.is_ok(),
        Err(_) => {
            drop_unanswered(conn);
            false
        }
    }
}

/// Closes a connection that did not answer in time, instead of giving it back to the pool, which
/// would wait for the answer to its last statement (forever, on a half-open link).
pub fn drop_unanswered(conn: sqlx::pool::PoolConnection<MySql>) {
    drop(conn.detach());
}

/// Longest a canary write ([`takes_writes`]) may take.
pub const CANARY_WITHIN: Duration = ACQUIRE_WITHIN.saturating_add(ANSWER_WITHIN);

/// Longest taking a connection and then running work bounded by `bound` on it may take.
pub fn with_acquire(bound: Duration) -> Duration {
    ACQUIRE_WITHIN + bound
}

/// The largest packet this connection's server accepts. Read per transaction: `SET GLOBAL`
/// changes it for new connections only, so the pool can hold connections with different limits.
pub async fn max_allowed_packet(tx: &mut Transaction<'_, MySql>) -> Result<usize, sqlx::Error> {
    let (limit,): (u64,) = sqlx::query_as("SELECT @@SESSION.max_allowed_packet").fetch_one(&mut **tx).await?;
    Ok(usize::try_from(limit).unwrap_or(usize::MAX))
}

/// How much one multi-row statement may carry, from the server's `max_allowed_packet`.
///
/// Rows are grouped up to half the limit (and at most 4 MiB), so an estimate that is a little off still fits; a row
/// bigger than that goes in a statement of its own, up to the limit less headroom for the
/// statement's own framing; a row bigger still cannot be written at all.
#[derive(Debug, Clone, Copy)]
pub struct StatementBounds {
    pub max_packet: usize,
}

/// Kept below MySQL's 65,535 placeholders per statement.
const MAX_PLACEHOLDERS: usize = 60_000;
/// Past a few MiB a bigger statement saves nothing but costs memory (the client encodes it whole).
const MAX_GROUP_BYTES: usize = 4 << 20;
/// Framing of a prepared statement's execute packet beyond its values.
const HEADROOM: usize = 16 * 1024;

impl StatementBounds {
    /// The largest row (by [`row_bytes`]) a statement can carry.
    pub fn row_limit(&self) -> usize {
        self.max_packet.saturating_sub(HEADROOM)
    }

    fn group_limit(&self) -> usize {
        (self.max_packet / 2).clamp(1, MAX_GROUP_BYTES)
    }

    /// Splits `rows` into consecutive runs that each fit one statement, keeping their order.
    pub fn chunks<'r, T>(
        &self,
        rows: &'r [T],
        params_per_row: usize,
        size: impl Fn(&T) -> usize,
    ) -> Vec<&'r [T]> {
        let max_rows = (MAX_PLACEHOLDERS / params_per_row.max(1)).max(1);
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (i, row) in rows.iter().enumerate() {
            let row_bytes = size(row);
            let full = i - start >= max_rows || bytes + row_bytes > self.group_limit();
            if i > start && full {
                chunks.push(&rows[start..i]);
                (start, bytes) = (i, 0);
            }
            bytes += row_bytes;
        }
        if start < rows.len() {
            chunks.push(&rows[start..]);
        }
        chunks
    }

    /// As [`StatementBounds::chunks`], each chunk cut further into runs of a power of two rows
    /// (largest first), for the statements written with every batch. A statement's text depends
    /// on its row count, and sqlx prepares each text once per connection and keeps 100: batches
    /// of every size from 1 to 500 messages would have the server prepare the statement again for
    /// most batches. With this ladder there are a dozen texts, prepared once.
    pub fn ladder<'r, T>(
        &self,
        rows: &'r [T],
        params_per_row: usize,
        size: impl Fn(&T) -> usize,
    ) -> Vec<&'r [T]> {
        let mut runs = Vec::new();
        for mut chunk in self.chunks(rows, params_per_row, size) {
            while !chunk.is_empty() {
                let (run, rest) = chunk.split_at(1 << chunk.len().ilog2());
                runs.push(run);
                chunk = rest;
            }
        }
        runs
    }
}

/// What one row of bound values costs in an execute packet: each string with its length
/// prefix, and each value's type and fixed-size encoding.
pub fn row_bytes(strings: &[&str], other_values: usize) -> usize {
    strings.iter().map(|s| s.len() + 9).sum::<usize>() + 16 * (strings.len() + other_values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_bytes_and_keep_order() {
        let bounds = StatementBounds { max_packet: 1000 };
        let rows = [100, 200, 300, 50, 600, 10];
        let chunks = bounds.chunks(&rows, 1, |r| *r);
        assert_eq!(chunks, vec![&[100, 200][..], &[300, 50][..], &[600][..], &[10][..]]);
    }

    #[test]
    fn ladder_runs_are_powers_of_two_in_order() {
        let bounds = StatementBounds { max_packet: usize::MAX / 4 };
        let rows: Vec<usize> = (0..1000).collect();
        let runs = bounds.ladder(&rows, 5, |_| 1);
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![512, 256, 128, 64, 32, 8]);
        assert_eq!(runs.concat(), rows, "every row once, in order");
        assert!(bounds.ladder(&rows[..0], 5, |_| 1).is_empty());
    }

    #[test]
    fn chunks_respect_placeholders() {
        let bounds = StatementBounds { max_packet: usize::MAX / 4 };
        let rows = vec![1usize; 30_001];
        let chunks = bounds.chunks(&rows, 5, |r| *r);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![12_000, 12_000, 6_001]);
    }

    #[test]
    fn a_lock_wait_is_no_conflict() {
        assert!(!conflict(&sqlx::Error::PoolTimedOut));
        assert!(!lock_wait(&sqlx::Error::PoolTimedOut));
        assert!(LOCK_WAIT < ANSWER_WITHIN, "a lock wait comes back as the server's error, not our timeout");
        let seconds = LOCK_WAIT.as_secs();
        assert_eq!(
            SESSION_LOCK_WAITS,
            format!(
                "SET SESSION lock_wait_timeout = {seconds}, SESSION innodb_lock_wait_timeout = {seconds}"
            )
        );
    }

    #[test]
    fn only_value_errors_blame_the_message() {
        assert_eq!(blame(&sqlx::Error::PoolTimedOut), Blame::Database);
        assert_eq!(blame(&sqlx::Error::RowNotFound), Blame::Database);
        assert_eq!(blame(&sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())), Blame::Database);
    }
}
