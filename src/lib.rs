//! mqtt-gateway takes MQTT messages off a broker and, for each flow defined in the `flows`
//! table, stores them in MariaDB or POSTs them to an HTTP endpoint. It is a drop-in
//! replacement for a Python service: same tables, environment, rows, counters, bodies and log
//! lines.
//!
//! Where things live, in the order a message travels:
//! - [`config`]: the environment variables, read once; secrets kept out of logs.
//! - [`mqtt`]: the broker session on its own socket, MQTT 5 or 3.1.1 (rumqttc's codecs):
//!   reconnects with backoff, every filter subscribed on every connection and what no flow
//!   needs unsubscribed, the in-flight window in messages and bytes, acknowledgements on the
//!   connection their message came on.
//! - [`processor`]: the loop only: receive a batch, decode, match, render, commit, report, ack.
//! - [`payload`]: what a payload must be (UTF-8 text holding a JSON object) and its decoding.
//! - [`flows`]: flow rows checked into flows that can work; topic filters; payload schemas;
//!   `flows/table.rs`, every statement on the `flows` and `gateway_flow_stats` tables.
//! - [`sinks`]: one file per action (`store_db`, `post_endpoint`): what it renders of a payload
//!   and the rows it writes; `Effect` and `Item`, what a rendered message is.
//! - [`retained`]: a retained message the broker sends again is not stored twice
//!   (`gateway_retained`).
//! - [`commit`]: one transaction for a batch (counters, then each sink's rows) in statements
//!   bounded by `max_allowed_packet`; holding the stream while the database cannot write, and
//!   splitting a batch to find the message at fault.
//! - [`outbox`]: durable delivery of POST_ENDPOINT requests, with retries and leases;
//!   `outbox/queue.rs`, every statement on the outbox tables.
//! - [`pyfmt`]: the Python renderings of values the original stored and sent.
//! - [`db`]: the pool; queries on `mqtt_servers`; how big a
//!   statement may be; whose fault a failed write is (a message's data, or the database, which
//!   holds the stream); how long a database wait may last; [`keepalive`]: TCP keepalive on its
//!   connections; [`migrate`]: schema migrations that several instances can run at once.
//! - [`reload`]: periodic and SIGHUP reload of the flows.
//! - [`logging`]: the original's log format, stderr and daily files; journald and JSON.
//! - [`health`] and [`systemd`]: heartbeats, readiness, status, watchdog; [`metrics`]:
//!   Prometheus metrics, `/healthz` and `/readyz`.
//! - [`app`]: startup in the original's order, and an orderly shutdown; [`cli`]: the subcommands,
//!   one file per command group.
//! - [`backoff`]: capped exponential backoff with jitter; [`tls`]: crypto provider, broker TLS.

pub mod app;
pub mod backoff;
pub mod cli;
pub mod commit;
pub mod config;
pub mod db;
pub mod flows;
pub mod health;
pub mod keepalive;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod mqtt;
pub mod outbox;
pub mod payload;
pub mod processor;
pub mod pyfmt;
pub mod reload;
pub mod retained;
pub mod sinks;
pub mod systemd;
pub mod tls;
