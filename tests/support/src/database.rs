//! A gateway's own database on a test server, and the environment that points a gateway at it
//! and at a broker: set up the same way by the end-to-end tests, the cluster scenario, the
//! benchmarks and the examples.

use crate::{GaleraCluster, MariaDb};
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

/// A database server a test can create a gateway's database on.
pub trait SqlServer {
    /// The port a client reaches it on (for a cluster, its first node).
    fn port(&self) -> u16;
    fn create_database(&self, name: &str, user: &str, password: &str) -> anyhow::Result<()>;
}

impl SqlServer for MariaDb {
    fn port(&self) -> u16 {
        self.port
    }
    fn create_database(&self, name: &str, user: &str, password: &str) -> anyhow::Result<()> {
        MariaDb::create_database(self, name, user, password)
    }
}

impl SqlServer for GaleraCluster {
    fn port(&self) -> u16 {
        self.node(0).port
    }
    fn create_database(&self, name: &str, user: &str, password: &str) -> anyhow::Result<()> {
        GaleraCluster::create_database(self, name, user, password)
    }
}

/// What `DB_NAME`, `DB_USER` and `DB_PASSWORD` say.
#[derive(Clone, Copy, Debug)]
pub struct Login<'a> {
    pub database: &'a str,
    pub user: &'a str,
    pub password: &'a str,
}

/// A fresh database (no tables yet) with a user of its own, a pool on it as that user, and the
/// environment a gateway needs to use it and the broker.
pub struct GatewayDb {
    pub pool: MySqlPool,
    /// `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`, `DB_PASSWORD`, `MQTT_DEFAULT_HOST`,
    /// `MQTT_DEFAULT_PORT` and `RUST_LOG=info`; everything else at the gateway's defaults.
    pub env: Vec<(String, String)>,
}

impl GatewayDb {
    /// Creates the database and its user on `server`, reachable over TCP on 127.0.0.1.
    pub async fn create(
        server: &impl SqlServer,
        login: Login<'_>,
        broker_port: u16,
    ) -> anyhow::Result<GatewayDb> {
        server.create_database(login.database, login.user, login.password)?;
        let options = MySqlConnectOptions::new()
            .host("127.0.0.1")
            .port(server.port())
            .username(login.user)
            .password(login.password)
            .database(login.database);
        let pool = MySqlPoolOptions::new().max_connections(3).connect_with(options).await?;
        let env = [
            ("DB_HOST", "127.0.0.1".to_owned()),
            ("DB_PORT", server.port().to_string()),
            ("DB_NAME", login.database.to_owned()),
            ("DB_USER", login.user.to_owned()),
            ("DB_PASSWORD", login.password.to_owned()),
            ("MQTT_DEFAULT_HOST", "127.0.0.1".to_owned()),
            ("MQTT_DEFAULT_PORT", broker_port.to_string()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok(GatewayDb { pool, env })
    }

    /// The environment with these variables set (replacing any of the same name).
    pub fn env_with(&self, settings: &[(&str, String)]) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        for (name, value) in settings {
            set_var(&mut env, name, value.clone());
        }
        env
    }
}

/// Sets `name` in an environment, replacing what it held.
pub fn set_var(env: &mut Vec<(String, String)>, name: &str, value: String) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_owned(), value));
}
