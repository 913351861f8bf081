//! `cpushare-node vm run ...` (run by `vm_cmd::run`).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

/// `vm run --help` lists these; `vm_cmd::exit_status` implements them.
pub const EXIT_STATUSES: &str = "\
Exit status:
  0    the guest powered off
  1    an error, or the guest or its VMM crashed
  3    the guest reset (rebooted); guests are not restarted
  4    the firmware found nothing to boot (it reset before the guest wrote anything)
  124  --timeout ran out: the guest was stopped (shut down, or killed after --grace)
  130  stopped on request (Ctrl-C or SIGTERM): the guest shut down within --grace
  137  stopped on request: the guest did not shut down within --grace and was killed";

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a guest here and print its serial console; exits with the guest (the
    /// exit statuses are listed in `vm run --help`).
    #[command(after_help = EXIT_STATUSES)]
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image id (hex) in the chunk store: a disk, ISO or direct-boot image.
    #[arg(long, conflicts_with_all = ["kernel", "iso"])]
    pub image: Option<String>,

    /// Linux kernel for direct boot (bzImage or ELF vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk for direct boot.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line (replaces a direct-boot image's own). Direct boot only: a
    /// disk or ISO boots its own loader's command line, so --append is refused there.
    #[arg(long)]
    pub append: Option<String>,

    /// Disk image file, used in place (writes go to it unless --read-only). Boots it
    /// with firmware unless --kernel or --iso is given.
    #[arg(long)]
    pub disk: Option<PathBuf>,

    /// ISO image to boot (a live CD) with firmware.
    #[arg(long, conflicts_with = "kernel")]
    pub iso: Option<PathBuf>,

    /// Attach the disk read-only.
    #[arg(long)]
    pub read_only: bool,

    /// Put the disk on IDE instead of virtio (guests without virtio drivers).
    #[arg(long)]
    pub ide: bool,

    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,

    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,

    /// Refuse disks larger than this (MiB).
    #[arg(long)]
    pub disk_cap_mib: Option<u64>,

    /// Which backend; auto picks the best one this host can run the guest with.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,

    /// qemu accelerator: auto probes KVM and falls back to TCG.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,

    /// qemu CPU model (a named model; `host` fails on some nested hosts).
    #[arg(long)]
    pub cpu: Option<String>,

    /// qemu binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,

    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<u64>,

    /// Seconds a guest asked to stop (Ctrl-C, SIGTERM, --timeout) gets to shut down
    /// before it is killed.
    #[arg(long, default_value_t = 5)]
    pub grace: u64,

    /// Plug the NIC into this tap: one that `overlay attach --tap` made (it is
    /// opened in its lease namespace), or an existing tap of this namespace.
    #[arg(long)]
    pub tap: Option<String>,

    /// The network namespace holding --tap [default: the lease namespace that
    /// `overlay attach --tap` of this data dir made for it].
    #[arg(long, requires = "tap")]
    pub netns: Option<String>,

    /// The NIC's MAC address.
    #[arg(long, default_value = "02:00:00:00:00:01", requires = "tap")]
    pub mac: String,

    /// Also write the console to this file.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,

    /// Don't print which backend was chosen and why.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Auto,
    Microvm,
    Qemu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}
