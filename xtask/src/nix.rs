//! `cargo xtask nix-check`: what can be checked of the Nix files without nixpkgs (see the
//! README): every tracked `.nix` file parses, is formatted (nixfmt) and has no dead code
//! (deadnix), and `flake.lock` agrees with the inputs of `flake.nix`.

use crate::packages::program;
use crate::{root, run};
use anyhow::bail;
use std::process::Command;

pub fn check() -> anyhow::Result<()> {
    let instantiate = program("nix-instantiate")?;
    let nix = program("nix")?;
    let nixfmt = program("nixfmt")?;
    let deadnix = program("deadnix")?;

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
