//! The external programs the end-to-end tests start, and how to get them.

use anyhow::bail;
use std::path::Path;

/// (program, Debian package) pairs the tests need.
const PROGRAMS: [(&str, &str); 4] = [
    ("mariadbd", "mariadb-server"),
    ("mariadb-install-db", "mariadb-server"),
    ("mariadb", "mariadb-client"),
    ("mosquitto", "mosquitto"),
];

fn installed(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(Into::into))
        .any(|dir| Path::new(&dir).join(program).is_file())
}

/// Fails with the exact install command when a program is missing.
pub fn require_installed() -> anyhow::Result<()> {
    let mut missing: Vec<&str> =
        PROGRAMS.iter().filter(|(p, _)| !installed(p)).map(|(_, pkg)| *pkg).collect();
    missing.dedup();
    if !missing.is_empty() {
        bail!(
            "the end-to-end tests start real servers, and these packages are missing: {0}\n\
             Debian/Ubuntu: sudo apt-get install -y {0}\n\
             Nix: nix develop (the dev shell provides them)",
            missing.join(" ")
        );
    }
    Ok(())
}

/// Galera's provider library and the state-transfer tool, for `cargo xtask cluster`.
pub fn require_galera() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    if !Path::new("/usr/lib/galera/libgalera_smm.so").is_file() {
        missing.push("galera-4");
    }
    if !installed("rsync") {
        missing.push("rsync");
    }
    if !missing.is_empty() {
        bail!(
            "the Galera scenario starts a three-node cluster, and these packages are missing: {0}\n\
             Debian/Ubuntu: sudo apt-get install -y {0}",
            missing.join(" ")
        );
    }
    Ok(())
}
