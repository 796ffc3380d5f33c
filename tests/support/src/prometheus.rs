//! A Prometheus server of our own (Debian package `prometheus`): its configuration and data in a
//! temporary directory, its web UI and API on a free loopback port, scraping one target every
//! second and evaluating rules every second, so that a test sees `rate()` over fresh samples and
//! an alert's state change within seconds.

use crate::cleanup;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Prometheus {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`, path `/metrics`) every second as job `mqtt-gateway`.
    pub fn start(target: &str) -> anyhow::Result<Prometheus> {
        Prometheus::start_with_rules(target, &[])
    }

    /// The same, with these rule files loaded (alerting and recording rules, evaluated every
    /// second).
    pub fn start_with_rules(target: &str, rule_files: &[&Path]) -> anyhow::Result<Prometheus> {
        Prometheus::start_with_args(target, rule_files, &[])
    }

    /// The same, with more command line arguments (say `--web.user-assets=DIR`, to serve pages
    /// of one's own beside Prometheus's).
    pub fn start_with_args(
        target: &str,
        rule_files: &[&Path],
        args: &[String],
    ) -> anyhow::Result<Prometheus> {
        let program = crate::require_program("prometheus", "prometheus")?;
        let dir = cleanup::service_dir("prometheus")?;
        let config = dir.join("prometheus.yml");
        let mut text = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mqtt-gateway\n    static_configs:\n      - targets: ['{target}']\n"
        );
        if !rule_files.is_empty() {
            text.push_str("rule_files:\n");
            for file in rule_files {
                let file = std::path::absolute(file)?;
                text.push_str(&format!("  - '{}'\n", file.display()));
            }
        }
        std::fs::write(&config, text)?;
        let port = crate::free_port();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new(&program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        cleanup::register(child.id(), &dir);
        let mut server = Prometheus { port, dir, child: Some(child) };
        // Ready, not only listening: Prometheus answers 503 to every API call until its
        // storage is open, which takes seconds on a loaded machine.
        let started = crate::wait_until(Duration::from_secs(60), || {
            answers_ready(port) || matches!(server.child.as_mut().map(Child::try_wait), Some(Ok(Some(_))))
        });
        if !started || matches!(server.child.as_mut().map(Child::try_wait), Some(Ok(Some(_)))) {
            bail!(
                "prometheus did not start on port {port}; see {}",
                server.dir.join("prometheus.log").display()
            );
        }
        Ok(server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            cleanup::terminate(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether Prometheus on `port` says it is ready (`GET /-/ready` answers 200).
fn answers_ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut answer = String::new();
    stream.write_all(b"GET /-/ready HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_ok()
        && stream.read_to_string(&mut answer).is_ok()
        && (answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
}
