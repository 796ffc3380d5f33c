//! `cargo xtask ci`, `cargo xtask e2e` and `cargo xtask bench`.

use crate::services;
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The workspace root, whatever directory cargo was called from.
pub fn root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().expect("xtask lives in the workspace root").to_owned()
}

/// Runs `cargo <args>` in the workspace root and fails with the step's name.
pub fn cargo(step: &str, args: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("==> {step}: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run cargo for {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    eprintln!("==> {step}: ok in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

pub fn ci() -> anyhow::Result<()> {
    cargo("format", &["fmt", "--all", "--", "--check"])?;
    cargo("clippy", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    crate::nix::check()?;
    cargo("unit tests", &["test", "--workspace", "--lib", "--bins"])?;
    cargo(
        "NixOS option types against config.rs, the Debian unit against the module's",
        &["test", "--test", "nixos_options", "--test", "debian_unit"],
    )?;
    e2e()?;
    crate::cluster::cluster()
}

pub fn e2e() -> anyhow::Result<()> {
    services::require_installed()?;
    cargo("end-to-end tests", &["test", "--test", "e2e"])?;
    demo(&["--check"])
}

/// The demo: everything set up, the gateway running, sample readings through both actions.
/// With `--check` it verifies what it shows and exits.
pub fn demo(args: &[&str]) -> anyhow::Result<()> {
    cargo("build the gateway", &["build", "--bin", "mqtt-gateway"])?;
    let mut run = vec!["run", "--quiet", "--example", "demo", "--"];
    run.extend_from_slice(args);
    cargo("demo", &run)
}

pub fn bench() -> anyhow::Result<()> {
    services::require_installed()?;
    cargo("benchmark", &["bench", "--bench", "throughput"])
}
