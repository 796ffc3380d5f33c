//! The Debian unit (`dist/systemd/mqtt-gateway.service`) against the unit the NixOS module
//! renders (`nixos/rendered/gateway.service`, kept current by the offline kit's drift check):
//! the same service settings and hardening, line for line, except the lines that are about
//! where things live on each system. And the Prometheus files of `dist/prometheus/`: the rules
//! are the ones `monitoring/` tests and the Nix package installs, loaded by the example
//! configuration under the job name they expect.

use std::collections::BTreeSet;

const RENDERED: &str = include_str!("../nixos/rendered/gateway.service");
const DEBIAN: &str = include_str!("../dist/systemd/mqtt-gateway.service");

/// The `key=value` lines of one section, comments and blank lines left out.
fn section<'a>(unit: &'a str, name: &str) -> BTreeSet<&'a str> {
    let header = format!("[{name}]");
    unit.lines()
        .skip_while(|l| l.trim() != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Lines that differ by design: paths and the site's settings.
fn is_local(line: &str) -> bool {
    ["ExecStart=", "EnvironmentFile=", "Environment=", "Environment=\"", "LoadCredential="]
        .iter()
        .any(|p| line.starts_with(p))
}

#[test]
fn the_debian_unit_has_the_modules_service_settings() {
    let rendered: BTreeSet<_> = section(RENDERED, "Service").into_iter().filter(|l| !is_local(l)).collect();
    let debian: BTreeSet<_> = section(DEBIAN, "Service").into_iter().filter(|l| !is_local(l)).collect();
    assert!(rendered.len() > 30, "the rendered unit was not read");
    let missing: Vec<_> = rendered.difference(&debian).collect();
    let extra: Vec<_> = debian.difference(&rendered).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing in the Debian unit: {missing:?}; only there: {extra:?}"
    );
}

#[test]
fn the_debian_unit_never_gives_up_and_logs_to_the_journal() {
    assert!(section(DEBIAN, "Unit").contains("StartLimitIntervalSec=0"));
    assert_eq!(
        section(RENDERED, "Unit").contains("StartLimitIntervalSec=0"),
        section(DEBIAN, "Unit").contains("StartLimitIntervalSec=0")
    );
    assert!(section(DEBIAN, "Service").contains("Environment=\"LOG_FORMAT=journald\""));
    assert!(section(DEBIAN, "Service").contains("ExecStart=/usr/local/bin/mqtt-gateway"));
    assert_eq!(section(DEBIAN, "Install"), section(RENDERED, "Install"));
}

#[test]
fn the_debian_prometheus_files_load_the_shipped_rules_for_the_job_they_expect() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shipped = std::fs::read_to_string(root.join("monitoring/mqtt-gateway.rules.yml")).unwrap();
    let debian = std::fs::read_to_string(root.join("dist/prometheus/mqtt-gateway.rules.yml")).unwrap();
    assert!(
        debian == shipped,
        "dist/prometheus/mqtt-gateway.rules.yml is not monitoring/mqtt-gateway.rules.yml"
    );
    let example = std::fs::read_to_string(root.join("dist/prometheus/prometheus.yml.example")).unwrap();
    let loaded: Vec<&str> = example
        .lines()
        .skip_while(|l| *l != "rule_files:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    assert_eq!(loaded, ["/etc/prometheus/rules/mqtt-gateway.rules.yml"], "{example}");
    assert!(
        example.contains(&format!("install -D -m 0644 dist/prometheus/mqtt-gateway.rules.yml {}", loaded[0]))
    );
    assert!(shipped.contains(r#"up{job="mqtt-gateway"}"#));
    assert!(example.contains("  - job_name: mqtt-gateway\n"), "{example}");
}
