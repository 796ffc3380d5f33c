//! A page screenshot with headless Chromium (Debian package `chromium`), for the pictures in
//! `docs/`: a fresh profile, and none of the background connections this machine's closed
//! network refuses.

use std::path::Path;

/// Saves a PNG of `url`, `width` by `height` pixels, at `out`.
pub fn screenshot(url: &str, out: &Path, width: u32, height: u32) -> anyhow::Result<()> {
    let chromium = crate::require_program("chromium", "chromium")?;
    let profile = tempfile::tempdir()?;
    let status = std::process::Command::new(chromium)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--window-size={width},{height}"))
        .arg("--virtual-time-budget=15000")
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        // Headless Chromium complains at length about the missing D-Bus; the status says enough.
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "chromium failed ({status})");
    Ok(())
}
