//! The qemu command line for a guest spec. Pure: no I/O, so it is unit-tested.

use std::os::fd::RawFd;
use std::path::Path;

use crate::backend::{mac_string, Boot, DiskBus};

use super::Accel;

/// What the command line needs to know, with the fds already decided.
#[derive(Debug, Clone)]
pub struct ArgsInput<'a> {
    pub name: &'a str,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub cpu_model: &'a str,
    /// TCG translation cache size in MiB (bounds the VMM's own memory).
    pub tcg_tb_size_mib: Option<u32>,
    pub boot: &'a Boot,
    /// The disk: its fd in qemu, read-only, bus.
    pub disk: Option<(RawFd, bool, DiskBus)>,
    /// The NIC: a tap fd or tap name, and the MAC.
    pub net: Option<(NetArg<'a>, [u8; 6])>,
    /// QMP control socket fd in qemu.
    pub qmp_fd: RawFd,
    /// Serial console socket fd in qemu.
    pub serial_fd: RawFd,
    /// qemu runs jailed: no /proc, so the disk fd goes in as an fd set
    /// (`-add-fd`, `/dev/fdset/N`), which dups the fd instead of reopening a path.
    /// qemu opens the image read-only first and read-write later, matching each
    /// open to an fd of the same access mode: this is the read-only one.
    pub jailed: bool,
    pub disk_ro_fd: Option<RawFd>,
    /// Disk throughput (bytes/s) and IOPS caps (`-drive throttling.*`).
    pub disk_bps: Option<u64>,
    pub disk_iops: Option<u64>,
}

/// The fd set a jailed qemu's disk fd goes in.
const DISK_FDSET: u32 = 1;

/// How qemu finds the tap.
#[derive(Debug, Clone, Copy)]
pub enum NetArg<'a> {
    Fd(RawFd),
    Name(&'a str),
}

/// Builds qemu's arguments (without the binary).
pub fn build(input: &ArgsInput<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let direct = matches!(input.boot, Boot::Direct { .. });

    // The process name shows up in ps/top; the guest name is only for qemu's own use.
    let name = format!("guest={},process=cs-qemu", sanitize(input.name));
    push(&["-name", &name]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    // qemu's seccomp filter: no exec, no privilege changes, no obsolete syscalls.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    if !direct {
        // SeaBIOS halts for ever when nothing boots (it says so only on its debug
        // port); with this it resets at once, which -no-reboot turns into an exit.
        push(&["-boot", "reboot-timeout=0"]);
    }
    let machine = if direct {
        // The PIT/PIC/RTC are needed under TCG: without them the kernel cannot
        // calibrate its clocks and stalls early in boot.
        "microvm,acpi=on,pit=on,pic=on,rtc=on"
    } else {
        "q35"
    };
    push(&["-M", machine]);
    let accel = match (input.accel, input.tcg_tb_size_mib) {
        (Accel::Kvm, _) => "kvm".to_string(),
        (Accel::Tcg, Some(tb)) => format!("tcg,tb-size={tb}"),
        (Accel::Tcg, None) => "tcg".to_string(),
    };
    push(&["-accel", &accel]);
    push(&["-cpu", input.cpu_model]);
    push(&[
        "-m",
        &input.memory_mib.to_string(),
        "-smp",
        &input.vcpus.to_string(),
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={}", input.qmp_fd),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=ser0,fd={}", input.serial_fd),
        "-serial",
        "chardev:ser0",
    ]);

    if let Boot::Direct {
        kernel,
        initrd,
        cmdline,
    } = input.boot
    {
        push(&["-kernel", &path_arg(kernel)]);
        if let Some(initrd) = initrd {
            push(&["-initrd", &path_arg(initrd)]);
        }
        push(&["-append", cmdline]);
    }

    if let Some((fd, read_only, bus)) = input.disk {
        // The disk is the already-open (unlinked) file, reached through our fd; no
        // -snapshot, so writes go to that file and nothing is copied into RAM.
        let file = if input.jailed {
            push(&["-add-fd", &format!("fd={fd},set={DISK_FDSET}")]);
            if let Some(ro) = input.disk_ro_fd {
                push(&["-add-fd", &format!("fd={ro},set={DISK_FDSET}")]);
            }
            format!("/dev/fdset/{DISK_FDSET}")
        } else {
            format!("/proc/self/fd/{fd}")
        };
        let mut drive = format!("file={file},format=raw,if=none,id=disk0,aio=threads");
        if read_only {
            drive.push_str(",readonly=on");
        }
        if let Some(bps) = input.disk_bps {
            drive.push_str(&format!(",throttling.bps-total={bps}"));
        }
        if let Some(iops) = input.disk_iops {
            drive.push_str(&format!(",throttling.iops-total={iops}"));
        }
        push(&["-drive", &drive]);
        let boot_index = if matches!(input.boot, Boot::Disk) {
            ",bootindex=1"
        } else {
            ""
        };
        let device = match (direct, bus) {
            (true, _) => "virtio-blk-device,drive=disk0".to_string(),
            (false, DiskBus::Virtio) => format!("virtio-blk-pci,drive=disk0{boot_index}"),
            (false, DiskBus::Ide) => format!("ide-hd,drive=disk0,bus=ide.0{boot_index}"),
        };
        push(&["-device", &device]);
    }

    if let Boot::Iso { iso } = input.boot {
        let drive = format!(
            "file={},format=raw,if=none,id=cd0,media=cdrom,readonly=on",
            path_arg(iso)
        );
        push(&[
            "-drive",
            &drive,
            "-device",
            "ide-cd,drive=cd0,bus=ide.2,bootindex=0",
        ]);
    }

    if let Some((net, mac)) = input.net {
        let netdev = match net {
            NetArg::Fd(fd) => format!("tap,id=net0,fd={fd},vhost=off"),
            NetArg::Name(name) => {
                format!(
                    "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
                    escape(name)
                )
            }
        };
        push(&["-netdev", &netdev]);
        let device = if direct {
            format!("virtio-net-device,netdev=net0,mac={}", mac_string(&mac))
        } else {
            // No option ROM: we never PXE-boot, and it saves the ipxe dependency.
            format!(
                "virtio-net-pci,netdev=net0,mac={},romfile=",
                mac_string(&mac)
            )
        };
        push(&["-device", &device]);
    }
    a
}

/// qemu's option parser splits on ',' and escapes it as ",,".
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_arg(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// Guest names end up in qemu's option syntax; keep them plain.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() {
        "guest".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(a: &[String]) -> String {
        a.join(" ")
    }

    fn input<'a>(boot: &'a Boot) -> ArgsInput<'a> {
        ArgsInput {
            name: "lease 1,x",
            vcpus: 2,
            memory_mib: 64,
            accel: Accel::Tcg,
            cpu_model: "qemu64",
            tcg_tb_size_mib: None,
            boot,
            disk: Some((7, false, DiskBus::Virtio)),
            net: Some((NetArg::Fd(9), [2, 0, 0, 0, 0, 1])),
            qmp_fd: 5,
            serial_fd: 6,
            jailed: false,
            disk_ro_fd: None,
            disk_bps: None,
            disk_iops: None,
        }
    }

    #[test]
    fn jailed_disk_is_an_fd_set_with_throttling() {
        let boot = Boot::Disk;
        let mut inp = input(&boot);
        inp.jailed = true;
        inp.disk_ro_fd = Some(11);
        inp.disk_bps = Some(10 << 20);
        inp.disk_iops = Some(500);
        let s = joined(&build(&inp));
        assert!(s.contains("-add-fd fd=7,set=1 -add-fd fd=11,set=1"), "{s}");
        assert!(s.contains("file=/dev/fdset/1,format=raw"), "{s}");
        assert!(
            s.contains("throttling.bps-total=10485760,throttling.iops-total=500"),
            "{s}"
        );
        assert!(!s.contains("/proc/self/fd"), "{s}");
    }

    #[test]
    fn direct_boot_uses_microvm_fds_and_no_snapshot() {
        let boot = Boot::Direct {
            kernel: "/k,1".into(),
            initrd: Some("/i".into()),
            cmdline: "console=ttyS0 cs.run=x".into(),
        };
        let a = build(&input(&boot));
        let s = joined(&a);
        assert!(s.contains("-M microvm,acpi=on"), "{s}");
        assert!(s.contains("-nodefaults -no-user-config"));
        assert!(s.contains("-sandbox on,"));
        assert!(s.contains("-accel tcg"));
        assert!(s.contains("-cpu qemu64"));
        assert!(s.contains("file=/proc/self/fd/7,format=raw"));
        assert!(s.contains("virtio-blk-device,drive=disk0"));
        assert!(s.contains("tap,id=net0,fd=9,vhost=off"));
        assert!(s.contains("virtio-net-device,netdev=net0,mac=02:00:00:00:00:01"));
        assert!(s.contains("socket,id=qmp,fd=5"));
        assert!(s.contains("socket,id=ser0,fd=6"));
        assert!(s.contains("-kernel /k,,1"), "commas escaped: {s}");
        assert!(s.contains("guest=lease_1_x,"));
        // The cmdline is one argument, untouched.
        assert!(a.iter().any(|x| x == "console=ttyS0 cs.run=x"));
        assert!(!a.iter().any(|x| x.contains("snapshot")));
        assert!(!a.iter().any(|x| x == "host"));
    }

    #[test]
    fn firmware_boot_uses_q35_and_boot_order() {
        let boot = Boot::Iso {
            iso: "/live.iso".into(),
        };
        let mut inp = input(&boot);
        inp.accel = Accel::Kvm;
        inp.disk = Some((7, true, DiskBus::Ide));
        let s = joined(&build(&inp));
        assert!(s.contains("-M q35"));
        assert!(s.contains("-boot reboot-timeout=0"), "{s}");
        assert!(s.contains("-accel kvm"));
        assert!(s.contains("ide-cd,drive=cd0,bus=ide.2,bootindex=0"));
        assert!(
            s.contains("ide-hd,drive=disk0,bus=ide.0 "),
            "disk not first boot: {s}"
        );
        assert!(s.contains("readonly=on"));
        assert!(s.contains("virtio-net-pci,netdev=net0,mac=02:00:00:00:00:01,romfile="));
        assert!(!s.contains("-kernel"));

        let boot = Boot::Disk;
        let mut inp = input(&boot);
        inp.tcg_tb_size_mib = Some(32);
        inp.net = Some((NetArg::Name("cvq0"), [2, 0, 0, 0, 0, 2]));
        let s = joined(&build(&inp));
        assert!(s.contains("virtio-blk-pci,drive=disk0,bootindex=1"));
        assert!(s.contains("-accel tcg,tb-size=32"));
        assert!(s.contains("tap,id=net0,ifname=cvq0,script=no,downscript=no"));
    }
}
