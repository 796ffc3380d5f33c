//! The command line: `mqtt-gateway` alone runs the service as before; subcommands let an
//! operator check the setup, manage flows and look at counters and the outbox without SQL.
//! Every subcommand reads the same environment variables as the service.
//!
//! This file parses the command line and dispatches; each command group has its own file:
//! `check.rs`, `flows.rs`, `status.rs`, `outbox.rs`. None of them writes SQL of its own for a table
//! another module owns: the `flows` table's statements are in [`crate::flows::table`].

mod check;
mod flows;
mod outbox;
mod status;

pub use flows::FlowsCommand;
pub use outbox::OutboxCommand;

use crate::config::Settings;
use crate::{db, tls};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mqtt-gateway",
    version,
    about = "Takes MQTT messages off a broker and, per flow, stores them in MariaDB or POSTs them",
    long_about = "Takes MQTT messages off a broker and, per flow, stores them in MariaDB or POSTs them.\n\
                  Without a subcommand it runs the service. Configuration comes from the environment \
                  (DB_HOST, DB_NAME, DB_USER, DB_PASSWORD, ...; see the README)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service (the default)
    Run,
    /// Create or update the tables, then exit
    ///
    /// Example: DB_HOST=db DB_NAME=gw DB_USER=gw DB_PASSWORD=... mqtt-gateway migrate
    Migrate,
    /// Check the configuration, the database, the broker and every flow; exit 1 if anything would not work
    ///
    /// Example: mqtt-gateway check --json
    Check {
        #[arg(long)]
        json: bool,
    },
    /// List, show, add, enable or disable flows
    #[command(subcommand)]
    Flows(FlowsCommand),
    /// Per flow: the counter, the last message time and the current rate; the outbox's pending
    /// and dead requests
    ///
    /// Example: mqtt-gateway status --interval 5 --json
    Status {
        /// Seconds over which the rate is measured
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long)]
        json: bool,
    },
    /// List or retry POST_ENDPOINT requests that are pending or dead
    #[command(subcommand)]
    Outbox(OutboxCommand),
}

/// Runs a subcommand other than `run`; returns the process exit code.
pub async fn execute(settings: Settings, command: Command) -> anyhow::Result<i32> {
    tls::install_crypto_provider();
    let pool = db::connect(&settings.db).await.context("cannot connect to the database")?;
    let code = match command {
        Command::Run => unreachable!("main runs the service itself"),
        Command::Migrate => {
            db::migrate(&pool).await.context("cannot migrate")?;
            println!("the schema is up to date");
            0
        }
        Command::Check { json } => check::run(&settings, &pool, json).await?,
        Command::Flows(command) => flows::run(&pool, command).await?,
        Command::Status { interval, json } => status::run(&pool, interval, json).await?,
        Command::Outbox(command) => outbox::run(&pool, command).await?,
    };
    pool.close().await;
    Ok(code)
}

/// An endpoint URL as every CLI output shows it: with its password masked exactly as the
/// service's log masks it. A value that is not a URL at all cannot be masked reliably, so when
/// it could hold user info it is not shown (its flow's problem says what is wrong with it).
fn shown_url(raw: &str) -> String {
    if url::Url::parse(raw.trim()).is_err() && raw.contains('@') {
        return "(not a valid URL; not shown, as it may hold a password)".to_owned();
    }
    crate::outbox::redacted_str(raw)
}
