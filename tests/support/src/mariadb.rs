//! A MariaDB server of our own: fresh data directory from `mariadb-install-db`, own socket, a
//! free port on 127.0.0.1, root without a password (it is reachable from loopback only).

use crate::cleanup;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct MariaDb {
    pub port: u16,
    pub socket: PathBuf,
    dir: PathBuf,
    server: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// How the server treats commits.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    /// `innodb_flush_log_at_trx_commit=1`, the server default: what benchmarks must use.
    Full,
    /// Flush once a second: correctness tests do not need to pay an fsync per commit.
    Relaxed,
}

impl MariaDb {
    pub fn start(durability: Durability) -> anyhow::Result<MariaDb> {
        MariaDb::start_with(durability, &[])
    }

    /// With extra server options, such as `--ssl-cert=...` or `--require-secure-transport=ON`.
    pub fn start_with(durability: Durability, extra_args: &[String]) -> anyhow::Result<MariaDb> {
        MariaDb::start_in(durability, None, extra_args)
    }

    /// With its data directory at `data` (say, on a small filesystem a test fills up).
    pub fn start_in(
        durability: Durability,
        data: Option<PathBuf>,
        extra_args: &[String],
    ) -> anyhow::Result<MariaDb> {
        let server = crate::require_program("mariadbd", "mariadb-server")?;
        let install = crate::require_program("mariadb-install-db", "mariadb-server")?;
        let dir = cleanup::service_dir("mariadb")?;
        let data = data.unwrap_or_else(|| dir.join("data"));
        let log = std::fs::File::create(dir.join("install.log"))?;
        // Servers bootstrapping at the same time in one /tmp collide on their temporary tables.
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let status = Command::new(&install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .args(user_arg())
            .arg("--innodb-log-file-size=16M")
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("cannot run {}", install.display()))?;
        if !status.success() {
            bail!("mariadb-install-db failed ({status}); see {}", dir.join("install.log").display());
        }
        let port = crate::free_port();
        let socket = dir.join("mariadbd.sock");
        let flush = if durability == Durability::Full { "1" } else { "2" };
        let mut args = vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", data.display()),
            format!("--tmpdir={}", tmp.display()),
            format!("--socket={}", socket.display()),
            format!("--pid-file={}", dir.join("mariadbd.pid").display()),
            format!("--log-error={}", dir.join("error.log").display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--skip-name-resolve".to_owned(),
            "--innodb-log-file-size=16M".to_owned(),
            "--innodb-buffer-pool-size=128M".to_owned(),
            "--max-connections=500".to_owned(),
            format!("--innodb-flush-log-at-trx-commit={flush}"),
        ];
        args.extend(user_arg());
        args.extend(extra_args.iter().cloned());
        let mut db = MariaDb { port, socket, dir, server, args, child: None };
        db.start_server()?;
        Ok(db)
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.server)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.server.display()))?;
        cleanup::register(child.id(), &self.dir);
        let child = self.child.insert(child);
        let port = self.port;
        let ready = crate::wait_until(Duration::from_secs(60), || {
            crate::wait_for_port(port, Duration::ZERO) || matches!(child.try_wait(), Ok(Some(_)))
        });
        if let Ok(Some(status)) = child.try_wait() {
            bail!("mariadbd exited ({status}); see {}", self.dir.join("error.log").display());
        }
        if !ready {
            bail!("mariadbd did not listen on port {port} within 60 s");
        }
        Ok(())
    }

    /// Shuts the server down cleanly (SIGTERM), keeping its data.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            cleanup::terminate(child);
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: connections stay open and nothing
    /// answers, as with a hung database.
    pub fn pause(&self, paused: bool) {
        if let Some(child) = &self.child {
            let signal = if paused { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Whether the server process is still there (a full disk can make InnoDB abort).
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.start_server()
    }

    /// Runs SQL as root with the `mariadb` command-line client.
    pub fn sql(&self, statements: &str) -> anyhow::Result<String> {
        sql_on_socket(&self.socket, statements)
    }

    /// Creates a database and a user with all rights on it, reachable over TCP.
    pub fn create_database(&self, name: &str, user: &str, password: &str) -> anyhow::Result<()> {
        let quote = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'");
        self.sql(&format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4; \
             CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{pw}'; \
             GRANT ALL ON `{name}`.* TO '{user}'@'%';",
            pw = quote(password)
        ))
        .map(drop)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        cleanup::kill(self.child.take(), &self.dir);
    }
}

/// mariadbd refuses to run as root unless told to.
fn user_arg() -> Vec<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        vec!["--user=root".to_owned()]
    } else {
        Vec::new()
    }
}

/// Runs SQL as root over a server's unix socket with the `mariadb` command-line client.
pub(crate) fn sql_on_socket(socket: &std::path::Path, statements: &str) -> anyhow::Result<String> {
    let client = crate::find_program("mariadb")
        .or_else(|| crate::find_program("mysql"))
        .context("the mariadb client is not installed (Debian: apt-get install -y mariadb-client)")?;
    let out = Command::new(client)
        .arg(format!("--socket={}", socket.display()))
        .args(["-uroot", "--batch", "--skip-column-names", "-e", statements])
        .output()?;
    if !out.status.success() {
        bail!("SQL failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
