//! Developer automation for mqtt-gateway, as plain Rust: `cargo xtask <task>`.
//!
//! - `ci`: everything CI checks: formatting, clippy, Nix files, alert rules, unit tests,
//!   end-to-end tests, the Galera cluster scenario.
//! - `e2e`: the end-to-end tests against real MariaDB, Mosquitto and HTTP servers.
//! - `cluster`: the scale-out scenario on a three-node MariaDB Galera cluster.
//! - `bench`: throughput, latency, CPU and memory against the same real services.
//! - `demo`: the gateway working against real services, in one command.
//! - `nix-check`: parse, format and dead-code checks of the Nix files, and the flake lock.
//! - `rules`: the shipped Prometheus rules, checked and unit-tested with promtool.
//! - `systemd-e2e`: the module's rendered unit and the Debian unit under a real systemd 257 in a
//!   systemd-nspawn container (root only).
//! - `packages`: what `xtask/required-packages.txt` lists and this machine lacks, for `.ci/run`
//!   and the GitHub workflow to install.
//!
//! Each task runs commands through [`cargo`] or [`run`] and stops at the first failure with a
//! readable message. The task modules use this file's helpers and never each other's, except
//! that `ci` runs the others.

mod ci;
mod cluster;
mod nix;
mod nspawn;
mod packages;
mod rules;
mod systemd_e2e;
mod which;

use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci         cargo fmt --check, clippy -D warnings, nix-check, rules, unit tests, NixOS option
             types against config.rs, end-to-end tests, the Galera cluster scenario
  e2e        end-to-end tests: the real binary against real MariaDB, Mosquitto and HTTP servers
  cluster    three gateways on a three-node MariaDB Galera cluster through a gateway crash and a
             node outage (needs galera-4 and rsync)
  bench      throughput, latency, CPU and memory (BENCH_MESSAGES=100000 scales it); writes
             target/bench/throughput.json
  demo       start MariaDB, Mosquitto and an echo server, run the gateway with sample flows and
             readings, show the rows, counters and POSTs, keep running until Ctrl-C
             (--check: verify and exit)
  nix-check  nix-instantiate --parse, nixfmt --check, deadnix --fail on every .nix file, and
             nix flake metadata --offline against flake.lock
  rules      promtool check rules and promtool test rules on monitoring/ (the alerts that ship),
             every alert with a test case that fires and one that does not
  systemd-e2e
             as root: boot systemd 257 in a systemd-nspawn container with MariaDB and Mosquitto,
             run the release binary under nixos/rendered/gateway.service and the Debian unit,
             check readiness, reload, watchdog, journal fields, credentials, restarts, security
             (--prepare: only make the container root, once per machine)
  packages apt|cargo [TASK...]
             print the packages of that kind that the tasks (all when none; `ci` for the tasks
             `ci` runs) need and this machine lacks, from xtask/required-packages.txt
";

fn main() -> ExitCode {
    let task = std::env::args().nth(1);
    let result = match task.as_deref() {
        Some("ci") => ci::ci(),
        Some("e2e") => ci::e2e(),
        Some("cluster") => cluster::cluster(),
        Some("bench") => ci::bench(),
        Some("nix-check") => nix::check(),
        Some("rules") => rules::rules(),
        Some("systemd-e2e") => {
            let rest: Vec<String> = std::env::args().skip(2).collect();
            systemd_e2e::systemd_e2e(&rest)
        }
        Some("packages") => {
            let rest: Vec<String> = std::env::args().skip(2).collect();
            packages::print_missing(&rest)
        }
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

/// The workspace root, whatever directory cargo was called from.
pub fn root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().expect("xtask lives in the workspace root").to_owned()
}

/// Runs `cargo <args>` in the workspace root, timing it, and fails with the step's name.
pub fn cargo(step: &str, args: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("==> {step}: cargo {}", args.join(" "));
    run(step, Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))?;
    eprintln!("==> {step}: ok in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs one step's command in the workspace root and fails with the step's name.
pub fn run(step: &str, command: &mut Command) -> anyhow::Result<()> {
    let status = command.current_dir(root()).status().with_context(|| format!("cannot run {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}
