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
    PasswordFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The variables as read; secrets and derived values are resolved in [`Settings::from_env`].
#[derive(Deserialize)]
struct Raw {
    db_host: String,
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
    #[serde(default = "defaults::client_id")]
    mqtt_client_id: String,
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
}

mod defaults {
    pub fn db_port() -> u16 {
        3306
    }
    pub fn http_timeout() -> f64 {
        10.0
    }
    pub fn client_id() -> String {
        "mqtt-gateway".to_owned()
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
}

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
}

#[derive(Debug, Clone)]
pub struct DbSettings {
    pub host: String,
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
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Settings::from_vars(std::env::vars())
    }

    /// Reads the given variables, as the process environment would hold them.
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let raw: Raw = envy::from_iter(vars).map_err(|e| match e {
            envy::Error::MissingValue(field) => ConfigError::Missing(field.to_ascii_uppercase()),
            // envy's message already names the variable and the value; no secret is parsed
            // into a type that can fail, so none can appear here.
            envy::Error::Custom(msg) => ConfigError::Invalid {
                name: variable_in(&msg),
                reason: msg,
            },
        })?;
        let password = resolve_password(&raw)?;
        if !(raw.http_timeout_seconds.is_finite() && raw.http_timeout_seconds > 0.0) {
            return Err(ConfigError::Invalid {
                name: "HTTP_TIMEOUT_SECONDS".into(),
                reason: "must be a positive number of seconds".into(),
            });
        }
        if raw.mqtt_qos > 1 {
            return Err(ConfigError::Invalid {
                name: "MQTT_QOS".into(),
                reason: format!("must be 0 or 1, not {}", raw.mqtt_qos),
            });
        }
        if raw.mqtt_client_id.is_empty() {
            return Err(ConfigError::Invalid {
                name: "MQTT_CLIENT_ID".into(),
                reason: "cannot be empty".into(),
            });
        }
        Ok(Settings {
            db: DbSettings {
                host: raw.db_host,
                port: raw.db_port,
                name: raw.db_name,
                user: raw.db_user,
                password,
            },
            log_dir: raw.log_dir.filter(|d| !d.as_os_str().is_empty()),
            http_timeout: Duration::from_secs_f64(raw.http_timeout_seconds),
            mqtt: MqttSettings {
                client_id: raw.mqtt_client_id,
                keepalive: Duration::from_secs(raw.mqtt_keepalive.into()),
                qos: raw.mqtt_qos,
                clean_session: raw.mqtt_clean_session,
            },
            // The original clamps with max(1, ...), so 0 and negative values mean one second.
            reload_interval: Duration::from_secs(raw.flows_reload_interval_seconds.max(1) as u64),
            default_broker: (raw.mqtt_default_host, raw.mqtt_default_port),
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
    raw.db_password
        .clone()
        .map(Secret::new)
        .ok_or_else(|| ConfigError::Missing("DB_PASSWORD (or DB_PASSWORD_FILE)".into()))
}

fn read_password_file(path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::PasswordFile {
        path: path.to_owned(),
        source,
    })?;
    // Editors and `echo` add one newline; a password never ends with one on purpose.
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(Secret::new(text))
}

/// envy ends a parse error with "provided by NAME"; the operator needs that name first.
fn variable_in(message: &str) -> String {
    message
        .rsplit_once("provided by ")
        .map_or("(unknown)", |(_, name)| name)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = [
            ("DB_HOST", "db"),
            ("DB_NAME", "gw"),
            ("DB_USER", "u"),
            ("DB_PASSWORD", "p@ss/w:rd"),
        ]
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
        let v: Vec<_> = vars(&[])
            .into_iter()
            .filter(|(k, _)| k != "DB_NAME")
            .collect();
        let err = Settings::from_vars(v).unwrap_err().to_string();
        assert_eq!(err, "missing environment variable DB_NAME");
    }

    #[test]
    fn a_malformed_variable_is_named() {
        let err = Settings::from_vars(vars(&[("DB_PORT", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("invalid environment variable DB_PORT:"),
            "{err}"
        );
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
    fn secrets_never_show_in_debug_output() {
        let s = Settings::from_vars(vars(&[])).unwrap();
        assert!(!format!("{s:?}").contains("p@ss"));
    }
}
