//! Settings: defaults, then the TOML config file, then command-line flags.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cli::{DaemonArgs, GlobalArgs, LogFormat, OnOff};
use crate::domain::Role;
use crate::error::{Error, Result};

/// The libp2p port every node listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7450;
/// Default chunk store cap: 20 GiB.
pub const DEFAULT_STORE_CAP_MIB: u64 = 20 * 1024;
/// Default UDP port of the buyer's overlay switch.
pub const OVERLAY_PORT: u16 = 7451;
/// Default name of the buyer's host tap.
pub const DEFAULT_TAP: &str = "csovl0";
/// Default overlay address of the buyer's host.
pub const DEFAULT_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Default busy-poll budget of the overlay I/O threads (see `overlay::io::spin`).
pub const DEFAULT_BUSY_POLL_US: u64 = overlay::io::spin::DEFAULT_BUDGET.as_micros() as u64;

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
    #[serde(default)]
    pub overlay: OverlayConfig,
    #[serde(default)]
    pub seller: SellerTable,
    #[serde(default)]
    pub buyer: BuyerTable,
    #[serde(default)]
    pub swarm: SwarmTable,
}

/// The `[swarm]` table: how image uploads share this machine's uplink (both roles:
/// a seller relaying chunks, a buyer seeding its images).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmTable {
    /// Cap on chunk uploads, kbit/s of chunk payload (default none).
    pub upload_max_kbps: Option<u64>,
    /// Yield to the owner's traffic: back off when the queueing delay the uploads
    /// see rises above `upload_yield_target_ms` (default "on").
    pub upload_yield: Option<OnOff>,
    /// The yielding mode's queueing-delay target, ms (default 100).
    pub upload_yield_target_ms: Option<u64>,
    /// Where the yielding mode reads the queueing delay (default "acks").
    pub upload_yield_signal: Option<YieldSignal>,
    /// TCP congestion control of the swarm's connections, e.g. "cubic" or "reno";
    /// unset: the system's. One of the kernel's tcp_available_congestion_control.
    pub tcp_congestion: Option<String>,
}

/// Where the yielding mode reads the queueing delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum YieldSignal {
    /// The chunks' acknowledgements: their latency beyond what the bytes ahead of
    /// them need at the measured capacity.
    Acks,
    /// The kernel's TCP round trip (smoothed minus least) on the connections
    /// uploading now (experimental: a receiver's delayed ACKs read as queueing
    /// when few packets flow; docs/bench/owner-link.md).
    Tcp,
    /// The chunks' one-way delay (LEDBAT's): each reply stamped by its sender,
    /// the receiver's acknowledgement echoing arrival minus stamp, against a
    /// per-peer base; the receiver's own uplink is not in it.
    Owd,
}

impl SwarmTable {
    /// The congestion control the swarm's sockets ask for, checked against the
    /// kernel's list so a typo is a clear error at start, not a silent default.
    pub fn tcp_congestion(&self) -> Result<Option<String>> {
        let Some(cc) = &self.tcp_congestion else {
            return Ok(None);
        };
        let path = "/proc/sys/net/ipv4/tcp_available_congestion_control";
        let avail = std::fs::read_to_string(path).unwrap_or_default();
        if !avail.split_whitespace().any(|a| a == cc) {
            return Err(Error::BadArg {
                what: "swarm.tcp_congestion",
                reason: format!(
                    "{cc:?} is not available in this kernel (it has: {}; a module such as tcp_{cc} may need loading)",
                    avail.trim()
                ),
            });
        }
        Ok(Some(cc.clone()))
    }

    /// Whether the yielding mode follows the TCP round trip (`upload_yield_signal = "tcp"`).
    pub fn tcp_yield_signal(&self) -> bool {
        self.upload_yield_signal == Some(YieldSignal::Tcp)
    }
}

/// Default queueing-delay target of the yielding upload mode, ms.
pub const DEFAULT_YIELD_TARGET_MS: u64 = 100;

impl SwarmTable {
    /// The uploads' pacing for `role`: the role's defaults with this table's
    /// cap and yielding mode.
    pub fn upload_config(&self, role: Role) -> Result<chunks::swarm::UploadConfig> {
        let mut c = match role {
            Role::Buyer => chunks::swarm::UploadConfig::seed(),
            Role::Seller => chunks::swarm::UploadConfig::relay(),
        };
        if let Some(k) = self.upload_max_kbps {
            if k == 0 {
                return Err(Error::BadArg {
                    what: "swarm.upload_max_kbps",
                    reason: "must be at least 1 (leave it unset for no cap)".into(),
                });
            }
            c.max_rate = Some(k * 1000 / 8);
        }
        let target = self
            .upload_yield_target_ms
            .unwrap_or(DEFAULT_YIELD_TARGET_MS);
        if !(1..=10_000).contains(&target) {
            return Err(Error::BadArg {
                what: "swarm.upload_yield_target_ms",
                reason: format!("{target} is outside 1..=10000"),
            });
        }
        if self.upload_yield.unwrap_or(OnOff::On) == OnOff::On {
            c.yield_target_us = Some(target * 1000);
        }
        // The one-way delay ("owd") serves the owner's line best (docs/bench/
        // owner-link.md, 2026-12-08) but is not the default: with it on every node
        // the real 8-seller benchmark (8 Mbit/s, 100 ms FIFOs) took 4.9 x its bound
        // instead of 1.10 x (docs/bench/swarm.md)
        c.one_way =
            c.yield_target_us.is_some() && self.upload_yield_signal == Some(YieldSignal::Owd);
        Ok(c)
    }
}

/// The `[seller]` table: what this seller offers and its owner's policy.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SellerTable {
    /// Guests at once (default 2).
    pub max_guests: Option<u32>,
    /// vCPUs offered per guest (default 1).
    pub vcpus: Option<u32>,
    /// Memory offered per guest, MiB (default 256).
    pub memory_mib: Option<u64>,
    /// Largest guest disk, MiB (default half the store cap).
    pub disk_cap_mib: Option<u64>,
    /// Price per guest-minute in credits, e.g. "0.01" (the default).
    pub price_per_min: Option<String>,
    /// auto (KVM where it runs Linux, else TCG), kvm (refuse to start without it), tcg.
    pub accel: Option<String>,
    /// Only these buyers (hex public keys); empty = anyone not denied.
    #[serde(default)]
    pub allowed_buyers: Vec<String>,
    /// Never these buyers.
    #[serde(default)]
    pub denied_buyers: Vec<String>,
    /// Hours it sells, "START-END" in UTC (e.g. "18-8"); none = always.
    pub hours: Option<String>,
    /// The boot medium this seller booted from, hashed into its measurement.
    pub measure_boot: Option<PathBuf>,
    /// Run each guest's VMM jailed (own uid, no capabilities, minimal root, own
    /// cgroup): on (the default) or off.
    pub jail: Option<OnOff>,
    /// All guests together use at most this percent of the machine's CPU (1-100;
    /// default 100).
    pub max_cpu_percent: Option<u32>,
    /// First uid/gid of the range reserved for guests' VMMs (default 400000).
    pub jail_uid_base: Option<u32>,
    /// How many uids/gids the range holds (default 1000).
    pub jail_uid_count: Option<u32>,
    /// Each guest's disk throughput cap in MiB/s (default none).
    pub disk_mbps: Option<u64>,
    /// Each guest's disk operations per second cap (default none).
    pub disk_iops: Option<u64>,
}

/// The `[buyer]` table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuyerTable {
    /// Trusted seller measurements (one hex hash per line): a file, re-read when it
    /// changes, or an http:// URL, fetched again every minute (ETag/Last-Modified).
    pub trusted: Option<PathBuf>,
    /// Revoked measurements, same format, file or URL.
    pub revoked: Option<PathBuf>,
    /// Billing period in seconds (default 60: a receipt per minute).
    pub billing_period_s: Option<u32>,
    /// How long a seller may go unacknowledged before it ends the guest (default 120).
    pub grace_s: Option<u32>,
    /// A lease with no sign of life for this long is re-dispatched (default 30).
    pub silence_s: Option<u32>,
}

/// The `[overlay]` table: defaults for the `overlay admit` / `overlay attach`
/// flags of the same names (a flag given on the command line wins).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayConfig {
    /// Buyer: UDP address sellers connect to.
    pub listen: Option<SocketAddr>,
    /// Buyer: name of the host tap.
    pub tap: Option<String>,
    /// Buyer: the host's overlay address (/16).
    pub host_ip: Option<Ipv4Addr>,
    /// Seller: the buyer host's overlay address.
    pub buyer_ip: Option<Ipv4Addr>,
    /// Seller: cap on a guest's sending rate, Mbit/s.
    pub max_mbit: Option<u64>,
    /// Seller: cap on a guest's sending rate, frames per second.
    pub max_pps: Option<u64>,
    /// Both: busy-poll budget of the overlay I/O threads, microseconds.
    pub busy_poll_us: Option<u64>,
}

/// Resolved `overlay admit` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitSettings {
    pub listen: SocketAddr,
    pub tap: String,
    pub host_ip: Ipv4Addr,
    pub busy_poll_us: u64,
}

/// Resolved `overlay attach` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSettings {
    pub buyer_ip: Ipv4Addr,
    pub max_mbit: Option<u64>,
    pub max_pps: Option<u64>,
    pub busy_poll_us: u64,
}

impl OverlayConfig {
    /// Flags (`Some`) over the config file over built-in defaults.
    pub fn admit(
        &self,
        listen: Option<SocketAddr>,
        tap: Option<String>,
        host_ip: Option<Ipv4Addr>,
        busy_poll_us: Option<u64>,
    ) -> AdmitSettings {
        AdmitSettings {
            listen: listen
                .or(self.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], OVERLAY_PORT))),
            tap: tap
                .or_else(|| self.tap.clone())
                .unwrap_or_else(|| DEFAULT_TAP.to_string()),
            host_ip: host_ip.or(self.host_ip).unwrap_or(DEFAULT_HOST_IP),
            busy_poll_us: busy_poll_us
                .or(self.busy_poll_us)
                .unwrap_or(DEFAULT_BUSY_POLL_US),
        }
    }

    /// Flags (`Some`) over the config file over built-in defaults.
    pub fn attach(
        &self,
        buyer_ip: Option<Ipv4Addr>,
        max_mbit: Option<u64>,
        max_pps: Option<u64>,
        busy_poll_us: Option<u64>,
    ) -> AttachSettings {
        AttachSettings {
            buyer_ip: buyer_ip.or(self.buyer_ip).unwrap_or(DEFAULT_HOST_IP),
            max_mbit: max_mbit.or(self.max_mbit),
            max_pps: max_pps.or(self.max_pps),
            busy_poll_us: busy_poll_us
                .or(self.busy_poll_us)
                .unwrap_or(DEFAULT_BUSY_POLL_US),
        }
    }
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
    /// The config file's `[overlay]` table (resolved against flags per command).
    pub overlay: OverlayConfig,
    /// The config file's `[seller]` table.
    pub seller: SellerTable,
    /// The config file's `[buyer]` table.
    pub buyer: BuyerTable,
    /// The config file's `[swarm]` table.
    pub swarm: SwarmTable,
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
            overlay: file.overlay,
            seller: file.seller,
            buyer: file.buyer,
            swarm: file.swarm,
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
    fn overlay_table_fills_in_flags_not_given() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(
            &cfg,
            "[overlay]\nlisten = \"127.0.0.1:9000\"\ntap = \"ovl7\"\nhost_ip = \"10.9.0.1\"\n\
             buyer_ip = \"10.9.0.2\"\nmax_mbit = 40\nmax_pps = 5000\nbusy_poll_us = 0\n",
        )
        .unwrap();
        let global = GlobalArgs {
            config: Some(cfg),
            data_dir: Some(dir.path().into()),
            log_format: None,
        };
        let o = Settings::resolve(&global, &DaemonArgs::default())
            .unwrap()
            .overlay;
        // Nothing on the command line: the file's values.
        assert_eq!(
            o.admit(None, None, None, None),
            AdmitSettings {
                listen: "127.0.0.1:9000".parse().unwrap(),
                tap: "ovl7".into(),
                host_ip: Ipv4Addr::new(10, 9, 0, 1),
                busy_poll_us: 0,
            }
        );
        assert_eq!(
            o.attach(None, None, None, None),
            AttachSettings {
                buyer_ip: Ipv4Addr::new(10, 9, 0, 2),
                max_mbit: Some(40),
                max_pps: Some(5000),
                busy_poll_us: 0,
            }
        );
        // Flags win, one by one.
        let a = o.admit(None, Some("ovl8".into()), None, Some(20));
        assert_eq!((a.tap.as_str(), a.busy_poll_us), ("ovl8", 20));
        assert_eq!(a.listen, "127.0.0.1:9000".parse().unwrap());
        let t = o.attach(Some(Ipv4Addr::new(10, 9, 0, 3)), None, Some(7), None);
        assert_eq!(t.buyer_ip, Ipv4Addr::new(10, 9, 0, 3));
        assert_eq!((t.max_mbit, t.max_pps), (Some(40), Some(7)));
        // No file: the built-in defaults.
        let d = OverlayConfig::default();
        let a = d.admit(None, None, None, None);
        assert_eq!(a.listen, SocketAddr::from(([0, 0, 0, 0], OVERLAY_PORT)));
        assert_eq!(
            (a.tap.as_str(), a.host_ip, a.busy_poll_us),
            (DEFAULT_TAP, DEFAULT_HOST_IP, DEFAULT_BUSY_POLL_US)
        );
        let t = d.attach(None, None, None, None);
        assert_eq!(
            (t.buyer_ip, t.max_mbit, t.max_pps),
            (DEFAULT_HOST_IP, None, None)
        );
    }

    #[test]
    fn unknown_overlay_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "[overlay]\nbusy_pol_us = 3\n").unwrap();
        let global = GlobalArgs {
            config: Some(cfg),
            ..Default::default()
        };
        let err = Settings::resolve(&global, &DaemonArgs::default()).unwrap_err();
        assert!(err.to_string().contains("busy_pol_us"), "{err}");
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

    #[test]
    fn yielding_defaults_to_the_acknowledgement_signal() {
        for role in [Role::Buyer, Role::Seller] {
            let c = SwarmTable::default().upload_config(role).unwrap();
            assert_eq!(c.yield_target_us, Some(DEFAULT_YIELD_TARGET_MS * 1000));
            assert!(!c.one_way, "{role:?}");
        }
        let owd = SwarmTable {
            upload_yield_signal: Some(YieldSignal::Owd),
            ..Default::default()
        };
        assert!(owd.upload_config(Role::Seller).unwrap().one_way);
        // yielding off: no signal is followed
        let off = SwarmTable {
            upload_yield: Some(OnOff::Off),
            ..Default::default()
        };
        let c = off.upload_config(Role::Seller).unwrap();
        assert!(!c.one_way && c.yield_target_us.is_none());
    }
}
