//! The crate's one error type.

use std::path::PathBuf;

/// What can stop a simulation run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot read scenario {path}: {source}")]
    ReadScenario {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid TOML for a simulation: {detail}")]
    ParseScenario {
        path: PathBuf,
        /// One line: where and what (toml's own rendering spans several lines).
        detail: String,
    },
    #[error("scenario is inconsistent: {0}")]
    Invalid(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw plot {path}: {why}")]
    Plot { path: PathBuf, why: String },
}

pub type Result<T> = std::result::Result<T, SimError>;
