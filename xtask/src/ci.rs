//! `cargo xtask ci`, `cargo xtask e2e` and `cargo xtask bench`.

use crate::{cargo, packages};

pub fn ci() -> anyhow::Result<()> {
    cargo("format", &["fmt", "--all", "--", "--check"])?;
    cargo("clippy", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    crate::nix::check()?;
    crate::rules::rules()?;
    cargo("unit tests", &["test", "--workspace", "--lib", "--bins"])?;
    cargo(
        "NixOS option types against config.rs, settings across config.rs, README and module, \
         the Debian unit against the module's",
        &["test", "--test", "nixos_options", "--test", "settings_tidy", "--test", "debian_unit"],
    )?;
    e2e()?;
    crate::cluster::cluster()
}

pub fn e2e() -> anyhow::Result<()> {
    packages::require("e2e")?;
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
    packages::require("e2e")?;
    cargo("benchmark", &["bench", "--bench", "throughput"])?;
    cargo("benchmark: the number of flows", &["bench", "--bench", "flows"])
}
