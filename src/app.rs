//! Startup and shutdown: wires the components together in the original's order and takes
//! them down in the order that loses nothing.
//!
//! Startup: configuration and logging (done by `main`), database, schema, default broker row,
//! flows, broker connection, subscriptions. Any failure there is fatal. Shutdown: stop taking
//! messages, finish the ones in hand and their acks, let queued POSTs go out, disconnect.

use crate::config::Settings;
use crate::flows::FlowSet;
use crate::mqtt::{self, BrokerSession};
use crate::processor::Processor;
use crate::reload::Reloader;
use crate::sinks::{PostEndpoint, StoreDb};
use crate::{db, tls};
use anyhow::Context;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Messages decoded ahead of the processor. With QoS 1 the broker's in-flight window (20 in
/// Mosquitto) keeps far fewer than this outstanding.
const PROCESSOR_QUEUE: usize = 1_024;

/// Why the gateway stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Logged as `Fatal error during startup: ...`, exit status 1.
    #[error("{0:#}")]
    Startup(anyhow::Error),
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

/// Runs the gateway until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    tls::install_crypto_provider();
    // Installed before anything slow, so a SIGHUP during startup cannot kill the process.
    let hangup = signal(SignalKind::hangup())
        .context("cannot install the SIGHUP handler")
        .map_err(RunError::Startup)?;

    let db = &settings.db;
    let pool = db::connect(db)
        .await
        .with_context(|| {
            format!(
                "cannot connect to database {} at {}:{} as {}",
                db.name, db.host, db.port, db.user
            )
        })
        .map_err(RunError::Startup)?;
    let outcome = run_with_pool(&settings, pool.clone(), hangup, shutdown).await;
    pool.close().await;
    outcome
}

async fn run_with_pool(
    settings: &Settings,
    pool: sqlx::MySqlPool,
    hangup: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let startup = |e: anyhow::Error| RunError::Startup(e);
    db::migrate(&pool)
        .await
        .context("cannot create the tables")
        .map_err(startup)?;
    let (host, port) = &settings.default_broker;
    if db::seed_default_broker(&pool, host, *port)
        .await
        .context("cannot seed mqtt_servers")
        .map_err(startup)?
    {
        tracing::info!("mqtt_servers was empty: added the default broker {host}:{port}");
    }
    let flows = FlowSet::from_rows(
        db::enabled_flows(&pool)
            .await
            .context("cannot load flows")
            .map_err(startup)?,
    );
    let broker = db::choose_broker(&pool)
        .await
        .context("cannot read mqtt_servers")
        .map_err(startup)?
        .ok_or_else(|| anyhow::anyhow!("No enabled MQTT server found in mqtt_servers"))
        .map_err(startup)?;

    let qos = mqtt::qos(settings.mqtt.qos);
    let (flows_tx, flows_rx) = watch::channel(Arc::new(flows));
    let (messages_tx, messages_rx) = mpsc::channel(PROCESSOR_QUEUE);
    let (mut session, client) = BrokerSession::new(
        mqtt::options(&settings.mqtt, &broker),
        qos,
        flows_rx.clone(),
        messages_tx,
    );
    let mut reloader = Reloader::new(pool.clone(), flows_tx, client.clone(), qos);
    reloader.report_broken(&flows_rx.borrow().broken);

    let post = PostEndpoint::new(pool.clone(), settings.http_timeout)
        .context("cannot set up the HTTP client")
        .map_err(startup)?;
    let processor = Processor::new(flows_rx.clone(), StoreDb::new(pool.clone()), post, client);
    // The processor runs before the first connection: a persistent session may deliver
    // queued messages right after CONNACK, before any SUBSCRIBE.
    let processor = tokio::spawn(processor.run(messages_rx));

    if let Err(error) = session.start(&shutdown).await {
        if matches!(error, mqtt::StartError::Interrupted) {
            return Ok(());
        }
        return Err(startup(error.into()));
    }
    {
        let flows = flows_rx.borrow();
        tracing::info!(
            "Gateway ready: {} flows on {} topic filters, broker {}",
            flows.flows.len(),
            flows.filters().len(),
            session.address()
        );
    }

    let reload = tokio::spawn(reloader.run(settings.reload_interval, hangup, shutdown.clone()));
    session.run(shutdown.clone(), processor).await;
    let _ = reload.await;
    tracing::info!("Gateway stopped");
    Ok(())
}
