//! Numeric settings out of range: the binary, service or subcommand, ends with one line naming
//! the variable (or the option) and exit status 1, never a panic. (The property test over every numeric variable
//! is in `src/config.rs`; these prove the binary reports what the configuration refuses.)

use crate::harness::*;
use rstest::rstest;

/// A configuration that gets as far as the numeric checks; nothing is listening behind it.
fn vars(name: &str, value: &str) -> Vec<(String, String)> {
    [("DB_HOST", "127.0.0.1"), ("DB_NAME", "gw"), ("DB_USER", "gw"), ("DB_PASSWORD", "pw"), (name, value)]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[rstest]
#[case::duration_overflow("HTTP_TIMEOUT_SECONDS", "1e30")]
#[case::not_a_number("HTTP_RETRY_MAX_DELAY_SECONDS", "NaN")]
#[case::huge_count("MAX_IN_FLIGHT", "18446744073709551615")]
#[case::negative("BATCH_MAX_DELAY_MS", "-1")]
#[case::huge_interval("FLOWS_RELOAD_INTERVAL_SECONDS", "9223372036854775807")]
fn an_out_of_range_setting_is_one_fatal_line_and_exit_1(#[case] name: &str, #[case] value: &str) {
    let (code, out, err) = run_cli(&vars(name, value), &[]);
    let lines: Vec<&str> = out.lines().chain(err.lines()).filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(lines.len(), 1, "one line, no panic: {lines:#?}");
    assert!(
        lines[0].contains(&format!(
            "| ERROR | mqtt_gateway | Fatal error during startup: invalid environment variable {name}: "
        )),
        "{}",
        lines[0]
    );
}

#[test]
fn a_subcommand_refuses_it_the_same_way() {
    let (code, out, err) = run_cli(&vars("HTTP_TIMEOUT_SECONDS", "inf"), &["check"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.trim().starts_with("error: invalid environment variable HTTP_TIMEOUT_SECONDS: must be"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test]
async fn a_status_interval_beyond_range_is_an_error_not_a_panic() {
    let env = TestEnv::new().await;
    for interval in ["1e30", "NaN", "inf", "0"] {
        let (code, out, err) = env.command(&["status", "--interval", interval]);
        assert_eq!((code, out.as_str()), (1, ""), "{interval}: {err}");
        assert!(err.trim().starts_with("error: --interval must be a number of seconds"), "{interval}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
