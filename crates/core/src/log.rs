//! The debug and error logs of a communicator, through `tracing`: events of target `kvtransfer`, each naming the
//! communicator and its process (`comm=decode:0 pid=4242`), written where `KVCACHE_DEBUG_FILE` and `KVCACHE_ERROR_FILE` say (standard error
//! when unset). The debug log is written only with `KVCACHE_DEBUG` on; the error log always.
//!
//! Each communicator has its own subscriber (its settings may differ from another's in the same process), used
//! for its events only; an application's global subscriber is left alone.
//!
//! Log files are created with mode 0600 and never through a symbolic link. Lines a peer can cause (refusals) go
//! through [`Logger::error_from`], which writes at most [`PER_PEER`] of them per peer every [`WINDOW`].

use crate::sync::lock;
use crate::config::Config;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::level_filters::LevelFilter;
use tracing::{Dispatch, Level};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::MakeWriter;

/// Lines [`Logger::error_from`] writes per peer in each [`WINDOW`].
pub const PER_PEER: u32 = 10;
pub const WINDOW: Duration = Duration::from_secs(10);
/// Peers whose counts are kept; past that the stale ones are forgotten (and, if none is stale, the oldest).
const PEERS: usize = 4096;

/// The logs of one communicator.
pub struct Logger {
    tag: String,
    debug: bool,
    dispatch: Dispatch,
    /// Per peer: when its window began, lines written and lines left out in it.
    peers: Mutex<HashMap<String, (Instant, u32, u64)>>,
}

impl Logger {
    /// Opens the logs the configuration asks for.
    pub fn new(config: &Config, tag: impl Into<String>) -> Result<Logger> {
        // Errors and warnings go to the error log, everything else to the debug log (when it is on).
        let errors = sink(config.error_file.as_deref(), "KVCACHE_ERROR_FILE")?.with_filter(|m| *m.level() <= Level::WARN);
        let writer = match config.debug {
            true => {
                let debug = sink(config.debug_file.as_deref(), "KVCACHE_DEBUG_FILE")?.with_filter(|m| *m.level() > Level::WARN);
                BoxMakeWriter::new(errors.and(debug))
            }
            false => BoxMakeWriter::new(errors),
        };
        Ok(Logger { tag: tag.into(), debug: config.debug, dispatch: dispatch(writer, config.debug), peers: Mutex::default() })
    }

    /// Whether debug lines are written (so callers can skip formatting them).
    pub fn debug_enabled(&self) -> bool {
        self.debug
    }

    /// Writes a debug line, if the debug log is on.
    pub fn debug(&self, message: impl AsRef<str>) {
        if self.debug {
            tracing::dispatcher::with_default(&self.dispatch, || {
                tracing::debug!(target: "kvtransfer", comm = %self.tag, pid = std::process::id(), "{}", message.as_ref())
            });
        }
    }

    /// Writes a warning, to the error log.
    pub fn warn(&self, message: impl AsRef<str>) {
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::warn!(target: "kvtransfer", comm = %self.tag, pid = std::process::id(), "{}", message.as_ref())
        });
    }

    /// Writes an error line that `peer` caused, unless `peer` has had [`PER_PEER`] lines in this [`WINDOW`]
    /// already: a stranger cannot fill the disk through refusals. The next window's first line says how many
    /// were left out.
    pub fn error_from(&self, peer: &str, message: impl AsRef<str>) {
        if let Some(left_out) = self.allowance(peer) {
            if left_out > 0 {
                self.error(format!("{left_out} more lines about {peer} were left out"));
            }
            self.error(message);
        }
    }

    /// Writes a warning about `peer`, within the same allowance as [`Logger::error_from`].
    pub fn warn_from(&self, peer: &str, message: impl AsRef<str>) {
        if let Some(left_out) = self.allowance(peer) {
            if left_out > 0 {
                self.warn(format!("{left_out} more lines about {peer} were left out"));
            }
            self.warn(message);
        }
    }

    /// Counts a line about `peer`: `None` where its allowance in this window is spent, else how many lines the
    /// window before left out.
    fn allowance(&self, peer: &str) -> Option<u64> {
        {
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

    /// Writes an error line.
    pub fn error(&self, message: impl AsRef<str>) {
        tracing::dispatcher::with_default(&self.dispatch, || {
            tracing::error!(target: "kvtransfer", comm = %self.tag, pid = std::process::id(), "{}", message.as_ref())
        });
    }
}

fn dispatch(writer: BoxMakeWriter, debug: bool) -> Dispatch {
    let level = if debug { LevelFilter::DEBUG } else { LevelFilter::WARN };
    let subscriber = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_max_level(level)
        .with_ansi(false)
        .with_thread_names(true)
        .finish();
    Dispatch::new(subscriber)
}

/// Where one log goes: standard error, or a file appended to.
#[derive(Clone)]
enum Sink {
    Stderr,
    File(Arc<Mutex<File>>),
}

fn sink(path: Option<&Path>, variable: &str) -> Result<Sink> {
    let Some(path) = path else { return Ok(Sink::Stderr) };
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
}

impl std::io::Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            SinkWriter::Stderr(s) => s.write(buf),
            SinkWriter::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            SinkWriter::Stderr(s) => s.flush(),
            SinkWriter::File(f) => f.flush(),
        }
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter<'a>;
    fn make_writer(&'a self) -> SinkWriter<'a> {
        match self {
            Sink::Stderr => SinkWriter::Stderr(std::io::stderr()),
            // A poisoned lock only means another line panicked half-written: keep logging.
            Sink::File(f) => SinkWriter::File(lock(&f)),
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
}
