//! Configuration: the original's nine `KVCACHE_*` environment variables plus `KVCACHE_TRANSPORT`, each of
//! which may also be set per communicator (an option wins over the environment).
//!
//! ```
//! use kvtransfer::config::{Config, Setting};
//! let cfg = Config::load_from(|name| (name == "KVCACHE_IB_TIMEOUT").then(|| "20".to_string()), &[]).unwrap();
//! assert_eq!(cfg.ib_timeout, 20);
//! assert_eq!(cfg.gid_index, 3);
//! let err = Config::load_from(|_| None, &[(Setting::IbTimeout, 40.into())]).unwrap_err();
//! assert!(err.to_string().contains("KVCACHE_IB_TIMEOUT"));
//! ```

use crate::error::{Error, Result};
use crate::wire::TransportKind;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The longest instance id (`KVCACHE_INSTANCE_ID`), in bytes.
pub const MAX_INSTANCE_ID: usize = 128;

/// One configurable setting: its environment variable and its option name in the bindings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    GidIndex,
    RdmaNics,
    IbTimeout,
    RelaxOrdering,
    SocketIfname,
    Debug,
    DebugFile,
    ErrorFile,
    GdrcopyFlushEnable,
    Transport,
    AuthToken,
    TimeoutMs,
    ConnectTimeoutMs,
    StallTimeoutMs,
    ConfirmTimeoutMs,
    MaxPeers,
    TcpConnections,
    RequestTtlMs,
    InstanceId,
    Insecure,
    AnswersTo,
    ReconnectRetries,
    ReconnectBackoffMs,
    LogFormat,
}

impl Setting {
    /// Every setting, in documentation order.
    pub const ALL: [Setting; 24] = [
        Setting::GidIndex,
        Setting::RdmaNics,
        Setting::IbTimeout,
        Setting::RelaxOrdering,
        Setting::SocketIfname,
        Setting::Debug,
        Setting::DebugFile,
        Setting::ErrorFile,
        Setting::GdrcopyFlushEnable,
        Setting::Transport,
        Setting::AuthToken,
        Setting::TimeoutMs,
        Setting::ConnectTimeoutMs,
        Setting::StallTimeoutMs,
        Setting::ConfirmTimeoutMs,
        Setting::MaxPeers,
        Setting::TcpConnections,
        Setting::RequestTtlMs,
        Setting::InstanceId,
        Setting::Insecure,
        Setting::AnswersTo,
        Setting::ReconnectRetries,
        Setting::ReconnectBackoffMs,
        Setting::LogFormat,
    ];

    /// The environment variable that sets it (`None` for settings that are options only).
    pub fn env_name(self) -> Option<&'static str> {
        Some(match self {
            Setting::GidIndex => "KVCACHE_RDMA_GID_INDEX",
            Setting::RdmaNics => "KVCACHE_RDMA_NICS",
            Setting::IbTimeout => "KVCACHE_IB_TIMEOUT",
            Setting::RelaxOrdering => "KVCACHE_RELAX_ORDERING",
            Setting::SocketIfname => "KVCACHE_SOCKET_IFNAME",
            Setting::Debug => "KVCACHE_DEBUG",
            Setting::DebugFile => "KVCACHE_DEBUG_FILE",
            Setting::ErrorFile => "KVCACHE_ERROR_FILE",
            Setting::GdrcopyFlushEnable => "KVCACHE_GDRCOPY_FLUSH_ENABLE",
            Setting::Transport => "KVCACHE_TRANSPORT",
            Setting::AuthToken => "KVCACHE_AUTH_TOKEN",
            Setting::MaxPeers => "KVCACHE_MAX_PEERS",
            Setting::TcpConnections => "KVCACHE_TCP_CONNECTIONS",
            Setting::RequestTtlMs => "KVCACHE_REQUEST_TTL_MS",
            Setting::InstanceId => "KVCACHE_INSTANCE_ID",
            Setting::Insecure => "KVCACHE_INSECURE",
            Setting::AnswersTo => "KVCACHE_ANSWERS_TO",
            Setting::ReconnectRetries => "KVCACHE_RECONNECT_RETRIES",
            Setting::ReconnectBackoffMs => "KVCACHE_RECONNECT_BACKOFF_MS",
            Setting::LogFormat => "KVCACHE_LOG_FORMAT",
            Setting::TimeoutMs | Setting::ConnectTimeoutMs | Setting::StallTimeoutMs | Setting::ConfirmTimeoutMs => return None,
        })
    }

    /// The option name in the bindings (camelCase).
    pub fn option_name(self) -> &'static str {
        match self {
            Setting::GidIndex => "gidIndex",
            Setting::RdmaNics => "rdmaNics",
            Setting::IbTimeout => "ibTimeout",
            Setting::RelaxOrdering => "relaxOrdering",
            Setting::SocketIfname => "socketIfname",
            Setting::Debug => "debug",
            Setting::DebugFile => "debugFile",
            Setting::ErrorFile => "errorFile",
            Setting::GdrcopyFlushEnable => "gdrcopyFlushEnable",
            Setting::Transport => "transport",
            Setting::AuthToken => "authToken",
            Setting::TimeoutMs => "timeoutMs",
            Setting::ConnectTimeoutMs => "connectTimeoutMs",
            Setting::StallTimeoutMs => "stallTimeoutMs",
            Setting::ConfirmTimeoutMs => "confirmTimeoutMs",
            Setting::MaxPeers => "maxPeers",
            Setting::TcpConnections => "tcpConnections",
            Setting::RequestTtlMs => "requestTtlMs",
            Setting::InstanceId => "instanceId",
            Setting::Insecure => "insecure",
            Setting::AnswersTo => "answersTo",
            Setting::ReconnectRetries => "reconnect.retries",
            Setting::ReconnectBackoffMs => "reconnect.backoffMs",
            Setting::LogFormat => "logFormat",
        }
    }

    /// Whether its value is a secret: never shown in messages or reports.
    pub fn is_secret(self) -> bool {
        self == Setting::AuthToken
    }

    /// The setting for an option name, if there is one.
    pub fn from_option_name(name: &str) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| s.option_name() == name)
    }
}

/// A setting's value: text, as the environment gives it (parsed by the variable's rules), or typed, as an
/// option gives it (checked against the same limits, never turned into text and back).
#[derive(Debug, Clone, PartialEq)]
pub enum SettingValue {
    Text(String),
    Number(f64),
    Flag(bool),
    List(Vec<String>),
}

impl From<&str> for SettingValue {
    fn from(v: &str) -> SettingValue {
        SettingValue::Text(v.to_string())
    }
}
impl From<f64> for SettingValue {
    fn from(v: f64) -> SettingValue {
        SettingValue::Number(v)
    }
}
impl From<u32> for SettingValue {
    fn from(v: u32) -> SettingValue {
        SettingValue::Number(v.into())
    }
}
impl From<bool> for SettingValue {
    fn from(v: bool) -> SettingValue {
        SettingValue::Flag(v)
    }
}

impl fmt::Display for SettingValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingValue::Text(t) => write!(f, "{t:?}"),
            SettingValue::Number(n) => write!(f, "{n}"),
            SettingValue::Flag(b) => write!(f, "{b}"),
            SettingValue::List(l) => write!(f, "{l:?}"),
        }
    }
}

/// A secret setting's value. Its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<hidden>)")
    }
}

/// Which transport a communicator uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// The fastest transport both sides have: on one host cuda-ipc (GPU caches) or shm (host caches), else
    /// RDMA when a device of `KVCACHE_RDMA_NICS` is usable, else TCP.
    Auto,
    /// That transport and no other.
    Only(TransportKind),
}

impl TransportChoice {
    /// The name as written in `KVCACHE_TRANSPORT`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Only(kind) => kind.as_str(),
        }
    }
}

/// How log lines are written (`KVCACHE_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-07T10:00:00Z ERROR thread kvtransfer: message comm=decode:0 pid=42 peer="10.0.0.3"`, one per line.
    Text,
    /// One JSON object per line: `timestamp`, `level`, `threadName`, `target`, `message`, and each field
    /// (`comm`, `pid`, `peer`, `request`, `layer`, `code`) as a key of its own.
    Json,
}

/// How severe a log line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// A failure, or a refusal of a peer: always written.
    Error,
    /// Something that works but not as it should (an open listener, a transport a peer could not take).
    Warn,
    /// What happens, step by step: written only with `KVCACHE_DEBUG`.
    Debug,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Debug => "debug",
        }
    }
}

/// One log line, as a [`LogHook`] gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    pub level: LogLevel,
    pub message: String,
    /// Its fields, in order: `comm` (`decode:0`), `pid`, and where they apply `peer` (a decode's `host:port`, or
    /// a prefill's host), `request`, `layer` and `code` (an error code's name).
    pub fields: Vec<(&'static str, String)>,
}

impl LogRecord {
    /// The field `name`, if the line has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

/// Where a binding routes log lines (Node's `onLog`): called on the thread that logs, so it must not block.
/// Lines it gets do not go to standard error (a log file, where one is set, still gets them).
#[derive(Clone)]
pub struct LogHook(pub std::sync::Arc<dyn Fn(&LogRecord) + Send + Sync>);

impl fmt::Debug for LogHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogHook")
    }
}

impl PartialEq for LogHook {
    fn eq(&self, other: &LogHook) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The settings in force for one communicator.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `KVCACHE_RDMA_GID_INDEX` (default 3).
    pub gid_index: u32,
    /// `KVCACHE_RDMA_NICS`: the NIC of GPU `i` is `rdma_nics[i % len]`.
    pub rdma_nics: Vec<String>,
    /// `KVCACHE_IB_TIMEOUT` (default 18, 14..=31): the QP timeout is 4.096 µs · 2^v.
    pub ib_timeout: u8,
    /// `KVCACHE_RELAX_ORDERING`: register memory with relaxed ordering where supported.
    pub relax_ordering: bool,
    /// `KVCACHE_SOCKET_IFNAME`: the interface the decode side listens on (all interfaces when unset).
    pub socket_ifname: Option<String>,
    /// `KVCACHE_DEBUG`: write the debug log.
    pub debug: bool,
    /// `KVCACHE_DEBUG_FILE`: where the debug log goes (standard error when unset).
    pub debug_file: Option<PathBuf>,
    /// `KVCACHE_ERROR_FILE`: where the error log goes (standard error when unset).
    pub error_file: Option<PathBuf>,
    /// `KVCACHE_GDRCOPY_FLUSH_ENABLE`: finish each RDMA write call with a flush read.
    pub gdrcopy_flush: bool,
    /// `KVCACHE_TRANSPORT` (default `auto`).
    pub transport: TransportChoice,
    /// How long each kind of wait may last: see [`Timeouts`].
    pub timeouts: Timeouts,
    /// `KVCACHE_AUTH_TOKEN`: the shared secret both sides prove they hold; `None` authenticates nobody.
    pub auth_token: Option<Secret>,
    /// `KVCACHE_MAX_PEERS` (default 4096, 1..=65 536): the most prefill links a decode keeps at once (each a
    /// request channel, and a TCP data connection or RDMA queue pair), and the most admitted ones waiting to
    /// open; past that a new connection is closed, and the oldest waiting admission is let go.
    pub max_peers: usize,
    /// `KVCACHE_TCP_CONNECTIONS` (default 4, or the CPUs this process may use where fewer; 1..=16): the data
    /// connections of a TCP link. A write is split over as many of them as give each piece at least
    /// [`TCP_STRIPE_BYTES`] (cut at block boundaries), each piece sent by a thread of its own; the two sides use
    /// the lower of their settings.
    pub tcp_connections: u32,
    /// `KVCACHE_REQUEST_TTL_MS` (default 300 000, 1 000..=86 400 000): a decode gives up a request that made no
    /// progress for this long (it ends `expired`), and remembers an ended one for as long.
    pub request_ttl: Duration,
    /// `KVCACHE_INSTANCE_ID` (1 to 128 bytes, no control characters): the prefill instance this communicator is
    /// a rank of. Ranks that share it own their requests together; without it, each link owns its own.
    pub instance_id: Option<String>,
    /// `KVCACHE_INSECURE` (default false): lets a decode whose API is secure by default (see `refuse_open_listen`)
    /// listen beyond loopback without `KVCACHE_AUTH_TOKEN`.
    pub insecure: bool,
    /// `KVCACHE_ANSWERS_TO` (comma-separated `address:port`s, default none), on a decode: the addresses prefills
    /// dial it by besides the ones it listens on, where a NAT or a forwarded port stands between them. With a
    /// token, a decode admits only a prefill that dialed one of these or the address its connection came to (the
    /// hello names it, signed): a relay cannot steer a prefill to another decode that shares the token.
    pub answers_to: Vec<SocketAddr>,
    /// How a prefill (re)connects: see [`Reconnect`].
    pub reconnect: Reconnect,
    /// `KVCACHE_LOG_FORMAT` (`text`, the default, or `json`): how log lines are written.
    pub log_format: LogFormat,
    /// Not a setting: where a binding routes every log line (its `onLog`), in place of standard error.
    pub log_hook: Option<LogHook>,
    /// Not a setting: set by a binding's API that is secure by default (Node's `Communicator.decode`). A decode
    /// that would listen beyond loopback without `KVCACHE_AUTH_TOKEN` then refuses to start (`CONFIG`) unless
    /// `insecure` is set. Off for the seed API, which keeps the original's behaviour (with a warning).
    pub refuse_open_listen: bool,
}

/// The most data connections a TCP link may have (`KVCACHE_TCP_CONNECTIONS`).
pub const MAX_TCP_CONNECTIONS: u32 = 16;
/// The least a TCP write sends on each connection it is split over: smaller writes take fewer connections (a
/// write under twice this takes one).
pub const TCP_STRIPE_BYTES: u64 = 1 << 20;

/// How long each kind of wait may last (options `connectTimeoutMs`, `stallTimeoutMs`, `confirmTimeoutMs`, each
/// 10 000 ms by default; `timeoutMs` sets all three).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// One attempt to make a connection: the handshake (connection, greeting, hello, welcome), then its request
    /// channel and data connection opening. A decode answers a handshake's connection for at most 5 s of it.
    pub connect: Duration,
    /// The longest a transfer or a socket operation of a working connection may go without progress (a TCP
    /// read or write, an RDMA completion): then it fails with `TIMEOUT` and the connection is dropped. A
    /// request channel that hears nothing for this long (and at least 3 s) has ended.
    pub stall: Duration,
    /// How long a decode's `revoke` and `close` wait for each prefill link to confirm that it stopped writing,
    /// before cutting it off.
    pub confirm: Duration,
}

impl Timeouts {
    /// The same for every kind of wait.
    pub fn all(d: Duration) -> Timeouts {
        Timeouts { connect: d, stall: d, confirm: d }
    }
}

/// How a prefill (re)connects to a decode, the same for every call that needs a connection it does not have:
/// `connect`, and a write after the connection ended (an abort needs none: without a connection the decode has
/// failed the request already). The call holds the peer meanwhile: its other calls wait. A call makes one attempt and, where
/// that fails in a way another attempt can mend (`UNREACHABLE`, `TIMEOUT`, `TRANSPORT`), up to `retries` more,
/// pausing `backoff` before the first of them and twice as long before each next one (at most
/// [`Reconnect::MAX_PAUSE`]). Then the call fails with the last attempt's error, and a peer whose connection
/// had ended is forgotten (`NOT_CONNECTED` until `connect`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reconnect {
    /// `KVCACHE_RECONNECT_RETRIES` (default 3, 0–100).
    pub retries: u32,
    /// `KVCACHE_RECONNECT_BACKOFF_MS` (default 200, 1–60 000).
    pub backoff: Duration,
}

impl Reconnect {
    /// The longest pause between two attempts.
    pub const MAX_PAUSE: Duration = Duration::from_secs(10);

    /// The pause before attempt `attempt` (from 1; none before the first).
    pub fn pause_before(&self, attempt: u32) -> Duration {
        match attempt {
            0 | 1 => Duration::ZERO,
            n => self.backoff.saturating_mul(1 << (n - 2).min(20)).min(Reconnect::MAX_PAUSE),
        }
    }
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect { retries: 3, backoff: Duration::from_millis(200) }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            gid_index: 3,
            rdma_nics: Vec::new(),
            ib_timeout: 18,
            relax_ordering: false,
            socket_ifname: None,
            debug: false,
            debug_file: None,
            error_file: None,
            gdrcopy_flush: false,
            transport: TransportChoice::Auto,
            timeouts: Timeouts::all(Duration::from_secs(10)),
            auth_token: None,
            max_peers: 4096,
            tcp_connections: std::thread::available_parallelism().map_or(1, |n| n.get() as u32).min(4),
            request_ttl: Duration::from_secs(300),
            instance_id: None,
            insecure: false,
            answers_to: Vec::new(),
            reconnect: Reconnect::default(),
            log_format: LogFormat::Text,
            log_hook: None,
            refuse_open_listen: false,
        }
    }
}

impl Config {
    /// Reads the process environment, then applies `overrides` (the options).
    pub fn load(overrides: &[(Setting, SettingValue)]) -> Result<Config> {
        Config::load_from(|name| std::env::var(name).ok(), overrides)
    }

    /// Like [`Config::load`], with the environment given as a lookup function.
    pub fn load_from(env: impl Fn(&str) -> Option<String>, overrides: &[(Setting, SettingValue)]) -> Result<Config> {
        let mut cfg = Config::default();
        for setting in Setting::ALL {
            let from_option = overrides.iter().rev().find(|(s, _)| *s == setting);
            let (value, origin) = match from_option {
                Some((_, v)) => (v.clone(), Origin::Option),
                None => match setting.env_name().and_then(&env) {
                    Some(text) => (SettingValue::Text(text), Origin::Env),
                    None => continue,
                },
            };
            let value = match value {
                // A secret that is set but empty (an unset shell variable, say) must not turn authentication off.
                SettingValue::Text(t) if t.trim().is_empty() && setting.is_secret() => {
                    return Err(Error::config(format!(
                        "{} is set but empty: give it a random secret (e.g. `openssl rand -hex 32`), or unset it",
                        setting.env_name().unwrap_or(setting.option_name())
                    )))
                }
                SettingValue::Text(t) if t.trim().is_empty() => continue,
                SettingValue::Text(t) => SettingValue::Text(t.trim().to_string()),
                typed => typed,
            };
            cfg.apply(setting, &value).map_err(|why| {
                let name = match (origin, setting.env_name()) {
                    (Origin::Env, Some(env)) => env.to_string(),
                    (_, Some(env)) => format!("{env} (option {})", setting.option_name()),
                    (_, None) => format!("option {}", setting.option_name()),
                };
                let shown = if setting.is_secret() { "<secret>".to_string() } else { value.to_string() };
                Error::config(format!("{name}={shown}: {why}"))
            })?;
        }
        Ok(cfg)
    }

    fn apply(&mut self, setting: Setting, v: &SettingValue) -> std::result::Result<(), String> {
        match setting {
            Setting::GidIndex => self.gid_index = whole(v, 0, 255)? as u32,
            Setting::RdmaNics => {
                let nics: Vec<String> = match v {
                    SettingValue::Text(t) => t.split(',').map(|s| s.trim().to_string()).collect(),
                    SettingValue::List(l) => l.iter().map(|s| s.trim().to_string()).collect(),
                    _ => vec![String::new()],
                };
                if nics.iter().any(|n| n.is_empty()) {
                    return Err("expected a comma-separated list of RDMA device names, e.g. mlx5_0,mlx5_1".into());
                }
                self.rdma_nics = nics;
            }
            Setting::IbTimeout => self.ib_timeout = whole(v, 14, 31)? as u8,
            Setting::RelaxOrdering => self.relax_ordering = flag(v)?,
            Setting::SocketIfname => self.socket_ifname = Some(text(v)?.to_string()),
            Setting::Debug => self.debug = flag(v)?,
            Setting::DebugFile => self.debug_file = Some(PathBuf::from(text(v)?)),
            Setting::ErrorFile => self.error_file = Some(PathBuf::from(text(v)?)),
            Setting::GdrcopyFlushEnable => self.gdrcopy_flush = flag(v)?,
            Setting::Transport => {
                self.transport = match text(v)?.to_ascii_lowercase().as_str() {
                    "auto" => TransportChoice::Auto,
                    name => TransportChoice::Only(name.parse().map_err(|_| {
                        let names: Vec<&str> = TransportKind::ALL.iter().map(|t| t.as_str()).collect();
                        format!("expected auto or one of {}", names.join(", "))
                    })?),
                }
            }
            // Before the three it stands for (in `Setting::ALL`), so each of them wins over it.
            Setting::TimeoutMs => self.timeouts = Timeouts::all(Duration::from_millis(whole(v, 1, 86_400_000)?)),
            Setting::ConnectTimeoutMs => self.timeouts.connect = Duration::from_millis(whole(v, 1, 86_400_000)?),
            Setting::StallTimeoutMs => self.timeouts.stall = Duration::from_millis(whole(v, 1, 86_400_000)?),
            Setting::ConfirmTimeoutMs => self.timeouts.confirm = Duration::from_millis(whole(v, 1, 86_400_000)?),
            Setting::MaxPeers => self.max_peers = whole(v, 1, 65_536)? as usize,
            Setting::TcpConnections => self.tcp_connections = whole(v, 1, MAX_TCP_CONNECTIONS as u64)? as u32,
            Setting::Insecure => self.insecure = flag(v)?,
            Setting::ReconnectRetries => self.reconnect.retries = whole(v, 0, 100)? as u32,
            Setting::ReconnectBackoffMs => self.reconnect.backoff = Duration::from_millis(whole(v, 1, 60_000)?),
            Setting::AnswersTo => {
                let why = || "expected a comma-separated list of addresses with ports, e.g. 203.0.113.7:9000,[2001:db8::7]:9000".to_string();
                let addrs: std::result::Result<Vec<SocketAddr>, _> = match v {
                    SettingValue::Text(t) => t.split(',').map(|a| a.trim().parse::<SocketAddr>()).collect(),
                    SettingValue::List(l) => l.iter().map(|a| a.trim().parse::<SocketAddr>()).collect(),
                    _ => return Err(why()),
                };
                let addrs = addrs.map_err(|_| why())?;
                // An address a connection can never come to would never match.
                if let Some(a) = addrs.iter().find(|a| a.ip().is_unspecified() || a.port() == 0) {
                    return Err(format!("{a} is not an address a prefill can dial (give the address and port it dials)"));
                }
                self.answers_to = addrs;
            }
            Setting::LogFormat => {
                self.log_format = match text(v)?.to_ascii_lowercase().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err("expected text or json".into()),
                }
            }
            Setting::RequestTtlMs => self.request_ttl = Duration::from_millis(whole(v, 1_000, 86_400_000)?),
            Setting::InstanceId => {
                let id = text(v)?;
                if id.len() > MAX_INSTANCE_ID || id.chars().any(char::is_control) {
                    return Err(format!("expected 1 to {MAX_INSTANCE_ID} bytes without control characters"));
                }
                self.instance_id = Some(id.to_string());
            }
            Setting::AuthToken => {
                let token = text(v)?;
                // One challenge lets anyone test guesses offline, so the secret must be too long to guess.
                if token.chars().count() < 32 {
                    return Err("expected a random secret of at least 32 characters (e.g. `openssl rand -hex 32`)".into());
                }
                self.auth_token = Some(Secret(token.to_string()));
            }
        }
        Ok(())
    }

    /// The RDMA device for a GPU index: `KVCACHE_RDMA_NICS[gpu_idx % n]`, or `None` when the list is empty.
    pub fn nic_for_gpu(&self, gpu_idx: u32) -> Option<&str> {
        if self.rdma_nics.is_empty() {
            return None;
        }
        Some(&self.rdma_nics[gpu_idx as usize % self.rdma_nics.len()])
    }
}

#[derive(Clone, Copy)]
enum Origin {
    Env,
    Option,
}

/// A whole number in `[min, max]`: a number, or text that spells one.
fn whole(v: &SettingValue, min: u64, max: u64) -> std::result::Result<u64, String> {
    let n = match v {
        SettingValue::Text(t) => t.parse::<u64>().ok(),
        SettingValue::Number(n) if n.fract() == 0.0 && *n >= 0.0 && *n <= u64::MAX as f64 => Some(*n as u64),
        _ => None,
    };
    n.filter(|n| (min..=max).contains(n)).ok_or_else(|| format!("expected a whole number from {min} to {max}"))
}

/// A boolean: `true`/`false`, or text that spells one (`1/0/true/false/yes/no/on/off`).
fn flag(v: &SettingValue) -> std::result::Result<bool, String> {
    let b = match v {
        SettingValue::Flag(b) => Some(*b),
        SettingValue::Text(t) => match t.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" => Some(false),
            _ => None,
        },
        _ => None,
    };
    b.ok_or_else(|| "expected a boolean: 1, 0, true, false, yes, no, on or off".into())
}

fn text(v: &SettingValue) -> std::result::Result<&str, String> {
    match v {
        SettingValue::Text(t) => Ok(t),
        _ => Err("expected a string".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)], overrides: &[(Setting, &str)]) -> Result<Config> {
        let overrides: Vec<(Setting, SettingValue)> = overrides.iter().map(|(s, v)| (*s, (*v).into())).collect();
        load_typed(env, &overrides)
    }

    fn load_typed(env: &[(&str, &str)], overrides: &[(Setting, SettingValue)]) -> Result<Config> {
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::load_from(|k| env.get(k).cloned(), overrides)
    }

    #[test]
    fn defaults_match_the_original() {
        let cfg = load(&[], &[]).unwrap();
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.gid_index, 3);
        assert_eq!(cfg.ib_timeout, 18);
        assert!(!cfg.relax_ordering && !cfg.debug && !cfg.gdrcopy_flush);
        assert_eq!(cfg.transport, TransportChoice::Auto);
    }

    #[test]
    fn every_variable_is_read() {
        let cfg = load(
            &[
                ("KVCACHE_RDMA_GID_INDEX", "1"),
                ("KVCACHE_RDMA_NICS", "mlx5_0, mlx5_1,mlx5_2"),
                ("KVCACHE_IB_TIMEOUT", "14"),
                ("KVCACHE_RELAX_ORDERING", "true"),
                ("KVCACHE_SOCKET_IFNAME", "eth0"),
                ("KVCACHE_DEBUG", "1"),
                ("KVCACHE_DEBUG_FILE", "/tmp/d.log"),
                ("KVCACHE_ERROR_FILE", "/tmp/e.log"),
                ("KVCACHE_GDRCOPY_FLUSH_ENABLE", "on"),
                ("KVCACHE_TRANSPORT", "TCP"),
            ],
            &[],
        )
        .unwrap();
        assert_eq!(cfg.gid_index, 1);
        assert_eq!(cfg.rdma_nics, ["mlx5_0", "mlx5_1", "mlx5_2"]);
        assert_eq!(cfg.nic_for_gpu(4), Some("mlx5_1"));
        assert_eq!(cfg.ib_timeout, 14);
        assert!(cfg.relax_ordering && cfg.debug && cfg.gdrcopy_flush);
        assert_eq!(cfg.socket_ifname.as_deref(), Some("eth0"));
        assert_eq!(cfg.debug_file, Some(PathBuf::from("/tmp/d.log")));
        assert_eq!(cfg.error_file, Some(PathBuf::from("/tmp/e.log")));
        assert_eq!(cfg.transport, TransportChoice::Only(TransportKind::Tcp));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value) in [
            ("KVCACHE_IB_TIMEOUT", "13"),
            ("KVCACHE_IB_TIMEOUT", "32"),
            ("KVCACHE_IB_TIMEOUT", "x"),
            ("KVCACHE_RDMA_GID_INDEX", "-1"),
            ("KVCACHE_RELAX_ORDERING", "maybe"),
            ("KVCACHE_DEBUG", "2"),
            ("KVCACHE_GDRCOPY_FLUSH_ENABLE", "yes please"),
            ("KVCACHE_RDMA_NICS", "mlx5_0,,mlx5_1"),
            ("KVCACHE_TRANSPORT", "carrier-pigeon"),
            ("KVCACHE_TCP_CONNECTIONS", "0"),
            ("KVCACHE_TCP_CONNECTIONS", "17"),
            ("KVCACHE_TCP_CONNECTIONS", "2.5"),
        ] {
            let err = load(&[(var, value)], &[]).unwrap_err();
            assert_eq!(err.code(), crate::ErrorCode::Config);
            assert!(err.message().starts_with(var), "{err}");
        }
    }

    #[test]
    fn tcp_connections_are_1_to_16_and_4_by_default_or_the_cpus_where_fewer() {
        let cpus = std::thread::available_parallelism().unwrap().get() as u32;
        assert_eq!(load(&[], &[]).unwrap().tcp_connections, cpus.min(4));
        assert_eq!(load(&[("KVCACHE_TCP_CONNECTIONS", "1")], &[]).unwrap().tcp_connections, 1);
        assert_eq!(load_typed(&[], &[(Setting::TcpConnections, SettingValue::Number(16.0))]).unwrap().tcp_connections, 16);
    }

    #[test]
    fn max_peers_is_a_whole_number_from_1_to_65536() {
        assert_eq!(load(&[], &[]).unwrap().max_peers, 4096);
        assert_eq!(load(&[("KVCACHE_MAX_PEERS", "64")], &[]).unwrap().max_peers, 64);
        for bad in ["0", "65537", "-1", "1.5", "many"] {
            let err = load(&[("KVCACHE_MAX_PEERS", bad)], &[]).unwrap_err();
            assert!(err.message().starts_with("KVCACHE_MAX_PEERS"), "{bad}: {err}");
        }
    }

    #[test]
    fn request_ttl_and_instance_id_are_checked() {
        let cfg = load(&[], &[]).unwrap();
        assert_eq!((cfg.request_ttl, cfg.instance_id), (Duration::from_secs(300), None));
        let cfg = load(&[("KVCACHE_REQUEST_TTL_MS", "2000"), ("KVCACHE_INSTANCE_ID", "prefill-7")], &[]).unwrap();
        assert_eq!((cfg.request_ttl, cfg.instance_id.as_deref()), (Duration::from_secs(2), Some("prefill-7")));
        for bad in ["999", "86400001", "soon"] {
            let err = load(&[("KVCACHE_REQUEST_TTL_MS", bad)], &[]).unwrap_err();
            assert!(err.message().starts_with("KVCACHE_REQUEST_TTL_MS"), "{bad}: {err}");
        }
        for bad in ["a\nb".to_string(), "x".repeat(MAX_INSTANCE_ID + 1)] {
            let err = load(&[], &[(Setting::InstanceId, bad.as_str())]).unwrap_err();
            assert!(err.message().contains("option instanceId"), "{err}");
        }
    }

    #[test]
    fn the_reconnect_policy_doubles_its_pause_up_to_a_limit() {
        let cfg = load(&[], &[]).unwrap();
        assert_eq!(cfg.reconnect, Reconnect { retries: 3, backoff: Duration::from_millis(200) });
        let pauses: Vec<u64> = (1..=5).map(|n| cfg.reconnect.pause_before(n).as_millis() as u64).collect();
        assert_eq!(pauses, [0, 200, 400, 800, 1600]);
        assert_eq!(cfg.reconnect.pause_before(100), Reconnect::MAX_PAUSE);
        let cfg = load(&[("KVCACHE_RECONNECT_RETRIES", "0")], &[(Setting::ReconnectBackoffMs, "50")]).unwrap();
        assert_eq!(cfg.reconnect, Reconnect { retries: 0, backoff: Duration::from_millis(50) });
        let err = load(&[], &[(Setting::ReconnectRetries, "101")]).unwrap_err();
        assert!(err.message().contains("option reconnect.retries"), "{err}");
    }

    #[test]
    fn each_timeout_has_its_own_option_and_timeout_ms_sets_all_three() {
        let ms = Duration::from_millis;
        let cfg = load(&[], &[(Setting::StallTimeoutMs, "700"), (Setting::TimeoutMs, "2000"), (Setting::ConfirmTimeoutMs, "300")]).unwrap();
        assert_eq!(cfg.timeouts, Timeouts { connect: ms(2000), stall: ms(700), confirm: ms(300) });
        let err = load(&[], &[(Setting::ConnectTimeoutMs, "0")]).unwrap_err();
        assert!(err.message().contains("option connectTimeoutMs"), "{err}");
    }

    #[test]
    fn answers_to_is_a_list_of_addresses_with_ports() {
        assert!(load(&[], &[]).unwrap().answers_to.is_empty());
        let cfg = load(&[("KVCACHE_ANSWERS_TO", "203.0.113.7:9000, [2001:db8::7]:9001")], &[]).unwrap();
        let want: Vec<SocketAddr> = vec!["203.0.113.7:9000".parse().unwrap(), "[2001:db8::7]:9001".parse().unwrap()];
        assert_eq!(cfg.answers_to, want);
        let list = SettingValue::List(vec!["203.0.113.7:9000".into(), "[2001:db8::7]:9001".into()]);
        assert_eq!(load_typed(&[], &[(Setting::AnswersTo, list)]).unwrap().answers_to, want);
        // A name, an address without its port, an empty entry: each is refused, naming the variable.
        for bad in ["0.0.0.0:9000", "203.0.113.7:0", "[::]:9000"] {
            let err = load(&[("KVCACHE_ANSWERS_TO", bad)], &[]).unwrap_err();
            assert!(err.message().contains("not an address a prefill can dial"), "{bad}: {err}");
        }
        for bad in ["decode.example:9000", "203.0.113.7", "203.0.113.7:9000,,", "203.0.113.7:99999"] {
            let err = load(&[("KVCACHE_ANSWERS_TO", bad)], &[]).unwrap_err();
            assert!(err.message().starts_with("KVCACHE_ANSWERS_TO") && err.message().contains("with ports"), "{bad}: {err}");
        }
    }

    #[test]
    fn options_win_and_are_named_in_errors() {
        let cfg = load(&[("KVCACHE_IB_TIMEOUT", "20")], &[(Setting::IbTimeout, "22")]).unwrap();
        assert_eq!(cfg.ib_timeout, 22);
        let err = load(&[], &[(Setting::Transport, "udp")]).unwrap_err();
        assert!(err.message().contains("KVCACHE_TRANSPORT (option transport)"), "{err}");
        let err = load(&[], &[(Setting::TimeoutMs, "0")]).unwrap_err();
        assert!(err.message().contains("option timeoutMs"), "{err}");
        assert_eq!(Setting::from_option_name("ibTimeout"), Some(Setting::IbTimeout));
        assert_eq!(Setting::from_option_name("nope"), None);
    }

    #[test]
    fn typed_options_are_checked_against_the_same_limits() {
        let cfg = load_typed(
            &[("KVCACHE_DEBUG", "1")],
            &[
                (Setting::IbTimeout, 20.into()),
                (Setting::Debug, false.into()),
                (Setting::RdmaNics, SettingValue::List(vec!["mlx5_0".into(), "mlx5_1".into()])),
                (Setting::TimeoutMs, 2500.into()),
            ],
        )
        .unwrap();
        assert_eq!((cfg.ib_timeout, cfg.debug, cfg.timeouts), (20, false, Timeouts::all(Duration::from_millis(2500))));
        assert_eq!(cfg.rdma_nics, ["mlx5_0", "mlx5_1"]);
        for (setting, value, want) in [
            (Setting::IbTimeout, SettingValue::Number(99.0), "KVCACHE_IB_TIMEOUT (option ibTimeout)=99: expected a whole number"),
            (Setting::IbTimeout, SettingValue::Number(20.5), "=20.5: expected a whole number"),
            (Setting::GidIndex, SettingValue::Number(-1.0), "expected a whole number from 0 to 255"),
            (Setting::Debug, SettingValue::Number(1.0), "expected a boolean"),
            (Setting::Transport, SettingValue::Flag(true), "expected a string"),
            (Setting::RdmaNics, SettingValue::List(vec!["".into()]), "RDMA device names"),
        ] {
            let err = load_typed(&[], &[(setting, value)]).unwrap_err();
            assert!(err.message().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn the_auth_token_is_read_checked_and_never_shown() {
        let token = "c0ffee00c0ffee00c0ffee00c0ffee00";
        let cfg = load(&[("KVCACHE_AUTH_TOKEN", token)], &[]).unwrap();
        assert_eq!(cfg.auth_token.as_ref().map(Secret::expose), Some(token));
        assert!(!format!("{cfg:?}").contains("c0ffee"));
        let err = load(&[("KVCACHE_AUTH_TOKEN", "a-short-secret")], &[]).unwrap_err();
        assert!(err.message().contains("KVCACHE_AUTH_TOKEN=<secret>: expected a random secret of at least 32"), "{err}");
        assert!(!err.message().contains("a-short-secret"), "{err}");
        let cfg = load(&[], &[(Setting::AuthToken, "0123456789abcdef0123456789abcdef")]).unwrap();
        assert!(cfg.auth_token.is_some());
        // Set but empty: an error, not "no authentication".
        let err = load(&[("KVCACHE_AUTH_TOKEN", "  ")], &[]).unwrap_err();
        assert!(err.message().contains("KVCACHE_AUTH_TOKEN is set but empty"), "{err}");
        assert!(load(&[("KVCACHE_AUTH_TOKEN", "0123456789abcdef0123456789abcdef")], &[(Setting::AuthToken, "")]).is_err());
    }

    #[test]
    fn empty_values_mean_unset() {
        let cfg = load(&[("KVCACHE_IB_TIMEOUT", ""), ("KVCACHE_DEBUG", " ")], &[]).unwrap();
        assert_eq!(cfg, Config::default());
    }
}
