//! Configuration: the environment variables of the Python service, plus ours, read once.
//!
//! Names and defaults are the original's, so a site keeps its environment as it is. The database
//! password may instead come from a file (`DB_PASSWORD_FILE`) or a systemd credential
//! (`$CREDENTIALS_DIRECTORY/db-password`), so that it need not sit in the environment at all. It
//! is held in a [`Secret`], whose `Debug` never shows it.
//!
//! Every value is checked here, once: numbers against their ranges (so that no setting can
//! panic the process later, say by overflowing a `Duration`), TLS settings against each other.
//! An error names the variable to fix.
//!
//! One concept, and long for it: some forty settings each with its default, range and check,
//! and the tests that pin them (over a quarter of the file). Split by topic, the ranges and the
//! cross-checks between settings would be spread over several files.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A value that must never reach a log line or an error message.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Why the configuration cannot be used; each message names the variable to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing environment variable {0}")]
    Missing(String),
    #[error("invalid environment variable {name}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("cannot read the database password from {path}: {source}")]
    PasswordFile { path: PathBuf, source: std::io::Error },
}

/// The variables as read; secrets and derived values are resolved in [`Settings::from_env`].
#[derive(Deserialize)]
struct Raw {
    db_host: Option<String>,
    db_socket: Option<PathBuf>,
    db_name: String,
    db_user: String,
    db_password: Option<String>,
    db_password_file: Option<PathBuf>,
    credentials_directory: Option<PathBuf>,
    #[serde(default = "defaults::db_port")]
    db_port: u16,
    log_dir: Option<PathBuf>,
    #[serde(default = "defaults::http_timeout")]
    http_timeout_seconds: f64,
    mqtt_client_id: Option<String>,
    #[serde(default = "defaults::keepalive")]
    mqtt_keepalive: u16,
    #[serde(default = "defaults::reload_interval")]
    flows_reload_interval_seconds: i64,
    #[serde(default = "defaults::default_broker_host")]
    mqtt_default_host: String,
    #[serde(default = "defaults::default_broker_port")]
    mqtt_default_port: u16,
    #[serde(default = "defaults::qos")]
    mqtt_qos: u8,
    #[serde(default)]
    mqtt_clean_session: bool,
    mqtt_shared_group: Option<String>,
    mqtt_protocol: Option<String>,
    mqtt_session_expiry_seconds: Option<u64>,
    metrics_addr: Option<String>,
    #[serde(default)]
    mqtt_tls: bool,
    mqtt_ca_file: Option<PathBuf>,
    mqtt_client_cert: Option<PathBuf>,
    mqtt_client_key: Option<PathBuf>,
    #[serde(default = "defaults::max_in_flight")]
    max_in_flight: usize,
    #[serde(default = "defaults::max_in_flight_bytes")]
    max_in_flight_bytes: usize,
    #[serde(default = "defaults::batch_max_messages")]
    batch_max_messages: usize,
    #[serde(default = "defaults::batch_max_delay_ms")]
    batch_max_delay_ms: u64,
    #[serde(default = "defaults::http_max_attempts")]
    http_max_attempts: u32,
    #[serde(default = "defaults::http_max_age_seconds")]
    http_max_age_seconds: u64,
    #[serde(default = "defaults::http_retry_max_delay_seconds")]
    http_retry_max_delay_seconds: f64,
    #[serde(default = "defaults::http_concurrency")]
    http_concurrency: usize,
    #[serde(default = "defaults::http_max_in_flight_bytes")]
    http_max_in_flight_bytes: usize,
    #[serde(default = "defaults::yes")]
    http_ordered: bool,
    http_ca_file: Option<PathBuf>,
    db_ssl_mode: Option<String>,
    db_ssl_ca: Option<PathBuf>,
    db_ssl_cert: Option<PathBuf>,
    db_ssl_key: Option<PathBuf>,
    #[serde(default = "defaults::outbox_lease_seconds")]
    outbox_lease_seconds: f64,
}

mod defaults {
    pub fn db_port() -> u16 {
        3306
    }
    pub fn http_timeout() -> f64 {
        10.0
    }
    pub fn keepalive() -> u16 {
        60
    }
    pub fn reload_interval() -> i64 {
        600
    }
    pub fn default_broker_host() -> String {
        "localhost".to_owned()
    }
    pub fn default_broker_port() -> u16 {
        1883
    }
    pub fn qos() -> u8 {
        1
    }
    pub fn max_in_flight() -> usize {
        1_000
    }
    /// 64 MiB: room for a burst of large messages, small beside the host's memory.
    pub fn max_in_flight_bytes() -> usize {
        64 << 20
    }
    pub fn batch_max_messages() -> usize {
        500
    }
    pub fn batch_max_delay_ms() -> u64 {
        2
    }
    pub fn http_max_attempts() -> u32 {
        100
    }
    pub fn http_max_age_seconds() -> u64 {
        86_400
    }
    pub fn http_retry_max_delay_seconds() -> f64 {
        300.0
    }
    pub fn http_concurrency() -> usize {
        8
    }
    /// 32 MiB: many small requests at once, or a couple of the largest bodies a statement holds.
    pub fn http_max_in_flight_bytes() -> usize {
        32 << 20
    }
    pub fn yes() -> bool {
        true
    }
    pub fn outbox_lease_seconds() -> f64 {
        30.0
    }
}

/// The client id of the original, used unless `MQTT_CLIENT_ID` or a shared group says otherwise.
pub const DEFAULT_CLIENT_ID: &str = "mqtt-gateway";
/// Longest `MQTT_CLIENT_ID` and `MQTT_SHARED_GROUP`: what the tables that name them hold.
const MAX_CLIENT_ID: usize = 191;
const MAX_SHARED_GROUP: usize = 200;

/// Everything the gateway needs to know before it starts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub db: DbSettings,
    pub log_dir: Option<PathBuf>,
    pub http_timeout: Duration,
    pub mqtt: MqttSettings,
    pub reload_interval: Duration,
    /// The broker row seeded into an empty `mqtt_servers`.
    pub default_broker: (String, u16),
    /// Messages taken from the broker and not yet acknowledged, at most.
    pub max_in_flight: usize,
    /// Payload bytes taken from the broker and not yet acknowledged; reading pauses above it.
    pub max_in_flight_bytes: usize,
    pub batch: BatchSettings,
    pub delivery: DeliverySettings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; off when `None`.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Group commit of STORE_DB (and outbox) writes.
#[derive(Debug, Clone)]
pub struct BatchSettings {
    pub max_messages: usize,
    pub max_delay: Duration,
}

/// Durable HTTP delivery of POST_ENDPOINT requests.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub timeout: Duration,
    /// After this many failed attempts a request is kept as dead.
    pub max_attempts: u32,
    /// A request older than this is kept as dead after its next failure.
    pub max_age: Duration,
    pub max_retry_delay: Duration,
    /// Requests in flight per endpoint (scheme, host and port).
    pub concurrency: usize,
    /// Request bodies read from the outbox and not yet answered, in bytes, over all flows.
    pub max_in_flight_bytes: usize,
    /// Keep each flow's requests in arrival order (one at a time per flow).
    pub ordered: bool,
    /// PEM certificates of `HTTP_CA_FILE`, trusted for HTTPS endpoints besides the system's
    /// roots; read at startup so that a missing or empty file stops the start, naming it.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// How long a flow's delivery lease lasts without renewal.
    pub lease: Duration,
}

#[derive(Debug, Clone)]
pub struct DbSettings {
    pub host: String,
    /// A Unix socket to connect through instead of TCP (`host` and `port` then unused).
    pub socket: Option<PathBuf>,
    pub port: u16,
    pub name: String,
    pub user: String,
    pub password: Secret,
    pub tls: DbTls,
}

/// TLS to the database, with the MySQL client's `--ssl-mode` meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbSslMode {
    /// Clear text.
    Disabled,
    /// TLS when the server offers it, its certificate not verified; clear text otherwise.
    Preferred,
    /// TLS or no connection; the certificate is not verified.
    Required,
    /// TLS with a certificate signed by a trusted CA, for any host name.
    VerifyCa,
    /// TLS with a trusted certificate that is valid for `DB_HOST`.
    VerifyIdentity,
}

#[derive(Debug, Clone)]
pub struct DbTls {
    pub mode: DbSslMode,
    /// PEM CA certificates to verify the server with (`verify_ca`, `verify_identity`); the
    /// system's roots are trusted too.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and key for a user that must present one (`REQUIRE X509`).
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub client_id: String,
    pub keepalive: Duration,
    /// 1 by default: the broker redelivers what the gateway has not acknowledged.
    pub qos: u8,
    /// false by default: the broker keeps the session, and queues messages while we are away.
    pub clean_session: bool,
    /// With a group, filters are subscribed as `$share/<group>/<filter>`.
    pub shared_group: Option<String>,
    /// True when the operator chose the client id, rather than the default or a derived one.
    pub client_id_explicit: bool,
    pub tls: Option<TlsSettings>,
    /// The version asked for first; a broker that refuses 5 gets 3.1.1.
    pub protocol: MqttVersion,
    /// MQTT 5: how long the broker keeps the session after a disconnect; `None`: never ends.
    pub session_expiry: Option<u32>,
}

/// `MQTT_PROTOCOL`: the MQTT version the gateway asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    V5,
    V311,
}

impl MqttVersion {
    /// As `MQTT_PROTOCOL` spells it.
    pub fn name(self) -> &'static str {
        match self {
            MqttVersion::V5 => "5",
            MqttVersion::V311 => "3.1.1",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// PEM CA certificates to trust; the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain and key for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Settings::from_vars(std::env::vars())
    }

    /// `LOG_DIR` alone, read as [`Settings::from_env`] reads it, for the one line that says
    /// why the rest of the configuration was refused: it still reaches the daily files.
    pub fn log_dir_from_env() -> Option<PathBuf> {
        #[derive(Deserialize)]
        struct LogDirOnly {
            log_dir: Option<PathBuf>,
        }
        let only: LogDirOnly = envy::from_iter(std::env::vars()).ok()?;
        log_dir(only.log_dir)
    }

    /// Reads the given variables, as the process environment would hold them.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
        let raw: Raw = envy::from_iter(vars).map_err(|e| match e {
            envy::Error::MissingValue(field) => ConfigError::Missing(field.to_ascii_uppercase()),
            // envy's message already names the variable and the value; no secret is parsed
            // into a type that can fail, so none can appear here.
            envy::Error::Custom(msg) => ConfigError::Invalid { name: variable_in(&msg), reason: msg },
        })?;
        let socket = raw.db_socket.as_ref().filter(|p| !p.as_os_str().is_empty());
        let host = match (&raw.db_host, socket) {
            (Some(host), _) => host.clone(),
            (None, Some(_)) => "localhost".to_owned(),
            (None, None) => return Err(ConfigError::Missing("DB_HOST (or DB_SOCKET)".into())),
        };
        let password = resolve_password(&raw)?;
        let ranges = Ranges::check(&raw)?;
        let db_tls = db_tls(&raw)?;
        let http_ca_file = raw.http_ca_file.as_deref().filter(|p| !p.as_os_str().is_empty());
        let extra_roots_pem = http_ca_file.map(read_ca_file).transpose()?;
        if !(raw.outbox_lease_seconds.is_finite() && (0.5..=86_400.0).contains(&raw.outbox_lease_seconds)) {
            return Err(ConfigError::Invalid {
                name: "OUTBOX_LEASE_SECONDS".into(),
                reason: "must be between 0.5 and 86400 seconds".into(),
            });
        }
        if raw.mqtt_qos > 1 {
            return Err(ConfigError::Invalid {
                name: "MQTT_QOS".into(),
                reason: format!("must be 0 or 1, not {}", raw.mqtt_qos),
            });
        }
        if raw.mqtt_client_id.as_deref() == Some("") {
            return Err(ConfigError::Invalid {
                name: "MQTT_CLIENT_ID".into(),
                reason: "cannot be empty".into(),
            });
        }
        let shared_group = raw.mqtt_shared_group.clone().filter(|g| !g.is_empty());
        if let Some(group) = &shared_group {
            if group.contains(['/', '+', '#']) {
                return Err(ConfigError::Invalid {
                    name: "MQTT_SHARED_GROUP".into(),
                    reason: "cannot contain '/', '+' or '#'".into(),
                });
            }
            // A shared form of a 255-character filter must fit gateway_session_filters.
            if group.chars().count() > MAX_SHARED_GROUP {
                return Err(ConfigError::Invalid {
                    name: "MQTT_SHARED_GROUP".into(),
                    reason: format!("must be at most {MAX_SHARED_GROUP} characters"),
                });
            }
        }
        let protocol = match raw.mqtt_protocol.as_deref().map(str::trim) {
            None | Some("") | Some("5") => MqttVersion::V5,
            Some("3.1.1") => MqttVersion::V311,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "MQTT_PROTOCOL".into(),
                    reason: format!("must be 5 or 3.1.1, not {other:?}"),
                })
            }
        };
        let session_expiry =
            match raw.mqtt_session_expiry_seconds {
                None => None,
                Some(_) if raw.mqtt_clean_session => return Err(ConfigError::Invalid {
                    name: "MQTT_SESSION_EXPIRY_SECONDS".into(),
                    reason:
                        "has no meaning with MQTT_CLEAN_SESSION=true, whose session ends with the connection"
                            .into(),
                }),
                Some(seconds) => Some(u32::try_from(seconds).map_err(|_| ConfigError::Invalid {
                    name: "MQTT_SESSION_EXPIRY_SECONDS".into(),
                    reason: format!("must be between 0 and {} (which means never)", u32::MAX),
                })?),
            };
        let metrics_addr = match raw.metrics_addr.as_deref().map(str::trim).filter(|a| !a.is_empty()) {
            None => None,
            Some(addr) => Some(addr.parse().map_err(|e| ConfigError::Invalid {
                name: "METRICS_ADDR".into(),
                reason: format!("{addr:?} is not an address and port like 127.0.0.1:9464: {e}"),
            })?),
        };
        let client_id_explicit = raw.mqtt_client_id.is_some();
        let client_id = match (&raw.mqtt_client_id, &shared_group) {
            (Some(id), _) => id.clone(),
            // Instances sharing a group must not share a client id, or the broker would keep
            // disconnecting one for the other; the host name keeps the id stable across restarts,
            // which the persistent session needs.
            (None, Some(_)) => format!("{DEFAULT_CLIENT_ID}-{}", hostname()),
            (None, None) => DEFAULT_CLIENT_ID.to_owned(),
        };
        // The client id names rows in gateway_session_filters and gateway_outbox_leases.
        if client_id.chars().count() > MAX_CLIENT_ID {
            return Err(ConfigError::Invalid {
                name: "MQTT_CLIENT_ID".into(),
                reason: format!("must be at most {MAX_CLIENT_ID} characters (this one is {client_id:?})"),
            });
        }
        let tls = raw.mqtt_tls.then(|| -> Result<TlsSettings, ConfigError> {
            let client_auth = match (&raw.mqtt_client_cert, &raw.mqtt_client_key) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                _ => {
                    return Err(ConfigError::Invalid {
                        name: "MQTT_CLIENT_CERT".into(),
                        reason: "MQTT_CLIENT_CERT and MQTT_CLIENT_KEY go together".into(),
                    })
                }
            };
            Ok(TlsSettings { ca_file: raw.mqtt_ca_file.clone(), client_auth })
        });
        let tls = tls.transpose()?;
        Ok(Settings {
            db: DbSettings {
                host,
                socket: raw.db_socket.clone(),
                port: raw.db_port,
                name: raw.db_name,
                user: raw.db_user,
                password,
                tls: db_tls,
            },
            log_dir: log_dir(raw.log_dir),
            http_timeout: ranges.http_timeout,
            mqtt: MqttSettings {
                client_id,
                keepalive: Duration::from_secs(raw.mqtt_keepalive.into()),
                qos: raw.mqtt_qos,
                clean_session: raw.mqtt_clean_session,
                shared_group,
                client_id_explicit,
                tls,
                protocol,
                session_expiry,
            },
            reload_interval: ranges.reload_interval,
            default_broker: (raw.mqtt_default_host, raw.mqtt_default_port),
            max_in_flight: raw.max_in_flight,
            max_in_flight_bytes: raw.max_in_flight_bytes,
            metrics_addr,
            batch: BatchSettings {
                max_messages: raw.batch_max_messages,
                max_delay: Duration::from_millis(raw.batch_max_delay_ms),
            },
            delivery: DeliverySettings {
                timeout: ranges.http_timeout,
                max_attempts: raw.http_max_attempts.max(1),
                max_age: ranges.http_max_age,
                max_retry_delay: ranges.http_retry_max_delay,
                concurrency: raw.http_concurrency,
                max_in_flight_bytes: raw.http_max_in_flight_bytes,
                ordered: raw.http_ordered,
                extra_roots_pem,
                lease: Duration::from_secs_f64(raw.outbox_lease_seconds),
            },
        })
    }
}

/// The longest duration any setting may have: a hundred years, which still means "never" to an
/// operator, and stays far inside what `Duration`, `Instant` and the timers can add.
const MAX_SECONDS: u64 = 100 * 365 * 86_400;
const ONE_DAY: f64 = 86_400.0;

/// The numeric settings, each checked against its range as it is read. Beyond these ranges a
/// value is a typo or a unit mistake, and some would panic where they are used instead of
/// failing here with the variable's name: a duration past `Duration`'s range
/// (`HTTP_TIMEOUT_SECONDS=1e30`), a capacity past what a channel or a `Vec` can hold.
struct Ranges {
    http_timeout: Duration,
    http_retry_max_delay: Duration,
    http_max_age: Duration,
    reload_interval: Duration,
}

impl Ranges {
    fn check(raw: &Raw) -> Result<Ranges, ConfigError> {
        port("DB_PORT", raw.db_port)?;
        port("MQTT_DEFAULT_PORT", raw.mqtt_default_port)?;
        // 0 turns keepalive off, as MQTT allows; every u16 is a valid number of seconds.
        count("MAX_IN_FLIGHT", raw.max_in_flight as u64, 1, 1_000_000, "messages")?;
        count("MAX_IN_FLIGHT_BYTES", raw.max_in_flight_bytes as u64, 1, 1 << 40, "bytes")?;
        count("BATCH_MAX_MESSAGES", raw.batch_max_messages as u64, 1, 100_000, "messages")?;
        count("BATCH_MAX_DELAY_MS", raw.batch_max_delay_ms, 0, 60_000, "milliseconds")?;
        count("HTTP_CONCURRENCY", raw.http_concurrency as u64, 1, 10_000, "requests")?;
        count("HTTP_MAX_IN_FLIGHT_BYTES", raw.http_max_in_flight_bytes as u64, 1, 1 << 40, "bytes")?;
        // Attempts are kept in an INT column; 0 means 1, as before.
        count("HTTP_MAX_ATTEMPTS", raw.http_max_attempts.into(), 0, 1_000_000_000, "attempts")?;
        let http_max_age =
            count("HTTP_MAX_AGE_SECONDS", raw.http_max_age_seconds, 0, MAX_SECONDS, "seconds")?;
        // The original clamps with max(1, ...), so 0 and negative values mean one second.
        let reload = raw.flows_reload_interval_seconds.max(1).unsigned_abs();
        let reload = count("FLOWS_RELOAD_INTERVAL_SECONDS", reload, 1, MAX_SECONDS, "seconds")?;
        Ok(Ranges {
            http_timeout: seconds("HTTP_TIMEOUT_SECONDS", raw.http_timeout_seconds, 0.001, ONE_DAY)?,
            http_retry_max_delay: seconds(
                "HTTP_RETRY_MAX_DELAY_SECONDS",
                raw.http_retry_max_delay_seconds,
                0.1,
                ONE_DAY,
            )?,
            http_max_age: Duration::from_secs(http_max_age),
            reload_interval: Duration::from_secs(reload),
        })
    }
}

fn count(name: &str, value: u64, min: u64, max: u64, unit: &str) -> Result<u64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            name: name.into(),
            reason: format!("must be between {min} and {max} {unit}, not {value}"),
        })
    }
}

/// Written so that NaN, which compares false with everything, is refused too.
fn seconds(name: &str, value: f64, min: f64, max: f64) -> Result<Duration, ConfigError> {
    if min <= value && value <= max {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::Invalid {
            name: name.into(),
            reason: format!("must be a number of seconds between {min} and {max}, not {value:?}"),
        })
    }
}

fn port(name: &str, value: u16) -> Result<u16, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            name: name.into(),
            reason: "must be a port from 1 to 65535, not 0".into(),
        });
    }
    Ok(value)
}

/// An empty `LOG_DIR` means no files, as an unset one.
fn log_dir(value: Option<PathBuf>) -> Option<PathBuf> {
    value.filter(|d| !d.as_os_str().is_empty())
}

fn db_tls(raw: &Raw) -> Result<DbTls, ConfigError> {
    let invalid =
        |name: &str, reason: &str| ConfigError::Invalid { name: name.into(), reason: reason.into() };
    let explicit = match raw.db_ssl_mode.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        None => None,
        // The MySQL client spells them in capitals with `--ssl-mode`; both spellings work.
        Some(mode) => Some(match mode.to_ascii_lowercase().as_str() {
            "disabled" => DbSslMode::Disabled,
            "preferred" => DbSslMode::Preferred,
            "required" => DbSslMode::Required,
            "verify_ca" => DbSslMode::VerifyCa,
            "verify_identity" => DbSslMode::VerifyIdentity,
            _ => {
                return Err(invalid(
                    "DB_SSL_MODE",
                    &format!(
                        "{mode:?} is not one of disabled, preferred, required, verify_ca, verify_identity"
                    ),
                ))
            }
        }),
    };
    let socket = raw.db_socket.as_ref().is_some_and(|p| !p.as_os_str().is_empty());
    // The MySQL client does not use TLS over a Unix socket unless told to: the socket never
    // leaves the machine.
    let mode = explicit.unwrap_or(if socket { DbSslMode::Disabled } else { DbSslMode::Preferred });
    // A module or unit file may set a variable to "" for "not set".
    let set = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
    let ca_file = set(&raw.db_ssl_ca);
    // A CA that is never consulted would look like protection and be none: refuse it.
    if ca_file.is_some() && !matches!(mode, DbSslMode::VerifyCa | DbSslMode::VerifyIdentity) {
        return Err(invalid(
            "DB_SSL_CA",
            "is only used to verify the server, with DB_SSL_MODE=verify_ca or verify_identity",
        ));
    }
    let client_auth = match (set(&raw.db_ssl_cert), set(&raw.db_ssl_key)) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(invalid("DB_SSL_CERT", "DB_SSL_CERT and DB_SSL_KEY go together")),
    };
    if client_auth.is_some() && mode == DbSslMode::Disabled {
        return Err(invalid("DB_SSL_CERT", "a client certificate needs TLS, but DB_SSL_MODE is disabled"));
    }
    Ok(DbTls { mode, ca_file, client_auth })
}

fn read_ca_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let invalid = |reason: String| ConfigError::Invalid { name: "HTTP_CA_FILE".into(), reason };
    let pem = std::fs::read(path).map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("{} is not PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(pem)
}

/// A password file wins over the systemd credential, which wins over `DB_PASSWORD`, so that a
/// unit can override an inherited environment without unsetting it.
fn resolve_password(raw: &Raw) -> Result<Secret, ConfigError> {
    if let Some(path) = &raw.db_password_file {
        return read_password_file(path);
    }
    if let Some(dir) = &raw.credentials_directory {
        let path = dir.join("db-password");
        if path.exists() {
            return read_password_file(&path);
        }
    }
    // Over a Unix socket the server may authenticate the process by its user (MariaDB's
    // unix_socket plugin), with no password at all.
    if raw.db_password.is_none() && raw.db_socket.is_some() {
        return Ok(Secret::default());
    }
    raw.db_password
        .clone()
        .map(Secret::new)
        .ok_or_else(|| ConfigError::Missing("DB_PASSWORD (or DB_PASSWORD_FILE)".into()))
}

fn read_password_file(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::PasswordFile { path: path.to_owned(), source })?;
    // Editors and `echo` add one newline; a password never ends with one on purpose.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(Secret::new(text))
}

/// The machine's name, for a client id that differs per host and survives restarts.
/// `gethostname(2)` rather than `/proc/sys/kernel/hostname`, which a hardened unit
/// (`ProcSubset=pid`) cannot read.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that much.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let name = if ok {
        std::ffi::CStr::from_bytes_until_nul(&buf).ok().map(|c| c.to_string_lossy().into_owned())
    } else {
        None
    };
    name.filter(|h| !h.is_empty()).unwrap_or_else(|| "unknown-host".to_owned())
}

/// envy ends a parse error with "provided by NAME"; the operator needs that name first.
fn variable_in(message: &str) -> String {
    message.rsplit_once("provided by ").map_or("(unknown)", |(_, name)| name).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> =
            [("DB_HOST", "db"), ("DB_NAME", "gw"), ("DB_USER", "u"), ("DB_PASSWORD", "p@ss/w:rd")]
                .iter()
                .chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        v.dedup_by(|a, b| a.0 == b.0);
        v
    }

    #[test]
    fn defaults_are_the_originals() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert_eq!(s.db.port, 3306);
        assert_eq!(s.http_timeout, Duration::from_secs(10));
        assert_eq!(s.mqtt.client_id, "mqtt-gateway");
        assert_eq!(s.mqtt.keepalive, Duration::from_secs(60));
        assert_eq!(s.reload_interval, Duration::from_secs(600));
        assert_eq!(s.default_broker, ("localhost".to_owned(), 1883));
        assert_eq!(s.db.password.expose(), "p@ss/w:rd");
        assert!(s.log_dir.is_none());
    }

    #[test]
    fn reload_interval_is_clamped_to_one_second() {
        for v in ["0", "-5"] {
            let s = Settings::from_vars(vars(&[("FLOWS_RELOAD_INTERVAL_SECONDS", v)])).unwrap();
            assert_eq!(s.reload_interval, Duration::from_secs(1));
        }
    }

    #[test]
    fn a_missing_variable_is_named() {
        let v: Vec<_> = vars(&[]).into_iter().filter(|(k, _)| k != "DB_NAME").collect();
        let err = Settings::from_vars(v).unwrap_err().to_string();
        assert_eq!(err, "missing environment variable DB_NAME");
    }

    #[test]
    fn a_malformed_variable_is_named() {
        let err = Settings::from_vars(vars(&[("DB_PORT", "abc")])).unwrap_err().to_string();
        assert!(err.starts_with("invalid environment variable DB_PORT:"), "{err}");
    }

    #[test]
    fn password_file_wins_and_loses_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let s = Settings::from_vars(vars(&[("DB_PASSWORD_FILE", file.to_str().unwrap())])).unwrap();
        assert_eq!(s.db.password.expose(), "from-file");
    }

    #[test]
    fn systemd_credential_is_used_without_db_password() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db-password"), "cred").unwrap();
        let v: Vec<_> = vars(&[("CREDENTIALS_DIRECTORY", dir.path().to_str().unwrap())])
            .into_iter()
            .filter(|(k, _)| k != "DB_PASSWORD")
            .collect();
        assert_eq!(Settings::from_vars(v).unwrap().db.password.expose(), "cred");
    }

    #[test]
    fn a_shared_group_derives_a_client_id_per_host() {
        let s = Settings::from_vars(vars(&[("MQTT_SHARED_GROUP", "gw")])).unwrap();
        assert!(s.mqtt.client_id.starts_with("mqtt-gateway-") && s.mqtt.client_id.len() > 13);
        assert!(!s.mqtt.client_id_explicit);
        let s = Settings::from_vars(vars(&[("MQTT_SHARED_GROUP", "gw"), ("MQTT_CLIENT_ID", "a")])).unwrap();
        assert_eq!((s.mqtt.client_id.as_str(), s.mqtt.client_id_explicit), ("a", true));
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert_eq!(s.mqtt.client_id, "mqtt-gateway", "drop-in default without a group");
    }

    #[test]
    fn mqtt_5_is_the_default_and_3_1_1_can_be_asked_for() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert_eq!((s.mqtt.protocol, s.mqtt.session_expiry), (MqttVersion::V5, None));
        let s = Settings::from_vars(vars(&[("MQTT_PROTOCOL", "3.1.1")])).unwrap();
        assert_eq!(s.mqtt.protocol, MqttVersion::V311);
        for wrong in ["4", "3.1", "v5", "mqtt5"] {
            let err = Settings::from_vars(vars(&[("MQTT_PROTOCOL", wrong)])).unwrap_err().to_string();
            assert!(err.contains("MQTT_PROTOCOL: must be 5 or 3.1.1"), "{err}");
        }
    }

    #[test]
    fn a_session_expiry_is_a_u32_and_needs_a_persistent_session() {
        let s = Settings::from_vars(vars(&[("MQTT_SESSION_EXPIRY_SECONDS", "86400")])).unwrap();
        assert_eq!(s.mqtt.session_expiry, Some(86_400));
        let s = Settings::from_vars(vars(&[("MQTT_SESSION_EXPIRY_SECONDS", "4294967295")])).unwrap();
        assert_eq!(s.mqtt.session_expiry, Some(u32::MAX));
        let err = Settings::from_vars(vars(&[("MQTT_SESSION_EXPIRY_SECONDS", "4294967296")])).unwrap_err();
        assert!(err.to_string().contains("between 0 and 4294967295"), "{err}");
        let err = Settings::from_vars(vars(&[
            ("MQTT_SESSION_EXPIRY_SECONDS", "60"),
            ("MQTT_CLEAN_SESSION", "true"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("no meaning with MQTT_CLEAN_SESSION=true"), "{err}");
    }

    #[test]
    fn client_ids_and_shared_groups_must_fit_the_tables_that_name_them() {
        let long = "x".repeat(192);
        let err = Settings::from_vars(vars(&[("MQTT_CLIENT_ID", &long)])).unwrap_err().to_string();
        assert!(err.contains("MQTT_CLIENT_ID: must be at most 191 characters"), "{err}");
        let long = "g".repeat(201);
        let err = Settings::from_vars(vars(&[("MQTT_SHARED_GROUP", &long)])).unwrap_err().to_string();
        assert!(err.contains("MQTT_SHARED_GROUP: must be at most 200 characters"), "{err}");
        assert!(Settings::from_vars(vars(&[("MQTT_CLIENT_ID", &"x".repeat(191))])).is_ok());
    }

    #[test]
    fn tls_needs_certificate_and_key_together() {
        let err =
            Settings::from_vars(vars(&[("MQTT_TLS", "true"), ("MQTT_CLIENT_CERT", "/c.pem")])).unwrap_err();
        assert!(err.to_string().contains("MQTT_CLIENT_CERT and MQTT_CLIENT_KEY go together"), "{err}");
        let s = Settings::from_vars(vars(&[("MQTT_TLS", "true")])).unwrap();
        assert!(s.mqtt.tls.is_some_and(|t| t.ca_file.is_none() && t.client_auth.is_none()));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert!(!format!("{s:?}").contains("p@ss"));
    }

    /// Every numeric variable; a new one belongs here, so the property below covers it.
    const NUMERIC: [&str; 15] = [
        "MAX_IN_FLIGHT_BYTES",
        "HTTP_MAX_IN_FLIGHT_BYTES",
        "DB_PORT",
        "HTTP_TIMEOUT_SECONDS",
        "MQTT_KEEPALIVE",
        "FLOWS_RELOAD_INTERVAL_SECONDS",
        "MQTT_DEFAULT_PORT",
        "MQTT_QOS",
        "MAX_IN_FLIGHT",
        "BATCH_MAX_MESSAGES",
        "BATCH_MAX_DELAY_MS",
        "HTTP_MAX_ATTEMPTS",
        "HTTP_MAX_AGE_SECONDS",
        "HTTP_RETRY_MAX_DELAY_SECONDS",
        "HTTP_CONCURRENCY",
    ];

    /// Values an operator might type by mistake, and the edges of every integer type.
    const EXTREMES: [&str; 30] = [
        "0",
        "-0",
        "1",
        "-1",
        "0.5",
        "1e30",
        "-1e30",
        "1e-30",
        "1e400",
        "NaN",
        "nan",
        "inf",
        "-inf",
        "infinity",
        "",
        " 5",
        "5 ",
        "0x10",
        "1_000",
        "65535",
        "65536",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "\u{661}",
        "5s",
    ];

    /// A value that every use of the settings can take without panicking: durations that
    /// `Instant` arithmetic and the timers accept, capacities a channel and a `Vec` can hold.
    fn assert_sane(s: &Settings) {
        let now = std::time::Instant::now();
        for d in [
            s.http_timeout,
            s.reload_interval,
            s.batch.max_delay,
            s.delivery.max_age,
            s.delivery.max_retry_delay,
        ] {
            assert!(d <= Duration::from_secs(MAX_SECONDS) && now.checked_add(d).is_some(), "{d:?}");
        }
        assert!(s.http_timeout > Duration::ZERO && s.reload_interval >= Duration::from_secs(1));
        assert!(s.delivery.max_retry_delay >= Duration::from_millis(100));
        assert!(s.mqtt.keepalive.is_zero() || s.mqtt.keepalive >= Duration::from_secs(1));
        assert!((1..=1_000_000).contains(&s.max_in_flight));
        assert!((1..=100_000).contains(&s.batch.max_messages));
        assert!((1..=10_000).contains(&s.delivery.concurrency));
        assert!((1..=1 << 40).contains(&s.delivery.max_in_flight_bytes));
        assert!((1..=i32::MAX as u32).contains(&s.delivery.max_attempts));
        assert!(s.db.port > 0 && s.default_broker.1 > 0 && s.mqtt.qos <= 1);
    }

    fn value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::sample::select(&EXTREMES[..]).prop_map(str::to_owned),
            any::<i128>().prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            "\\PC{0,12}",
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Whatever a numeric variable holds, the settings are sane or the error names it.
        #[test]
        fn every_numeric_value_is_sane_or_named(name in proptest::sample::select(&NUMERIC[..]), value in value()) {
            match Settings::from_vars(vars(&[(name, &value)])) {
                Ok(settings) => assert_sane(&settings),
                Err(error) => {
                    let text = error.to_string();
                    proptest::prop_assert!(
                        text.starts_with(&format!("invalid environment variable {name}: ")),
                        "{name}={value:?}: {text}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_duration_beyond_range_is_refused_not_a_panic() {
        for (name, value) in [
            ("HTTP_TIMEOUT_SECONDS", "1e30"),
            ("HTTP_TIMEOUT_SECONDS", "NaN"),
            ("HTTP_TIMEOUT_SECONDS", "0"),
            ("HTTP_RETRY_MAX_DELAY_SECONDS", "inf"),
            ("HTTP_MAX_AGE_SECONDS", "18446744073709551615"),
            ("FLOWS_RELOAD_INTERVAL_SECONDS", "9223372036854775807"),
            ("MAX_IN_FLIGHT", "18446744073709551615"),
            ("BATCH_MAX_MESSAGES", "0"),
            ("DB_PORT", "0"),
        ] {
            let err = Settings::from_vars(vars(&[(name, value)])).unwrap_err().to_string();
            assert!(err.starts_with(&format!("invalid environment variable {name}: must be")), "{err}");
        }
        let s = Settings::from_vars(vars(&[("HTTP_TIMEOUT_SECONDS", "0.25")])).unwrap();
        assert_eq!(s.http_timeout, Duration::from_millis(250));
    }

    #[test]
    fn db_ssl_settings_are_checked_together() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert_eq!((s.db.tls.mode, s.db.tls.ca_file.is_none()), (DbSslMode::Preferred, true));
        let s = Settings::from_vars(vars(&[("DB_SOCKET", "/run/mysqld/mysqld.sock")])).unwrap();
        assert_eq!(s.db.tls.mode, DbSslMode::Disabled, "no TLS over a Unix socket unless asked");
        let s = Settings::from_vars(vars(&[("DB_SSL_MODE", "VERIFY_CA"), ("DB_SSL_CA", "/ca.pem")])).unwrap();
        assert_eq!(s.db.tls.mode, DbSslMode::VerifyCa);
        for (extra, wanted) in [
            (
                &[("DB_SSL_MODE", "verify")][..],
                "invalid environment variable DB_SSL_MODE: \"verify\" is not one of",
            ),
            (&[("DB_SSL_CA", "/ca.pem")][..], "invalid environment variable DB_SSL_CA: is only used"),
            (&[("DB_SSL_CERT", "/c.pem")][..], "DB_SSL_CERT and DB_SSL_KEY go together"),
            (
                &[("DB_SSL_MODE", "disabled"), ("DB_SSL_CERT", "/c.pem"), ("DB_SSL_KEY", "/k.pem")][..],
                "a client certificate needs TLS",
            ),
            (
                &[("HTTP_CA_FILE", "/nonexistent/ca.pem")][..],
                "invalid environment variable HTTP_CA_FILE: cannot read",
            ),
        ] {
            let err = Settings::from_vars(vars(extra)).unwrap_err().to_string();
            assert!(err.contains(wanted), "{extra:?}: {err}");
        }
    }
}
