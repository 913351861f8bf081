//! The qemu backend with a real Linux guest (Debian cloud kernel + busybox, built by
//! scripts/build-test-guest.sh), under TCG on hosts where KVM cannot run Linux.
//!
//! Names of namespaces and taps carry the prefix `cvq`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpushare_tests::is_root;
use overlay::dhcp;
use overlay::io::NetNs;
use overlay::MacAddr;
use vm::qemu::{AccelPolicy, Qemu, QemuConfig};
use vm::{Boot, DiskSpec, Guest, GuestExit, GuestSpec, NetSpec, Tap};

#[path = "common/vmguest.rs"]
mod vmguest;
use vmguest::Console;

const GUEST_MAC: [u8; 6] = [0x02, 0xc5, 0x00, 0x00, 0x00, 0x02];

fn backend() -> Qemu {
    // Auto: probes KVM (and falls back to TCG where KVM cannot run Linux).
    Qemu::new(QemuConfig {
        accel: AccelPolicy::Auto,
        ..QemuConfig::default()
    })
}

/// A raw AF_PACKET socket on `ifname` in the calling thread's namespace.
fn packet_socket(ifname: &str) -> std::io::Result<OwnedFd> {
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: plain syscalls on owned values.
    unsafe {
        let idx = libc::if_nametoindex(name.as_ptr());
        if idx == 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = idx as i32;
        if libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of_val(&sll) as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of_val(&tv) as u32,
        );
        Ok(fd)
    }
}

/// The test's DHCP responder: the overlay's DHCP server answering on the tap's host
/// side. Returns how many replies it sent, when stopped.
fn spawn_dhcp(
    fd: OwnedFd,
    server_mac: [u8; 6],
    server_ip: Ipv4Addr,
    guest_ip: Ipv4Addr,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let server = dhcp::DhcpServer {
            server_mac: MacAddr(server_mac),
            server_ip,
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            dns: server_ip,
            mtu: 1400,
            lease_time: Duration::from_secs(3600),
        };
        let mut buf = vec![0u8; 2048];
        let mut out = Vec::new();
        let mut replies = 0;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: reading into our buffer.
            let n = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n <= 0 {
                continue;
            }
            let frame = &buf[..n as usize];
            if !dhcp::is_dhcp_to_server(frame) {
                continue;
            }
            let Ok(msg) = dhcp::parse_client_frame(frame) else {
                continue;
            };
            if msg.chaddr != MacAddr(GUEST_MAC) {
                continue;
            }
            if server.answer(&msg, guest_ip, &mut out).is_some() {
                // SAFETY: sending our buffer on a bound packet socket.
                unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        out.as_ptr() as *const libc::c_void,
                        out.len(),
                        0,
                    )
                };
                replies += 1;
            }
        }
        replies
    })
}

fn if_mac(ns: &NetNs, ifname: &str) -> [u8; 6] {
    // `ip netns exec` remounts /sys for the namespace; a setns'd thread would not.
    let out = ns_cmd(ns, &["cat", &format!("/sys/class/net/{ifname}/address")]);
    assert!(
        out.status.success(),
        "interface MAC: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    let mut mac = [0u8; 6];
    for (i, part) in s.trim().split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

fn ns_cmd(ns: &NetNs, args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(args)
        .output()
        .expect("ip netns exec")
}

fn http_get(ns: &NetNs, addr: &str) -> std::io::Result<String> {
    let addr = addr.to_string();
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

#[test]
fn linux_guest_gets_dhcp_answers_ping_and_http_then_powers_off() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, tap devices)"
    );
    let files = vmguest::test_guest();
    let ns = NetNs::create(&format!("cvq{}n", std::process::id())).expect("netns");
    let tap_name = "cvqtap0";
    let tap = overlay::io::create_guest_tap(&ns, tap_name, false).expect("tap");
    let host_ip = Ipv4Addr::new(10, 99, 0, 1);
    let guest_ip = Ipv4Addr::new(10, 99, 0, 2);
    let out = ns_cmd(&ns, &["ip", "addr", "add", "10.99.0.1/24", "dev", tap_name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ns_cmd(&ns, &["ip", "link", "set", tap_name, "up"]);
    assert!(out.status.success());
    let server_mac = if_mac(&ns, tap_name);
    let pkt = ns
        .run(move || packet_socket(tap_name))
        .expect("packet socket");
    let stop = Arc::new(AtomicBool::new(false));
    let dhcp_thread = spawn_dhcp(pkt, server_mac, host_ip, guest_ip, stop.clone());

    let script = "echo 'hello from the cpushare guest' > /var/www/index.html; \
                  httpd -p 80 -h /var/www; echo cs-serving; \
                  nc -l -p 9000 > /tmp/got; echo \"cs-got: $(cat /tmp/got)\"";
    let mut spec = GuestSpec::new(
        "cvq-net",
        Boot::Direct {
            kernel: files.vmlinuz.clone(),
            initrd: Some(files.initrd.clone()),
            cmdline: vmguest::cmdline(script, ""),
        },
    );
    spec.memory_mib = 128;
    spec.net = Some(NetSpec {
        tap: Tap::Fd(tap.into_fd()),
        mac: GUEST_MAC,
    });
    spec.wall_clock_limit = Some(Duration::from_secs(240));
    let mut guest = backend().start_guest(spec).expect("qemu starts");
    eprintln!("accel: {} ({})", guest.accel().accel, guest.accel().reason);
    let console = Console::follow(&mut guest);

    let seen = console.wait_for("cs-serving", Duration::from_secs(180));
    assert!(seen, "guest did not come up; console:\n{}", console.text());
    assert!(
        console.text().contains(&format!("cs-dhcp: {guest_ip}")),
        "guest did not get its lease {guest_ip} from the test DHCP server; console:\n{}",
        console.text()
    );

    // ping from the host side of the tap
    let mut pinged = false;
    for _ in 0..10 {
        let out = ns_cmd(&ns, &["ping", "-c", "1", "-W", "2", "10.99.0.2"]);
        if out.status.success() {
            pinged = true;
            break;
        }
    }
    assert!(
        pinged,
        "guest does not answer ping; console:\n{}",
        console.text()
    );

    let body = http_get(&ns, "10.99.0.2:80").expect("HTTP GET from the guest");
    assert!(body.starts_with("HTTP/1."), "not an HTTP reply: {body:?}");
    assert!(
        body.contains("hello from the cpushare guest"),
        "unexpected body: {body:?}"
    );

    // Tell the guest to finish; it powers itself off.
    ns.run(|| {
        let mut s =
            TcpStream::connect_timeout(&"10.99.0.2:9000".parse().unwrap(), Duration::from_secs(5))?;
        s.write_all(b"bye\n")
    })
    .expect("connect to the guest's port 9000");
    let exit = guest.wait_timeout(Duration::from_secs(120)).unwrap();
    assert_eq!(
        exit,
        Some(GuestExit::PoweredOff),
        "console:\n{}",
        console.text()
    );
    assert!(
        console.wait_for("cs-got: bye", Duration::from_secs(5)),
        "console:\n{}",
        console.text()
    );
    assert!(console.text().contains("cs-exit: 0"));
    stop.store(true, Ordering::Relaxed);
    let replies = dhcp_thread.join().unwrap();
    assert!(
        replies >= 2,
        "DHCP server sent {replies} replies (want OFFER and ACK)"
    );
}

/// Lists `/proc/<pid>/fd` link targets.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ext4_root_boots_from_an_unlinked_file_and_writes_land_in_it() {
    let files = vmguest::test_guest();
    // An unlinked copy of the root disk: the only name it ever has is the fd.
    let dir = vmguest::scratch_dir();
    let mut disk = tempfile::tempfile_in(&dir).expect("temp file");
    let mut src = std::fs::File::open(&files.rootfs).unwrap();
    std::io::copy(&mut src, &mut disk).unwrap();
    let check = disk.try_clone().unwrap();
    let marker = format!("cvq-marker-{:016x}", rand::random::<u64>());

    let script = format!(
        "cat /etc/cs-rootfs; echo {marker} > /root/marker; sync; echo cs-written; sleep 600"
    );
    let mut spec = GuestSpec::new(
        "cvq-ext4",
        Boot::Direct {
            kernel: files.vmlinuz.clone(),
            initrd: Some(files.initrd.clone()),
            cmdline: vmguest::cmdline(&script, "cs.root=/dev/vda cs.nonet"),
        },
    );
    spec.memory_mib = 128;
    spec.disk = Some(DiskSpec::new(disk));
    spec.disk_cap_bytes = Some(256 << 20);
    spec.wall_clock_limit = Some(Duration::from_secs(240));
    let mut guest = backend().start_guest(spec).expect("qemu starts");
    let pid = guest.vmm_pid().expect("qemu has a pid");
    let console = Console::follow(&mut guest);
    assert!(
        console.wait_for("cs-written", Duration::from_secs(180)),
        "console:\n{}",
        console.text()
    );
    let text = console.text();
    assert!(
        text.contains("cs-init: switching root to /dev/vda"),
        "console:\n{text}"
    );
    assert!(
        text.contains("cs-init: running from root disk"),
        "console:\n{text}"
    );

    // qemu's view of the disk: the deleted file, through the inherited fd.
    let targets = fd_targets(pid);
    let deleted: Vec<_> = targets
        .iter()
        .filter(|t| t.starts_with(dir.to_str().unwrap()) && t.ends_with("(deleted)"))
        .collect();
    assert!(
        !deleted.is_empty(),
        "qemu (pid {pid}) has no deleted disk file open: {targets:?}"
    );
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .replace('\0', " ");
    assert!(
        !cmdline.contains("snapshot"),
        "qemu runs with a snapshot: {cmdline}"
    );

    // The guest never shuts down by itself: stop it. The ACPI power button reaches
    // its acpid, which powers off cleanly well within the grace period.
    let exit = guest.stop(Duration::from_secs(60)).unwrap();
    assert_eq!(exit, GuestExit::Stopped);
    assert!(
        console.wait_for("reboot: Power down", Duration::from_secs(5)),
        "guest was killed instead of shutting down on the ACPI request; console:\n{}",
        console.text()
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists() || fd_targets(pid).is_empty(),
        "qemu still running"
    );

    // The guest's write went into the unlinked file itself.
    let mut data = Vec::new();
    let mut check = check;
    use std::io::Seek;
    check.seek(std::io::SeekFrom::Start(0)).unwrap();
    check.read_to_end(&mut data).unwrap();
    assert!(
        data.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the guest's write is not in the disk file"
    );
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn vmm_rss_stays_near_guest_memory_while_reading_a_bigger_disk() {
    const GUEST_MIB: u64 = 128; // the cloud kernel needs ~100 MiB to unpack itself
    const DISK_MIB: u64 = 320;
    let files = vmguest::test_guest();
    let dir = vmguest::scratch_dir();
    let mut disk = tempfile::tempfile_in(&dir).expect("temp file");
    // Random data, so nothing (zero pages, dedup) can make a copy cheap.
    let mut block = vec![0u8; 1 << 20];
    let mut hasher_input = Vec::new();
    for i in 0..DISK_MIB {
        rand::Rng::fill(&mut rand::thread_rng(), &mut block[..]);
        disk.write_all(&block).unwrap();
        if i == DISK_MIB - 1 {
            hasher_input = block.clone();
        }
    }
    disk.flush().unwrap();
    // The guest checksums the last MiB, proving it read real disk data to the end.
    let want = md5_hex(&hasher_input);

    let script = format!(
        "dd if=/dev/vda of=/dev/null bs=1M 2>&1 | tail -n1; \
         echo \"cs-md5: $(dd if=/dev/vda bs=1M skip={} count=1 2>/dev/null | md5sum)\"",
        DISK_MIB - 1
    );
    let mut spec = GuestSpec::new(
        "cvq-rss",
        Boot::Direct {
            kernel: files.vmlinuz.clone(),
            initrd: Some(files.initrd.clone()),
            cmdline: vmguest::cmdline(&script, "cs.nonet"),
        },
    );
    spec.memory_mib = GUEST_MIB;
    spec.disk = Some(DiskSpec {
        read_only: true,
        ..DiskSpec::new(disk)
    });
    spec.wall_clock_limit = Some(Duration::from_secs(240));
    let mut guest = backend().start_guest(spec).expect("qemu starts");
    let pid = guest.vmm_pid().unwrap();
    let console = Console::follow(&mut guest);
    let mut max_rss = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while guest
        .wait_timeout(Duration::from_millis(100))
        .unwrap()
        .is_none()
    {
        if let Some(r) = vm_rss_kib(pid) {
            max_rss = max_rss.max(r);
        }
        assert!(
            Instant::now() < deadline,
            "guest did not finish; console:\n{}",
            console.text()
        );
    }
    let text = console.text();
    assert!(
        text.contains(&format!("cs-md5: {want}")),
        "guest did not read the disk's last MiB correctly (want {want}); console:\n{text}"
    );
    assert!(text.contains("cs-exit: 0"), "console:\n{text}");
    let max_mib = max_rss / 1024;
    eprintln!(
        "qemu max RSS {max_mib} MiB for a {GUEST_MIB} MiB guest reading a {DISK_MIB} MiB disk"
    );
    // A RAM copy of the image (snapshot overlay, tmpfs copy) would add the disk's
    // size; the VMM's own overhead (TCG translation cache, qemu) is bounded well below.
    assert!(
        max_mib < GUEST_MIB + DISK_MIB / 2,
        "qemu RSS {max_mib} MiB: more than guest memory {GUEST_MIB} MiB + {} MiB while reading a {DISK_MIB} MiB disk",
        DISK_MIB / 2
    );
}

fn md5_hex(data: &[u8]) -> String {
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("md5sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// 512 bytes of real-mode code that prints `msg` on COM1 and powers off through ACPI
/// (q35's PM1a_CNT at 0x604, S5 = 0), with the MBR signature.
fn boot_sector(msg: &str) -> Vec<u8> {
    boot_sector_then(msg, true)
}

/// Like [`boot_sector`]; without `poweroff` it spins forever after printing.
fn boot_sector_then(msg: &str, poweroff: bool) -> Vec<u8> {
    let mut code: Vec<u8> = vec![0x31, 0xC0, 0x8E, 0xD8]; // xor ax,ax; mov ds,ax
    code.extend_from_slice(&[0xBA, 0xF8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xBE, 0x40, 0x7C]); // mov si, 0x7c40 (the message)
                                                 // loop: lodsb; test al,al; jz done; out dx,al; jmp loop
    code.extend_from_slice(&[0xAC, 0x84, 0xC0, 0x74, 0x03, 0xEE, 0xEB, 0xF8]);
    // done: mov dx,0x604; mov ax,0x2000; out dx,ax; cli; hlt; jmp $-2  (or: jmp $)
    if poweroff {
        code.extend_from_slice(&[
            0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF, 0xFA, 0xF4, 0xEB, 0xFD,
        ]);
    } else {
        code.extend_from_slice(&[0xEB, 0xFE]);
    }
    let mut mbr = vec![0u8; 512];
    mbr[..code.len()].copy_from_slice(&code);
    let msg = format!("{msg}\r\n\0");
    mbr[0x40..0x40 + msg.len()].copy_from_slice(msg.as_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

/// A minimal El Torito ISO 9660 image whose no-emulation boot image is `boot`.
fn el_torito_iso(boot: &[u8]) -> Vec<u8> {
    const S: usize = 2048;
    let mut iso = vec![0u8; 32 * S];
    let both32 = |v: u32| [v.to_le_bytes(), v.to_be_bytes()].concat();
    // Primary volume descriptor (sector 16).
    let pvd = &mut iso[16 * S..17 * S];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[80..88].copy_from_slice(&both32(32));
    pvd[128..132].copy_from_slice(&[0x00, 0x08, 0x08, 0x00]); // block size 2048, both-endian
                                                              // Boot record (sector 17) pointing at the boot catalog (sector 19).
    let br = &mut iso[17 * S..18 * S];
    br[1..6].copy_from_slice(b"CD001");
    br[6] = 1;
    br[7..7 + 23].copy_from_slice(b"EL TORITO SPECIFICATION");
    br[0x47..0x4B].copy_from_slice(&19u32.to_le_bytes());
    // Terminator (sector 18).
    let t = &mut iso[18 * S..19 * S];
    t[0] = 255;
    t[1..6].copy_from_slice(b"CD001");
    t[6] = 1;
    // Boot catalog (sector 19): validation entry + default entry.
    let cat = &mut iso[19 * S..20 * S];
    cat[0] = 1;
    cat[30] = 0x55;
    cat[31] = 0xAA;
    let sum: u16 = cat[..32].chunks(2).fold(0u16, |a, w| {
        a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    cat[28..30].copy_from_slice(&0u16.wrapping_sub(sum).to_le_bytes());
    cat[32] = 0x88; // bootable, no emulation, load segment 0 (= 0x7c0)
    cat[38..40].copy_from_slice(&4u16.to_le_bytes()); // 4 x 512 bytes
    cat[40..44].copy_from_slice(&20u32.to_le_bytes()); // at sector 20
    iso[20 * S..20 * S + boot.len()].copy_from_slice(boot);
    iso
}

#[test]
fn firmware_boot_of_an_iso_live_cd() {
    let dir = vmguest::scratch_dir();
    let path = dir.join(format!("cvq-live-{}.iso", std::process::id()));
    std::fs::write(&path, el_torito_iso(&boot_sector("cvq-iso-boot-ok"))).unwrap();
    let mut spec = GuestSpec::new("cvq-iso", Boot::Iso { iso: path.clone() });
    spec.memory_mib = 32;
    spec.wall_clock_limit = Some(Duration::from_secs(60));
    spec.shutdown_grace = Duration::from_secs(1);
    let started = backend().start_guest(spec);
    let _ = std::fs::remove_file(&path);
    let mut guest = started.expect("qemu starts");
    let console = Console::follow(&mut guest);
    let exit = guest.wait_timeout(Duration::from_secs(90)).unwrap();
    assert!(
        console.text().contains("cvq-iso-boot-ok"),
        "console:\n{}",
        console.text()
    );
    assert_eq!(
        exit,
        Some(GuestExit::PoweredOff),
        "console:\n{}",
        console.text()
    );
}

#[test]
fn firmware_boot_from_an_unlinked_disk_runs_the_boot_sector() {
    let mbr = boot_sector("cvq-bios-boot-ok");
    let dir = vmguest::scratch_dir();
    let mut disk = tempfile::tempfile_in(&dir).unwrap();
    disk.write_all(&mbr).unwrap();
    disk.set_len(1 << 20).unwrap();

    let mut spec = GuestSpec::new("cvq-bios", Boot::Disk);
    spec.memory_mib = 32;
    spec.disk = Some(DiskSpec::new(disk));
    spec.wall_clock_limit = Some(Duration::from_secs(60));
    spec.shutdown_grace = Duration::from_secs(1);
    let mut guest = backend().start_guest(spec).expect("qemu starts");
    let console = Console::follow(&mut guest);
    let exit = guest.wait_timeout(Duration::from_secs(90)).unwrap();
    assert!(
        console.text().contains("cvq-bios-boot-ok"),
        "console:\n{}",
        console.text()
    );
    assert_eq!(
        exit,
        Some(GuestExit::PoweredOff),
        "console:\n{}",
        console.text()
    );
}

#[test]
fn wall_clock_limit_stops_a_guest_that_never_ends() {
    // A boot sector that prints and then spins: ignores the ACPI request, so the
    // limit ends in a kill after the grace period.
    let dir = vmguest::scratch_dir();
    let mut disk = tempfile::tempfile_in(&dir).unwrap();
    disk.write_all(&boot_sector_then("cs-looping", false))
        .unwrap();
    disk.set_len(1 << 20).unwrap();
    let mut spec = GuestSpec::new("cvq-limit", Boot::Disk);
    spec.memory_mib = 32;
    spec.disk = Some(DiskSpec::new(disk));
    spec.wall_clock_limit = Some(Duration::from_secs(5));
    spec.shutdown_grace = Duration::from_secs(1);
    let log = Arc::new(Mutex::new(Vec::new()));
    spec.serial_log = Some(Box::new(vmguest::SharedLog(log.clone())));
    let started = Instant::now();
    let mut guest = backend().start_guest(spec).expect("qemu starts");
    let pid = guest.vmm_pid().unwrap();
    let exit = guest.wait_timeout(Duration::from_secs(120)).unwrap();
    assert_eq!(exit, Some(GuestExit::LimitReached));
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "stopped before its limit"
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/exe")).exists(),
        "qemu outlived its limit"
    );
    let log = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        log.contains("cs-looping"),
        "serial log misses the guest's output:\n{log}"
    );
}

#[test]
fn dropping_the_handle_kills_qemu_and_bad_kernels_fail_clearly() {
    let files = vmguest::test_guest();
    let mut spec = GuestSpec::new(
        "cvq-drop",
        Boot::Direct {
            kernel: files.vmlinuz.clone(),
            initrd: Some(files.initrd.clone()),
            cmdline: vmguest::cmdline("sleep 600", "cs.nonet"),
        },
    );
    spec.memory_mib = 128;
    let guest = backend().start_guest(spec).expect("qemu starts");
    let pid = guest.vmm_pid().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}/exe")).exists());
    drop(guest);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/exe")).exists(),
        "qemu survived its handle"
    );

    // Not a kernel: a clear error at start, not a hang.
    let dir = vmguest::scratch_dir();
    let bogus = dir.join("cvq-not-a-kernel");
    std::fs::write(&bogus, vec![0x5a; 8192]).unwrap();
    let spec = GuestSpec::new(
        "cvq-bad",
        Boot::Direct {
            kernel: bogus.clone(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    let err = backend()
        .start_guest(spec)
        .err()
        .expect("a bogus kernel must not start");
    let _ = std::fs::remove_file(&bogus);
    eprintln!("bogus kernel: {err}");
    assert!(
        matches!(err, vm::Error::KernelNotBootable { .. }),
        "{err:?}"
    );
}

/// `auto` must pick a backend that really boots Linux here, and say why.
#[test]
fn auto_choice_boots_linux_and_explains_itself() {
    let files = vmguest::test_guest();
    let mut spec = GuestSpec::new(
        "cvq-auto",
        Boot::Direct {
            kernel: files.vmlinuz.clone(),
            initrd: Some(files.initrd.clone()),
            cmdline: vmguest::cmdline("echo cvq-auto-ok", "cs.nonet"),
        },
    );
    spec.memory_mib = 128;
    spec.wall_clock_limit = Some(Duration::from_secs(180));
    let choice = vm::auto(&spec).expect("some backend runs Linux here");
    let why = choice.explain();
    eprintln!("auto: {why}");
    match vm::kvm_probe::linux_instructions() {
        Err(e) => {
            assert_eq!(choice.backend.kind(), vm::BackendKind::Qemu, "{why}");
            assert!(why.contains("tcg") && why.contains("not microvm"), "{why}");
            eprintln!("KVM cannot run Linux here: {e}");
        }
        Ok(()) => assert_eq!(choice.backend.kind(), vm::BackendKind::Microvm, "{why}"),
    }
    let mut guest = choice
        .backend
        .start(spec)
        .expect("the chosen backend starts");
    let console = Console::follow(guest.as_mut());
    let exit = guest.wait_timeout(Duration::from_secs(200)).unwrap();
    assert_eq!(
        exit,
        Some(GuestExit::PoweredOff),
        "console:\n{}",
        console.text()
    );
    assert!(
        console.text().contains("cvq-auto-ok"),
        "console:\n{}",
        console.text()
    );
}
