//! A real systemd as PID 1 of a `systemd-nspawn` container, for `cargo xtask systemd-e2e`.
//!
//! The container root is Debian trixie (systemd 257) with MariaDB and Mosquitto, made once per
//! machine with debootstrap and kept under `/var/cache/mqtt-gateway/systemd-e2e/<key>`, where
//! the key is a hash of everything that goes into it: a changed package list makes a new root.
//! Each run boots a fresh copy of it, so runs never see each other's state.
//!
//! Booting works on a host whose PID 1 is not systemd and whose cgroups are v1 or hybrid (CI
//! machines and this one): the container gets a pure cgroup2 tree
//! (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`), runs from a cgroup of its own so nspawn's
//! sub-cgroups do not land at the hierarchy roots, and is not registered with machined
//! (`--register=no --keep-unit`: there is no D-Bus on such a host). It has a private network:
//! loopback only, so the host's own MariaDB and Mosquitto ports do not collide.

use crate::run;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SUITE: &str = "trixie";
/// Bumped when the preparation below changes in a way the package list does not show.
const RECIPE: &str = "3";
/// Installed by debootstrap: enough to boot.
const BASE: &[&str] = &["systemd", "dbus", "libnss-systemd", "ca-certificates"];
/// Installed inside the (not booted) container with apt, service starts blocked.
const PACKAGES: &[&str] =
    &["mariadb-server", "mariadb-client", "mosquitto", "mosquitto-clients", "procps", "iproute2"];
const CACHE: &str = "/var/cache/mqtt-gateway/systemd-e2e";
const PATH_INSIDE: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// FNV-1a, enough to name a cache directory after its recipe.
fn key() -> String {
    let recipe = format!("{SUITE} {RECIPE} {BASE:?} {PACKAGES:?}");
    let hash = recipe
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("{SUITE}-{hash:016x}")
}

/// The Debian mirror apt uses on this host.
fn mirror() -> String {
    let sources = Command::new("sh")
        .args(["-c", "cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // `URIs: <url>` (deb822) or `deb [options] <url> <suite> ...`; comments do not count.
    sources
        .lines()
        .filter(|line| line.starts_with("URIs:") || line.starts_with("deb "))
        .flat_map(str::split_whitespace)
        .find(|w| w.starts_with("http") && w.contains("debian") && !w.contains("security"))
        .unwrap_or("http://deb.debian.org/debian")
        .trim_end_matches('/')
        .to_owned()
}

/// The prepared root, made now if this machine has none for the current recipe.
pub fn prepared_root() -> anyhow::Result<PathBuf> {
    let root = Path::new(CACHE).join(key());
    if root.join(".prepared").exists() {
        return Ok(root);
    }
    crate::packages::require("systemd-e2e")?;
    let started = Instant::now();
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(CACHE)?;
    eprintln!(
        "==> systemd-e2e: making the container root {} (once per machine, a few minutes)",
        root.display()
    );
    run(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={}", BASE.join(",")), SUITE])
            .arg(&partial)
            .arg(mirror()),
    )?;
    // No init runs while packages are installed: block service starts.
    let policy = partial.join("usr/sbin/policy-rc.d");
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    run("chmod policy-rc.d", Command::new("chmod").arg("755").arg(&policy))?;
    let install = format!(
        "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends {} \
         && apt-get clean && rm -rf /var/lib/apt/lists/*",
        PACKAGES.join(" ")
    );
    let (shell, cgroups) = own_cgroups(&format!("mqtt-gateway-e2e-prepare-{}", std::process::id()))?;
    let installed = run(
        "apt-get install in the container root",
        Command::new("sh").args([
            "-c",
            &format!(
                "{shell} exec systemd-nspawn -q -D {} --register=no --keep-unit --resolv-conf=copy-host sh -c '{install}'",
                partial.display()
            ),
        ]),
    );
    clean_up(&cgroups);
    installed?;
    std::fs::remove_file(&policy)?;
    // What the VM tests and the module assume of the machine around the unit.
    std::fs::write(partial.join("etc/hostname"), "gw\n")?;
    std::fs::write(partial.join("etc/hosts"), "127.0.0.1\tlocalhost broker db\n::1\tlocalhost\n")?;
    // NixOS names the MariaDB unit mysql.service, which the rendered unit wants and follows.
    std::os::unix::fs::symlink(
        "/usr/lib/systemd/system/mariadb.service",
        partial.join("etc/systemd/system/mysql.service"),
    )?;
    // What the module's mqtt.createLocally renders for Mosquitto.
    std::fs::write(
        partial.join("etc/mosquitto/conf.d/gateway.conf"),
        "max_queued_messages 1000000\nmax_inflight_messages 1000\nlistener 1883 127.0.0.1\nallow_anonymous true\n",
    )?;
    // A quiet container: no timers, no getty.
    for unit in [
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer",
        "fstrim.timer",
        "e2scrub_all.timer",
    ] {
        let _ = std::os::unix::fs::symlink("/dev/null", partial.join("etc/systemd/system").join(unit));
    }
    let _ = std::fs::remove_file(partial.join("etc/systemd/system/getty.target.wants/getty@tty1.service"));
    std::fs::write(partial.join(".prepared"), key())?;
    std::fs::rename(&partial, &root)?;
    eprintln!("==> systemd-e2e: container root ready in {:.0}s", started.elapsed().as_secs_f64());
    Ok(root)
}

/// A cgroup of our own in every hierarchy nspawn touches, and the shell prefix that moves a
/// shell into it (before it execs nspawn).
fn own_cgroups(name: &str) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let trees: Vec<PathBuf> = if Path::new("/sys/fs/cgroup/unified").is_dir() {
        vec!["/sys/fs/cgroup/systemd".into(), "/sys/fs/cgroup/unified".into()]
    } else {
        vec!["/sys/fs/cgroup".into()]
    };
    let mut shell = String::new();
    let mut dirs = Vec::new();
    for tree in &trees {
        let dir = tree.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        shell.push_str(&format!("echo $$ > {}/cgroup.procs && ", dir.display()));
        dirs.push(dir);
    }
    Ok((shell, dirs))
}

/// Removes our cgroups and what nspawn leaves in /run when the host's PID 1 is not systemd.
fn clean_up(cgroups: &[PathBuf]) {
    for cgroup in cgroups {
        remove_cgroup(cgroup);
    }
    for dir in ["/run/systemd/nspawn/propagate", "/run/systemd/nspawn/locks", "/run/systemd/nspawn"] {
        let _ = std::fs::remove_dir(dir);
    }
}

fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Ends what an interrupted run left: a container whose xtask is gone, its cgroups, its copy
/// of the root. Cgroups and copies are named after the xtask's pid.
fn sweep(root: &Path) {
    let tree = if Path::new("/sys/fs/cgroup/unified").is_dir() {
        "/sys/fs/cgroup/unified"
    } else {
        "/sys/fs/cgroup"
    };
    let Ok(entries) = std::fs::read_dir(tree) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("mqtt-gateway-e2e-").and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let init = entry.path().join("payload/init.scope/cgroup.procs");
        for leader in std::fs::read_to_string(init).unwrap_or_default().split_whitespace() {
            eprintln!("==> systemd-e2e: ending the container (PID 1 = {leader}) of an interrupted run");
            let _ = Command::new("kill").args(["-KILL", leader]).status();
        }
        std::thread::sleep(Duration::from_millis(500));
        let hierarchies = ["/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
        clean_up(&hierarchies.iter().map(|h| Path::new(h).join(&name)).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(format!("{}.run-{pid}", root.display()));
    }
}

/// A booted container: systemd 257 as PID 1 on a fresh copy of the prepared root.
pub struct Container {
    nspawn: Child,
    leader: u32,
    copy: PathBuf,
    cgroups: Vec<PathBuf>,
}

/// What a command inside printed and how it ended.
pub struct Run {
    pub ok: bool,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Container {
    /// Copies the root, boots it and waits until the system is up.
    pub fn boot(root: &Path, setup: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<Container> {
        sweep(root);
        let copy = PathBuf::from(format!("{}.run-{}", root.display(), std::process::id()));
        let _ = std::fs::remove_dir_all(&copy);
        let started = Instant::now();
        run(
            "copy the container root",
            Command::new("cp").args(["-a", "--reflink=auto"]).arg(root).arg(&copy),
        )?;
        setup(&copy)?;
        eprintln!("==> systemd-e2e: root copied in {:.1}s", started.elapsed().as_secs_f64());
        let (shell, cgroups) = own_cgroups(&format!("mqtt-gateway-e2e-{}", std::process::id()))?;
        let log = std::fs::File::create(copy.with_extension("boot.log"))?;
        let nspawn = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "{shell} SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 exec systemd-nspawn -q -D {} -b -M e2e --register=no \
                     --keep-unit --private-network --console=pipe",
                    copy.display()
                ),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start systemd-nspawn")?;
        let mut container = Container { leader: 0, nspawn, copy, cgroups };
        let deadline = Instant::now() + Duration::from_secs(30);
        container.leader = loop {
            if let Some(pid) = container.find_leader() {
                break pid;
            }
            if Instant::now() > deadline || container.nspawn.try_wait()?.is_some() {
                let log =
                    std::fs::read_to_string(container.copy.with_extension("boot.log")).unwrap_or_default();
                bail!("the container did not start:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        // Until PID 1 has its private socket, systemctl cannot even ask; then it waits itself.
        let deadline = Instant::now() + Duration::from_secs(120);
        let state = loop {
            let state = container.sh("systemctl is-system-running --wait").stdout.trim().to_owned();
            if state == "running" || state == "degraded" {
                break state;
            }
            if Instant::now() > deadline {
                bail!("the container's systemd did not finish booting (state {state:?})");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let version = container.sh("systemctl --version | head -1");
        eprintln!(
            "==> systemd-e2e: booted in {:.1}s: {}, system {state}",
            started.elapsed().as_secs_f64(),
            version.stdout.trim()
        );
        Ok(container)
    }

    /// PID 1 of the container, as the host sees it: nspawn's child named systemd.
    fn find_leader(&self) -> Option<u32> {
        let out = Command::new("pgrep").args(["-P", &self.nspawn.id().to_string()]).output().ok()?;
        let children = String::from_utf8_lossy(&out.stdout).into_owned();
        children.lines().filter_map(|p| p.trim().parse::<u32>().ok()).find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "systemd")
        })
    }

    /// Runs a shell command inside, as root, in all of PID 1's namespaces.
    pub fn sh(&self, script: &str) -> Run {
        let out: Output = Command::new("nsenter")
            .args([
                "-t",
                &self.leader.to_string(),
                "-a",
                "env",
                "-i",
                PATH_INSIDE,
                "LANG=C.UTF-8",
                "SYSTEMD_COLORS=0",
            ])
            .args(["SYSTEMD_PAGER=cat", "bash", "-c", script])
            .output()
            .expect("nsenter");
        Run {
            ok: out.status.success(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Like [`Container::sh`], failing with the command and its output unless it succeeds.
    pub fn ok(&self, script: &str) -> anyhow::Result<String> {
        let run = self.sh(script);
        if !run.ok {
            bail!("`{script}` failed ({}):\n{}{}", run.code, run.stdout, run.stderr);
        }
        Ok(run.stdout)
    }
}

impl Container {
    fn wait_for_nspawn(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Before PID 1 was found (a failed boot) there is nothing to enter and no pid to kill.
        let powered_off = self.leader == 0
            || (self.sh("systemctl poweroff").ok && self.wait_for_nspawn(Duration::from_secs(60)));
        if self.leader == 0 {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        } else if !powered_off {
            // Killing nspawn would orphan the container; killing its PID 1 ends its whole PID
            // namespace, and nspawn exits with it.
            let _ = Command::new("kill").args(["-KILL", &self.leader.to_string()]).status();
            if !self.wait_for_nspawn(Duration::from_secs(10)) {
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
            }
        }
        clean_up(&self.cgroups);
        let _ = std::fs::remove_dir_all(&self.copy);
        let _ = std::fs::remove_file(self.copy.with_extension("boot.log"));
    }
}
