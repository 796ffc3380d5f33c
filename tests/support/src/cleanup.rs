//! Cleanup of service processes and their directories, even when handles are never dropped
//! (shared services live in statics) or the test process was killed.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

/// Directory names start with this, so a later run can find what a killed run left.
pub const DIR_PREFIX: &str = "mqtt-gw-test-";
const OWNER_FILE: &str = "owner.pid";
const SERVICE_FILE: &str = "service.pid";

static REGISTERED: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());
static INIT: Once = Once::new();

/// A fresh directory for one service, owned by this process.
pub fn service_dir(kind: &str) -> std::io::Result<PathBuf> {
    INIT.call_once(|| {
        sweep_stale();
        // SAFETY: registers a plain extern "C" function with no captured state.
        unsafe { libc::atexit(stop_all_at_exit) };
    });
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{kind}-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())?;
    Ok(dir)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Remembers a running service so that process exit stops it.
pub fn register(pid: u32, dir: &Path) {
    let _ = std::fs::write(dir.join(SERVICE_FILE), pid.to_string());
    REGISTERED.lock().unwrap_or_else(|p| p.into_inner()).push((pid, dir.to_owned()));
}

/// Stops a service gracefully (SIGTERM, so it can save its state), waits for it, forgets it.
pub fn terminate(mut child: std::process::Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    release(child.id(), None);
}

/// Kills a service at once (its handle is dropping), reaps it, forgets it, and removes its
/// directory.
pub fn kill(child: Option<std::process::Child>, dir: &Path) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
        release(child.id(), None);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Forgets a service its owner has stopped and reaped, and removes its directory if given.
pub fn release(pid: u32, dir: Option<&Path>) {
    REGISTERED.lock().unwrap_or_else(|p| p.into_inner()).retain(|(p, _)| *p != pid);
    if let Some(dir) = dir {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn kill_and_wait(pid: u32) {
    // SAFETY: plain syscalls on a pid this process started and has not reaped yet.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
        libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
    }
}

extern "C" fn stop_all_at_exit() {
    let registered = std::mem::take(&mut *REGISTERED.lock().unwrap_or_else(|p| p.into_inner()));
    for (pid, dir) in registered {
        kill_and_wait(pid);
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Removes directories of runs whose process is gone, killing a service still running there.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let read_pid =
            |name| std::fs::read_to_string(dir.join(name)).ok().and_then(|s| s.trim().parse::<i32>().ok());
        if read_pid(OWNER_FILE).is_some_and(alive) {
            continue;
        }
        if let Some(service) = read_pid(SERVICE_FILE) {
            let cmdline = std::fs::read(format!("/proc/{service}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                // SAFETY: the process runs from this stale directory: it is a leftover service.
                unsafe { libc::kill(service, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
