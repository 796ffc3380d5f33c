//! A MariaDB Galera cluster of our own on this machine, the way MariaDB's own test suite runs
//! one: each node a `mariadbd` with its own temporary data directory and its own SQL, group
//! communication, IST and SST ports on loopback; the first node bootstraps the cluster, the
//! others join it by state transfer (rsync).
//!
//! Learned the hard way (see the project's GALERA notes): started by root, the nodes must run
//! as the `mysql` user in directories it owns, or the rsync state transfer cannot enter the
//! joiner's data directory and the joiner aborts.

use crate::cleanup;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PROVIDER: &str = "/usr/lib/galera/libgalera_smm.so";
/// A joiner copies the donor's whole data directory; generous for a loaded 2-core machine.
const JOIN_LIMIT: Duration = Duration::from_secs(90);

pub struct GaleraCluster {
    nodes: Vec<GaleraNode>,
}

pub struct GaleraNode {
    /// The SQL port on 127.0.0.1.
    pub port: u16,
    pub socket: PathBuf,
    dir: PathBuf,
    server: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl GaleraCluster {
    /// Starts `size` nodes, one after the other, each synced before the next joins.
    pub fn start(size: usize) -> anyhow::Result<GaleraCluster> {
        let server = crate::require_program("mariadbd", "mariadb-server")?;
        let install = crate::require_program("mariadb-install-db", "mariadb-server")?;
        crate::require_program("rsync", "rsync")?;
        if !Path::new(PROVIDER).is_file() {
            bail!("{PROVIDER} is missing. On Debian or Ubuntu: `apt-get install -y galera-4`");
        }
        let ports: Vec<[u16; 4]> = (0..size)
            .map(|_| [crate::free_port(), crate::free_port(), crate::free_port(), crate::free_port()])
            .collect();
        let members: Vec<String> =
            ports.iter().map(|[_, group, _, _]| format!("127.0.0.1:{group}")).collect();
        let address = format!("gcomm://{}", members.join(","));
        let mut cluster = GaleraCluster { nodes: Vec::new() };
        for (i, [sql, group, ist, sst]) in ports.into_iter().enumerate() {
            let dir = cleanup::service_dir("galera")?;
            give_to_mysql(&dir)?;
            let data = dir.join("data");
            let log = std::fs::File::create(dir.join("install.log"))?;
            let status = Command::new(&install)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
                .args(user_arg())
                .stdout(log.try_clone()?)
                .stderr(log)
                .status()
                .with_context(|| format!("cannot run {}", install.display()))?;
            if !status.success() {
                bail!("mariadb-install-db failed ({status}); see {}", dir.join("install.log").display());
            }
            let socket = dir.join("mariadbd.sock");
            let mut args = vec![
                "--no-defaults".to_owned(),
                format!("--datadir={}", data.display()),
                format!("--socket={}", socket.display()),
                format!("--pid-file={}", dir.join("mariadbd.pid").display()),
                format!("--log-error={}", dir.join("error.log").display()),
                format!("--port={sql}"),
                "--bind-address=127.0.0.1".to_owned(),
                "--skip-name-resolve".to_owned(),
                "--max-connections=300".to_owned(),
                "--innodb-buffer-pool-size=64M".to_owned(),
                "--innodb-flush-log-at-trx-commit=2".to_owned(),
                // What Galera requires.
                "--binlog-format=ROW".to_owned(),
                "--default-storage-engine=InnoDB".to_owned(),
                "--innodb-autoinc-lock-mode=2".to_owned(),
                "--wsrep-on=ON".to_owned(),
                format!("--wsrep-provider={PROVIDER}"),
                "--wsrep-cluster-name=mqtt-gateway-test".to_owned(),
                format!("--wsrep-cluster-address={address}"),
                format!("--wsrep-node-address=127.0.0.1:{group}"),
                format!("--wsrep-node-name=node{}", i + 1),
                format!(
                    "--wsrep-provider-options=gmcast.listen_addr=tcp://127.0.0.1:{group};\
                     ist.recv_addr=127.0.0.1:{ist};gcache.size=64M"
                ),
                "--wsrep-sst-method=rsync".to_owned(),
                format!("--wsrep-sst-receive-address=127.0.0.1:{sst}"),
            ];
            args.extend(user_arg());
            let mut node = GaleraNode { port: sql, socket, dir, server: server.clone(), args, child: None };
            // Only the very first start of the first node founds the cluster; every later
            // start of any node joins what is there.
            node.start_server(i == 0)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    pub fn node(&self, i: usize) -> &GaleraNode {
        &self.nodes[i]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Shuts a node down cleanly (SIGTERM); the others carry on as the primary component.
    pub fn stop_node(&mut self, i: usize) {
        self.nodes[i].stop();
    }

    /// Starts a stopped node again; it rejoins and catches up (IST) before this returns.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.nodes[i].start_server(false)
    }

    /// Creates a database and a user with all rights on it, through the first node; the
    /// cluster replicates both.
    pub fn create_database(&self, name: &str, user: &str, password: &str) -> anyhow::Result<()> {
        let quote = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'");
        self.nodes[0]
            .sql(&format!(
                "CREATE DATABASE `{name}` CHARACTER SET utf8mb4; \
                 CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{pw}'; \
                 GRANT ALL ON `{name}`.* TO '{user}'@'%';",
                pw = quote(password)
            ))
            .map(drop)
    }
}

impl GaleraNode {
    fn start_server(&mut self, bootstrap: bool) -> anyhow::Result<()> {
        let mut command = Command::new(&self.server);
        command.args(&self.args);
        if bootstrap {
            command.arg("--wsrep-new-cluster");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.server.display()))?;
        cleanup::register(child.id(), &self.dir);
        self.child = Some(child);
        let synced = crate::wait_until(JOIN_LIMIT, || {
            self.exited().is_none() && self.status("wsrep_local_state_comment").as_deref() == Some("Synced")
        });
        if let Some(status) = self.exited() {
            bail!("Galera node exited ({status}); see {}", self.dir.join("error.log").display());
        }
        if !synced {
            bail!("Galera node on port {} not synced within {JOIN_LIMIT:?}", self.port);
        }
        Ok(())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// A `SHOW STATUS` value, if the node answers.
    pub fn status(&self, variable: &str) -> Option<String> {
        let out = self.sql(&format!("SHOW STATUS LIKE '{variable}'")).ok()?;
        out.split_whitespace().nth(1).map(str::to_owned)
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            cleanup::terminate(child);
        }
    }

    /// Runs SQL as root with the `mariadb` command-line client.
    pub fn sql(&self, statements: &str) -> anyhow::Result<String> {
        crate::mariadb::sql_on_socket(&self.socket, statements)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for GaleraNode {
    fn drop(&mut self) {
        cleanup::kill(self.child.take(), &self.dir);
    }
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// As root, the node runs as `mysql`; otherwise as whoever runs the tests.
fn user_arg() -> Vec<String> {
    if running_as_root() {
        vec!["--user=mysql".to_owned()]
    } else {
        Vec::new()
    }
}

/// Hands the node's directory to the `mysql` user when running as root.
fn give_to_mysql(dir: &Path) -> anyhow::Result<()> {
    if !running_as_root() {
        return Ok(());
    }
    let name = std::ffi::CString::new("mysql").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the result is read at once, before any other
    // call that could overwrite it.
    let (uid, gid) = unsafe {
        let entry = libc::getpwnam(name.as_ptr());
        if entry.is_null() {
            bail!("there is no `mysql` user to run Galera nodes as (it comes with mariadb-server)");
        }
        ((*entry).pw_uid, (*entry).pw_gid)
    };
    for path in std::iter::once(dir.to_owned())
        .chain(std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()))
    {
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .with_context(|| format!("cannot give {} to mysql", path.display()))?;
    }
    Ok(())
}
