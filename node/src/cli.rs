//! Command-line interface. With no subcommand the binary runs the daemon.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::domain::Role;
pub use overlay_args::OverlayCommand;
pub use vm_args::VmCommand;

// Every clap type lives under cli (the services import them, never the reverse).
pub mod overlay_args;
pub mod run_args;
pub mod vm_args;

#[derive(Debug, Parser)]
#[command(
    name = "cpushare-node",
    version,
    about = "cpushare: rent CPU time on other people's machines, or sell yours",
    long_about = "With --role, runs the daemon. Subcommands talk to the running daemon \
                  of the same --data-dir over its control socket."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(flatten)]
    pub daemon: DaemonArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options every invocation understands (daemon and client commands).
#[derive(Debug, Args, Clone, Default)]
pub struct GlobalArgs {
    /// TOML config file; command-line flags override its values.
    #[arg(long, global = true, env = "CPUSHARE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Data directory (identity key, chunk store, control socket).
    #[arg(long, global = true, env = "CPUSHARE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Options of the daemon (`cpushare-node --role ...`).
#[derive(Debug, Args, Clone, Default)]
pub struct DaemonArgs {
    /// Run the daemon in this role.
    #[arg(long, value_enum)]
    pub role: Option<Role>,

    /// libp2p listen multiaddr (default /ip4/0.0.0.0/tcp/7450).
    #[arg(long)]
    pub listen: Option<String>,

    /// Multiaddrs of peers to dial at start (with /p2p/<peer id>); repeatable.
    #[arg(long)]
    pub bootstrap: Vec<String>,

    /// Find peers on the local network with mDNS.
    #[arg(long, value_enum)]
    pub mdns: Option<OnOff>,

    /// Chunk store size cap in MiB (least recently used chunks of unpinned images are evicted).
    #[arg(long)]
    pub store_cap_mib: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Guest images in the chunk store.
    #[command(subcommand)]
    Image(ImageCommand),

    /// The L2 overlay: admit guests (buyer), attach guest ports (seller), list sessions.
    #[command(subcommand)]
    Overlay(OverlayCommand),

    /// Run a guest here (from files or an image in the store) and print its console.
    #[command(subcommand)]
    Vm(VmCommand),

    /// Show the daemon's peer id, addresses, peers, transfer counters and store.
    Status {
        /// Print machine-readable JSON.
        #[arg(long)]
        json: bool,
    },

    /// Print this node's identity (peer id and public key) without a daemon.
    Id,

    /// Print the configuration in effect: every key with its value (built-in
    /// defaults, then the --config file, then flags), as TOML.
    Config {
        /// Print JSON instead (unset keys as null).
        #[arg(long)]
        json: bool,
    },

    /// Buyer: rent guests of an image on the best sellers and keep them running.
    Run(run_args::RunArgs),

    /// Leases of this node (buyer: its guests; seller: the guests it runs).
    Leases {
        #[arg(long)]
        json: bool,
    },

    /// Buyer: end a lease, or every lease with --all (billing stops there).
    Stop {
        /// Lease id (see `leases`).
        lease: Option<String>,
        #[arg(long, conflicts_with = "lease")]
        all: bool,
    },

    /// Seller: the audit log (which buyer ran what, when, and what its guest sent).
    Audit {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Chunk a disk image (or a kernel + initrd + disk for direct boot) into the
    /// store, sign its manifest, print the image id.
    Import {
        /// Raw disk image, ISO, or qcow2 (converted with qemu-img). With --kernel:
        /// the optional root disk.
        #[arg(required_unless_present = "kernel")]
        file: Option<PathBuf>,
        /// Linux kernel (bzImage or ELF vmlinux): import a direct-boot image.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initial ramdisk of a direct-boot image.
        #[arg(long, requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Kernel command line of a direct-boot image.
        #[arg(long, requires = "kernel", default_value = "console=ttyS0")]
        cmdline: String,
        /// Image format; guessed from the file when omitted.
        #[arg(long, value_enum)]
        format: Option<ImageFormatArg>,
        /// Human-readable name kept in the manifest (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// Let any peer fetch it (a public grant). Images are private by default:
        /// only peers a lease or `image grant` lets in get its manifest and chunks.
        #[arg(long)]
        public: bool,
    },
    /// Let a peer fetch an image this node imported (its buyer); prints the signed
    /// grant (hex), which the peer may also pass to `image fetch --grant`.
    /// Leases carry such a grant for their seller by themselves.
    Grant {
        /// Image id (hex).
        id: String,
        /// The peer let in: its peer id (12D3Koo...) or 64-hex key.
        #[arg(required_unless_present = "public", conflicts_with = "public")]
        peer: Option<String>,
        /// Let any peer fetch it.
        #[arg(long)]
        public: bool,
        /// Until when: a duration from now (`90s`, `30m`, `12h`, `7d`) or Unix
        /// seconds; default: no expiry.
        #[arg(long)]
        until: Option<String>,
    },
    /// List images in the store.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Fetch an image from the swarm into the store now.
    Fetch {
        /// Image id (hex).
        id: String,
        /// A grant (hex, from the buyer's `image grant`) letting this node fetch it.
        #[arg(long)]
        grant: Option<String>,
    },
    /// Write an image from the store to a file.
    Export {
        /// Image id (hex).
        id: String,
        /// Destination file (written atomically).
        file: PathBuf,
    },
    /// Check every chunk in the store against its hash; bad chunks are removed.
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormatArg {
    Raw,
    Iso,
    Qcow2,
}
