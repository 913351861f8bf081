//! A sub-millisecond KVM probe for "can this KVM run a stock Linux kernel?".
//!
//! Some nested (software-assisted) KVM implementations open `/dev/kvm` and run tiny
//! real-mode guests, yet die with "emulation failure" once Linux does `lock
//! cmpxchg16b`, `xrstor` or its `int3` self-test. This probe runs exactly those
//! instructions in a long-mode guest of a few pages: on ordinary memory, on a page
//! that is also a live page table (where shadow paging has to emulate writes), and
//! an `int3` through an IDT. It passes on real hardware KVM.

use kvm_bindings::{
    kvm_regs, kvm_segment, kvm_userspace_memory_region, kvm_xcrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::error::{Error, Result};

const MEM_SIZE: usize = 0x10000;
const GDT: usize = 0x500;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const IDT: usize = 0x6000;
const STACK_TOP: u64 = 0x7000;
const CODE: usize = 0x8000;
const HANDLER: usize = 0x8100;
const DATA: u32 = 0x9000;
const XSAVE_AREA: u32 = 0xA000;
const DONE_PORT: u16 = 0x80;

/// The probe's code: xsave/xrstor (fxsave/fxrstor without XSAVE), two
/// `lock cmpxchg16b` (if the CPU has CX16), `int3`, `out 0x80`, `hlt`.
fn code(xsave: bool, cx16: bool) -> Vec<u8> {
    let mut c = Vec::new();
    let imm = |c: &mut Vec<u8>, op: u8, v: u32| {
        c.push(op);
        c.extend_from_slice(&v.to_le_bytes());
    };
    imm(&mut c, 0xB8, 7); // mov eax, 7   (x87|SSE|AVX mask, clipped by XCR0)
    c.extend_from_slice(&[0x31, 0xD2]); // xor edx, edx
    imm(&mut c, 0xB9, XSAVE_AREA); // mov ecx, area
    if xsave {
        c.extend_from_slice(&[0x0F, 0xAE, 0x21]); // xsave [rcx]
        c.extend_from_slice(&[0x0F, 0xAE, 0x29]); // xrstor [rcx]
    } else {
        c.extend_from_slice(&[0x0F, 0xAE, 0x01]); // fxsave [rcx]
        c.extend_from_slice(&[0x0F, 0xAE, 0x09]); // fxrstor [rcx]
    }
    let targets: &[u32] = if cx16 {
        &[DATA, (PD + 0x800) as u32]
    } else {
        &[]
    };
    for &target in targets {
        c.extend_from_slice(&[0x31, 0xC0, 0x31, 0xD2, 0x31, 0xDB, 0x31, 0xC9]); // zero rax rdx rbx rcx
        imm(&mut c, 0xBE, target); // mov esi, target
        c.extend_from_slice(&[0xF0, 0x48, 0x0F, 0xC7, 0x0E]); // lock cmpxchg16b [rsi]
    }
    c.push(0xCC); // int3 -> handler -> iretq
    c.extend_from_slice(&[0xE6, DONE_PORT as u8]); // out 0x80, al
    c.push(0xF4); // hlt
    c
}

/// Runs the probe; `Ok` means KVM ran every instruction natively or emulated it fine.
pub fn linux_instructions() -> Result<()> {
    let unusable = |what: &str, e: kvm_ioctls::Error| Error::KvmUnusable {
        reason: format!("{what}: {e}"),
    };
    let kvm = Kvm::new().map_err(|e| unusable("opening /dev/kvm", e))?;

    // Guest memory: an anonymous mapping owned by this function. It is made (and its
    // unmapping guard declared) before the VM, so that locals, dropped in reverse
    // declaration order, drop the vCPU and the VM before the memory goes away.
    // SAFETY: fresh private anonymous mapping, unmapped at the end of this function.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(Error::io(
            "mapping probe memory",
            std::io::Error::last_os_error(),
        ));
    }
    struct Unmap(*mut libc::c_void);
    impl Drop for Unmap {
        fn drop(&mut self) {
            // SAFETY: the mapping made above, of MEM_SIZE bytes.
            unsafe { libc::munmap(self.0, MEM_SIZE) };
        }
    }
    let _unmap = Unmap(host);
    let vm = kvm
        .create_vm()
        .map_err(|e| unusable("creating a probe VM", e))?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| unusable("reading supported CPUID", e))?;
    let leaf1_ecx = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map(|e| e.ecx)
        .unwrap_or(0);
    let has_xsave = leaf1_ecx & (1 << 26) != 0;
    let has_cx16 = leaf1_ecx & (1 << 13) != 0;
    tracing::debug!(has_xsave, has_cx16, "KVM probe CPU features");

    // SAFETY: the mapping is MEM_SIZE bytes, readable and writable, and only this
    // function (and the probe guest, which it runs synchronously) uses it.
    let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, MEM_SIZE) };
    let put64 =
        |mem: &mut [u8], at: usize, v: u64| mem[at..at + 8].copy_from_slice(&v.to_le_bytes());

    // Identity-map the first 2 MiB with one large page.
    put64(mem, PML4, PDPT as u64 | 0x3);
    put64(mem, PDPT, PD as u64 | 0x3);
    put64(mem, PD, 0x83);
    // GDT: null, 64-bit code (0x08), data (0x10).
    put64(mem, GDT, 0);
    put64(mem, GDT + 8, 0x00af_9b00_0000_ffff);
    put64(mem, GDT + 16, 0x00cf_9300_0000_ffff);
    // IDT entry 3 (#BP): 64-bit interrupt gate to HANDLER.
    let h = HANDLER as u64;
    let gate_lo: u64 = (h & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((h >> 16) & 0xffff) << 48;
    put64(mem, IDT + 3 * 16, gate_lo);
    put64(mem, IDT + 3 * 16 + 8, h >> 32);
    let code = code(has_xsave, has_cx16);
    mem[CODE..CODE + code.len()].copy_from_slice(&code);
    mem[HANDLER..HANDLER + 2].copy_from_slice(&[0x48, 0xCF]); // iretq

    // SAFETY: the region is the mapping above, MEM_SIZE bytes, which outlives the VM:
    // `_unmap` is declared before `vm` (and `vcpu`), so it is dropped after them.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: host as u64,
        })
    }
    .map_err(|e| unusable("registering probe memory", e))?;

    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| unusable("creating a probe vCPU", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| unusable("setting CPUID", e))?;

    let mut sregs = vcpu.get_sregs().map_err(|e| unusable("reading sregs", e))?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 11, 1, 0);
    let data = seg(0x10, 3, 0, 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT as u64;
    sregs.idt.limit = 0xfff;
    sregs.cr3 = PML4 as u64;
    // PAE | OSFXSR | OSXMMEXCPT (| OSXSAVE)
    sregs.cr4 = 0x20 | 0x200 | 0x400 | if has_xsave { 0x4_0000 } else { 0 };
    // PE | MP | ET | NE | PG
    sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x8000_0000;
    // LME | LMA
    sregs.efer = 0x100 | 0x400;
    vcpu.set_sregs(&sregs)
        .map_err(|e| unusable("entering long mode", e))?;
    if has_xsave {
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = 0x3; // x87 | SSE
        vcpu.set_xcrs(&xcrs)
            .map_err(|e| unusable("setting XCR0", e))?;
    }
    let regs = kvm_regs {
        rip: CODE as u64,
        rsp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| unusable("setting registers", e))?;

    let mut vcpu = vcpu;
    let mut saw_done = false;
    enum Step {
        Done,
        Halt,
        Internal,
        Other(String),
        Retry,
    }
    for _ in 0..16 {
        let step = match vcpu.run() {
            Ok(VcpuExit::IoOut(DONE_PORT, _)) => Step::Done,
            Ok(VcpuExit::Hlt) => Step::Halt,
            Ok(VcpuExit::InternalError) => Step::Internal,
            Ok(other) => Step::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Retry,
            Err(e) => return Err(unusable("running the probe guest", e)),
        };
        let rip = || vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        match step {
            Step::Done => saw_done = true,
            Step::Retry => {}
            Step::Halt if saw_done => return Ok(()),
            Step::Halt => {
                return Err(Error::KvmUnusable { reason: format!("probe guest halted early at {}", what_at(&code, rip())) })
            }
            Step::Internal => {
                return Err(Error::KvmUnusable {
                    reason: format!(
                        "KVM internal error (emulation failure) on {}: a nested or software KVM that cannot run Linux",
                        what_at(&code, rip())
                    ),
                })
            }
            Step::Other(what) => {
                return Err(Error::KvmUnusable {
                    reason: format!("probe guest stopped with {what} at {}", what_at(&code, rip())),
                })
            }
        }
    }
    Err(Error::KvmUnusable {
        reason: "probe guest did not finish".into(),
    })
}

/// Names the probe instruction at a guest address, for the error message.
fn what_at(code: &[u8], rip: u64) -> String {
    let off = rip.wrapping_sub(CODE as u64) as usize;
    let name = match code.get(off..) {
        Some([0x0F, 0xAE, 0x21, ..]) => "xsave",
        Some([0x0F, 0xAE, 0x29, ..]) => "xrstor",
        Some([0x0F, 0xAE, 0x01, ..]) => "fxsave",
        Some([0x0F, 0xAE, 0x09, ..]) => "fxrstor",
        Some([0xF0, 0x48, 0x0F, 0xC7, ..]) => "lock cmpxchg16b",
        Some([0xCC, ..]) => "int3",
        _ if rip == HANDLER as u64 => "the int3 handler",
        _ => "the probe code",
    };
    format!("{name} (rip {rip:#x})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_layout_is_as_named() {
        let c = code(true, true);
        assert!(c.len() < HANDLER - CODE);
        assert!(what_at(&c, CODE as u64 + 12).starts_with("xsave"));
        assert!(what_at(&c, CODE as u64 + 15).starts_with("xrstor"));
        let at = c.iter().position(|&b| b == 0xF0).unwrap() as u64;
        assert!(what_at(&c, CODE as u64 + at).starts_with("lock cmpxchg16b"));
        let c = code(false, false);
        assert!(what_at(&c, CODE as u64 + 12).starts_with("fxsave"));
        assert!(!c.contains(&0xF0));
    }

    /// Runs where /dev/kvm exists; prints the verdict either way (the verdict is
    /// host-dependent, the probe must just not hang or crash).
    #[test]
    fn probe_runs_and_reports() {
        if !std::path::Path::new("/dev/kvm").exists() {
            // CI machines have /dev/kvm: its absence there is a broken setup.
            assert!(
                std::env::var_os("CI").is_none(),
                "no /dev/kvm and CI is set"
            );
            eprintln!("skipping: no /dev/kvm");
            return;
        }
        match linux_instructions() {
            Ok(()) => eprintln!("KVM probe: this KVM can run Linux"),
            Err(e) => {
                eprintln!("KVM probe: {e}");
                assert!(matches!(e, Error::KvmUnusable { .. }));
            }
        }
    }
}
