//! End-to-end tests: the real `mqtt-gateway` binary against a real MariaDB, a real Mosquitto and
//! a real HTTP server, started by `testkit` and shared by every test in this binary. Each test
//! has its own database, client id and topic prefix, so tests stay independent.
//!
//! Run with `cargo xtask e2e` (or `cargo test --test e2e`).

mod certs;
mod harness;

mod alerts;
mod bad_input;
mod broker;
mod cli;
mod cli_redaction;
mod db_tls;
mod delivery;
mod holding;
mod https;
mod large;
mod logs;
mod metrics;
mod migrations;
mod notify;
mod outbox;
mod outbox_reads;
mod post_endpoint;
mod prometheus;
mod protocol;
mod reload;
mod retained;
mod scaleout;
mod session;
mod settings;
mod shutdown;
mod startup;
mod store_db;
mod subscriptions;
mod systemd;
mod tls;
mod waiting;
