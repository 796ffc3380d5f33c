//! `cargo xtask rules`: the Prometheus rules the appliance ships (`monitoring/`). `promtool check
//! rules` on the rules file, `promtool check config` on the Debian example that loads them,
//! `promtool test rules` on `monitoring/tests/`, and two checks of our own that promtool cannot
//! make: every alert has a test case in which it fires and one in which it must not, and every
//! gateway series the rules read is one `src/metrics.rs` declares.

use crate::packages::{self, program};
use crate::{root, run};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The rules file, relative to the workspace root.
const RULES: &str = "monitoring/mqtt-gateway.rules.yml";
/// The promtool unit tests: every `*.test.yml` there.
const TESTS: &str = "monitoring/tests";
/// What a Debian Prometheus adds to its configuration for the gateway.
const DEBIAN_EXAMPLE: &str = "dist/prometheus/prometheus.yml.example";

pub fn rules() -> anyhow::Result<()> {
    packages::require("rules")?;
    let promtool = program("promtool")?;
    run("promtool check rules", Command::new(&promtool).args(["check", "rules", RULES]))?;
    run(
        "promtool check config --syntax-only (the Debian example)",
        Command::new(&promtool).args(["check", "config", "--syntax-only", DEBIAN_EXAMPLE]),
    )?;
    let tests = test_files()?;
    run("promtool test rules", Command::new(&promtool).args(["test", "rules"]).args(&tests))?;

    let rules = std::fs::read_to_string(root().join(RULES)).with_context(|| format!("read {RULES}"))?;
    let mut cases = Cases::default();
    for test in &tests {
        let text = std::fs::read_to_string(root().join(test)).with_context(|| format!("read {test}"))?;
        cases.read(&text);
    }
    let mut problems = cases.missing(&alerts(&rules));
    let metrics = std::fs::read_to_string(root().join("src/metrics.rs")).context("read src/metrics.rs")?;
    let declared = series_names(&metrics);
    for name in series_names(&rules) {
        if !declared.contains(&name) {
            problems.push(format!("{RULES} reads {name}, which src/metrics.rs does not declare"));
        }
    }
    if !problems.is_empty() {
        bail!("the rules' tests are incomplete:\n  {}", problems.join("\n  "));
    }
    eprintln!(
        "==> rules: every alert fires in a test and stays quiet in another; every series read is declared"
    );
    Ok(())
}

/// `monitoring/tests/*.test.yml`, relative to the root, in a stable order.
fn test_files() -> anyhow::Result<Vec<String>> {
    let mut files: Vec<String> = std::fs::read_dir(root().join(TESTS))
        .with_context(|| format!("read {TESTS}"))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".test.yml"))
        .map(|name| format!("{TESTS}/{name}"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{TESTS} has no *.test.yml");
    }
    Ok(files)
}

/// The names of the alerting rules (`- alert: NAME`).
fn alerts(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect()
}

/// Every `mqtt_gateway_...` name in a text: the gateway's own series (recording rules are
/// `mqtt_gateway:...`, which this does not match).
fn series_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("mqtt_gateway_"))
        .map(str::to_owned)
        .collect()
}

/// Which alerts the unit tests expect to fire (`exp_alerts:` with entries) and to stay quiet
/// (`exp_alerts: []`), read from `alert_rule_test` cases as the test files write them.
#[derive(Default)]
struct Cases {
    /// alert name -> (a case where it fires, a case where it does not)
    seen: BTreeMap<String, (bool, bool)>,
}

impl Cases {
    fn read(&mut self, test: &str) {
        let mut alert: Option<&str> = None;
        for line in test.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix("alertname:") {
                alert = Some(name.trim());
            } else if let (Some(name), Some(expected)) = (alert, line.strip_prefix("exp_alerts:")) {
                let entry = self.seen.entry(name.to_owned()).or_default();
                if expected.trim() == "[]" {
                    entry.1 = true;
                } else {
                    entry.0 = true;
                }
                alert = None;
            }
        }
    }

    fn missing(&self, alerts: &[String]) -> Vec<String> {
        let mut problems = Vec::new();
        for alert in alerts {
            let (fires, quiet) = self.seen.get(alert).copied().unwrap_or_default();
            if !fires {
                problems.push(format!("{alert}: no test case in which it fires (exp_alerts with an alert)"));
            }
            if !quiet {
                problems.push(format!("{alert}: no test case in which it must not fire (exp_alerts: [])"));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_without_a_quiet_case_is_named() {
        let mut cases = Cases::default();
        cases.read(
            "alert_rule_test:\n  - eval_time: 5m\n    alertname: A\n    exp_alerts:\n      - exp_labels: {}\n\
             \n  - eval_time: 1m\n    alertname: B\n    exp_alerts: []\n",
        );
        let problems = cases.missing(&["A".to_owned(), "B".to_owned(), "C".to_owned()]);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].starts_with("A: no test case in which it must not fire"), "{problems:?}");
        assert!(problems[1].starts_with("B: no test case in which it fires"), "{problems:?}");
        assert!(problems[2].starts_with("C: no test case in which it fires"), "{problems:?}");
    }

    #[test]
    fn series_names_leave_recording_rules_out() {
        let names = series_names("max by (job) (mqtt_gateway_outbox_dead) > mqtt_gateway:outbox_dead:max");
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["mqtt_gateway_outbox_dead"]);
    }
}
