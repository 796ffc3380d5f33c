//! Developer automation for mqtt-gateway, as plain Rust: `cargo xtask <task>`.
//!
//! - `ci`: everything CI checks: formatting, clippy, unit tests, end-to-end tests.
//! - `e2e`: the end-to-end tests against real MariaDB, Mosquitto and HTTP servers.
//! - `bench`: throughput, latency, CPU and memory against the same real services.
//!
//! Each task runs cargo commands and stops at the first failure with a readable message.

mod ci;
mod services;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci     cargo fmt --check, clippy -D warnings, unit tests, end-to-end tests
  e2e    end-to-end tests: the real binary against real MariaDB, Mosquitto and HTTP servers
  bench  throughput, latency, CPU and memory (BENCH_MESSAGES=100000 scales it); writes
         target/bench/throughput.json
";

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    let result = match task.as_deref() {
        Some("ci") => ci::ci(),
        Some("e2e") => ci::e2e(),
        Some("bench") => ci::bench(),
        Some("-h" | "--help" | "help") | None => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => Err(anyhow::anyhow!("unknown task `{other}`\n\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}
