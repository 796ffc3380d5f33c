//! Logging: the Python service's line format, on stderr and in its daily files.
//!
//! Operators grep `YYYY-MM-DD HH:MM:SS | LEVEL | mqtt_gateway | message` lines, so the format and
//! the message texts are kept word for word. Stderr gets every level `RUST_LOG` allows (default
//! `info`); when `LOG_DIR` is set, ERROR and above also go to `LOG_DIR/YYYY-MM-DD.log`, a new
//! file each local day, as the original wrote them. Under systemd the same messages go to the
//! journal with their structured fields instead of stderr; `LOG_FORMAT=json` writes JSON lines.

use chrono::{Local, NaiveDate};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter::LevelFilter, EnvFilter, Layer};

/// The logger name of the original; operators' filters match on it.
const LOGGER: &str = "mqtt_gateway";

/// Where and how lines are written, from `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The original's text lines on stderr.
    Text,
    /// One JSON object per line on stderr, with every structured field.
    Json,
    /// Straight to the journal, with structured fields (`FLOW_CODE`, `TOPIC`, `MSG_ID`, ...)
    /// that `journalctl -u mqtt-gateway FLOW_CODE=...` filters on.
    Journald,
}

impl Format {
    /// `LOG_FORMAT` when set; otherwise the journal when stderr is connected to it (systemd
    /// sets `JOURNAL_STREAM` to the device and inode of that stream), else text.
    pub fn from_env() -> Result<Format, String> {
        match std::env::var("LOG_FORMAT").ok().as_deref().map(str::trim) {
            Some("text") => Ok(Format::Text),
            Some("json") => Ok(Format::Json),
            Some("journald") => Ok(Format::Journald),
            Some("") | None => Ok(if stderr_is_journal() { Format::Journald } else { Format::Text }),
            Some(other) => Err(format!(
                "invalid environment variable LOG_FORMAT: {other:?} is not text, json or journald"
            )),
        }
    }
}

fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else { return false };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else { return false };
    stream == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// Installs the global subscriber. Fails only when `LOG_DIR` cannot be created.
pub fn init(log_dir: Option<&Path>, format: Format) -> io::Result<()> {
    let filter = || {
        EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .from_env_lossy()
            // Dependencies speak up only for warnings unless RUST_LOG names them.
            .add_directive("sqlx=warn".parse().expect("static directive"))
            .add_directive("rumqttc=warn".parse().expect("static directive"))
    };
    let text = (format == Format::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .event_format(PythonFormat)
            .with_writer(io::stderr)
            .with_filter(filter())
    });
    let json = (format == Format::Json)
        .then(|| tracing_subscriber::fmt::layer().json().with_writer(io::stderr).with_filter(filter()));
    let journald = match format {
        Format::Journald => Some(
            tracing_journald::layer()?
                .with_syslog_identifier("mqtt-gateway".to_owned())
                // tracing-journald prefixes fields with `F_` by default; operators filter on
                // the documented names (`journalctl FLOW_CODE=...`). None of our field names
                // collides with a journal field (MESSAGE, PRIORITY, CODE_*, TARGET, ...).
                .with_field_prefix(None)
                .with_filter(filter()),
        ),
        _ => None,
    };
    let file = match log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Some(
                tracing_subscriber::fmt::layer()
                    .event_format(PythonFormat)
                    .with_writer(DailyFile::new(dir.to_owned()))
                    .with_filter(LevelFilter::ERROR),
            )
        }
        None => None,
    };
    // A second init (tests calling run twice in one process) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(text).with(json).with(journald).with(file).try_init();
    Ok(())
}

/// `2026-11-25 10:00:00 | ERROR | mqtt_gateway | message`, in local time like Python's
/// `logging.Formatter` with `datefmt="%Y-%m-%d %H:%M:%S"`.
struct PythonFormat;

impl<S, N> FormatEvent<S, N> for PythonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let level = match *meta.level() {
            Level::ERROR => "ERROR",
            Level::WARN => "WARNING",
            Level::INFO => "INFO",
            Level::DEBUG | Level::TRACE => "DEBUG",
        };
        let target = meta.target();
        let logger = if target.starts_with(LOGGER) { LOGGER } else { target };
        let mut message = MessageOnly(String::new());
        event.record(&mut message);
        writeln!(w, "{} | {level} | {logger} | {}", Local::now().format("%Y-%m-%d %H:%M:%S"), message.0)
    }
}

/// Keeps only the message: the structured fields are for the journal and JSON outputs, and the
/// text line must stay exactly what operators' greps expect.
struct MessageOnly(String);

impl tracing::field::Visit for MessageOnly {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}

/// `LOG_DIR/YYYY-MM-DD.log`, switching files at local midnight. tracing-appender's daily
/// rotation names files by the UTC date, which would split a local day across two files.
struct DailyFile {
    dir: PathBuf,
    current: Mutex<Option<(NaiveDate, File)>>,
}

impl DailyFile {
    fn new(dir: PathBuf) -> DailyFile {
        DailyFile { dir, current: Mutex::new(None) }
    }
}

impl<'a> MakeWriter<'a> for DailyFile {
    type Writer = DailyFileWriter<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        DailyFileWriter { file: self }
    }
}

struct DailyFileWriter<'a> {
    file: &'a DailyFile,
}

impl Write for DailyFileWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let today = Local::now().date_naive();
        let mut current = self.file.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_none_or(|(day, _)| *day != today) {
            let path = self.file.dir.join(format!("{}.log", today.format("%Y-%m-%d")));
            let file = OpenOptions::new().create(true).append(true).open(path)?;
            *current = Some((today, file));
        }
        let (_, file) = current.as_mut().expect("opened above");
        // One write per formatted line keeps lines whole when several tasks log at once.
        file.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
