//! One source of truth for the settings: every environment variable the gateway reads is
//! declared in `src/config.rs` (the fields of `Raw`), documented in the README's configuration
//! tables and set by an option of `nixos/module.nix`. This test reads the three files (no
//! services) and fails when they disagree, naming the variable and the file to change.
//!
//! `tests/nixos_options.rs` checks the other direction for the module (every variable it sets
//! is parsed, with every value its option admits).

use std::collections::BTreeSet;
use std::path::Path;

const CONFIG: &str = include_str!("../src/config.rs");
const README: &str = include_str!("../README.md");
const MODULE: &str = include_str!("../nixos/module.nix");

/// Settings read outside `config.rs`, and why there.
const READ_OUTSIDE_CONFIG: [(&str, &str); 2] = [
    ("LOG_FORMAT", "src/logging.rs: chosen before the configuration, so its errors can be logged"),
    ("RUST_LOG", "src/logging.rs: tracing's EnvFilter reads it"),
];

/// Variables the code reads that are not settings: an operator never sets them.
const NOT_SETTINGS: [(&str, &str); 6] = [
    ("NOTIFY_SOCKET", "systemd's notify protocol, set by systemd"),
    ("WATCHDOG_USEC", "systemd's watchdog, set by systemd"),
    ("WATCHDOG_PID", "systemd's watchdog, set by systemd"),
    ("JOURNAL_STREAM", "set by systemd when stderr is the journal"),
    ("MQTT_GATEWAY_TEST_PANIC_ON_TOPIC", "fault injection for an end-to-end test"),
    ("MQTT_GATEWAY_TEST_WEDGE_ON_TOPIC", "fault injection for the watchdog tests (debug builds)"),
];

/// Settings the module deliberately has no option for, and how a NixOS user sets them.
const NOT_MODULE_OPTIONS: [(&str, &str); 3] = [
    // Secrets: the module passes the password as a credential, never as a variable.
    ("DB_PASSWORD", "database.passwordFile, passed with LoadCredential as db-password"),
    ("DB_PASSWORD_FILE", "database.passwordFile, passed with LoadCredential as db-password"),
    ("CREDENTIALS_DIRECTORY", "set by systemd from the unit's LoadCredential"),
];

/// The fields of `struct Raw` in `config.rs`, as the variable names envy reads.
fn declared_in_config() -> BTreeSet<String> {
    let start = CONFIG.find("struct Raw {").expect("struct Raw in src/config.rs");
    let body = &CONFIG[start..start + CONFIG[start..].find("\n}").expect("the end of struct Raw")];
    let fields: BTreeSet<String> = body
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.starts_with("#[") && !line.starts_with("//"))
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_ascii_uppercase())
        .collect();
    assert!(fields.len() > 30, "struct Raw was not read: {fields:?}");
    fields
}

/// Every setting: what `config.rs` declares and the few read elsewhere.
fn settings() -> BTreeSet<String> {
    let mut all = declared_in_config();
    all.extend(READ_OUTSIDE_CONFIG.iter().map(|(name, _)| (*name).to_owned()));
    all
}

/// Variables named in the first column of the README's tables under "## Configuration".
fn documented_in_readme() -> BTreeSet<String> {
    let start = README.find("\n## Configuration\n").expect("the README's Configuration section");
    let section = &README[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |end| end + 3)];
    let mut names = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split('|').nth(1).unwrap_or("");
        for quoted in first_cell.split('`').skip(1).step_by(2) {
            names.insert(quoted.to_owned());
        }
    }
    assert!(names.len() > 30, "the README's settings tables were not read: {names:?}");
    names
}

/// The names the module's `environment` block sets.
fn set_by_module() -> BTreeSet<String> {
    let start = MODULE.find("  environment = lib.filterAttrs").expect("the module's environment block");
    let end =
        start + MODULE[start..].find("// cfg.extraEnvironment").expect("the end of the environment block");
    let names: BTreeSet<String> = MODULE[start..end]
        .lines()
        .skip(1)
        .map(str::trim)
        // `NAME = value;`, or `NAME =` with the value on the next line.
        .filter_map(|line| line.split_once(" = ").map(|(name, _)| name).or_else(|| line.strip_suffix(" =")))
        .map(str::to_owned)
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(names.len() > 20, "the environment block was not read: {names:?}");
    names
}

/// `NAME` of every `env::var("NAME")` or `env::var_os("NAME")` in the Rust files under `dir`.
fn read_from_environment(dir: &Path, found: &mut BTreeSet<(String, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            read_from_environment(&path, found);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        for call in ["env::var(\"", "env::var_os(\""] {
            for (at, _) in text.match_indices(call) {
                let rest = &text[at + call.len()..];
                let name = &rest[..rest.find('"').expect("a closing quote")];
                found.insert((name.to_owned(), path.display().to_string()));
            }
        }
    }
}

#[test]
fn every_setting_is_documented_in_the_readme() {
    let readme = documented_in_readme();
    let missing: Vec<_> = settings().into_iter().filter(|name| !readme.contains(name)).collect();
    assert!(
        missing.is_empty(),
        "read by the gateway, missing from the README's Configuration tables: {missing:?}"
    );
}

#[test]
fn the_readme_documents_only_settings_the_gateway_reads() {
    let settings = settings();
    let unknown: Vec<_> =
        documented_in_readme().into_iter().filter(|name| !settings.contains(name)).collect();
    assert!(
        unknown.is_empty(),
        "documented in the README's Configuration tables, read nowhere (not a field of Raw in src/config.rs): {unknown:?}"
    );
}

#[test]
fn every_setting_has_a_module_option_or_a_reason_not_to() {
    let module = set_by_module();
    let missing: Vec<_> = settings()
        .into_iter()
        .filter(|name| !module.contains(name) && !NOT_MODULE_OPTIONS.iter().any(|(n, _)| n == name))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the gateway, set by no option of nixos/module.nix: {missing:?}; add an option, or \
         say in NOT_MODULE_OPTIONS how a NixOS user sets it"
    );
    for (name, _) in NOT_MODULE_OPTIONS {
        assert!(!module.contains(name), "{name} is set by the module now: remove it from NOT_MODULE_OPTIONS");
        assert!(settings().contains(name), "{name} in NOT_MODULE_OPTIONS is not a setting");
    }
}

#[test]
fn settings_are_read_from_the_environment_only_through_config() {
    let mut found = BTreeSet::new();
    read_from_environment(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut found);
    assert!(found.iter().any(|(name, _)| name == "NOTIFY_SOCKET"), "src/ was not scanned: {found:?}");
    let stray: Vec<_> = found
        .into_iter()
        .filter(|(name, _)| {
            !READ_OUTSIDE_CONFIG.iter().any(|(n, _)| n == name)
                && !NOT_SETTINGS.iter().any(|(n, _)| n == name)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "read straight from the environment: {stray:?}; declare it in struct Raw of src/config.rs \
         (or, if an operator never sets it, in NOT_SETTINGS here)"
    );
}
