//! The debug and error logs, written where `KVCACHE_DEBUG_FILE` and `KVCACHE_ERROR_FILE` say (standard
//! error when unset). The debug log is written only with `KVCACHE_DEBUG` on; the error log always.

use crate::config::Config;
use crate::error::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Where one log goes.
enum Sink {
    Stderr,
    File(Mutex<File>),
}

impl Sink {
    fn open(path: Option<&Path>, variable: &str) -> Result<Sink> {
        match path {
            None => Ok(Sink::Stderr),
            Some(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(|f| Sink::File(Mutex::new(f)))
                .map_err(|e| Error::config(format!("{variable}={}: cannot open for appending: {e}", path.display()))),
        }
    }

    fn write(&self, line: &str) {
        // A log that cannot be written must not fail the transfer it describes.
        match self {
            Sink::Stderr => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
            Sink::File(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
        }
    }
}

/// The logs of one communicator; every line names the communicator (`prefill:0`, `decode:1`).
pub struct Logger {
    tag: String,
    debug: Option<Sink>,
    error: Sink,
}

impl Logger {
    /// Opens the logs the configuration asks for.
    pub fn new(config: &Config, tag: impl Into<String>) -> Result<Logger> {
        let debug = if config.debug {
            Some(Sink::open(config.debug_file.as_deref(), "KVCACHE_DEBUG_FILE")?)
        } else {
            None
        };
        let error = Sink::open(config.error_file.as_deref(), "KVCACHE_ERROR_FILE")?;
        Ok(Logger { tag: tag.into(), debug, error })
    }

    /// A logger that writes errors to standard error and no debug log (for tests and tools).
    pub fn stderr(tag: impl Into<String>) -> Logger {
        Logger { tag: tag.into(), debug: None, error: Sink::Stderr }
    }

    /// Whether debug lines are written (so callers can skip formatting them).
    pub fn debug_enabled(&self) -> bool {
        self.debug.is_some()
    }

    /// Writes a debug line, if the debug log is on.
    pub fn debug(&self, message: impl AsRef<str>) {
        if let Some(sink) = &self.debug {
            sink.write(&self.line("DEBUG", message.as_ref()));
        }
    }

    /// Writes an error line.
    pub fn error(&self, message: impl AsRef<str>) {
        self.error.write(&self.line("ERROR", message.as_ref()));
    }

    fn line(&self, level: &str, message: &str) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        format!(
            "[kvtransfer {}.{:03} {level} {} pid={}] {message}\n",
            now.as_secs(),
            now.subsec_millis(),
            self.tag,
            std::process::id()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_go_to_their_files() {
        let dir = std::env::temp_dir().join(format!("kvt-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = Config {
            debug: true,
            debug_file: Some(dir.join("debug.log")),
            error_file: Some(dir.join("error.log")),
            ..Config::default()
        };
        let log = Logger::new(&cfg, "decode:0").unwrap();
        log.debug("hello debug");
        log.error("hello error");
        let debug = std::fs::read_to_string(dir.join("debug.log")).unwrap();
        let error = std::fs::read_to_string(dir.join("error.log")).unwrap();
        assert!(debug.contains("DEBUG decode:0") && debug.contains("hello debug"), "{debug}");
        assert!(error.contains("ERROR decode:0") && error.contains("hello error"), "{error}");
        assert!(!debug.contains("hello error"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_log_file_is_a_config_error() {
        let cfg = Config { error_file: Some("/nonexistent-dir/x/error.log".into()), ..Config::default() };
        let err = Logger::new(&cfg, "t").err().unwrap();
        assert!(err.message().contains("KVCACHE_ERROR_FILE"), "{err}");
    }
}
