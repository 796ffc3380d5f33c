//! Developer automation for mqtt-gateway, as plain Rust: `cargo xtask <task>`.
//!
//! - `ci`: everything CI checks: formatting, clippy, unit tests, end-to-end tests.
//! - `e2e`: the end-to-end tests against real MariaDB, Mosquitto and HTTP servers.
//! - `bench`: throughput, latency, CPU and memory against the same real services.
//! - `demo`: the gateway working against real services, in one command.
//! - `nix-check`: parse, format and dead-code checks of the Nix files, and the flake lock.
//!
//! Each task runs cargo commands and stops at the first failure with a readable message.

mod ci;
mod nix;
mod services;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci         cargo fmt --check, clippy -D warnings, nix-check, unit tests, NixOS option types
             against config.rs, end-to-end tests
  e2e        end-to-end tests: the real binary against real MariaDB, Mosquitto and HTTP servers
  bench      throughput, latency, CPU and memory (BENCH_MESSAGES=100000 scales it); writes
             target/bench/throughput.json
  demo       start MariaDB, Mosquitto and an echo server, run the gateway with sample flows and
             readings, show the rows, counters and POSTs, keep running until Ctrl-C
             (--check: verify and exit)
  nix-check  nix-instantiate --parse, nixfmt --check, deadnix --fail on every .nix file, and
             nix flake metadata --offline against flake.lock
";

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    let result = match task.as_deref() {
        Some("ci") => ci::ci(),
        Some("e2e") => ci::e2e(),
        Some("bench") => ci::bench(),
        Some("nix-check") => nix::check(),
        Some("demo") => {
            let rest: Vec<String> = std::env::args().skip(2).collect();
            ci::demo(&rest.iter().map(String::as_str).collect::<Vec<_>>())
        }
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
