//! The debug and error logs of a communicator, through `tracing`: events of target `kvtransfer`, each with
//! fields: the communicator and its process (`comm=decode:0 pid=4242`), and where they apply the peer, the
//! request, the layer and the error code ([`Fields`]). Written where `KVCACHE_DEBUG_FILE` and
//! `KVCACHE_ERROR_FILE` say (standard error when unset), as text or, with `KVCACHE_LOG_FORMAT=json`, as one
//! JSON object per line; a binding's [`LogHook`] (Node's `onLog`) gets every line as a [`LogRecord`], in place
//! of standard error. The debug log is written only with `KVCACHE_DEBUG` on; the error log always.
//!
//! Each communicator has its own subscriber (its settings may differ from another's in the same process), used
//! for its events only; an application's global subscriber is left alone.
//!
//! Log files are created with mode 0600 and never through a symbolic link. Lines a peer can cause (refusals) go
//! through [`Logger::error_from`], which writes at most [`PER_PEER`] of them per peer every [`WINDOW`].

use crate::config::{Config, LogFormat, LogHook, LogLevel, LogRecord};
use crate::error::{Error, ErrorCode, Result};
use crate::sync::lock;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Lines [`Logger::error_from`] writes per peer in each [`WINDOW`].
pub const PER_PEER: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(10);
/// Peers whose counts are kept; past that the stale ones are forgotten (and, if none is stale, the oldest).
const PEERS: usize = 4096;

/// What a line is about, besides its communicator: each one set is a field of the line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Fields<'a> {
    /// A prefill's decode (`host:port`), or a decode's prefill (its host).
    pub peer: Option<&'a str>,
    pub request: Option<&'a str>,
    pub layer: Option<u32>,
    pub code: Option<ErrorCode>,
}

/// The logs of one communicator.
pub struct Logger {
    tag: String,
    debug: bool,
    dispatch: Dispatch,
    /// Per peer: when its window began, lines written and lines left out in it.
    peers: Mutex<HashMap<String, (Instant, u32, u64)>>,
    /// The hook lines go to, until [`Logger::unhook`].
    hook: Arc<Mutex<Option<LogHook>>>,
}

/// One event with every field, at a level known when the macro expands (tracing's levels are constants).
macro_rules! line {
    ($level:expr, $tag:expr, $f:expr, $message:expr) => {
        tracing::event!(
            target: "kvtransfer",
            $level,
            comm = %$tag,
            pid = std::process::id(),
            peer = $f.peer,
            request = $f.request,
            layer = $f.layer,
            code = $f.code.map(ErrorCode::as_str),
            "{}",
            $message
        )
    };
}

impl Logger {
    /// Opens the logs the configuration asks for.
    pub fn new(config: &Config, tag: impl Into<String>) -> Result<Logger> {
        let hook = Arc::new(Mutex::new(config.log_hook.clone()));
        // Errors and warnings go to the error log, everything else to the debug log (when it is on).
        let errors = sink(config.error_file.as_deref(), "KVCACHE_ERROR_FILE", &hook)?.with_filter(|m| *m.level() <= Level::WARN);
        let writer = match config.debug {
            true => {
                let debug = sink(config.debug_file.as_deref(), "KVCACHE_DEBUG_FILE", &hook)?.with_filter(|m| *m.level() > Level::WARN);
                BoxMakeWriter::new(errors.and(debug))
            }
            false => BoxMakeWriter::new(errors),
        };
        let hooked = config.log_hook.is_some().then(|| Hooked(hook.clone()));
        let dispatch = dispatch(writer, config.debug, config.log_format, hooked);
        Ok(Logger { tag: tag.into(), debug: config.debug, dispatch, peers: Mutex::default(), hook })
    }

    /// Lets go of the hook (the communicator closed): later lines go only to the log files, if any.
    pub fn unhook(&self) {
        lock(&self.hook).take();
    }

    /// Whether debug lines are written (so callers can skip formatting them).
    pub fn debug_enabled(&self) -> bool {
        self.debug
    }

    /// Writes a line at `level` with `fields` (a debug line only if the debug log is on).
    pub fn log(&self, level: LogLevel, fields: Fields<'_>, message: impl AsRef<str>) {
        if level == LogLevel::Debug && !self.debug {
            return;
        }
        let message = message.as_ref();
        tracing::dispatcher::with_default(&self.dispatch, || match level {
            LogLevel::Error => line!(Level::ERROR, self.tag, fields, message),
            LogLevel::Warn => line!(Level::WARN, self.tag, fields, message),
            LogLevel::Debug => line!(Level::DEBUG, self.tag, fields, message),
        });
    }

    /// Writes a debug line, if the debug log is on.
    pub fn debug(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Debug, Fields::default(), message)
    }

    /// Writes a warning, to the error log.
    pub fn warn(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Warn, Fields::default(), message)
    }

    /// Writes an error line.
    pub fn error(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Error, Fields::default(), message)
    }

    /// Writes an error line that `peer` caused, unless `peer` has had [`PER_PEER`] lines in this [`WINDOW`]
    /// already: a stranger cannot fill the disk through refusals. The next window's first line says how many
    /// were left out.
    pub fn error_from(&self, peer: &str, message: impl AsRef<str>) {
        self.limited(LogLevel::Error, peer, message.as_ref())
    }

    /// Writes a warning about `peer`, within the same allowance as [`Logger::error_from`].
    pub fn warn_from(&self, peer: &str, message: impl AsRef<str>) {
        self.limited(LogLevel::Warn, peer, message.as_ref())
    }

    fn limited(&self, level: LogLevel, peer: &str, message: &str) {
        if let Some(left_out) = self.allowance(peer) {
            let fields = Fields { peer: Some(peer), ..Fields::default() };
            if left_out > 0 {
                self.log(level, fields, format!("{left_out} more lines about {peer} were left out"));
            }
            self.log(level, fields, message);
        }
    }

    /// Counts a line about `peer`: `None` where its allowance in this window is spent, else how many lines the
    /// window before left out.
    fn allowance(&self, peer: &str) -> Option<u64> {
        let mut peers = lock(&self.peers);
        if peers.len() >= PEERS && !peers.contains_key(peer) {
            peers.retain(|_, (start, ..)| start.elapsed() < WINDOW);
            if peers.len() >= PEERS {
                let oldest = peers.iter().min_by_key(|(_, (start, ..))| *start).map(|(k, _)| k.clone());
                peers.remove(&oldest.expect("the map is full"));
            }
        }
        let (start, written, skipped) = peers.entry(peer.to_string()).or_insert((Instant::now(), 0, 0));
        let mut left_out = 0;
        if start.elapsed() >= WINDOW {
            left_out = *skipped;
            (*start, *written, *skipped) = (Instant::now(), 0, 0);
        }
        if *written >= PER_PEER {
            *skipped += 1;
            return None;
        }
        *written += 1;
        Some(left_out)
    }
}

fn dispatch(writer: BoxMakeWriter, debug: bool, format: LogFormat, hook: Option<Hooked>) -> Dispatch {
    let level = if debug { LevelFilter::DEBUG } else { LevelFilter::WARN };
    let lines = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false).with_thread_names(true);
    let lines = match format {
        LogFormat::Text => lines.boxed(),
        LogFormat::Json => lines.json().flatten_event(true).with_current_span(false).with_span_list(false).boxed(),
    };
    let subscriber = tracing_subscriber::registry().with(lines).with(hook).with(level);
    Dispatch::new(subscriber)
}

/// Hands each line to a [`LogHook`], while there is one.
struct Hooked(Arc<Mutex<Option<LogHook>>>);

impl<S: Subscriber> Layer<S> for Hooked {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        // Called outside the lock: a hook may log.
        let Some(hook) = lock(&self.0).clone() else { return };
        let level = match *event.metadata().level() {
            Level::ERROR => LogLevel::Error,
            Level::WARN => LogLevel::Warn,
            _ => LogLevel::Debug,
        };
        let mut record = LogRecord { level, message: String::new(), fields: Vec::new() };
        event.record(&mut Collect(&mut record));
        // A panic in the hook must not take the thread that logged with it.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (hook.0)(&record)));
    }
}

/// Reads an event's fields into a [`LogRecord`].
struct Collect<'a>(&'a mut LogRecord);

impl Visit for Collect<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.0.message = value.to_string(),
            name => self.0.fields.push((name, value.to_string())),
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.0.message = format!("{value:?}"),
            name => self.0.fields.push((name, format!("{value:?}"))),
        }
    }
}

/// Where one log goes: a file appended to, or standard error unless a hook has the lines.
#[derive(Clone)]
enum Sink {
    File(Arc<Mutex<File>>),
    StderrUnhooked(Arc<Mutex<Option<LogHook>>>),
}

fn sink(path: Option<&Path>, variable: &str, hook: &Arc<Mutex<Option<LogHook>>>) -> Result<Sink> {
    let Some(path) = path else { return Ok(Sink::StderrUnhooked(hook.clone())) };
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map(|f| Sink::File(Arc::new(Mutex::new(f))))
        .map_err(|e| {
            let why = match e.raw_os_error() {
                Some(libc::ELOOP) => "it is a symbolic link, which a log never follows".to_string(),
                _ => e.to_string(),
            };
            Error::config(format!("{variable}={}: cannot open for appending: {why}", path.display()))
        })
}

/// One line's writer: a log that cannot be written must not fail the transfer it describes, so write errors
/// are dropped by the formatter.
enum SinkWriter<'a> {
    Stderr(std::io::Stderr),
    File(std::sync::MutexGuard<'a, File>),
    Nowhere,
}

impl std::io::Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SinkWriter::Stderr(s) => s.write(buf),
            SinkWriter::File(f) => f.write(buf),
            SinkWriter::Nowhere => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SinkWriter::Stderr(s) => s.flush(),
            SinkWriter::File(f) => f.flush(),
            SinkWriter::Nowhere => Ok(()),
        }
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter<'a>;
    fn make_writer(&'a self) -> SinkWriter<'a> {
        match self {
            // A poisoned lock only means another line panicked half-written: keep logging.
            Sink::File(f) => SinkWriter::File(lock(f)),
            Sink::StderrUnhooked(hook) if lock(hook).is_some() => SinkWriter::Nowhere,
            Sink::StderrUnhooked(_) => SinkWriter::Stderr(std::io::stderr()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kvt-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn logs_go_to_their_files() {
        let dir = dir("files");
        let cfg = Config {
            debug: true,
            debug_file: Some(dir.join("debug.log")),
            error_file: Some(dir.join("error.log")),
            ..Config::default()
        };
        let log = Logger::new(&cfg, "decode:0").unwrap();
        log.debug("hello debug");
        log.warn("hello warning");
        log.error("hello error");
        let debug = std::fs::read_to_string(dir.join("debug.log")).unwrap();
        let error = std::fs::read_to_string(dir.join("error.log")).unwrap();
        assert!(debug.contains("DEBUG") && debug.contains("comm=decode:0") && debug.contains("hello debug"), "{debug}");
        assert!(error.contains("ERROR") && error.contains("comm=decode:0") && error.contains("hello error"), "{error}");
        assert!(!error.contains("hello debug"), "{error}");
        assert!(!debug.contains("hello error"), "{debug}");
        assert!(error.contains("WARN") && error.contains("hello warning"), "{error}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.join("error.log")).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_debug_only_errors_are_written() {
        let dir = dir("quiet");
        let cfg = Config { debug_file: Some(dir.join("debug.log")), error_file: Some(dir.join("error.log")), ..Config::default() };
        let log = Logger::new(&cfg, "prefill:1").unwrap();
        log.debug("not written");
        log.error("written");
        assert!(!dir.join("debug.log").exists());
        let error = std::fs::read_to_string(dir.join("error.log")).unwrap();
        assert!(error.contains("written") && !error.contains("not written"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_file_is_never_opened_through_a_symlink() {
        let dir = dir("symlink");
        let target = dir.join("elsewhere");
        std::fs::write(&target, "precious\n").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("error.log")).unwrap();
        let cfg = Config { error_file: Some(dir.join("error.log")), ..Config::default() };
        let err = Logger::new(&cfg, "t").err().unwrap();
        assert!(err.message().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_log_file_is_a_config_error() {
        let cfg = Config { error_file: Some("/nonexistent-dir/x/error.log".into()), ..Config::default() };
        let err = Logger::new(&cfg, "t").err().unwrap();
        assert!(err.message().contains("KVCACHE_ERROR_FILE"), "{err}");
    }

    #[test]
    fn json_lines_parse_and_carry_their_fields() {
        let dir = dir("json");
        let cfg = Config { debug: true, log_format: LogFormat::Json, error_file: Some(dir.join("error.log")), debug_file: Some(dir.join("debug.log")), ..Config::default() };
        let log = Logger::new(&cfg, "prefill:0").unwrap();
        let fields = Fields { peer: Some("10.0.0.2:5000"), request: Some("req \"7\""), layer: Some(3), code: Some(ErrorCode::Timeout) };
        log.log(LogLevel::Error, fields, "write failed: \"quoted\"\nand a new line");
        log.debug("plain");
        let error = std::fs::read_to_string(dir.join("error.log")).unwrap();
        let line: serde_json::Value = serde_json::from_str(error.lines().next().unwrap()).unwrap();
        assert_eq!(line["level"], "ERROR");
        assert_eq!(line["message"], "write failed: \"quoted\"\nand a new line");
        assert_eq!((line["comm"].as_str(), line["peer"].as_str(), line["request"].as_str()), (Some("prefill:0"), Some("10.0.0.2:5000"), Some("req \"7\"")));
        assert_eq!((line["layer"].as_u64(), line["code"].as_str(), line["pid"].as_u64()), (Some(3), Some("TIMEOUT"), Some(std::process::id() as u64)));
        let debug = std::fs::read_to_string(dir.join("debug.log")).unwrap();
        let line: serde_json::Value = serde_json::from_str(debug.lines().next().unwrap()).unwrap();
        assert_eq!((line["level"].as_str(), line["message"].as_str()), (Some("DEBUG"), Some("plain")));
        assert!(line.get("peer").is_none(), "a field that does not apply is left out: {line}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hook_gets_every_level_with_its_fields_and_standard_error_gets_nothing() {
        let got: Arc<Mutex<Vec<LogRecord>>> = Arc::default();
        let seen = got.clone();
        let hook = LogHook(Arc::new(move |r: &LogRecord| lock(&seen).push(r.clone())));
        let cfg = Config { debug: true, log_hook: Some(hook), ..Config::default() };
        let log = Logger::new(&cfg, "decode:1").unwrap();
        log.debug("a debug line");
        log.warn_from("10.0.0.9", "a warning");
        log.log(LogLevel::Error, Fields { request: Some("r1"), layer: Some(0), code: Some(ErrorCode::Revoked), ..Fields::default() }, "an error");
        let got = lock(&got).clone();
        let levels: Vec<LogLevel> = got.iter().map(|r| r.level).collect();
        assert_eq!(levels, [LogLevel::Debug, LogLevel::Warn, LogLevel::Error]);
        assert_eq!(got[0].message, "a debug line");
        assert_eq!((got[1].field("peer"), got[1].field("comm")), (Some("10.0.0.9"), Some("decode:1")));
        assert_eq!((got[2].field("request"), got[2].field("layer"), got[2].field("code")), (Some("r1"), Some("0"), Some("REVOKED")));
        assert_eq!(got[2].field("pid"), Some(std::process::id().to_string().as_str()));
        // Without the debug log, a debug line reaches no one.
        let quiet: Arc<Mutex<Vec<LogRecord>>> = Arc::default();
        let q = quiet.clone();
        let cfg = Config { log_hook: Some(LogHook(Arc::new(move |r: &LogRecord| lock(&q).push(r.clone())))), ..Config::default() };
        Logger::new(&cfg, "t").unwrap().debug("not written");
        assert!(lock(&quiet).is_empty());
    }
}
