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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm::qemu::{AccelPolicy, QemuConfig};
use vm::{Backend, Boot, DiskBus, DiskSpec, GuestExit, GuestSpec, NetSpec, Tap};

use crate::cli::vm_args::{AccelArg, BackendArg, RunArgs, VmCommand};
use crate::config::Settings;
use crate::control::Client;
use crate::error::{Error, Result};

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

/// Flags that only make sense for some boots, checked once the boot is known and
/// before anything is materialised. `what` names the thing booted.
fn check_boot_flags(args: &RunArgs, direct: bool, what: &str) -> Result<()> {
    if direct {
        return Ok(());
    }
    if args.append.is_some() {
        return Err(bad(
            "--append",
            format!("{what} boots through firmware and its own boot loader, which never sees --append: drop it (change the command line in the image's loader configuration) or boot a kernel directly with --kernel"),
        ));
    }
    if args.backend == BackendArg::Microvm {
        return Err(bad(
            "--backend microvm",
            format!("{what} needs firmware to boot, and the microvm backend only boots a kernel directly: use --backend qemu (or auto)"),
        ));
    }
    Ok(())
}

fn prepare_from_files(args: &RunArgs) -> Result<Prepared> {
    let what = if args.iso.is_some() {
        "an ISO image"
    } else {
        "a disk image"
    };
    if args.kernel.is_none() && (args.iso.is_some() || args.disk.is_some()) {
        check_boot_flags(args, false, what)?;
    }
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
    if let Some(m) = store.get_manifest(id)? {
        let m = m.manifest();
        check_boot_flags(args, m.boot.is_some(), &image_what(m.format))?;
    }
    crate::guest_files::from_store(&store, id, &tmp, cap, args.append.clone())
}

fn image_what(format: chunks::ImageFormat) -> String {
    match format {
        chunks::ImageFormat::Iso => "this ISO image".into(),
        _ => "this disk image".into(),
    }
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
    let what = if info["format"].as_str() == Some("iso") {
        "this ISO image"
    } else {
        "this disk image"
    };
    check_boot_flags(args, boot_info.is_some(), what)?;
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

/// Why we asked the guest to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopCause {
    Request,
    TimeLimit,
}

/// A stop we asked for, and whether the guest had to be killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stop {
    cause: StopCause,
    killed: bool,
}

/// The exit status and the line for stderr (see [`EXIT_STATUSES`]). `firmware_silent`:
/// firmware booted the guest and it wrote nothing to its console.
fn exit_status(
    exit: &GuestExit,
    stop: Option<Stop>,
    firmware_silent: bool,
    grace: Duration,
) -> (u8, String) {
    let g = grace.as_secs();
    match (exit, stop) {
        (GuestExit::Crashed(why), _) => (1, format!("guest crashed: {why}")),
        (
            _,
            Some(Stop {
                cause: StopCause::TimeLimit,
                killed: false,
            }),
        ) => (
            124,
            "time limit reached: the guest was stopped and shut down".into(),
        ),
        (
            _,
            Some(Stop {
                cause: StopCause::TimeLimit,
                killed: true,
            }),
        ) => (
            124,
            format!("time limit reached: the guest did not shut down within {g} s and was killed"),
        ),
        (
            _,
            Some(Stop {
                cause: StopCause::Request,
                killed: false,
            }),
        ) => (130, "guest stopped on request: it shut down".into()),
        (
            _,
            Some(Stop {
                cause: StopCause::Request,
                killed: true,
            }),
        ) => (
            137,
            format!("guest stopped on request: it did not shut down within {g} s and was killed"),
        ),
        (GuestExit::PoweredOff, None) => (0, "guest powered off".into()),
        (GuestExit::Reset, None) if firmware_silent => (
            4,
            "the firmware found nothing to boot: it reset before the guest wrote anything to \
             its console (is the disk bootable? a BIOS boot sector or GRUB on an MBR disk is \
             needed)"
                .into(),
        ),
        (GuestExit::Reset, None) => (3, "guest reset (rebooted); it is not restarted".into()),
        (GuestExit::LimitReached, None) => (124, exit.to_string()),
        (GuestExit::Stopped, None) => (130, exit.to_string()),
    }
}

/// The guest's NIC: `--tap` opened where it lives. A tap that `overlay attach --tap`
/// made lives in its lease namespace, where a VMM opening it by name would not find it
/// (it would make a new, unconnected tap in its own namespace instead), so we open it
/// there and hand the VMM the fd.
fn guest_net(settings: &Settings, args: &RunArgs) -> Result<Option<NetSpec>> {
    let Some(name) = &args.tap else {
        return Ok(None);
    };
    let mac = parse_mac(&args.mac)?;
    let netns = args
        .netns
        .clone()
        .or_else(|| crate::overlay_leases::netns_of_tap(&settings.data_dir, name));
    let tap = match netns {
        Some(ns_name) => {
            let ns =
                overlay::io::NetNs::open(&ns_name).map_err(|e| bad("--netns", e.to_string()))?;
            let n = name.clone();
            let fd = ns
                .run(move || {
                    nix::net::if_::if_nametoindex(n.as_str()).map_err(std::io::Error::from)?;
                    // A vnet header, as qemu asks for when it opens a tap by name.
                    let opts = overlay::io::TapOptions { offload: true };
                    Ok(overlay::io::Tap::create(&n, opts)?.into_fd())
                })
                .map_err(|e| {
                    bad(
                        "--tap",
                        format!("opening tap {name} in namespace {ns_name}: {e}"),
                    )
                })?;
            Tap::Fd(fd)
        }
        None => {
            if nix::net::if_::if_nametoindex(name.as_str()).is_err() {
                return Err(bad(
                    "--tap",
                    format!("no tap {name}: `cpushare-node overlay attach --tap {name} ...` on the seller daemon of this data dir makes one (connected to a buyer) in a lease namespace; or give --netns NS for a tap in another namespace"),
                ));
            }
            Tap::Name(name.clone())
        }
    };
    Ok(Some(NetSpec { tap, mac }))
}

fn run_guest(settings: &Settings, args: RunArgs) -> Result<ExitCode> {
    if args.vcpus == 0 {
        return Err(bad("--vcpus", "must be at least 1"));
    }
    // The NIC first: a bad --mac or a missing tap costs no image materialisation.
    let net = guest_net(settings, &args)?;
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
    let firmware = !matches!(boot, Boot::Direct { .. });

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
    // The time limit is ours (below), so that its stop is told apart from a kill.
    spec.wall_clock_limit = None;
    let grace = Duration::from_secs(args.grace);
    spec.shutdown_grace = grace;
    spec.net = net;
    if let Some(p) = &args.serial_log {
        let f =
            File::create(p).map_err(|e| bad("--serial-log", format!("{}: {e}", p.display())))?;
        spec.serial_log = Some(Box::new(f));
    }
    // Fail on bad files/sizes before probing backends.
    spec.validate()?;
    if let (Boot::Disk, Some(d)) = (&spec.boot, &spec.disk) {
        // Before starting: firmware would halt on it with a blank console.
        vm::disk_check::check_bootable(&d.file)?;
    }

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
    let started = Instant::now();
    // Ctrl-C / SIGTERM: ask the guest to shut down (then kill after the grace).
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let console = guest.take_console();
    let console_bytes = Arc::new(AtomicU64::new(0));
    let seen = console_bytes.clone();
    let printer = console.map(|rx| {
        std::thread::spawn(move || {
            let mut out = std::io::stdout().lock();
            for chunk in rx {
                seen.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
        })
    });
    let limit = args.timeout.map(Duration::from_secs);
    let (exit, stop) = loop {
        if let Some(exit) = guest.wait_timeout(Duration::from_millis(100))? {
            break (exit, None);
        }
        let cause = if INTERRUPTED.swap(false, Ordering::SeqCst) {
            Some(StopCause::Request)
        } else if limit.is_some_and(|l| started.elapsed() >= l) {
            Some(StopCause::TimeLimit)
        } else {
            None
        };
        if let Some(cause) = cause {
            if !args.quiet {
                eprintln!(
                    "vm: stopping the guest (it has {} s to shut down)",
                    args.grace
                );
            }
            let asked = Instant::now();
            let exit = guest.stop(grace)?;
            // The backend kills the guest when the grace runs out, not before: an
            // answer that took the whole grace is a kill.
            let killed = asked.elapsed() >= grace;
            break (exit, Some(Stop { cause, killed }));
        }
    };
    if let Some(p) = printer {
        let _ = p.join();
    }
    drop(guest);
    drop(keep);
    drop(reserved);
    let silent = firmware && console_bytes.load(Ordering::Relaxed) == 0;
    let (code, line) = exit_status(&exit, stop, silent, grace);
    if !args.quiet || !matches!(code, 0 | 124 | 130) {
        eprintln!("vm: {line}");
    }
    Ok(ExitCode::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::vm_args::EXIT_STATUSES;
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
            swarm: Default::default(),
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
    fn exit_statuses_tell_the_endings_apart() {
        let g = Duration::from_secs(5);
        let st = |e: GuestExit, stop: Option<Stop>, silent| exit_status(&e, stop, silent, g).0;
        let stop = |cause, killed| Some(Stop { cause, killed });
        assert_eq!(st(GuestExit::PoweredOff, None, false), 0);
        assert_eq!(st(GuestExit::Crashed("x".into()), None, false), 1);
        assert_eq!(st(GuestExit::Reset, None, false), 3);
        assert_eq!(st(GuestExit::Reset, None, true), 4);
        let limit = StopCause::TimeLimit;
        assert_eq!(st(GuestExit::Stopped, stop(limit, false), false), 124);
        assert_eq!(st(GuestExit::Stopped, stop(limit, true), false), 124);
        let req = StopCause::Request;
        assert_eq!(st(GuestExit::Stopped, stop(req, false), false), 130);
        assert_eq!(st(GuestExit::Stopped, stop(req, true), false), 137);
        // A panic while stopping is a crash, whatever we asked for.
        assert_eq!(
            st(GuestExit::Crashed("p".into()), stop(req, true), false),
            1
        );
        // Every status the code returns is documented in --help.
        for code in [0, 1, 3, 4, 124, 130, 137] {
            assert!(
                EXIT_STATUSES.contains(&format!("\n  {code} ")),
                "{code} undocumented"
            );
        }
        let (_, line) = exit_status(&GuestExit::Stopped, stop(req, true), false, g);
        assert!(line.contains("within 5 s and was killed"), "{line}");
    }

    #[test]
    fn append_and_microvm_are_refused_for_firmware_boots_before_anything_is_read() {
        let e = prepare_from_files(&run_args(&["--disk", "/nonexistent", "--append", "x"]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("--append"), "{e}");
        let e = prepare_from_files(&run_args(&[
            "--iso",
            "/nonexistent",
            "--backend",
            "microvm",
        ]))
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("microvm backend only boots a kernel"),
            "{e}"
        );
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
