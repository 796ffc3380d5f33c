//! Finding an installed program, the same way for `cargo xtask` and for `testkit` (which
//! compiles this file too, through `#[path]`: it must stay free of dependencies).

use std::path::PathBuf;

/// A program on PATH, in the sbin directories Debian puts servers in (not on a user's PATH), or
/// in cargo's install directory (where `cargo install` put `nixfmt` and `deadnix`).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .map(|home| home.join("bin"));
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
