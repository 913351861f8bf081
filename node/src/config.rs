//! Settings: defaults, then the TOML config file, then command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::{DaemonArgs, GlobalArgs, LogFormat, OnOff, Role};
use crate::error::{Error, Result};

/// The libp2p port every node listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7450;
/// Default chunk store cap: 20 GiB.
pub const DEFAULT_STORE_CAP_MIB: u64 = 20 * 1024;

/// The config file's shape; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub role: Option<Role>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    #[serde(default)]
    pub bootstrap: Vec<String>,
    pub mdns: Option<OnOff>,
    pub log_format: Option<LogFormat>,
    pub store_cap_mib: Option<u64>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.message().to_string(),
        })
    }
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub role: Option<Role>,
    pub data_dir: PathBuf,
    pub listen: String,
    pub bootstrap: Vec<String>,
    pub mdns: bool,
    pub log_format: LogFormat,
    pub store_cap_mib: u64,
}

impl Settings {
    pub fn resolve(global: &GlobalArgs, daemon: &DaemonArgs) -> Result<Self> {
        let file = match &global.config {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let data_dir = global
            .data_dir
            .clone()
            .or(file.data_dir)
            .map(Ok)
            .unwrap_or_else(default_data_dir)?;
        let mut bootstrap = file.bootstrap;
        bootstrap.extend(daemon.bootstrap.iter().cloned());
        Ok(Settings {
            role: daemon.role.or(file.role),
            data_dir,
            listen: daemon
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}")),
            bootstrap,
            mdns: daemon.mdns.or(file.mdns).unwrap_or(OnOff::Off) == OnOff::On,
            log_format: global
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            store_cap_mib: daemon
                .store_cap_mib
                .or(file.store_cap_mib)
                .unwrap_or(DEFAULT_STORE_CAP_MIB),
        })
    }

    pub fn control_socket(&self) -> PathBuf {
        self.data_dir.join("control.sock")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }

    pub fn identity_file(&self) -> PathBuf {
        self.data_dir.join("identity.key")
    }
}

fn default_data_dir() -> Result<PathBuf> {
    directories::ProjectDirs::from("net", "cpushare", "cpushare")
        .map(|d| d.data_dir().to_path_buf())
        .ok_or(Error::BadArg {
            what: "--data-dir",
            reason: "no home directory to put the default data dir in; pass --data-dir".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_and_bootstrap_accumulates() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "role = \"seller\"\nlisten = \"/ip4/127.0.0.1/tcp/1\"\nbootstrap = [\"/ip4/1.2.3.4/tcp/5\"]\nmdns = \"on\"\n",
        )
        .unwrap();
        let global = GlobalArgs {
            config: Some(cfg),
            data_dir: Some(dir.path().into()),
            log_format: None,
        };
        let daemon = DaemonArgs {
            role: Some(Role::Buyer),
            bootstrap: vec!["/ip4/5.6.7.8/tcp/9".into()],
            ..Default::default()
        };
        let s = Settings::resolve(&global, &daemon).unwrap();
        assert_eq!(s.role, Some(Role::Buyer));
        assert_eq!(s.listen, "/ip4/127.0.0.1/tcp/1");
        assert_eq!(s.bootstrap.len(), 2);
        assert!(s.mdns);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "rol = \"seller\"\n").unwrap();
        let global = GlobalArgs {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let err = Settings::resolve(&global, &DaemonArgs::default()).unwrap_err();
        assert!(
            err.to_string().contains(&cfg.display().to_string()),
            "{err}"
        );
    }
}
