//! The microvm backend on this machine's KVM, with tiny guest programs assembled at
//! test time (tests/guests/): serial output and HLT, virtio-blk reads checked against
//! the host file, virtio-net frames both ways through a tap in a namespace of ours,
//! and guests that write outside their memory or loop forever being contained.
//!
//! Needs root (taps, namespaces), /dev/kvm, and binutils (`as`, `ld`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use cpushare_tests::netns::Netns;
use cpushare_tests::tinyguest::{build_guest, run_tool};
use cpushare_tests::wait_until;
use vm::microvm::Microvm;
use vm::{Backend, Boot, DiskSpec, Guest, GuestExit, GuestSpec, NetSpec, Tap};

const GUEST_MAC: [u8; 6] = [0x02, 0xc5, 0x00, 0x00, 0x00, 0x07];

fn spec(kernel: &Path, limit: Duration) -> GuestSpec {
    let mut s = GuestSpec::new(
        "cmv-test",
        Boot::Direct {
            kernel: kernel.to_path_buf(),
            initrd: None,
            cmdline: String::new(),
        },
    );
    s.memory_mib = 32;
    s.wall_clock_limit = Some(limit);
    s
}

fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm (TESTING.md: KVM runs tiny guests on these machines)"
    );
}

/// Collects console output on a thread so the guest never waits on us.
struct Console {
    rx: Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Console {
    fn new(guest: &mut dyn Guest) -> Self {
        Console {
            rx: guest.take_console().expect("console available once"),
            buf: Vec::new(),
        }
    }
    /// Wait until the output contains `needle`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while !String::from_utf8_lossy(&self.buf).contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(chunk) => self.buf.extend(chunk),
                Err(_) => panic!(
                    "no {needle:?} on the console within {timeout:?}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
        self.text()
    }
    /// Everything until the stream ends (the guest exited).
    fn drain(&mut self) -> String {
        while let Ok(chunk) = self.rx.recv_timeout(Duration::from_secs(10)) {
            self.buf.extend(chunk);
        }
        self.text()
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

fn run_to_exit(spec: GuestSpec) -> (GuestExit, String) {
    let mut guest = Microvm.start(spec).expect("microvm starts");
    let mut con = Console::new(guest.as_mut());
    let exit = guest
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("guest ends");
    (exit, con.drain())
}

const HELLO64: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    lea rsi, [msg]
    call puts
    cli
    hlt
.section .rodata
msg: .asciz "hello from long mode\n"
"#;

const HELLO_PVH: &str = r#"
.intel_syntax noprefix
.section .note.Xen, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .align 4
    .long _start
    .align 4
.text
.code32
.globl _start
_start:
    mov esi, offset msg
    mov dx, 0x3f8
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  cli
    hlt
msg: .asciz "hello from PVH\n"
"#;

#[test]
fn serial_hello_then_hlt_in_long_mode_and_pvh() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    for (name, src, lib, want) in [
        ("hello64", HELLO64, true, "hello from long mode\n"),
        ("hellopvh", HELLO_PVH, false, "hello from PVH\n"),
    ] {
        let elf = build_guest(dir.path(), name, src, lib);
        let log = dir.path().join(format!("{name}.log"));
        let mut s = spec(&elf, Duration::from_secs(20));
        s.serial_log = Some(Box::new(File::create(&log).unwrap()));
        s.vcpus = 2;
        let (exit, out) = run_to_exit(s);
        assert_eq!(out, want, "{name} console");
        // cli; hlt on the boot vCPU (the second one never started): halted for good.
        assert_eq!(exit, GuestExit::PoweredOff, "{name}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            want,
            "{name} serial log sink"
        );
    }
}

const RESETS: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    lea rsi, [msg]
    call puts
    mov al, MODE
    cmp al, 1
    je 1f
    mov al, 0xfe
    out 0x64, al
    jmp 2f
1:  mov dx, 0x3c0
    mov al, (5 << 2) | 0x20
    out dx, al
2:  jmp 2b
.section .rodata
msg: .asciz "bye\n"
"#;

#[test]
fn i8042_reset_and_acpi_poweroff_end_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    for (mode, want) in [(0, GuestExit::Reset), (1, GuestExit::PoweredOff)] {
        let src = RESETS.replace("MODE", &mode.to_string());
        let elf = build_guest(dir.path(), &format!("reset{mode}"), &src, true);
        let (exit, out) = run_to_exit(spec(&elf, Duration::from_secs(20)));
        assert_eq!(out, "bye\n");
        assert_eq!(exit, want);
    }
}

/// Simple 32-bit checksum the guest computes too: h = h * 31 + byte.
fn checksum(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
}

const BLK: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    mov r12, 0xd0000000
    cmp dword ptr [r12 + 8], 2
    jne vfail
    mov r13d, 1
    call vinit
    xor r15d, r15d
    # Read 4096 bytes from sector 3.
    mov rdi, 3
    mov esi, 0
    mov edx, 3
    call blkreq
    lea rsi, [m_st]
    call puts
    call puthex
    xor eax, eax
    mov rsi, 0x211000
    mov ecx, 4096
1:  imul eax, eax, 31
    movzx edx, byte ptr [rsi]
    add eax, edx
    inc rsi
    dec ecx
    jnz 1b
    lea rsi, [m_sum]
    call puts
    call puthex
    # Write 4096 bytes of 0x5a at sector 20.
    mov rdi, 0x211000
    mov ecx, 4096
    mov al, 0x5a
    rep stosb
    mov rdi, 20
    mov esi, 1
    mov edx, 1
    call blkreq
    lea rsi, [m_wr]
    call puts
    call puthex
    # Read past the end of the disk: must fail with IOERR (1).
    mov rdi, qword ptr [r12 + 0x100]
    mov esi, 0
    mov edx, 3
    call blkreq
    lea rsi, [m_oob]
    call puts
    call puthex
    lea rsi, [m_cap]
    call puts
    mov eax, dword ptr [r12 + 0x100]
    call puthex
    mov al, 10
    call putc
    cli
    hlt

# blkreq: sector rdi, type esi, data descriptor flags edx (3 = NEXT|WRITE for reads,
# 1 = NEXT for writes); 4096 bytes at 0x211000. Returns the status byte in eax.
blkreq:
    mov dword ptr [0x210000], esi
    mov dword ptr [0x210004], 0
    mov qword ptr [0x210008], rdi
    mov byte ptr [0x212000], 0xff
    mov qword ptr [0x200000], 0x210000
    mov dword ptr [0x200008], 16
    mov word ptr [0x20000c], 1
    mov word ptr [0x20000e], 1
    mov qword ptr [0x200010], 0x211000
    mov dword ptr [0x200018], 4096
    mov word ptr [0x20001c], dx
    mov word ptr [0x20001e], 2
    mov qword ptr [0x200020], 0x212000
    mov dword ptr [0x200028], 1
    mov word ptr [0x20002c], 2
    mov word ptr [0x20002e], 0
    mov eax, r15d
    mov ecx, eax
    and ecx, 7
    mov word ptr [0x201004 + rcx * 2], 0
    inc eax
    mov word ptr [0x201002], ax
    mov r15d, eax
    mov dword ptr [r12 + 0x50], 0
2:  movzx edx, word ptr [0x202002]
    cmp edx, r15d
    jne 2b
    movzx eax, byte ptr [0x212000]
    ret

.section .rodata
m_st: .asciz "st="
m_sum: .asciz " sum="
m_wr: .asciz " wr="
m_oob: .asciz " oob="
m_cap: .asciz " cap="
"#;

#[test]
fn virtio_blk_reads_and_writes_the_unlinked_file_in_place() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "blk", BLK, true);
    // The disk: 64 KiB of random bytes in an unlinked file, as the seller passes it.
    let mut disk = tempfile::tempfile().unwrap();
    let data: Vec<u8> = (0..65536).map(|_| rand::random::<u8>()).collect();
    disk.write_all(&data).unwrap();
    let host = disk.try_clone().unwrap();
    let mut s = spec(&elf, Duration::from_secs(20));
    s.disk = Some(DiskSpec::new(disk));
    let (exit, out) = run_to_exit(s);
    let want_sum = checksum(&data[3 * 512..3 * 512 + 4096]);
    assert_eq!(
        out,
        format!("st=00000000 sum={want_sum:08x} wr=00000000 oob=00000001 cap=00000080\n")
    );
    assert_eq!(exit, GuestExit::PoweredOff);
    let mut after = Vec::new();
    let mut host = host;
    host.seek(SeekFrom::Start(0)).unwrap();
    host.read_to_end(&mut after).unwrap();
    assert_eq!(after.len(), data.len(), "disk size unchanged");
    assert!(
        after[20 * 512..20 * 512 + 4096].iter().all(|&b| b == 0x5a),
        "guest write landed in the file"
    );
    assert!(
        after[..20 * 512] == data[..20 * 512],
        "nothing before the write changed"
    );
    assert!(
        after[28 * 512..] == data[28 * 512..],
        "nothing after the write changed"
    );
}

/// A tap (its fd for the VMM) and a packet socket on it, in a namespace of ours.
struct TapInNs {
    _ns: Netns,
    tap: Option<OwnedFd>,
    packet: OwnedFd,
}

impl TapInNs {
    fn with_vnet_hdr(ns_name: &str, tap_name: &'static str, vnet_hdr: bool) -> Self {
        assert!(ns_name.len() <= 15 && tap_name.len() <= 15);
        let ns = Netns::new(ns_name).expect("create netns (needs root)");
        // No IPv6: the kernel would send router/neighbour solicitations on the tap.
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            .unwrap();
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])
            .unwrap();
        let path = format!("/var/run/netns/{ns_name}");
        // Open the tap and the packet socket from a thread that entered the namespace.
        let (tap, packet) = std::thread::spawn(move || {
            let nsf = File::open(&path).unwrap();
            nix::sched::setns(&nsf, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let tap = vm::microvm::virtio::net::open_tap_with(tap_name, vnet_hdr).unwrap();
            // SAFETY: plain socket(2).
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd was just created.
            let packet = unsafe { OwnedFd::from_raw_fd(fd) };
            (tap, packet)
        })
        .join()
        .unwrap();
        ns.ip(&["link", "set", tap_name, "up"]).unwrap();
        let t = TapInNs {
            _ns: ns,
            tap: Some(tap),
            packet,
        };
        let idx = std::thread::scope(|sc| {
            sc.spawn(|| {
                let nsf = File::open(format!("/var/run/netns/{ns_name}")).unwrap();
                nix::sched::setns(&nsf, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let c = std::ffi::CString::new(tap_name).unwrap();
                // SAFETY: valid C string.
                unsafe { libc::if_nametoindex(c.as_ptr()) }
            })
            .join()
            .unwrap()
        });
        assert!(idx > 0);
        // SAFETY: sockaddr_ll is plain data; bind reads it.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = idx as i32;
            let r = libc::bind(
                t.packet.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            libc::setsockopt(
                t.packet.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        t
    }

    /// Next frame with EtherType `ethertype`, within `timeout`.
    fn recv(&self, ethertype: u16, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.packet.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n >= 14 && u16::from_be_bytes([buf[12], buf[13]]) == ethertype {
                return Some(buf[..n as usize].to_vec());
            }
        }
        None
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is valid for its length.
        let n = unsafe {
            libc::send(
                self.packet.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

const NET_TX: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    mov r12, 0xd0000000
    cmp dword ptr [r12 + 8], 1
    jne vfail
    mov r13d, 2
    call vinit
    # virtio-net header (12 bytes of zero) then the frame, at 0x230000.
    mov dword ptr [0x23000c], 0xffffffff
    mov word ptr [0x230010], 0xffff
    mov eax, dword ptr [r12 + 0x100]
    mov dword ptr [0x230012], eax
    mov ax, word ptr [r12 + 0x104]
    mov word ptr [0x230016], ax
    mov word ptr [0x230018], 0xb588
    lea rsi, [payload]
    mov rdi, 0x23001a
    mov ecx, 20
    rep movsb
    # TX is queue 1: descriptors at 0x210000, avail 0x211000, used 0x212000.
    mov qword ptr [0x210000], 0x230000
    mov dword ptr [0x210008], 72
    mov word ptr [0x21000c], 0
    mov word ptr [0x211004], 0
    mov word ptr [0x211002], 1
    mov dword ptr [r12 + 0x50], 1
1:  cmp word ptr [0x212002], 1
    jne 1b
    lea rsi, [msg]
    call puts
    cli
    hlt
.section .rodata
payload: .ascii "cpushare-tx-frame-01"
msg: .asciz "sent\n"
"#;

#[test]
fn virtio_net_guest_sends_a_frame_the_test_reads_from_the_tap() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "nettx", NET_TX, true);
    // Plain tap, and one whose frames carry a virtio-net header (passed through).
    for vnet_hdr in [false, true] {
        let mut tap = TapInNs::with_vnet_hdr("cmvtx", "cmvtap0", vnet_hdr);
        let mut s = spec(&elf, Duration::from_secs(20));
        s.net = Some(NetSpec {
            tap: Tap::Fd(tap.tap.take().unwrap()),
            mac: GUEST_MAC,
        });
        let (exit, out) = run_to_exit(s);
        assert_eq!(out, "sent\n");
        assert_eq!(exit, GuestExit::PoweredOff);
        let frame = tap
            .recv(0x88b5, Duration::from_secs(5))
            .expect("the guest's frame on the tap");
        assert_eq!(&frame[0..6], &[0xff; 6], "broadcast destination");
        assert_eq!(
            &frame[6..12],
            &GUEST_MAC,
            "source is the MAC from the device config"
        );
        assert_eq!(&frame[14..34], b"cpushare-tx-frame-01");
        assert_eq!(frame.len(), 60, "header stripped: 72 - 12 bytes");
    }
}

const NET_RX: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    mov r12, 0xd0000000
    mov r13d, 2
    call vinit
    # The device's interrupt (GSI 5, from the DSDT) -> vector 0x31.
    lea rdi, [on_irq]
    mov esi, 5
    mov edx, 0x31
    call irq_init
    # One 2 KiB receive buffer at 0x240000 on queue 0.
    mov qword ptr [0x200000], 0x240000
    mov dword ptr [0x200008], 2048
    mov word ptr [0x20000c], 2
    mov word ptr [0x201004], 0
    mov word ptr [0x201002], 1
    mov dword ptr [r12 + 0x50], 0
    lea rsi, [ready]
    call puts
    # Sleep until the used-buffer interrupt has been taken (sti; hlt takes one that
    # is already pending), then check the used ring.
1:  cli
    cmp dword ptr [irqs], 0
    jne 3f
    sti
    hlt
    jmp 1b
3:  cmp word ptr [0x202002], 1
    jne 1b
    lea rsi, [m_irq]
    call puts
    mov eax, dword ptr [irqs]
    call puthex
    mov al, ' '
    call putc
    lea rsi, [got]
    call puts
    mov eax, dword ptr [0x202008]
    call puthex
    mov al, ' '
    call putc
    # Payload after the 12-byte virtio header and the 14-byte Ethernet header.
    mov rsi, 0x24001a
    mov ecx, 20
2:  lodsb
    call putc
    dec ecx
    jnz 2b
    mov al, 10
    call putc
    cli
    hlt
on_irq:
    push rax
    mov eax, dword ptr [r12 + 0x60]
    mov dword ptr [r12 + 0x64], eax
    inc dword ptr [irqs]
    call eoi
    pop rax
    iretq
.section .rodata
ready: .asciz "ready\n"
got: .asciz "rx len="
m_irq: .asciz "irqs="
.data
irqs: .long 0
"#;

#[test]
fn virtio_net_guest_receives_a_frame_the_test_writes_to_the_tap() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "netrx", NET_RX, true);
    for vnet_hdr in [false, true] {
        let mut tap = TapInNs::with_vnet_hdr("cmvrx", "cmvtap1", vnet_hdr);
        tap._ns
            .ip(&["link", "set", "cmvtap1", "mtu", "9000"])
            .unwrap();
        let mut s = spec(&elf, Duration::from_secs(20));
        s.net = Some(NetSpec {
            tap: Tap::Fd(tap.tap.take().unwrap()),
            mac: GUEST_MAC,
        });
        let mut guest = Microvm.start(s).expect("microvm starts");
        let mut con = Console::new(guest.as_mut());
        con.wait_for("ready\n", Duration::from_secs(10));
        // First a frame larger than the guest's 2 KiB buffer: dropped, buffer kept.
        let mut big = Vec::new();
        big.extend_from_slice(&GUEST_MAC);
        big.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5]);
        big.resize(3000, b'B');
        tap.send(&big);
        let mut frame = Vec::new();
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend_from_slice(b"hello-from-host-1234");
        tap.send(&frame);
        let exit = guest
            .wait_timeout(Duration::from_secs(20))
            .unwrap()
            .expect("guest ends");
        let out = con.drain();
        assert_eq!(
            out,
            format!(
                "ready\nirqs=00000001 rx len={:08x} hello-from-host-1234\n",
                12 + frame.len()
            )
        );
        assert_eq!(exit, GuestExit::PoweredOff);
    }
}

const OUTSIDE: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    # 768 MiB: identity-mapped by the boot page tables, far beyond the 32 MiB of RAM.
    mov rbx, 0x30000000
    mov dword ptr [rbx], 0x41414141
    mov eax, dword ptr [rbx]
    lea rsi, [m1]
    call puts
    call puthex
    # Inside the MMIO gap, where no device lives.
    mov rbx, 0xe0000000
    mov qword ptr [rbx], -1
    mov eax, dword ptr [rbx + 0x10]
    lea rsi, [m2]
    call puts
    call puthex
    mov al, 10
    call putc
1:  jmp 1b
.section .rodata
m1: .asciz "far="
m2: .asciz " gap="
"#;

const LOOP: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    lea rsi, [msg]
    call puts
    sti
1:  jmp 1b
.section .rodata
msg: .asciz "looping\n"
"#;

#[test]
fn guest_writing_outside_its_memory_is_contained_and_stopped_by_the_limit() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "outside", OUTSIDE, true);
    let mut guest = Microvm
        .start_guest(spec(&elf, Duration::from_secs(2)))
        .expect("microvm starts");
    let mut con = Console::new(&mut guest);
    let t0 = Instant::now();
    let exit = guest
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("guest ends");
    let out = con.drain();
    // Reads of unbacked addresses see all-ones, never host memory; the guest kept
    // running (into its loop) until the wall-clock limit.
    assert_eq!(out, "far=ffffffff gap=ffffffff\n");
    assert_eq!(exit, GuestExit::LimitReached);
    assert!(
        guest.unmapped_accesses() >= 4,
        "accesses counted: {}",
        guest.unmapped_accesses()
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
}

#[test]
fn looping_guest_is_stopped_by_the_limit_and_by_stop() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "loop", LOOP, true);
    let (exit, out) = run_to_exit(spec(&elf, Duration::from_millis(500)));
    assert_eq!(out, "looping\n");
    assert_eq!(exit, GuestExit::LimitReached);

    let mut guest = Microvm.start(spec(&elf, Duration::from_secs(600))).unwrap();
    let mut con = Console::new(guest.as_mut());
    con.wait_for("looping\n", Duration::from_secs(10));
    assert_eq!(guest.state(), vm::GuestState::Running);
    // The vCPU thread runs under a seccomp filter (mode 2). Other tests' guests may
    // have a vCPU thread that is just starting (filter not yet on): give each a moment.
    let mut filtered = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == "vcpu0" {
            let mut last = String::new();
            let done = wait_until(Duration::from_secs(2), || {
                match std::fs::read_to_string(task.join("status")) {
                    // A thread that ended stops the wait.
                    Err(_) => true,
                    Ok(status) if status.lines().any(|l| l == "Seccomp:\t2") => {
                        filtered += 1;
                        true
                    }
                    Ok(status) => {
                        last = status;
                        false
                    }
                }
            });
            assert!(done, "vCPU thread not filtered:\n{last}");
        }
    }
    assert!(filtered >= 1, "no vCPU thread found");
    assert_eq!(
        guest.stop(Duration::from_secs(1)).unwrap(),
        GuestExit::Stopped
    );
    assert!(matches!(
        guest.state(),
        vm::GuestState::Exited(GuestExit::Stopped)
    ));
}

#[test]
fn clear_errors_for_unbootable_kernels_and_oversized_memory() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let err = Microvm
        .start(spec(&junk, Duration::from_secs(5)))
        .err()
        .expect("junk refused");
    assert!(matches!(err, vm::Error::KernelNotBootable { .. }), "{err}");

    let elf = build_guest(dir.path(), "hello64", HELLO64, true);
    let mut s = spec(&elf, Duration::from_secs(5));
    s.memory_mib = 1 << 40;
    let err = Microvm.start(s).err().expect("huge memory refused");
    assert!(matches!(err, vm::Error::MemoryTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("too large"));

    let s = GuestSpec::new("iso", Boot::Iso { iso: junk.clone() });
    let err = Microvm.start(s).err().expect("ISO refused");
    assert!(matches!(err, vm::Error::Unsupported { .. }), "{err}");

    // The probe runs a real guest instruction on this KVM.
    let p = Microvm.probe(&spec(&elf, Duration::from_secs(5)));
    assert!(p.usable, "{}", p.reason);
}

const BLK_STREAM: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    mov r12, 0xd0000000
    mov r13d, 1
    call vinit
    xor r15d, r15d
    xor r14d, r14d
    # r8: next sector; r9: sectors on the disk; 64 KiB (128 sectors) per request.
    xor r8d, r8d
    mov r9, qword ptr [r12 + 0x100]
1:  cmp r8, r9
    jae 3f
    mov rdi, r8
    call blkreq64k
    test eax, eax
    jnz 4f
    # Fold in the first byte of every sector (the whole buffer would be slow on a
    # nested KVM and proves nothing more about the VMM).
    mov rsi, 0x300000
    mov ecx, 128
2:  imul r14d, r14d, 31
    movzx edx, byte ptr [rsi]
    add r14d, edx
    add rsi, 512
    dec ecx
    jnz 2b
    add r8, 128
    jmp 1b
3:  lea rsi, [m_sum]
    call puts
    mov eax, r14d
    call puthex
    mov al, 10
    call putc
5:  pause
    jmp 5b
4:  lea rsi, [m_err]
    call puts
    cli
    hlt

# One 64 KiB read of sector rdi into 0x300000; returns the status byte in eax.
blkreq64k:
    mov dword ptr [0x210000], 0
    mov dword ptr [0x210004], 0
    mov qword ptr [0x210008], rdi
    mov byte ptr [0x212000], 0xff
    mov qword ptr [0x200000], 0x210000
    mov dword ptr [0x200008], 16
    mov word ptr [0x20000c], 1
    mov word ptr [0x20000e], 1
    mov qword ptr [0x200010], 0x300000
    mov dword ptr [0x200018], 65536
    mov word ptr [0x20001c], 3
    mov word ptr [0x20001e], 2
    mov qword ptr [0x200020], 0x212000
    mov dword ptr [0x200028], 1
    mov word ptr [0x20002c], 2
    mov word ptr [0x20002e], 0
    mov eax, r15d
    mov ecx, eax
    and ecx, 7
    mov word ptr [0x201004 + rcx * 2], 0
    inc eax
    mov word ptr [0x201002], ax
    mov r15d, eax
    mov dword ptr [r12 + 0x50], 0
6:  movzx edx, word ptr [0x202002]
    cmp edx, r15d
    jne 6b
    movzx eax, byte ptr [0x212000]
    ret

.section .rodata
m_sum: .asciz "sum="
m_err: .asciz "read error\n"
"#;

fn vm_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn guest_reads_a_disk_four_times_its_memory_without_the_vmm_copying_it() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "blkstream", BLK_STREAM, true);
    const DISK: usize = 128 << 20;
    let mut disk = tempfile::tempfile().unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; DISK];
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    disk.write_all(&data).unwrap();
    let firsts: Vec<u8> = data.iter().step_by(512).copied().collect();
    let want = checksum(&firsts);
    drop(data);
    let before = vm_rss_kib();
    let mut s = spec(&elf, Duration::from_secs(60));
    s.disk = Some(DiskSpec::new(disk));
    let mut guest = Microvm.start(s).unwrap();
    let mut con = Console::new(guest.as_mut());
    let out = con.wait_for("\n", Duration::from_secs(50));
    let during = vm_rss_kib();
    assert_eq!(out, format!("sum={want:08x}\n"), "whole-disk checksum");
    // 32 MiB of guest memory, 128 MiB of disk read: the VMM's RSS grows by the guest
    // pages touched plus a little, never by the disk's size.
    let grown_mib = during.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 32,
        "RSS grew by {grown_mib} MiB while the guest read 128 MiB"
    );
    assert_eq!(
        guest.stop(Duration::from_secs(1)).unwrap(),
        GuestExit::Stopped
    );
}

const POWER_BUTTON: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    # The GED (power button) is IOAPIC pin 23.
    lea rdi, [handler]
    mov esi, 23
    mov edx, 0x30
    call irq_init
    lea rsi, [armed]
    call puts
    sti
1:  hlt
    jmp 1b
handler:
    # What an OS does on the power button: power off through the ACPI sleep register.
    lea rsi, [pressed]
    call puts
    mov dx, 0x3c0
    mov al, (5 << 2) | 0x20
    out dx, al
2:  jmp 2b
.section .rodata
armed: .asciz "armed\n"
pressed: .asciz "power button\n"
"#;

#[test]
fn stop_presses_the_acpi_power_button_then_kills_after_the_grace() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "pwrbtn", POWER_BUTTON, true);
    let mut guest = Microvm.start(spec(&elf, Duration::from_secs(30))).unwrap();
    let mut con = Console::new(guest.as_mut());
    con.wait_for("armed\n", Duration::from_secs(10));
    // Halted with interrupts on is not "halted for good": still running. The pause is
    // what is tested (time for a wrong "halted" verdict to show), not a synchronisation.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(guest.state(), vm::GuestState::Running);
    let exit = guest.stop(Duration::from_secs(10)).unwrap();
    assert_eq!(
        exit,
        GuestExit::PoweredOff,
        "guest acted on the power button"
    );
    assert_eq!(con.drain(), "armed\npower button\n");

    // A guest that ignores the button is stopped once the grace period is over.
    let elf = build_guest(dir.path(), "loop", LOOP, true);
    let mut guest = Microvm.start(spec(&elf, Duration::from_secs(30))).unwrap();
    let mut con = Console::new(guest.as_mut());
    con.wait_for("looping\n", Duration::from_secs(10));
    let t0 = Instant::now();
    assert_eq!(
        guest.stop(Duration::from_millis(300)).unwrap(),
        GuestExit::Stopped
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));
}

const SMP: &str = r#"
.intel_syntax noprefix
.code64
.text
.globl _start
_start:
    # Real-mode trampoline for the AP at 0x10000 (SIPI vector 0x10).
    lea rsi, [tramp]
    mov rdi, 0x10000
    mov ecx, tramp_end - tramp
    rep movsb
    # LAPIC on; INIT then SIPI to APIC 1.
    mov rbx, 0xfee000f0
    mov dword ptr [rbx], 0x1ff
    mov rbx, 0xfee00310
    mov dword ptr [rbx], 0x01000000
    mov rbx, 0xfee00300
    mov dword ptr [rbx], 0x00004500
    mov dword ptr [rbx], 0x00004610
1:  pause
    cmp byte ptr [0x10100], 1
    jne 1b
    lea rsi, [msg]
    call puts
    cli
    hlt
.section .rodata
msg: .asciz "B\n"
# mov dx, 0x3f8; mov al, 'A'; out dx, al; mov ax, 0x1000; mov ds, ax;
# mov byte [0x100], 1; cli; hlt
tramp:
    .byte 0xba, 0xf8, 0x03, 0xb0, 0x41, 0xee
    .byte 0xb8, 0x00, 0x10, 0x8e, 0xd8, 0xc6, 0x06, 0x00, 0x01, 0x01
    .byte 0xfa, 0xf4
tramp_end:
"#;

#[test]
fn second_vcpu_starts_by_init_sipi_and_both_halting_ends_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "smp", SMP, true);
    let mut s = spec(&elf, Duration::from_secs(20));
    s.vcpus = 2;
    let (exit, out) = run_to_exit(s);
    assert_eq!(
        out, "AB\n",
        "the AP ran its real-mode trampoline, then the BSP went on"
    );
    assert_eq!(exit, GuestExit::PoweredOff);
}

const HELLO_BZ: &str = r#"
.intel_syntax noprefix
.code64
.section .text.boot, "ax"
    # The 64-bit entry of a bzImage is 0x200 past where its payload is loaded.
    .skip 0x200
.globl _start
_start:
    # rsi: the zero page (struct boot_params).
    mov rbx, rsi
    lea rsi, [msg]
    call puts
    # The command line, via hdr.cmd_line_ptr.
    mov esi, dword ptr [rbx + 0x228]
    call puts
    # The initrd, via hdr.ramdisk_image.
    mov al, 10
    call putc
    mov esi, dword ptr [rbx + 0x218]
    call puts
    # The number of e820 entries.
    lea rsi, [m_e820]
    call puts
    movzx eax, byte ptr [rbx + 0x1e8]
    call puthex
    mov al, 10
    call putc
    cli
    hlt
.section .rodata
msg: .asciz "hello from a bzImage\n"
m_e820: .asciz "\ne820="
"#;

/// Wrap the flat image of `elf` (linked at 1 MiB) in a minimal bzImage: one setup
/// sector with the boot protocol header, then the payload.
fn make_bzimage(dir: &Path, elf: &Path) -> PathBuf {
    let flat = dir.join("payload.bin");
    run_tool(
        "objcopy",
        &[
            "-O",
            "binary",
            elf.to_str().unwrap(),
            flat.to_str().unwrap(),
        ],
    );
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe] = 0x55; // boot_flag
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    img.extend(std::fs::read(&flat).unwrap());
    let out = dir.join("hello.bzImage");
    std::fs::write(&out, img).unwrap();
    out
}

#[test]
fn bzimage_boots_through_the_linux_64bit_entry() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "hellobz", HELLO_BZ, true);
    let bz = make_bzimage(dir.path(), &elf);
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"bz-initrd-9\0").unwrap();
    let mut s = spec(&bz, Duration::from_secs(20));
    s.boot = Boot::Direct {
        kernel: bz,
        initrd: Some(initrd),
        cmdline: "console=ttyS0 a=b".into(),
    };
    let (exit, out) = run_to_exit(s);
    assert_eq!(
        out,
        "hello from a bzImage\nconsole=ttyS0 a=b\nbz-initrd-9\ne820=00000003\n"
    );
    assert_eq!(exit, GuestExit::PoweredOff);
}

const PVH_INFO: &str = r#"
.intel_syntax noprefix
.section .note.Xen, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .align 4
    .long _start
    .align 4
.text
.code32
.globl _start
_start:
    # ebx: struct hvm_start_info. Stack below the boot tables.
    mov esp, 0x8ff0
    cmp dword ptr [ebx], 0x336ec578
    jne bad
    # Command line.
    mov esi, dword ptr [ebx + 24]
    call puts32
    mov al, 10
    call putc32
    # The initrd: module 0 of the module list.
    cmp dword ptr [ebx + 12], 1
    jne bad
    mov edi, dword ptr [ebx + 16]
    mov esi, dword ptr [edi]
    call puts32
    mov al, 10
    call putc32
    # The ACPI RSDP signature (8 bytes).
    mov esi, dword ptr [ebx + 32]
    mov ecx, 8
1:  lodsb
    call putc32
    dec ecx
    jnz 1b
    mov al, 10
    call putc32
    cli
    hlt
bad:
    mov al, '!'
    call putc32
    cli
    hlt
putc32:
    push edx
    mov dx, 0x3f8
    out dx, al
    pop edx
    ret
puts32:
    push eax
2:  lodsb
    test al, al
    jz 3f
    call putc32
    jmp 2b
3:  pop eax
    ret
"#;

#[test]
fn pvh_guest_gets_start_info_with_cmdline_initrd_and_rsdp() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let elf = build_guest(dir.path(), "pvhinfo", PVH_INFO, false);
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"initrd-content-7\0").unwrap();
    let mut s = spec(&elf, Duration::from_secs(20));
    s.boot = Boot::Direct {
        kernel: elf.clone(),
        initrd: Some(initrd),
        cmdline: "console=ttyS0 pvh=yes".into(),
    };
    let (exit, out) = run_to_exit(s);
    assert_eq!(out, "console=ttyS0 pvh=yes\ninitrd-content-7\nRSD PTR \n");
    assert_eq!(exit, GuestExit::PoweredOff);
}
