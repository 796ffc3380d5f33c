//! Log lines: the original's format on stderr, ERROR lines in daily files under LOG_DIR.

use crate::harness::*;

fn is_python_line(line: &str, level: &str) -> bool {
    let Some((stamp, rest)) = line.split_at_checked(19) else {
        return false;
    };
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y-%m-%d %H:%M:%S").is_ok()
        && rest.starts_with(&format!(" | {level} | mqtt_gateway | "))
}

#[tokio::test]
async fn log_dir_gets_a_daily_file_with_error_lines_only() {
    let mut env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    env.set("LOG_DIR", log_dir.to_str().unwrap());
    let topic = env.topic("t");
    env.add_flow("F", &topic, "STORE_DB", "{}", None).await;
    let gateway = env.start().await;
    publish(&topic, &[b"not json"]).await;
    wait_log(&gateway, "Invalid payload in topic").await;

    let file = log_dir.join(format!("{}.log", chrono::Local::now().format("%Y-%m-%d")));
    eventually("the daily log file", || file.exists()).await;
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "only ERROR lines go to the file:\n{text}");
    assert!(is_python_line(lines[0], "ERROR"), "{}", lines[0]);
    assert!(
        lines[0].ends_with(&format!(
            "Invalid payload in topic {topic}: payload is not valid JSON: expected ident at line 1 column 2"
        )),
        "{}",
        lines[0]
    );

    let ready = gateway.logs().lines().find(|l| l.contains("Gateway ready")).unwrap().to_owned();
    assert!(is_python_line(&ready, "INFO"), "stderr uses the same format: {ready}");
}
