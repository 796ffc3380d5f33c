//! Startup and shutdown: wires the components together in the original's order and takes
//! them down in the order that loses nothing.
//!
//! Startup: configuration and logging (done by `main`), database, schema, default broker row,
//! flows, broker connection, subscriptions. Any failure there is fatal. Shutdown: stop taking
//! messages, finish the ones in hand and their acks, let queued POSTs go out, disconnect.

use crate::config::Settings;
use crate::flows::{self, FlowSet};
use crate::health::Health;
use crate::mqtt::{self, BrokerSession, Subscriptions};
use crate::outbox::{Outbox, OutboxSignal};
use crate::processor::Processor;
use crate::reload::Reloader;
use crate::{db, systemd, tls};
use anyhow::Context;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

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

    // Before anything records; the listener itself starts once the database is there.
    let prometheus = match settings.metrics_addr {
        Some(_) => Some(
            crate::metrics::install(settings.batch.max_messages)
                .context("cannot set up metrics")
                .map_err(RunError::Startup)?,
        ),
        None => None,
    };
    let db = &settings.db;
    let pool = db::connect(db)
        .await
        .with_context(|| match &db.socket {
            Some(socket) => {
                format!("cannot connect to database {} through {} as {}", db.name, socket.display(), db.user)
            }
            None => {
                format!("cannot connect to database {} at {}:{} as {}", db.name, db.host, db.port, db.user)
            }
        })
        .map_err(RunError::Startup)?;
    let outcome = run_with_pool(&settings, pool.clone(), hangup, shutdown, prometheus).await;
    pool.close().await;
    outcome
}

async fn run_with_pool(
    settings: &Settings,
    pool: sqlx::MySqlPool,
    hangup: tokio::signal::unix::Signal,
    shutdown: CancellationToken,
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<(), RunError> {
    let startup = |e: anyhow::Error| RunError::Startup(e);
    db::migrate(&pool).await.context("cannot create the tables").map_err(startup)?;
    let (host, port) = &settings.default_broker;
    if db::seed_default_broker(&pool, host, *port)
        .await
        .context("cannot seed mqtt_servers")
        .map_err(startup)?
    {
        tracing::info!("mqtt_servers was empty: added the default broker {host}:{port}");
    }
    // The version first: a change made after it is read is followed at once.
    let flows_version =
        flows::table::version(&pool).await.context("cannot read gateway_flows_version").map_err(startup)?;
    let rows = flows::table::enabled(&pool).await.context("cannot load flows").map_err(startup)?;
    let flows = FlowSet::from_rows(rows.clone());
    let broker = db::choose_broker(&pool)
        .await
        .context("cannot read mqtt_servers")
        .map_err(startup)?
        .ok_or_else(|| anyhow::anyhow!("No enabled MQTT server found in mqtt_servers"))
        .map_err(startup)?;

    if settings.mqtt.shared_group.is_some() && settings.mqtt.client_id_explicit {
        tracing::warn!(
            "MQTT_CLIENT_ID is set to {:?} with a shared group: every instance needs its own id, or the broker \
             will keep disconnecting one for another",
            settings.mqtt.client_id
        );
    }
    let subscriptions = Subscriptions::new(&settings.mqtt);
    let target =
        mqtt::target(&settings.mqtt, &broker, settings.max_in_flight).context("MQTT TLS").map_err(startup)?;
    let (flows_tx, flows_rx) = watch::channel(Arc::new(flows));
    // Unbounded: the in-flight window bounds what is in hand, in messages and in bytes.
    let (messages_tx, messages_rx) = mpsc::unbounded_channel();
    let window = Arc::new(mqtt::Window::new(settings.max_in_flight, settings.max_in_flight_bytes));
    let health = Arc::new(Health::default());
    crate::metrics::record_flows(&flows_rx.borrow());
    let metrics_server = match (settings.metrics_addr, prometheus) {
        (Some(addr), Some(prometheus)) => Some(
            crate::metrics::serve(addr, prometheus, Arc::clone(&health), pool.clone(), shutdown.clone())
                .await
                .with_context(|| format!("cannot listen on METRICS_ADDR {addr}"))
                .map_err(startup)?,
        ),
        _ => None,
    };
    // A clean session is never kept by the broker: it holds nothing of earlier connections.
    let held = (!settings.mqtt.clean_session)
        .then(|| mqtt::Held::start(pool.clone(), settings.mqtt.client_id.clone()));
    if settings.mqtt.protocol == mqtt::Version::V311 && settings.mqtt.session_expiry.is_some() {
        tracing::warn!(
            "MQTT_SESSION_EXPIRY_SECONDS has no effect with MQTT 3.1.1: the broker's own setting decides"
        );
    }
    let (mut session, subscriber, acker) = BrokerSession::new(
        target,
        subscriptions,
        flows_rx.clone(),
        messages_tx,
        window,
        held,
        Arc::clone(&health),
    );
    let wake_outbox = Arc::new(OutboxSignal::default());
    let mut reloader = Reloader::new(
        pool.clone(),
        flows_tx,
        rows,
        flows_version,
        subscriber,
        Arc::clone(&wake_outbox),
        Arc::clone(&health),
    );
    reloader.report_broken(&flows_rx.borrow().broken);

    let outbox = Outbox::new(
        &pool,
        settings.delivery.clone(),
        settings.mqtt.client_id.clone(),
        Arc::clone(&wake_outbox),
    )
    .context("cannot set up the HTTP client")
    .map_err(startup)?;
    match crate::outbox::queue::depth(&pool).await {
        Ok((0, 0)) => {}
        Ok((pending, dead)) => {
            tracing::info!("Outbox holds {pending} pending and {dead} dead requests")
        }
        Err(error) => return Err(startup(anyhow::Error::new(error).context("cannot read gateway_outbox"))),
    }
    let processor = Processor::new(
        flows_rx.clone(),
        pool.clone(),
        settings.batch.clone(),
        wake_outbox,
        acker,
        shutdown.clone(),
        Arc::clone(&health),
    );
    // The processor runs before the first connection: a persistent session may deliver
    // queued messages right after CONNACK, before any SUBSCRIBE.
    let failed = Supervisor::new(shutdown.clone());
    let processor = failed.watch("the processor", tokio::spawn(processor.run(messages_rx)));
    let outbox =
        failed.watch("the outbox", tokio::spawn(Arc::new(outbox).run(shutdown.clone(), Arc::clone(&health))));

    if let Err(error) = session.start(&shutdown).await {
        if matches!(error, mqtt::StartError::Interrupted) {
            return Ok(());
        }
        return Err(startup(error.into()));
    }
    {
        let flows = flows_rx.borrow();
        tracing::info!(
            "Gateway ready: {} flows on {} topic filters, broker {} (MQTT {})",
            flows.flows.len(),
            flows.filter_count(),
            session.address(),
            session.version().name()
        );
        health.set_ready();
        systemd::ready(&systemd::describe(&health, &flows));
    }
    let supervise = failed.watch(
        "the systemd watchdog",
        tokio::spawn(systemd::supervise(Arc::clone(&health), flows_rx.clone(), shutdown.clone())),
    );
    let reload = failed.watch(
        "the flow reloader",
        tokio::spawn(reloader.run(settings.reload_interval, hangup, shutdown.clone())),
    );
    let metrics_server = metrics_server.map(|server| failed.watch("the metrics listener", server));
    session.run(shutdown.clone(), processor).await;
    if !shutdown.is_cancelled() {
        failed.fail("the MQTT session", "ended".to_owned());
    }
    let _ = reload.await;
    let _ = outbox.await;
    let _ = supervise.await;
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    if let Some(failure) = failed.failure() {
        return Err(RunError::Runtime(anyhow::anyhow!(failure)));
    }
    tracing::info!("Gateway stopped");
    Ok(())
}

/// Watches the long-running tasks. One that panics or ends before shutdown was asked leaves a
/// process that is alive and does nothing, so instead the whole gateway stops, in order, and
/// exits non-zero: the service manager restarts it, and the broker redelivers what was not
/// acknowledged.
#[derive(Clone)]
struct Supervisor {
    shutdown: CancellationToken,
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl Supervisor {
    fn new(shutdown: CancellationToken) -> Supervisor {
        Supervisor { shutdown, failure: Arc::default() }
    }

    /// A handle that ends when `task` ends, having reported it if it ended too early.
    fn watch(&self, name: &'static str, task: tokio::task::JoinHandle<()>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let ended = match task.await {
                Ok(()) => "ended".to_owned(),
                Err(error) if error.is_panic() => {
                    let panic = error.into_panic();
                    let text = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".to_owned());
                    format!("panicked: {text}")
                }
                Err(_) => "was cancelled".to_owned(),
            };
            if !this.shutdown.is_cancelled() {
                this.fail(name, ended);
            }
        })
    }

    fn fail(&self, name: &str, how: String) {
        let message = format!("{name} {how} while the gateway was running; stopping so that it is restarted");
        tracing::error!("{message}");
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(message);
        self.shutdown.cancel();
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
