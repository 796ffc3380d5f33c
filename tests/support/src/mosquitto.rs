//! A Mosquitto broker of our own on a free loopback port. It can be stopped and started again
//! on the same port, with its persistence file, to test reconnects without losing the session.

use crate::cleanup;
use anyhow::{bail, Context};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    extra_config: String,
    child: Option<Child>,
}

impl Mosquitto {
    /// A broker that accepts anyone and keeps sessions on disk across restarts.
    pub fn start() -> anyhow::Result<Mosquitto> {
        Mosquitto::start_with(
            "allow_anonymous true\npersistence true\npersistence_location {dir}/\nautosave_interval 1\n",
        )
    }

    /// A broker with extra configuration lines (`{dir}` stands for its directory). Without
    /// `persistence true` a restart forgets every session and subscription. Every broker queues
    /// plenty of messages for absent persistent clients (Mosquitto's default is 1,000).
    pub fn start_with(extra_config: &str) -> anyhow::Result<Mosquitto> {
        Mosquitto::start_with_files(extra_config, &[])
    }

    /// [`Mosquitto::start_with`], with files written into the broker's directory first (a
    /// plugin's configuration, say), each `(name, content)`; `{dir}` in either stands for the
    /// directory.
    pub fn start_with_files(extra_config: &str, files: &[(&str, &str)]) -> anyhow::Result<Mosquitto> {
        let dir = cleanup::service_dir("mosquitto")?;
        for (name, content) in files {
            std::fs::write(dir.join(name), content.replace("{dir}", &dir.display().to_string()))?;
        }
        let mut broker =
            Mosquitto { port: crate::free_port(), dir, extra_config: extra_config.to_owned(), child: None };
        broker.restart()?;
        Ok(broker)
    }

    /// Starts the broker (again) on its port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let program = crate::require_program("mosquitto", "mosquitto")?;
        let config = self.dir.join("mosquitto.conf");
        std::fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\n\
                 max_queued_messages 1000000\n\
                 log_dest file {dir}/mosquitto.log\n\
                 {user}{extra}",
                port = self.port,
                dir = self.dir.display(),
                // Mosquitto started as root switches to the `mosquitto` user unless told not to.
                user = if unsafe { libc::geteuid() } == 0 { "user root\n" } else { "" },
                extra = self.extra_config.replace("{dir}", &self.dir.display().to_string()),
            ),
        )?;
        let mut child = Command::new(&program)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        cleanup::register(child.id(), &self.dir);
        if !crate::wait_until(Duration::from_secs(10), || {
            crate::wait_for_port(self.port, Duration::ZERO) || matches!(child.try_wait(), Ok(Some(_)))
        }) || matches!(child.try_wait(), Ok(Some(_)))
        {
            bail!("mosquitto did not start on port {}; see {}/mosquitto.log", self.port, self.dir.display());
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the broker gracefully (SIGTERM), so it writes its persistence file.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            cleanup::terminate(child);
        }
    }

    /// Kills the broker at once (SIGKILL), as an OOM kill or a power loss would: it saves
    /// nothing, so [`Mosquitto::restart`] starts from its last autosave.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            cleanup::release(child.id(), None);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
