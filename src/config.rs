//! Configuration: the environment variables of the Python service, plus ours, read once.
//!
//! Names and defaults are the original's, so a site keeps its environment as it is. The database
//! password may instead come from a file (`DB_PASSWORD_FILE`) or a systemd credential
//! (`$CREDENTIALS_DIRECTORY/db-password`), so that it need not sit in the environment at all. It
//! is held in a [`Secret`], whose `Debug` never shows it.

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
    metrics_addr: Option<String>,
    #[serde(default)]
    mqtt_tls: bool,
    mqtt_ca_file: Option<PathBuf>,
    mqtt_client_cert: Option<PathBuf>,
    mqtt_client_key: Option<PathBuf>,
    #[serde(default = "defaults::max_in_flight")]
    max_in_flight: usize,
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
    #[serde(default = "defaults::yes")]
    http_ordered: bool,
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
    pub fn yes() -> bool {
        true
    }
    pub fn outbox_lease_seconds() -> f64 {
        30.0
    }
}

/// The client id of the original, used unless `MQTT_CLIENT_ID` or a shared group says otherwise.
pub const DEFAULT_CLIENT_ID: &str = "mqtt-gateway";

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
    /// Keep each flow's requests in arrival order (one at a time per flow).
    pub ordered: bool,
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
        if !(raw.http_timeout_seconds.is_finite() && raw.http_timeout_seconds > 0.0) {
            return Err(ConfigError::Invalid {
                name: "HTTP_TIMEOUT_SECONDS".into(),
                reason: "must be a positive number of seconds".into(),
            });
        }
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
        }
        let positive = |name: &str, value: usize| {
            if value == 0 {
                Err(ConfigError::Invalid { name: name.into(), reason: "must be at least 1".into() })
            } else {
                Ok(value)
            }
        };
        positive("MAX_IN_FLIGHT", raw.max_in_flight)?;
        positive("BATCH_MAX_MESSAGES", raw.batch_max_messages)?;
        positive("HTTP_CONCURRENCY", raw.http_concurrency)?;
        if !(raw.http_retry_max_delay_seconds.is_finite() && raw.http_retry_max_delay_seconds >= 0.1) {
            return Err(ConfigError::Invalid {
                name: "HTTP_RETRY_MAX_DELAY_SECONDS".into(),
                reason: "must be at least 0.1".into(),
            });
        }
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
            },
            log_dir: raw.log_dir.filter(|d| !d.as_os_str().is_empty()),
            http_timeout: Duration::from_secs_f64(raw.http_timeout_seconds),
            mqtt: MqttSettings {
                client_id,
                keepalive: Duration::from_secs(raw.mqtt_keepalive.into()),
                qos: raw.mqtt_qos,
                clean_session: raw.mqtt_clean_session,
                shared_group,
                client_id_explicit,
                tls,
            },
            // The original clamps with max(1, ...), so 0 and negative values mean one second.
            reload_interval: Duration::from_secs(raw.flows_reload_interval_seconds.max(1) as u64),
            default_broker: (raw.mqtt_default_host, raw.mqtt_default_port),
            max_in_flight: raw.max_in_flight,
            metrics_addr,
            batch: BatchSettings {
                max_messages: raw.batch_max_messages,
                max_delay: Duration::from_millis(raw.batch_max_delay_ms),
            },
            delivery: DeliverySettings {
                timeout: Duration::from_secs_f64(raw.http_timeout_seconds),
                max_attempts: raw.http_max_attempts.max(1),
                max_age: Duration::from_secs(raw.http_max_age_seconds),
                max_retry_delay: Duration::from_secs_f64(raw.http_retry_max_delay_seconds),
                concurrency: raw.http_concurrency,
                ordered: raw.http_ordered,
                lease: Duration::from_secs_f64(raw.outbox_lease_seconds),
            },
        })
    }
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
}
