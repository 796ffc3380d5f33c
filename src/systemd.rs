//! systemd: readiness, status lines, reload and stop notifications, and the watchdog.
//!
//! Each call is a no-op when `NOTIFY_SOCKET` is unset, so the gateway runs the same outside
//! systemd. `READY=1` is sent only once the schema is migrated, the broker has accepted the
//! connection and acknowledged every flow's subscription: a message published as soon as
//! systemd reports the unit active is delivered.
//!
//! The notification protocol (sd_notify(3)) is one datagram per call to the Unix socket named
//! by `NOTIFY_SOCKET`: a path, or, with a leading `@`, a name in Linux's abstract namespace,
//! which systemd and other service managers use in containers. Both are handled here with
//! std's Unix datagram sockets; the `sd-notify` crate handles only paths.
//!
//! The watchdog ping proves more than "the process has a running timer": it is sent only while
//! no part of the pipeline is stuck (see [`crate::health`]): the MQTT session, the processor and
//! the outbox loop each came back to their loop within half the watchdog interval, or are in a
//! wait that ends by itself (every database call has a bound: the server's lock wait timeout,
//! and the client's own timeout after which the connection is dropped). So a lock wait, a frozen
//! database or a half-open link is waited out with the watchdog fed, and reported as holding;
//! only a task that stops turning with nothing outstanding (a lost wakeup, a deadlock, a
//! blocking call) stops the pings, and systemd restarts the unit; the messages it held were not
//! acknowledged, so the broker delivers them again. It does not prove that messages flow: an
//! idle gateway with no traffic is healthy. Pings are sent only when `WATCHDOG_PID` is unset or
//! names this process, as the protocol asks: a watchdog set up for another process (a
//! wrapper's) is not ours to feed.

use crate::flows::FlowSet;
use crate::health::Health;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often the status line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The address `NOTIFY_SOCKET` names: `@name` is abstract, anything else a path.
fn notify_address(value: &OsStr) -> io::Result<SocketAddr> {
    match value.as_bytes() {
        [] => Err(io::Error::new(io::ErrorKind::InvalidInput, "NOTIFY_SOCKET is empty")),
        [b'@', name @ ..] => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        _ => SocketAddr::from_pathname(value),
    }
}

/// Sends one notification datagram to the socket `NOTIFY_SOCKET` names.
fn send(socket: &OsStr, message: &str) -> io::Result<()> {
    let address = notify_address(socket)?;
    let sent = UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &address)?;
    if sent != message.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "notification truncated"));
    }
    Ok(())
}

/// A failure is logged once, not at every ping and status refresh, until a send works again.
static FAILING: AtomicBool = AtomicBool::new(false);

fn notify(lines: &[&str]) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let mut message = lines.join("\n");
    message.push('\n');
    match send(&socket, &message) {
        Ok(()) => FAILING.store(false, Ordering::Relaxed),
        Err(error) => {
            if !FAILING.swap(true, Ordering::Relaxed) {
                tracing::warn!("Cannot notify systemd through {}: {error}", socket.to_string_lossy());
            }
        }
    }
}

pub fn ready(status: &str) {
    notify(&["READY=1", &format!("STATUS={status}")]);
}

pub fn status(status: &str) {
    notify(&[&format!("STATUS={status}")]);
}

/// Before a reload: `Type=notify-reload` wants the monotonic time with it, so systemd can tell
/// this reload from an earlier one.
pub fn reloading() {
    let now = monotonic_usec();
    notify(&["RELOADING=1", &format!("MONOTONIC_USEC={now}"), "STATUS=Reloading flows"]);
}

pub fn stopping() {
    notify(&["STOPPING=1", "STATUS=Stopping: finishing the messages in hand"]);
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` with.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid timespec to write into; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

/// The watchdog interval from `WATCHDOG_USEC`, when it is meant for process `pid`: systemd
/// sets `WATCHDOG_PID` to the main process; unset means "whoever reads this". Anything
/// unparsable or zero means no watchdog, as in libsystemd.
fn watchdog_interval(usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match watchdog_pid {
        None => Some(Duration::from_micros(usec)),
        Some(named) => (named.trim().parse::<u32>().ok()? == pid).then(|| Duration::from_micros(usec)),
    }
}

fn watchdog_enabled() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// The status line `systemctl status` shows.
pub fn describe(health: &Health, flows: &FlowSet) -> String {
    match health.waiting_for() {
        Some(what) => format!("Waiting for {what}; {} messages processed", health.processed()),
        None => format!(
            "{} flows on {} topic filters; {} messages processed",
            flows.flows.len(),
            flows.filter_count(),
            health.processed()
        ),
    }
}

/// Pings the watchdog while no part of the pipeline is stuck, and refreshes the status line,
/// until shutdown. Pings go four times per interval, so that a tick a little late never leaves
/// systemd more than half the interval without one.
pub async fn supervise(
    health: Arc<Health>,
    flows: watch::Receiver<Arc<FlowSet>>,
    shutdown: CancellationToken,
) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        // No service manager to tell anything: nothing to wake up for.
        return shutdown.cancelled().await;
    }
    let watchdog = watchdog_enabled();
    let ping_every = watchdog.map_or(STATUS_EVERY, |interval| interval / 4);
    let stuck_after = watchdog.map_or(STATUS_EVERY, stuck_after);
    // One timer for the pings, the pokes and the status line: with the default 30 s watchdog,
    // an idle gateway wakes here every 7.5 s.
    let mut ticker = tokio::time::interval(ping_every);
    let mut last_status = String::new();
    let mut reported_stall = false;
    // The parts have waited, unpoked, through the whole start (the broker's answers, the
    // subscriptions): the first tick pokes them all and judges none.
    let mut first = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if watchdog.is_some() {
            match health.stalled(stuck_after).filter(|_| !first) {
                None => {
                    notify(&["WATCHDOG=1"]);
                    if reported_stall {
                        tracing::warn!(
                            "Every part of the pipeline turns again; pinging the systemd watchdog"
                        );
                    }
                    reported_stall = false;
                }
                Some(part) if !reported_stall => {
                    tracing::error!(
                        "{part} is stuck: it has not come back to its loop for {stuck_after:?} and waits on \
                         nothing that ends by itself; not pinging the systemd watchdog"
                    );
                    reported_stall = true;
                }
                Some(_) => {}
            }
            // Each quiet part comes back to its loop for this before the next check; an idle
            // one sleeps until then instead of beating on a timer of its own.
            health.poke_quiet(if std::mem::take(&mut first) { Duration::ZERO } else { ping_every / 2 });
        }
        // Sent when it says something new: an idle gateway's does not change.
        let now = describe(&health, &flows.borrow());
        if now != last_status {
            status(&now);
            last_status = now;
        }
    }
}

/// How long a part may go without turning its loop before it counts as stuck: half the
/// watchdog interval (two checks, each of which pokes it), and never less than a second, so
/// that a very short interval does not take a part slowed by a busy machine for a stuck one.
fn stuck_after(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::linux::net::SocketAddrExt;

    fn receive(socket: &UnixDatagram) -> String {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifies_a_socket_named_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\n").unwrap();
        assert_eq!(receive(&socket), "READY=1\n");
    }

    #[test]
    fn notifies_an_abstract_socket_named_with_an_at_sign() {
        let name = format!("mqtt-gateway-test-{}-{:?}", std::process::id(), std::thread::current().id());
        let socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        send(OsStr::new(&format!("@{name}")), "WATCHDOG=1\n").unwrap();
        assert_eq!(receive(&socket), "WATCHDOG=1\n");
        // The same name as a path is another socket altogether, which does not exist.
        assert!(send(OsStr::new(&name), "WATCHDOG=1\n").is_err());
    }

    #[test]
    fn an_empty_notify_socket_is_an_error_not_a_path() {
        assert!(send(OsStr::new(""), "READY=1\n").is_err());
    }

    #[test]
    fn the_watchdog_is_ours_only_when_watchdog_pid_names_us_or_is_unset() {
        let ours = Some(Duration::from_secs(2));
        assert_eq!(watchdog_interval(Some("2000000"), None, 42), ours);
        assert_eq!(watchdog_interval(Some("2000000"), Some("42"), 42), ours);
        assert_eq!(watchdog_interval(Some("2000000"), Some("43"), 42), None, "another process's watchdog");
        assert_eq!(watchdog_interval(Some("2000000"), Some("x"), 42), None);
        assert_eq!(watchdog_interval(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval(None, Some("42"), 42), None);
    }

    #[test]
    fn a_part_is_stuck_after_half_the_interval_and_never_before_four_beats() {
        assert_eq!(stuck_after(Duration::from_secs(30)), Duration::from_secs(15));
        assert_eq!(stuck_after(Duration::from_secs(4)), Duration::from_secs(2));
        assert_eq!(stuck_after(Duration::from_millis(200)), Duration::from_secs(1));
    }

    #[test]
    fn monotonic_time_moves_forward() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() > a);
    }
}
