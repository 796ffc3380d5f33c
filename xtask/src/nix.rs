//! `cargo xtask nix-check`: what can be checked of the Nix files without nixpkgs (see the
//! README): every tracked `.nix` file parses, is formatted (nixfmt) and has no dead code
//! (deadnix), and `flake.lock` agrees with the inputs of `flake.nix`.

use crate::ci::root;
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::Command;

/// A tool from PATH or cargo's install directory, or how to get it.
fn tool(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("`{name}` is not installed: {install}"))
}

fn run(step: &str, command: &mut Command) -> anyhow::Result<()> {
    let status = command.current_dir(root()).status().with_context(|| format!("cannot run {step}"))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

pub fn check() -> anyhow::Result<()> {
    let instantiate = tool("nix-instantiate", "apt-get install -y nix-bin")?;
    let nix = tool("nix", "apt-get install -y nix-bin")?;
    let nixfmt = tool("nixfmt", "cargo install --locked nixfmt_rs")?;
    let deadnix = tool("deadnix", "cargo install --locked deadnix")?;

    let listed = Command::new("git").args(["ls-files", "*.nix"]).current_dir(root()).output()?;
    let files: Vec<String> = String::from_utf8(listed.stdout)?.lines().map(str::to_owned).collect();
    if files.is_empty() {
        bail!("git lists no .nix file");
    }
    eprintln!("==> nix-check: {} files", files.len());
    for file in &files {
        run(
            &format!("nix-instantiate --parse {file}"),
            Command::new(&instantiate).args(["--parse", file]).stdout(std::process::Stdio::null()),
        )?;
    }
    run("nixfmt --check", Command::new(&nixfmt).arg("--check").args(&files))?;
    run("deadnix --fail", Command::new(&deadnix).arg("--fail").args(&files))?;
    // Offline, with no substituter: a lock that does not match flake.nix fails here instead of
    // trying to download anything.
    run(
        "nix flake metadata (flake.lock against flake.nix)",
        Command::new(&nix)
            .env("NIX_CONFIG", "experimental-features = nix-command flakes\nsubstituters =\n")
            .args(["flake", "metadata", "--offline", "--no-update-lock-file", "."])
            .stdout(std::process::Stdio::null()),
    )?;
    eprintln!("==> nix-check: ok");
    Ok(())
}
