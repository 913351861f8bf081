//! `cpushare-node vm run`: boot a guest locally, from files or from an image in the
//! chunk store, print its console, and exit with the guest.
//!
//! An image from the store is materialised into unlinked temp files (never a RAM
//! copy). The store is single-process (sled): without a daemon it is opened directly;
//! while a daemon holds it, the daemon exports the image for us.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use vm::qemu::{AccelPolicy, QemuConfig};
use vm::{Backend, Boot, DiskBus, DiskSpec, GuestExit, GuestSpec, NetSpec, Tap};

use crate::config::Settings;
use crate::control::Client;
use crate::error::{Error, Result};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a guest here and print its serial console; exits with the guest
    /// (0 powered off, 124 time limit, 3 reset, 1 crashed).
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

    /// Kernel command line (replaces a direct-boot image's own).
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

    /// Stop the guest after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,

    /// Plug the NIC into this existing tap interface.
    #[arg(long)]
    pub tap: Option<String>,

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

pub fn run(settings: &Settings, cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Run(args) => run_guest(settings, args),
    }
}

fn bad(what: &'static str, reason: impl Into<String>) -> Error {
    Error::BadArg {
        what,
        reason: reason.into(),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(bad(
            "--mac",
            format!("{s:?} is not a MAC like 02:00:00:00:00:01"),
        ));
    }
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16).map_err(|_| {
            bad(
                "--mac",
                format!("{s:?} is not a MAC like 02:00:00:00:00:01"),
            )
        })?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad("--mac", format!("{s} is a multicast address")));
    }
    Ok(mac)
}

fn existing_file(what: &'static str, p: &Path) -> Result<PathBuf> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(p.to_path_buf()),
        Ok(_) => Err(bad(what, format!("{} is not a regular file", p.display()))),
        Err(e) => Err(bad(what, format!("{}: {e}", p.display()))),
    }
}

use crate::guest_files::{fd_path, Prepared};

fn prepare_from_files(args: &RunArgs) -> Result<Prepared> {
    let disk = match &args.disk {
        Some(p) => {
            existing_file("--disk", p)?;
            let f = File::options()
                .read(true)
                .write(!args.read_only)
                .open(p)
                .map_err(|e| bad("--disk", format!("{}: {e}", p.display())))?;
            Some(f)
        }
        None => None,
    };
    let boot = if let Some(k) = &args.kernel {
        Boot::Direct {
            kernel: existing_file("--kernel", k)?,
            initrd: args
                .initrd
                .as_deref()
                .map(|i| existing_file("--initrd", i))
                .transpose()?,
            cmdline: args
                .append
                .clone()
                .unwrap_or_else(|| "console=ttyS0".into()),
        }
    } else if let Some(iso) = &args.iso {
        Boot::Iso {
            iso: existing_file("--iso", iso)?,
        }
    } else if disk.is_some() {
        Boot::Disk
    } else {
        return Err(bad(
            "guest",
            "nothing to boot: give --image ID, --kernel FILE, --iso FILE or --disk FILE",
        ));
    };
    Ok(Prepared {
        boot,
        disk,
        keep: Vec::new(),
        reserved: Vec::new(),
    })
}

/// Materialises image `id` into unlinked temp files under the data dir.
fn prepare_from_store(settings: &Settings, args: &RunArgs, id_hex: &str) -> Result<Prepared> {
    let id: chunks::ImageId = id_hex.parse().map_err(Error::from)?;
    let tmp = settings.data_dir.join("vm-tmp");
    std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let cap = args.disk_cap_mib.map(|m| m << 20);
    let store = match chunks::ChunkStore::open(settings.store_dir(), settings.store_cap_mib << 20) {
        Ok(store) => store,
        Err(chunks::Error::StoreLocked { .. }) => {
            return prepare_via_daemon(settings, args, id_hex, &tmp, cap)
        }
        Err(e) => return Err(e.into()),
    };
    crate::guest_files::from_store(&store, id, &tmp, cap, args.append.clone())
}

/// The daemon holds the store: it exports the image to a private path, which we open
/// and unlink at once.
fn prepare_via_daemon(
    settings: &Settings,
    args: &RunArgs,
    id_hex: &str,
    tmp: &Path,
    cap: Option<u64>,
) -> Result<Prepared> {
    let mut client = Client::connect(&settings.control_socket(), &settings.data_dir)?;
    let images = client.call("image.ls", Value::Null, |_| {})?;
    let info = images
        .as_array()
        .and_then(|a| a.iter().find(|i| i["id"].as_str() == Some(id_hex)))
        .cloned()
        .ok_or_else(|| {
            bad(
                "--image",
                format!("image {id_hex} is not in the daemon's store"),
            )
        })?;
    let boot_info: Option<chunks::BootInfo> =
        match info.get("boot") {
            None | Some(Value::Null) => None,
            Some(b) => Some(serde_json::from_value(b.clone()).map_err(|e| {
                Error::Control(format!("unreadable boot info from the daemon: {e}"))
            })?),
        };
    if let (Some(cap), Some(size)) = (cap, info["size"].as_u64()) {
        if size > cap {
            return Err(vm::Error::ImageTooLarge { size, cap }.into());
        }
    }
    let path = tmp.join(format!(
        "image-{}-{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    client.call(
        "image.export",
        json!({ "id": id_hex, "path": path }),
        |_| {},
    )?;
    let file = File::options().read(true).write(true).open(&path);
    let _ = std::fs::remove_file(&path);
    let file =
        file.map_err(|e| Error::io(format!("opening the exported image {}", path.display()), e))?;
    if let Some(b) = boot_info {
        // Direct boot: cut the kernel, initrd and disk out of the exported image
        // into unlinked files of their own.
        let kernel = copy_range_unlinked(&file, b.kernel, tmp)?;
        let initrd = b
            .initrd
            .map(|r| copy_range_unlinked(&file, r, tmp))
            .transpose()?;
        let disk = b
            .disk
            .map(|r| copy_range_unlinked(&file, r, tmp))
            .transpose()?;
        let boot = Boot::Direct {
            kernel: fd_path(&kernel),
            initrd: initrd.as_ref().map(fd_path),
            cmdline: args.append.clone().unwrap_or(b.cmdline),
        };
        let mut keep = vec![kernel];
        keep.extend(initrd);
        return Ok(Prepared {
            boot,
            disk,
            keep,
            reserved: Vec::new(),
        });
    }
    if info["format"].as_str() == Some("iso") {
        let boot = Boot::Iso {
            iso: fd_path(&file),
        };
        return Ok(Prepared {
            boot,
            disk: None,
            keep: vec![file],
            reserved: Vec::new(),
        });
    }
    let _ = args;
    Ok(Prepared {
        boot: Boot::Disk,
        disk: Some(file),
        keep: Vec::new(),
        reserved: Vec::new(),
    })
}

/// Copy `range` of `src` into a new unlinked temp file in `dir`, positioned at 0.
fn copy_range_unlinked(src: &File, range: chunks::ByteRange, dir: &Path) -> Result<File> {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = tempfile::tempfile_in(dir)
        .map_err(|e| Error::io(format!("creating a temp file in {}", dir.display()), e))?;
    let mut src = src;
    src.seek(SeekFrom::Start(range.offset))
        .map_err(|e| Error::io("seeking in the exported image", e))?;
    let copied = std::io::copy(&mut src.take(range.len), &mut out)
        .map_err(|e| Error::io("copying a part of the exported image", e))?;
    if copied != range.len {
        return Err(Error::Control(format!(
            "exported image is shorter than its boot info says ({copied} of {} bytes)",
            range.len
        )));
    }
    out.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io("rewinding a temp file", e))?;
    Ok(out)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn run_guest(settings: &Settings, args: RunArgs) -> Result<ExitCode> {
    if args.vcpus == 0 {
        return Err(bad("--vcpus", "must be at least 1"));
    }
    let prepared = match &args.image {
        Some(id) => {
            if args.kernel.is_some() || args.disk.is_some() || args.iso.is_some() {
                return Err(bad(
                    "--image",
                    "give either --image or files (--kernel/--disk/--iso), not both",
                ));
            }
            prepare_from_store(settings, &args, id)?
        }
        None => prepare_from_files(&args)?,
    };
    let Prepared {
        boot,
        disk,
        keep,
        reserved,
    } = prepared;

    let mut spec = GuestSpec::new("vm-run", boot);
    spec.vcpus = args.vcpus;
    spec.memory_mib = args.memory_mib;
    spec.disk = disk.map(|file| DiskSpec {
        file,
        read_only: args.read_only,
        bus: if args.ide {
            DiskBus::Ide
        } else {
            DiskBus::Virtio
        },
    });
    spec.disk_cap_bytes = args.disk_cap_mib.map(|m| m << 20);
    spec.wall_clock_limit = args.timeout.map(Duration::from_secs);
    spec.shutdown_grace = Duration::from_secs(5);
    if let Some(tap) = &args.tap {
        spec.net = Some(NetSpec {
            tap: Tap::Name(tap.clone()),
            mac: parse_mac(&args.mac)?,
        });
    }
    if let Some(p) = &args.serial_log {
        let f =
            File::create(p).map_err(|e| bad("--serial-log", format!("{}: {e}", p.display())))?;
        spec.serial_log = Some(Box::new(f));
    }
    // Fail on bad files/sizes before probing backends.
    spec.validate()?;

    let qemu_cfg = QemuConfig {
        binary: args.qemu.clone(),
        accel: match args.accel {
            AccelArg::Auto => AccelPolicy::Auto,
            AccelArg::Kvm => AccelPolicy::Kvm,
            AccelArg::Tcg => AccelPolicy::Tcg,
        },
        cpu_model: args
            .cpu
            .clone()
            .unwrap_or_else(|| QemuConfig::default().cpu_model),
        ..QemuConfig::default()
    };
    let (backend, why): (Box<dyn Backend>, String) = match args.backend {
        BackendArg::Auto => {
            let choice = vm::auto::choose(&spec, vm::auto::backends_with(qemu_cfg))?;
            let why = choice.explain();
            (choice.backend, why)
        }
        BackendArg::Microvm => {
            if args.accel == AccelArg::Tcg {
                return Err(bad(
                    "--accel",
                    "the microvm backend runs on KVM only; use --backend qemu for TCG",
                ));
            }
            let b = vm::microvm::Microvm::new();
            let p = b.probe(&spec);
            if !p.usable {
                return Err(bad("--backend microvm", p.reason));
            }
            (Box::new(b), format!("microvm: {}", p.reason))
        }
        BackendArg::Qemu => {
            let q = vm::qemu::Qemu::new(qemu_cfg);
            let c = q.choose_accel()?;
            (Box::new(q), format!("qemu with {}: {}", c.accel, c.reason))
        }
    };
    if !args.quiet {
        eprintln!("vm: {why}");
    }

    let mut guest = backend.start(spec)?;
    // Ctrl-C / SIGTERM: ask the guest to shut down (then kill after the grace).
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let console = guest.take_console();
    let printer = console.map(|rx| {
        std::thread::spawn(move || {
            let mut out = std::io::stdout().lock();
            for chunk in rx {
                if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
        })
    });
    let exit = loop {
        if let Some(exit) = guest.wait_timeout(Duration::from_millis(100))? {
            break exit;
        }
        if INTERRUPTED.swap(false, Ordering::SeqCst) {
            eprintln!("vm: stopping the guest");
            break guest.stop(Duration::from_secs(5))?;
        }
    };
    if let Some(p) = printer {
        let _ = p.join();
    }
    drop(guest);
    drop(keep);
    drop(reserved);
    if !args.quiet || matches!(exit, GuestExit::Crashed(_)) {
        eprintln!("vm: {exit}");
    }
    Ok(ExitCode::from(exit.exit_code().clamp(0, 255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings(dir: &Path) -> Settings {
        Settings {
            role: None,
            data_dir: dir.to_path_buf(),
            listen: String::new(),
            bootstrap: Vec::new(),
            mdns: false,
            log_format: crate::cli::LogFormat::Text,
            store_cap_mib: 1024,
            overlay: Default::default(),
            seller: Default::default(),
            buyer: Default::default(),
        }
    }

    #[derive(Parser)]
    struct TestCli {
        #[command(subcommand)]
        cmd: VmCommand,
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["t", "run"];
        argv.extend_from_slice(extra);
        match TestCli::parse_from(argv).cmd {
            VmCommand::Run(a) => a,
        }
    }

    /// A direct-boot image in the store comes out as unlinked files whose bytes are
    /// the original parts, reachable by path through /proc for qemu.
    #[test]
    fn direct_boot_image_materialises_into_unlinked_parts() {
        let dir = tempfile::tempdir().unwrap();
        let parts_dir = dir.path().join("parts");
        std::fs::create_dir_all(&parts_dir).unwrap();
        let part = |name: &str, len: usize, seed: u8| {
            let data: Vec<u8> = (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            let p = parts_dir.join(name);
            std::fs::write(&p, &data).unwrap();
            (p, data)
        };
        let (kernel, kernel_data) = part("vmlinuz", 300_000, 1);
        let (initrd, initrd_data) = part("initrd", 200_000, 2);
        let (disk, disk_data) = part("disk.img", 1 << 20, 3);
        let s = settings(dir.path());
        let id = {
            let store = chunks::ChunkStore::open(s.store_dir(), chunks::UNLIMITED).unwrap();
            let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
            let boot = chunks::DirectBoot {
                kernel,
                initrd: Some(initrd),
                disk: Some(disk),
                cmdline: "console=ttyS0 from-manifest".into(),
            };
            let (id, _) =
                chunks::import_direct_boot(&store, &key, &boot, "t", None, |_, _| {}).unwrap();
            id
        };
        let hex = id.to_hex();
        let p = prepare_from_store(&s, &run_args(&["--image", &hex]), &hex).unwrap();
        let Boot::Direct {
            kernel,
            initrd,
            cmdline,
        } = &p.boot
        else {
            panic!("not a direct boot: {:?}", p.boot)
        };
        assert_eq!(cmdline, "console=ttyS0 from-manifest");
        assert_eq!(std::fs::read(kernel).unwrap(), kernel_data);
        assert_eq!(
            std::fs::read(initrd.as_ref().unwrap()).unwrap(),
            initrd_data
        );
        let mut disk = p.disk.as_ref().unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut disk, &mut got).unwrap();
        assert_eq!(got, disk_data);
        let target = std::fs::read_link(kernel).unwrap();
        assert!(
            target.to_string_lossy().ends_with("(deleted)")
                || target.to_string_lossy().contains("#"),
            "{target:?}"
        );
        // Nothing named is left in the temp dir.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("vm-tmp"))
            .unwrap()
            .flatten()
            .collect();
        assert!(names.is_empty(), "{names:?}");

        // The files hold the store's disk reservation (and so the store): let them go
        // before the store is opened again.
        drop(p);
        // --append replaces the manifest's command line; a cap smaller than the disk refuses.
        let p =
            prepare_from_store(&s, &run_args(&["--image", &hex, "--append", "x=1"]), &hex).unwrap();
        assert!(matches!(&p.boot, Boot::Direct { cmdline, .. } if cmdline == "x=1"));
        drop(p);
        let e = prepare_from_store(
            &s,
            &run_args(&["--image", &hex, "--disk-cap-mib", "0"]),
            &hex,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("larger"), "{e}");
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:00:00:00:ab:01").unwrap(),
            [2, 0, 0, 0, 0xab, 1]
        );
        assert!(parse_mac("02:00:00:00:ab").is_err());
        assert!(parse_mac("01:00:00:00:00:01").is_err(), "multicast");
        assert!(parse_mac("zz:00:00:00:00:01").is_err());
    }
}
