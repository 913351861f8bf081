//! The node's error type: every message says what went wrong and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `hint` names the role the command needs and how to start it.
    #[error("no cpushare-node daemon is running for data dir {dir} ({hint})")]
    NoDaemon { dir: PathBuf, hint: String },

    #[error("a cpushare-node daemon is already running for data dir {dir}")]
    DaemonRunning { dir: PathBuf },

    #[error("config file {path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("bad value for {what}: {reason}")]
    BadArg { what: &'static str, reason: String },

    #[error("identity key {path}: {reason}")]
    Identity { path: PathBuf, reason: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Chunks(#[from] chunks::Error),

    #[error(transparent)]
    Overlay(#[from] overlay::Error),

    #[error(transparent)]
    Vm(#[from] vm::Error),

    #[error("control socket protocol error: {0}")]
    Control(String),

    /// An error the daemon reported back to a client command.
    #[error("{0}")]
    Remote(String),

    #[error("unknown control method {0:?} (is the daemon the same version as this client?)")]
    UnknownMethod(String),

    #[error("this needs a {needed} daemon, but the daemon runs as {actual}")]
    WrongRole {
        needed: &'static str,
        actual: &'static str,
    },

    #[error("libp2p: {0}")]
    P2p(String),

    #[error("market: {0}")]
    Market(String),

    /// A capability, device or group the daemon needs and lacks (one line).
    #[error("{0}")]
    Privilege(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
