//! The `mqtt-gateway` binary: reads the configuration, sets up logging, runs the gateway until
//! SIGTERM or SIGINT, and turns the outcome into the original's exit status.

use clap::Parser;
use mqtt_gateway::app::{self, RunError};
use mqtt_gateway::cli::{Cli, Command};
use mqtt_gateway::config::Settings;
use mqtt_gateway::logging;
use std::process::ExitCode;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// The gateway's thread gets room for the deepest payload the processor accepts.
const THREAD_STACK: usize = 8 * 1024 * 1024;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None | Some(Command::Run) => run_service(),
        Some(command) => run_command(command),
    }
}

/// A subcommand: one clear line on failure, and a non-zero exit code.
fn run_command(command: Command) -> ExitCode {
    let _ = logging::init(None, logging::Format::Text);
    let outcome = Settings::from_env().map_err(anyhow::Error::new).and_then(|settings| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(mqtt_gateway::cli::execute(settings, command))
    });
    match outcome {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The service, as the Python one ran: configuration, logging, then the gateway until a stop
/// signal. Every way it cannot start ends in [`fatal`].
fn run_service() -> ExitCode {
    let settings = match configure() {
        Ok(settings) => settings,
        Err(error) => return fatal(error),
    };
    // One thread runs the gateway. With a work-stealing runtime on two cores, every HTTP
    // response and database reply woke the second worker to look for work: measured by
    // `cargo xtask bench`, one thread spends about a sixth less CPU per POST and a tenth less
    // per stored message, at the same throughput and latency. The heaviest step (decoding
    // and rendering a 20 MB payload) holds the thread for well under a second, far inside the
    // broker's keepalive and the watchdog's interval: with a 20 MB message every second, the
    // small messages beside it reach the database within 0.3-0.4 s (p99) on one thread and on
    // two alike, since the pipeline takes messages in order either way.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fatal(format!("cannot start the runtime: {error}")),
    };
    let gateway = std::thread::Builder::new()
        .name("gateway".to_owned())
        .stack_size(THREAD_STACK)
        .spawn(move || runtime.block_on(serve(settings)));
    match gateway.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(error) => fatal(format!("cannot start the gateway thread: {error}")),
    }
}

/// The gateway until a stop signal or a failure, with the original's exit status.
async fn serve(settings: Settings) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match app::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Startup(error)) => fatal(format!("{error:#}")),
        Err(RunError::Runtime(error)) => {
            tracing::error!("Gateway failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the configuration and installs logging as it says. When that fails, logging is
/// installed as far as the configuration allows (the original's text lines on stderr, and
/// `LOG_DIR`'s files if only the rest was refused), so the error can be logged.
fn configure() -> Result<Settings, String> {
    let format = logging::Format::from_env().inspect_err(|_| {
        let _ = logging::init(None, logging::Format::Text);
    })?;
    let settings = Settings::from_env().map_err(|error| {
        let _ = logging::init(Settings::log_dir_from_env().as_deref(), format);
        error.to_string()
    })?;
    logging::init(settings.log_dir.as_deref(), format).map_err(|error| {
        let _ = logging::init(None, logging::Format::Text);
        format!("cannot create LOG_DIR: {error}")
    })?;
    Ok(settings)
}

/// The original's last word when the service cannot start, and its exit status.
fn fatal(error: impl std::fmt::Display) -> ExitCode {
    tracing::error!("Fatal error during startup: {error}");
    ExitCode::FAILURE
}

/// The first SIGTERM or SIGINT starts an orderly shutdown; a second one ends the process at
/// once, for an operator who does not want to wait for slow endpoints.
async fn stop_on_signal(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        tracing::error!("Cannot install SIGTERM/SIGINT handlers");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if round == 0 {
            tracing::info!("Shutting down: finishing the messages in hand");
            mqtt_gateway::systemd::stopping();
            shutdown.cancel();
        }
    }
    tracing::warn!("Second signal: exiting without finishing");
    std::process::exit(1);
}
