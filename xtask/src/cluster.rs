//! `cargo xtask cluster`: the scale-out scenario on a three-node MariaDB Galera cluster
//! (`tests/cluster`), apart from the rest of the end-to-end suite so that its three database
//! servers have the machine to themselves.

use crate::{cargo, packages};

pub fn cluster() -> anyhow::Result<()> {
    packages::require("e2e")?;
    packages::require("cluster")?;
    cargo("Galera cluster scenario", &["test", "--test", "cluster"])
}
