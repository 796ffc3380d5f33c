//! `cargo xtask cluster`: the scale-out scenario on a three-node MariaDB Galera cluster
//! (`tests/cluster`), apart from the rest of the end-to-end suite so that its three database
//! servers have the machine to themselves.

use crate::ci::cargo;
use crate::services;

pub fn cluster() -> anyhow::Result<()> {
    services::require_installed()?;
    services::require_galera()?;
    cargo("Galera cluster scenario", &["test", "--test", "cluster"])
}
