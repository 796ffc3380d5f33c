//! `cargo xtask systemd-e2e`: the gateway under a real systemd, as an operator sees it.
//!
//! systemd 257 boots as PID 1 of a container (see `nspawn`) with MariaDB and Mosquitto, and
//! runs the release binary with the unit the NixOS module renders (`nixos/rendered/`, only the
//! `/nix/store` path of `ExecStart` replaced) and then with the Debian unit
//! (`dist/systemd/`). Each check acts with the operator's tools (`systemctl`, `journalctl`,
//! `mariadb`, `mosquitto_pub`) and asserts what they show. Three checks change the unit with a
//! drop-in, as an operator would: `FLOWS_RELOAD_INTERVAL_SECONDS=3600` (as the VM test does, so
//! only `systemctl reload` can apply a flow) and `WatchdogSec=3` for the two watchdog checks (the
//! rendered 30 s would make them longer and prove nothing more); the wedged-task check also
//! runs the debug build, whose fault switch wedges the processor for real.
//!
//! Needs root, `systemd-container` and `debootstrap` (`.ci/run` installs both). The container
//! root is made once per machine; a run takes about 3 minutes after the builds.
//!
//! Longer than our other files: eleven checks that read top to bottom like one operator's
//! session with the unit, each a few dozen lines; the container itself lives in `nspawn`.

use crate::nspawn::{self, Container};
use crate::{cargo, root};
use anyhow::{bail, Context};
use std::path::Path;
use std::time::{Duration, Instant};

const DROP_IN: &str = "/run/systemd/system/mqtt-gateway.service.d";
/// The remote-database VM test's password: characters a URL-based client would have to escape.
const PASSWORD: &str = "s3cret@with/odd:chars";

/// One row of the result table.
struct Row {
    check: &'static str,
    pass: bool,
    measured: String,
}

pub fn systemd_e2e(args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let image = nspawn::prepared_root()?;
    if args.iter().any(|a| a == "--prepare") {
        eprintln!("==> systemd-e2e: container root {}", image.display());
        return Ok(());
    }
    cargo("build the release binary", &["build", "--release", "--bin", "mqtt-gateway"])?;
    // For its fault switch, which release builds leave out. Built with the e2e tests, as `cargo
    // xtask ci` builds it: alone it would get other dependency features, and be built twice.
    cargo("build the debug binary", &["build", "--bin", "mqtt-gateway", "--test", "e2e"])?;
    let project = root();
    let container = Container::boot(&image, |copy| install(&project, copy))?;
    let bed = Bed { c: &container };
    let mut rows = Vec::new();
    let result = bed.run_all(&mut rows);
    drop(container);
    eprintln!("\n{:<28} {:<6} MEASURED", "CHECK", "RESULT");
    for row in &rows {
        eprintln!("{:<28} {:<6} {}", row.check, if row.pass { "PASS" } else { "FAIL" }, row.measured);
    }
    eprintln!("==> systemd-e2e: {:.0}s in all", started.elapsed().as_secs_f64());
    result?;
    let failed: Vec<&str> = rows.iter().filter(|r| !r.pass).map(|r| r.check).collect();
    if !failed.is_empty() {
        bail!("systemd-e2e: failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The rendered unit as the container runs it: the store path of the binary replaced.
fn from_rendering(text: &str) -> anyhow::Result<String> {
    let exec =
        text.lines().find(|l| l.starts_with("ExecStart=")).context("the rendered unit has no ExecStart")?;
    if !exec.starts_with("ExecStart=/nix/store/") || !exec.ends_with("/bin/mqtt-gateway") {
        bail!("unexpected ExecStart in the rendered unit: {exec}");
    }
    let text = text.replace(exec, "ExecStart=/usr/local/bin/mqtt-gateway");
    // Any other program from the store (an ExecReload=, say) would need substituting too.
    if let Some(line) = text.lines().find(|l| l.starts_with("Exec") && l.contains("/nix/store/")) {
        bail!("the rendered unit runs another program from the store: {line}");
    }
    Ok(text)
}

/// Puts the binary, the units and the Debian settings into the container's root.
fn install(project: &Path, copy: &Path) -> anyhow::Result<()> {
    let into = |path: &str| copy.join(path.trim_start_matches('/'));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| project.join("target"), Into::into);
    std::fs::copy(target.join("release/mqtt-gateway"), into("/usr/local/bin/mqtt-gateway"))?;
    std::fs::copy(target.join("debug/mqtt-gateway"), into("/usr/local/bin/mqtt-gateway-debug"))?;
    let units = into("/etc/gw-units");
    std::fs::create_dir_all(&units)?;
    for name in ["gateway", "remote-database"] {
        let text = std::fs::read_to_string(project.join(format!("nixos/rendered/{name}.service")))?;
        std::fs::write(units.join(format!("nixos-{name}.service")), from_rendering(&text)?)?;
    }
    std::fs::copy(project.join("dist/systemd/mqtt-gateway.service"), units.join("debian.service"))?;
    std::fs::copy(project.join("dist/systemd/credentials.conf"), units.join("credentials.conf"))?;
    std::fs::create_dir_all(into("/etc/mqtt-gateway"))?;
    std::fs::copy(
        project.join("dist/systemd/mqtt-gateway.env.example"),
        into("/etc/mqtt-gateway/mqtt-gateway.env"),
    )?;
    Ok(())
}

/// The container with the operator's vocabulary.
struct Bed<'a> {
    c: &'a Container,
}

impl Bed<'_> {
    fn ok(&self, script: &str) -> anyhow::Result<String> {
        self.c.ok(script)
    }

    fn sql(&self, db: &str, query: &str) -> anyhow::Result<String> {
        Ok(self
            .ok(&format!("mariadb --batch --skip-column-names {db} <<'SQL'\n{query}\nSQL"))?
            .trim()
            .to_owned())
    }

    fn q(&self, query: &str) -> anyhow::Result<String> {
        self.sql("mqtt_gateway", query)
    }

    fn count(&self, query: &str) -> i64 {
        self.q(query).ok().and_then(|v| v.parse().ok()).unwrap_or(-1)
    }

    fn add_flow(&self, code: &str, topic: &str) -> anyhow::Result<()> {
        self.q(&format!(
            "INSERT INTO flows (code, description, topic, action, payload_schema, endpoint_url, last_msg_id, enabled) \
             VALUES ('{code}', 'systemd-e2e', '{topic}', 'STORE_DB', '{{\"temperature\": \"float\"}}', NULL, 0, TRUE)"
        ))?;
        Ok(())
    }

    fn publish(&self, topic: &str, payload: &str) -> anyhow::Result<()> {
        self.ok(&format!("mosquitto_pub -h 127.0.0.1 -q 1 -t '{topic}' -m '{payload}'"))?;
        Ok(())
    }

    /// Publishes `{"temperature": first..first+n}` every `gap_ms` in the background, QoS 1.
    fn stream(&self, topic: &str, first: u32, n: u32, gap_ms: u32) -> anyhow::Result<()> {
        let last = first + n - 1;
        let client = format!("e2e-{}", topic.replace('/', "-"));
        self.ok(&format!(
            "(for i in $(seq {first} {last}); do echo \"{{\\\"temperature\\\": $i}}\"; sleep {}; done \
             | mosquitto_pub -h 127.0.0.1 -q 1 -t '{topic}' -l -i {client}) >/dev/null 2>&1 &",
            f64::from(gap_ms) / 1000.0
        ))?;
        Ok(())
    }

    fn show(&self, property: &str) -> String {
        self.ok(&format!("systemctl show -P {property} mqtt-gateway")).unwrap_or_default().trim().to_owned()
    }

    fn cursor(&self) -> anyhow::Result<String> {
        Ok(self.ok("journalctl -n0 --show-cursor -q | sed -n 's/^-- cursor: //p'")?.trim().to_owned())
    }

    fn journal_since(&self, cursor: &str, filter: &str) -> String {
        self.ok(&format!("journalctl --no-pager --after-cursor='{cursor}' {filter}")).unwrap_or_default()
    }

    /// Installs one of /etc/gw-units as mqtt-gateway.service, without drop-ins, stopped.
    fn use_unit(&self, unit: &str) -> anyhow::Result<()> {
        self.ok(&format!(
            "systemctl stop mqtt-gateway 2>/dev/null; rm -rf {DROP_IN}; \
             cp /etc/gw-units/{unit}.service /etc/systemd/system/mqtt-gateway.service; \
             systemctl daemon-reload; systemctl reset-failed mqtt-gateway 2>/dev/null; true"
        ))?;
        Ok(())
    }

    fn drop_in(&self, name: &str, lines: &[&str]) -> anyhow::Result<()> {
        self.ok(&format!(
            "mkdir -p {DROP_IN} && printf '%s\\n' '[Service]' {} > {DROP_IN}/{name}.conf && systemctl daemon-reload",
            lines.iter().map(|l| format!("'{l}'")).collect::<Vec<_>>().join(" ")
        ))?;
        Ok(())
    }

    /// Polls `check` every 200 ms for at most `limit`; the time it took.
    fn wait(&self, what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while !check() {
            if started.elapsed() > limit {
                bail!("timed out after {limit:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(started.elapsed())
    }

    fn security_score(&self) -> anyhow::Result<f64> {
        let out = self.ok("systemd-analyze security --no-pager mqtt-gateway | tail -n 1")?;
        out.split("mqtt-gateway.service:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|score| score.parse().ok())
            .with_context(|| format!("no exposure level in {out:?}"))
    }

    fn run_all(&self, rows: &mut Vec<Row>) -> anyhow::Result<()> {
        self.ok("systemctl is-active mariadb mosquitto")
            .context("MariaDB and Mosquitto are not running in the container")?;
        // Exactly what the NixOS mysql module runs for the module's ensureDatabases/ensureUsers.
        self.sql(
            "mysql",
            "CREATE DATABASE IF NOT EXISTS `mqtt_gateway`;\n\
             CREATE USER IF NOT EXISTS 'mqtt-gateway'@'localhost' IDENTIFIED WITH unix_socket;\n\
             GRANT ALL PRIVILEGES ON mqtt_gateway.* TO 'mqtt-gateway'@'localhost';",
        )?;
        type Check<'b> = fn(&Bed<'b>) -> anyhow::Result<Row>;
        let checks: [(&str, Check); 11] = [
            ("readiness", Bed::readiness),
            ("dynamicuser-unix-socket", Bed::dynamic_user),
            ("reload", Bed::reload),
            ("journal-fields", Bed::journal),
            ("watchdog-lock-wait", Bed::watchdog_lock_wait),
            ("watchdog-wedged-task", Bed::watchdog_wedged_task),
            ("security", Bed::security),
            ("stop-under-load", Bed::stop_under_load),
            ("broker-down-at-start", Bed::broker_down_at_start),
            ("credential-remote-db", Bed::credential),
            ("debian-unit", Bed::debian_unit),
        ];
        for (name, check) in checks {
            let started = Instant::now();
            eprintln!("==> systemd-e2e: {name}");
            let row = check(self).with_context(|| format!("check {name}"))?;
            eprintln!(
                "    {} in {:.1}s: {}",
                if row.pass { "pass" } else { "FAIL" },
                started.elapsed().as_secs_f64(),
                row.measured
            );
            rows.push(row);
        }
        Ok(())
    }

    /// `systemctl start` returns only after READY=1: a message published right after is
    /// stored, and while the database is frozen the unit stays `activating`.
    fn readiness(&self) -> anyhow::Result<Row> {
        self.use_unit("nixos-gateway")?;
        // First start on an empty database: migrations and the broker row.
        self.ok("systemctl start mqtt-gateway && systemctl stop mqtt-gateway")?;
        self.add_flow("T_READY", "t/ready")?;
        let started = Instant::now();
        let rc = self.c.sh("systemctl start mqtt-gateway").code;
        let took = started.elapsed();
        let state = self.ok("systemctl is-active mqtt-gateway").unwrap_or_default();
        self.publish("t/ready", r#"{"temperature": 1.5}"#)?;
        let stored = self.wait("the reading", Duration::from_secs(10), || {
            self.count("SELECT COUNT(*) FROM data WHERE flow_code = 'T_READY'") == 1
        });
        // With MariaDB frozen the gateway cannot be ready: start must still be waiting.
        self.ok("systemctl stop mqtt-gateway")?;
        self.ok("kill -STOP $(systemctl show -P MainPID mariadb)")?;
        self.ok("(systemctl start mqtt-gateway; echo $? > /run/start.rc) >/dev/null 2>&1 &")?;
        std::thread::sleep(Duration::from_secs(2));
        let during = self.ok("systemctl is-active mqtt-gateway || true")?.trim().to_owned();
        let thawed = Instant::now();
        self.ok("kill -CONT $(systemctl show -P MainPID mariadb)")?;
        self.wait("systemctl start to return", Duration::from_secs(30), || {
            self.c.sh("test -s /run/start.rc").ok
        })?;
        let after_thaw = thawed.elapsed();
        let late_rc = self.ok("cat /run/start.rc")?.trim().to_owned();
        let pass =
            rc == 0 && state.trim() == "active" && stored.is_ok() && during == "activating" && late_rc == "0";
        Ok(Row {
            check: "readiness",
            pass,
            measured: format!(
                "start rc={rc} in {:.0} ms, state right after: {}; published right after: {}; \
                 DB frozen 2 s: {during} during, start returned {:.0} ms after thaw (rc={late_rc})",
                took.as_secs_f64() * 1000.0,
                state.trim(),
                if stored.is_ok() { "stored" } else { "NOT stored" },
                after_thaw.as_secs_f64() * 1000.0
            ),
        })
    }

    /// DynamicUser under the full hardening, logged in by MariaDB's unix_socket plugin.
    fn dynamic_user(&self) -> anyhow::Result<Row> {
        let pid = self.show("MainPID");
        let uid = self.ok(&format!("awk '/^Uid/ {{print $2}}' /proc/{pid}/status"))?.trim().to_owned();
        let name =
            self.ok(&format!("getent passwd {uid} | cut -d: -f1")).unwrap_or_default().trim().to_owned();
        let connections = self.count(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE user = 'mqtt-gateway' AND host = 'localhost'",
        );
        let plugin = self.sql(
            "mysql",
            "SELECT json_value(priv, '$.plugin') FROM mysql.global_priv WHERE user = 'mqtt-gateway'",
        )?;
        let nnp = self.ok(&format!("awk '/^NoNewPrivs/ {{print $2}}' /proc/{pid}/status"))?.trim().to_owned();
        // The unit leaves these to DynamicUser, which implies them; systemd shows the result.
        let implied: Vec<String> =
            ["ProtectSystem", "PrivateTmp", "RemoveIPC", "NoNewPrivileges", "RestrictSUIDSGID"]
                .iter()
                .map(|p| format!("{p}={}", self.show(p)))
                .collect();
        let implied_ok = implied
            .iter()
            .all(|p| p.ends_with("=strict") || p.ends_with("=yes") || p.ends_with("=disconnected"));
        let pass = uid.parse::<u32>().is_ok_and(|u| (61184..=65519).contains(&u))
            && name == "mqtt-gateway"
            && connections >= 1
            && plugin == "unix_socket"
            && nnp == "1"
            && implied_ok;
        Ok(Row {
            check: "dynamicuser-unix-socket",
            pass,
            measured: format!(
                "uid {uid} ({name}), {connections} connections as 'mqtt-gateway'@'localhost' via {plugin}, NoNewPrivs={nnp}; \
                 implied by DynamicUser: {}",
                implied.join(" ")
            ),
        })
    }

    /// `systemctl reload` returns once the new flow is subscribed, also when the flows query
    /// is held by a table lock.
    fn reload(&self) -> anyhow::Result<Row> {
        self.ok("systemctl stop mqtt-gateway")?;
        self.drop_in("slow", &["Environment=FLOWS_RELOAD_INTERVAL_SECONDS=3600"])?;
        self.ok("systemctl start mqtt-gateway")?;
        let pid = self.show("MainPID");
        let mut notes = Vec::new();
        let unit_type = self.show("Type");
        let mut pass = unit_type == "notify-reload";
        for (k, held) in [(1, false), (2, true)] {
            let topic = format!("r/{k}");
            self.add_flow(&format!("R{k}"), &topic)?;
            if held {
                self.ok("(mariadb mqtt_gateway -e 'LOCK TABLES flows WRITE; SELECT SLEEP(2); UNLOCK TABLES') >/dev/null 2>&1 &")?;
                std::thread::sleep(Duration::from_millis(300));
            }
            let cursor = self.cursor()?;
            let started = Instant::now();
            let rc = self.c.sh("systemctl reload mqtt-gateway").code;
            let took = started.elapsed();
            // Read at once: the subscription must be in the journal before reload returned.
            let subscribed = self
                .journal_since(&cursor, "-u mqtt-gateway -o cat")
                .contains(&format!("Subscribed to {topic}"));
            self.publish(&topic, r#"{"temperature": 2}"#)?;
            let stored = self
                .wait("the reading", Duration::from_secs(10), || {
                    self.count(&format!("SELECT COUNT(*) FROM data WHERE flow_code = 'R{k}'")) == 1
                })
                .is_ok();
            pass &= rc == 0 && subscribed && stored && (!held || took >= Duration::from_millis(1500));
            notes.push(format!(
                "{}reload rc={rc} in {:.0} ms, subscribed before it returned: {subscribed}, stored: {stored}",
                if held { "flows locked 2 s: " } else { "" },
                took.as_secs_f64() * 1000.0
            ));
        }
        pass &= self.show("MainPID") == pid;
        Ok(Row {
            check: "reload",
            pass,
            measured: format!("Type={unit_type}; {}; same process", notes.join("; ")),
        })
    }

    /// `journalctl FLOW_CODE=...`, `TOPIC=...` and `ERROR_KIND=...` find the gateway's lines,
    /// without a prefix.
    fn journal(&self) -> anyhow::Result<Row> {
        self.add_flow("J_FLOW", "j/x")?;
        self.ok("systemctl reload mqtt-gateway")?;
        let cursor = self.cursor()?;
        self.publish("j/x", "not json")?;
        self.publish("j/x", r#"{"temperature": "hot"}"#)?;
        let by_flow = || self.journal_since(&cursor, "-u mqtt-gateway -o cat FLOW_CODE=J_FLOW");
        self.wait("the per-flow error line", Duration::from_secs(10), || {
            by_flow().contains("Error processing topic j/x")
        })
        .ok();
        let flow_lines = by_flow();
        let topic_lines = self.journal_since(&cursor, "-u mqtt-gateway -o cat TOPIC=j/x");
        let prefixed = self.journal_since(&cursor, "-u mqtt-gateway -o cat F_FLOW_CODE=J_FLOW");
        let invalid = topic_lines.contains("Invalid payload in topic j/x");
        let kinds = [
            ("invalid_payload", "Invalid payload in topic j/x"),
            ("invalid_for_flow", "Error processing topic j/x"),
        ];
        let kinds_found = kinds
            .iter()
            .filter(|(kind, line)| {
                self.journal_since(&cursor, &format!("-u mqtt-gateway -o cat ERROR_KIND={kind}"))
                    .contains(line)
            })
            .count();
        let pass = flow_lines.contains("Error processing topic j/x")
            && invalid
            && prefixed.trim().is_empty()
            && kinds_found == kinds.len();
        Ok(Row {
            check: "journal-fields",
            pass,
            measured: format!(
                "FLOW_CODE=J_FLOW: {} lines; TOPIC=j/x: {} lines (Invalid payload among them: {invalid}); F_FLOW_CODE: {} lines; ERROR_KIND: {kinds_found} of {} kinds found",
                flow_lines.lines().count(),
                topic_lines.lines().count(),
                prefixed.lines().count(),
                kinds.len()
            ),
        })
    }

    /// `data` locked for a minute is the database not taking writes, not a stuck gateway: it
    /// holds and says so, the watchdog is fed throughout (no timeout, no restart), and every
    /// reading of a QoS 1 stream is stored, once, after the lock goes.
    fn watchdog_lock_wait(&self) -> anyhow::Result<Row> {
        self.ok("systemctl stop mqtt-gateway")?;
        self.drop_in("watchdog", &["WatchdogSec=3"])?;
        self.add_flow("W_STREAM", "w/seq")?;
        self.ok("systemctl start mqtt-gateway")?;
        let restarts_before: u32 = self.show("NRestarts").parse().unwrap_or(0);
        let cursor = self.cursor()?;
        // A reading every 150 ms: the stream lasts as long as the lock.
        let n = 400;
        self.stream("w/seq", 1, n, 150)?;
        std::thread::sleep(Duration::from_secs(2));
        self.ok("(mariadb mqtt_gateway -e 'LOCK TABLES data WRITE; SELECT SLEEP(60); UNLOCK TABLES') >/dev/null 2>&1 &")?;
        let journal = || self.journal_since(&cursor, "-u mqtt-gateway -o cat");
        let held = self
            .wait("the hold in the journal", Duration::from_secs(30), || {
                journal().contains("Database cannot take writes")
            })
            .is_ok();
        let status = self
            .wait("the status line", Duration::from_secs(30), || {
                self.show("StatusText").contains("lock wait")
            })
            .map(|_| self.show("StatusText"))
            .unwrap_or_else(|_| self.show("StatusText"));
        let distinct =
            || self.count("SELECT COUNT(DISTINCT attribute_value) FROM data WHERE flow_code = 'W_STREAM'");
        let waited = self
            .wait("every reading after the lock", Duration::from_secs(150), || distinct() == i64::from(n));
        let rows = self.count("SELECT COUNT(*) FROM data WHERE flow_code = 'W_STREAM'");
        let resumed = journal().contains("Database takes writes again");
        let timeouts = self.journal_since(&cursor, "_PID=1 -o cat").matches("Watchdog timeout").count();
        let restarts = self.show("NRestarts").parse::<u32>().unwrap_or(0) - restarts_before;
        let state = self.show("ActiveState");
        let pass = waited.is_ok()
            && held
            && status.contains("lock wait")
            && resumed
            && timeouts == 0
            && restarts == 0
            && rows == distinct()
            && state == "active";
        self.ok(&format!("rm -f {DROP_IN}/watchdog.conf && systemctl daemon-reload"))?;
        Ok(Row {
            check: "watchdog-lock-wait",
            pass,
            measured: format!(
                "data locked 60 s (WatchdogSec=3): {timeouts} watchdog timeouts, {restarts} restarts; hold in the \
                 journal: {held}, resumed: {resumed}; status {status:?}; {}/{n} readings stored, {} duplicates; \
                 state {state}",
                distinct(),
                rows - distinct()
            ),
        })
    }

    /// A task that stops turning with nothing outstanding is stuck: the debug build's fault
    /// switch wedges the processor on a QoS 0 message (gone after the restart), the watchdog
    /// starves, systemd restarts the gateway, and every reading of a QoS 1 stream is stored.
    fn watchdog_wedged_task(&self) -> anyhow::Result<Row> {
        self.ok("systemctl stop mqtt-gateway")?;
        self.drop_in(
            "watchdog",
            &[
                "WatchdogSec=3",
                "ExecStart=",
                "ExecStart=/usr/local/bin/mqtt-gateway-debug",
                "Environment=MQTT_GATEWAY_TEST_WEDGE_ON_TOPIC=w/wedge",
            ],
        )?;
        self.add_flow("W_WEDGE", "w/wedge")?;
        self.add_flow("W_AROUND", "w/around")?;
        self.ok("systemctl start mqtt-gateway")?;
        let restarts_before: u32 = self.show("NRestarts").parse().unwrap_or(0);
        let cursor = self.cursor()?;
        let n = 200;
        self.stream("w/around", 1, n, 50)?;
        std::thread::sleep(Duration::from_secs(2));
        self.ok(r#"mosquitto_pub -h 127.0.0.1 -q 0 -t w/wedge -m '{"temperature": 0}'"#)?;
        let restarts = || self.show("NRestarts").parse::<u32>().unwrap_or(0) - restarts_before;
        let restarted = self.wait("a restart", Duration::from_secs(30), || restarts() >= 1);
        let distinct =
            || self.count("SELECT COUNT(DISTINCT attribute_value) FROM data WHERE flow_code = 'W_AROUND'");
        let waited = self.wait("every reading", Duration::from_secs(90), || distinct() == i64::from(n));
        self.wait("the unit active again", Duration::from_secs(30), || self.show("ActiveState") == "active")
            .ok();
        let stuck = self.journal_since(&cursor, "-u mqtt-gateway -o cat").contains("the processor is stuck");
        let timeouts = self.journal_since(&cursor, "_PID=1 -o cat").matches("Watchdog timeout").count();
        let rows = self.count("SELECT COUNT(*) FROM data WHERE flow_code = 'W_AROUND'");
        let state = self.show("ActiveState");
        let pass = restarted.is_ok() && waited.is_ok() && stuck && timeouts >= 1 && state == "active";
        self.ok(&format!("rm -f {DROP_IN}/watchdog.conf && systemctl daemon-reload"))?;
        Ok(Row {
            check: "watchdog-wedged-task",
            pass,
            measured: format!(
                "processor wedged (debug build, WatchdogSec=3): \"stuck\" logged: {stuck}, {timeouts} watchdog \
                 timeouts, {} restarts; {}/{n} readings stored ({} duplicates, QoS 1 allows them), state {state}",
                restarts(),
                distinct(),
                rows - distinct()
            ),
        })
    }

    fn security(&self) -> anyhow::Result<Row> {
        self.use_unit("nixos-gateway")?;
        self.ok("systemctl start mqtt-gateway")?;
        let score = self.security_score()?;
        Ok(Row {
            check: "security",
            pass: score <= 2.0,
            measured: format!("systemd-analyze security on the live unit: {score}"),
        })
    }

    /// SIGTERM while a stream flows: STOPPING=1, exit 0 quickly, and nothing lost across the
    /// stop and the next start.
    fn stop_under_load(&self) -> anyhow::Result<Row> {
        self.add_flow("S_STREAM", "s/seq")?;
        self.ok("systemctl reload mqtt-gateway")?;
        let pid = self.show("MainPID");
        self.ok("systemctl log-level debug")?;
        let cursor = self.cursor()?;
        let n = 200;
        self.stream("s/seq", 1, n, 20)?;
        std::thread::sleep(Duration::from_millis(1500));
        let started = Instant::now();
        let rc = self.c.sh("systemctl stop mqtt-gateway").code;
        let took = started.elapsed();
        self.ok("systemctl log-level info")?;
        let status = self.show("ExecMainStatus");
        let result = self.show("Result");
        let stopping = self
            .journal_since(&cursor, "_PID=1 -o cat")
            .lines()
            .any(|l| l.contains(&format!("notification message from PID {pid}")) && l.contains("STOPPING=1"));
        self.ok("systemctl start mqtt-gateway")?;
        let distinct =
            || self.count("SELECT COUNT(DISTINCT attribute_value) FROM data WHERE flow_code = 'S_STREAM'");
        let all =
            self.wait("the whole stream", Duration::from_secs(60), || distinct() == i64::from(n)).is_ok();
        let pass = rc == 0 && status == "0" && result == "success" && stopping && all;
        Ok(Row {
            check: "stop-under-load",
            pass,
            measured: format!(
                "stop rc={rc} in {:.0} ms, STOPPING=1: {stopping}, exit status {status}, Result={result}; \
                 {}/{n} readings stored across stop and start",
                took.as_secs_f64() * 1000.0,
                distinct()
            ),
        })
    }

    /// The broker down for a minute when the unit starts: it keeps restarting, never
    /// `failed`, and is active once the broker is back, by itself.
    fn broker_down_at_start(&self) -> anyhow::Result<Row> {
        self.ok(
            "systemctl stop mqtt-gateway; systemctl reset-failed mqtt-gateway; systemctl stop mosquitto",
        )?;
        let down = Instant::now();
        self.ok("systemctl start --no-block mqtt-gateway")?;
        let mut failed_seen = false;
        while down.elapsed() < Duration::from_secs(60) {
            failed_seen |= self.show("ActiveState") == "failed";
            std::thread::sleep(Duration::from_secs(1));
        }
        let restarts_while_down = self.show("NRestarts");
        self.ok("systemctl start mosquitto")?;
        let back = Instant::now();
        let active = self.wait("the gateway back", Duration::from_secs(90), || {
            let state = self.show("ActiveState");
            failed_seen |= state == "failed";
            state == "active"
        });
        let pass = !failed_seen && active.is_ok() && restarts_while_down.parse::<u32>().unwrap_or(0) > 5;
        Ok(Row {
            check: "broker-down-at-start",
            pass,
            measured: format!(
                "broker down 60 s: {restarts_while_down} restarts, failed at any time: {failed_seen}; active {} after the \
                 broker came back",
                match active {
                    Ok(_) => format!("{:.1} s", back.elapsed().as_secs_f64()),
                    Err(_) => "NOT within 90 s".to_owned(),
                }
            ),
        })
    }

    /// The remote-database unit: the password through LoadCredential, and nowhere else.
    fn credential(&self) -> anyhow::Result<Row> {
        self.ok("systemctl stop mqtt-gateway")?;
        self.sql(
            "mysql",
            &format!(
                "CREATE DATABASE IF NOT EXISTS gateway;\nCREATE USER IF NOT EXISTS 'gateway'@'%' IDENTIFIED BY '{PASSWORD}';\n\
                 GRANT ALL ON gateway.* TO 'gateway'@'%';"
            ),
        )?;
        self.ok(&format!("(umask 077; printf '%s' '{PASSWORD}' > /etc/gateway-db-password)"))?;
        self.use_unit("nixos-remote-database")?;
        // The module names the client key `%d/mqtt-client-key`: %d must reach the process as
        // the credentials directory.
        self.drop_in("specifier", &["Environment=E2E_CREDENTIALS=%d"])?;
        let cursor = self.cursor()?;
        let rc = self.c.sh("systemctl start mqtt-gateway").code;
        let ready = self.journal_since(&cursor, "-u mqtt-gateway -o cat").contains("Gateway ready");
        let pid = self.show("MainPID");
        let expanded = self
            .ok(&format!("tr '\\0' '\\n' < /proc/{pid}/environ | sed -n 's/^E2E_CREDENTIALS=//p'"))?
            .trim()
            .to_owned();
        let credentials = self
            .ok(&format!("ls {expanded}"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(",");
        let places = [
            ("systemctl show", "systemctl show mqtt-gateway".to_owned()),
            ("systemctl cat", "systemctl cat mqtt-gateway".to_owned()),
            ("journal", "journalctl -o export --no-pager".to_owned()),
            ("environ", format!("tr '\\0' '\\n' < /proc/{pid}/environ")),
            ("cmdline", format!("tr '\\0' '\\n' < /proc/{pid}/cmdline")),
        ];
        let mut leaks = Vec::new();
        for (place, command) in places {
            let found = self
                .c
                .sh(&format!("{command} | grep -acF '{PASSWORD}'"))
                .stdout
                .trim()
                .parse::<u32>()
                .unwrap_or(1);
            if found > 0 {
                leaks.push(place);
            }
        }
        let score = self.security_score()?;
        self.ok("systemctl stop mqtt-gateway")?;
        let pass = rc == 0
            && ready
            && leaks.is_empty()
            && score <= 2.0
            && expanded == "/run/credentials/mqtt-gateway.service"
            && credentials == "db-password";
        Ok(Row {
            check: "credential-remote-db",
            pass,
            measured: format!(
                "start rc={rc}, ready: {ready}; password found in: {}; security {score}; %d = {expanded} holding {credentials}",
                if leaks.is_empty() { "nowhere".to_owned() } else { leaks.join(", ") }
            ),
        })
    }

    /// The Debian unit with its settings file: ready, stores, reloads, hardened; with the
    /// credentials drop-in, a TCP database with a password.
    fn debian_unit(&self) -> anyhow::Result<Row> {
        self.use_unit("debian")?;
        let rc = self.c.sh("systemctl start mqtt-gateway").code;
        self.publish("t/ready", r#"{"temperature": 7.5}"#)?;
        let stored = self
            .wait("the reading", Duration::from_secs(10), || {
                self.count(
                    "SELECT COUNT(*) FROM data WHERE flow_code = 'T_READY' AND attribute_value = '7.5'",
                ) == 1
            })
            .is_ok();
        self.add_flow("D_RELOAD", "d/reload")?;
        let cursor = self.cursor()?;
        let reload = self.c.sh("systemctl reload mqtt-gateway").code;
        let reloaded =
            self.journal_since(&cursor, "-u mqtt-gateway -o cat").contains("Subscribed to d/reload");
        let score = self.security_score()?;
        // A remote database (here over TCP to 127.0.0.1) with the password as a credential.
        self.ok(
            "systemctl stop mqtt-gateway && mkdir -p /etc/systemd/system/mqtt-gateway.service.d && \
             cp /etc/gw-units/credentials.conf /etc/systemd/system/mqtt-gateway.service.d/ && \
             cp /etc/gateway-db-password /etc/mqtt-gateway/db-password && \
             sed -i 's/^DB_SOCKET=/#DB_SOCKET=/; s/^DB_NAME=.*/DB_NAME=gateway/; s/^DB_USER=.*/DB_USER=gateway/; \
             s/^#DB_HOST=.*/DB_HOST=127.0.0.1/' /etc/mqtt-gateway/mqtt-gateway.env && systemctl daemon-reload",
        )?;
        let cursor = self.cursor()?;
        let remote_rc = self.c.sh("systemctl start mqtt-gateway").code;
        let remote_ready = self.journal_since(&cursor, "-u mqtt-gateway -o cat").contains("Gateway ready");
        let leak =
            self.c.sh(&format!("systemctl show mqtt-gateway | grep -cF '{PASSWORD}'")).stdout.trim() != "0";
        self.ok("systemctl stop mqtt-gateway && rm -rf /etc/systemd/system/mqtt-gateway.service.d && systemctl daemon-reload")?;
        let pass = rc == 0
            && stored
            && reload == 0
            && reloaded
            && score <= 2.0
            && remote_rc == 0
            && remote_ready
            && !leak;
        Ok(Row {
            check: "debian-unit",
            pass,
            measured: format!(
                "start rc={rc}, stored: {stored}; reload rc={reload}, subscribed before it returned: {reloaded}; \
                 security {score}; with credentials.conf and a TCP database: start rc={remote_rc}, ready: {remote_ready}, \
                 password in systemctl show: {leak}"
            ),
        })
    }
}
