//! vCPU boot state: CPUID template, MSRs, segment/paging setup, FPU and LAPIC.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

/// The CPUID template the microvm exposes. Only features named here reach the guest,
/// so a guest sees the same conservative x86_64 baseline (SSE4.2/AVX2-class, no
/// AVX-512, no TSX, no MPX/SGX/PT, no PMU, no nested virtualisation, no power
/// management) whatever the seller's CPU has beyond that.
pub const CPU_TEMPLATE_NAME: &str = "cpushare-t2";

// Leaf 1 ECX: SSE3, PCLMULQDQ, SSSE3, FMA, CX16, PCID, SSE4.1, SSE4.2, x2APIC, MOVBE,
// POPCNT, TSC-deadline, AES, XSAVE, AVX, F16C, RDRAND.
const L1_ECX_ALLOW: u32 = (1 << 0)
    | (1 << 1)
    | (1 << 9)
    | (1 << 12)
    | (1 << 13)
    | (1 << 17)
    | (1 << 19)
    | (1 << 20)
    | (1 << 21)
    | (1 << 22)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30);
const L1_ECX_HYPERVISOR: u32 = 1 << 31;
// Leaf 1 EDX: FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36
// CLFSH MMX FXSR SSE SSE2 SS.
const L1_EDX_ALLOW: u32 = 0x0000_ffff & !(1 << 10)
    | (1 << 16)
    | (1 << 17)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26)
    | (1 << 27);
const L1_EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX: FSGSBASE BMI1 AVX2 SMEP BMI2 ERMS INVPCID RDSEED ADX SMAP CLFLUSHOPT
// CLWB SHA.
const L7_EBX_ALLOW: u32 = (1 << 0)
    | (1 << 3)
    | (1 << 5)
    | (1 << 7)
    | (1 << 8)
    | (1 << 9)
    | (1 << 10)
    | (1 << 18)
    | (1 << 19)
    | (1 << 20)
    | (1 << 23)
    | (1 << 24)
    | (1 << 29);
// Leaf 7.0 ECX: UMIP, RDPID.
const L7_ECX_ALLOW: u32 = (1 << 2) | (1 << 22);
// Leaf 7.0 EDX: speculation-control bits a guest kernel needs to protect itself
// (MD_CLEAR, IBRS/IBPB, STIBP, L1D_FLUSH, ARCH_CAPABILITIES, SSBD).
const L7_EDX_ALLOW: u32 = (1 << 10) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 31);
// 0x8000_0001 ECX: LAHF, ABM, SSE4A, PREFETCHW.  EDX: SYSCALL, NX, 1G pages, RDTSCP, LM.
const LX1_ECX_ALLOW: u32 = (1 << 0) | (1 << 5) | (1 << 6) | (1 << 8);
const LX1_EDX_ALLOW: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
// XCR0 components: x87, SSE, AVX.
const XCR0_ALLOW: u32 = 0x7;
// XSAVE area size with x87+SSE+AVX (legacy 512 + header 64 + AVX 256).
const XSAVE_SIZE_AVX: u32 = 832;
const XSAVE_SIZE_SSE: u32 = 576;

/// Leaves dropped entirely: thermal/power (6), PMU (0xa), RDT (0xf, 0x10), SGX (0x12),
/// processor trace (0x14), AMX/tile (0x1d, 0x1e), AMD SVM (0x8000_000a) and AMD
/// extended perf/ power leaves.
fn leaf_dropped(function: u32) -> bool {
    matches!(
        function,
        0x6 | 0xa | 0xf | 0x10 | 0x12 | 0x14 | 0x1d | 0x1e | 0x8000_000a | 0x8000_001f
    )
}

/// Apply the template to KVM's supported CPUID for vCPU `cpu_id` of `cpu_count`.
pub fn filter_cpuid(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8) {
    let has_avx = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.ecx & (1 << 28) != 0);
    for e in cpuid.as_mut_slice().iter_mut() {
        if leaf_dropped(e.function) {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
            continue;
        }
        match e.function {
            1 => {
                e.ecx = (e.ecx & L1_ECX_ALLOW) | L1_ECX_HYPERVISOR;
                e.edx &= L1_EDX_ALLOW;
                if cpu_count > 1 {
                    e.edx |= L1_EDX_HTT;
                }
                // EBX: initial APIC id, logical processor count, CLFLUSH line size (8 qwords).
                e.ebx = (u32::from(cpu_id) << 24) | (u32::from(cpu_count) << 16) | (8 << 8);
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; one thread per cache level.
                e.eax = (e.eax & 0x3fff) | ((u32::from(cpu_count) - 1) << 26);
            }
            7 if e.index == 0 => {
                e.eax = 0;
                e.ebx &= L7_EBX_ALLOW;
                e.ecx &= L7_ECX_ALLOW;
                e.edx &= L7_EDX_ALLOW;
            }
            7 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                // x2APIC topology: EDX is this CPU's x2APIC id.
                e.edx = u32::from(cpu_id);
                if e.index == 0 {
                    e.ebx = 1;
                } else if e.index == 1 {
                    e.ebx = u32::from(cpu_count);
                }
            }
            0xd if e.index == 0 => {
                e.eax &= XCR0_ALLOW;
                e.edx = 0;
                let size = if has_avx && e.eax & 0x4 != 0 {
                    XSAVE_SIZE_AVX
                } else {
                    XSAVE_SIZE_SSE
                };
                e.ebx = size;
                e.ecx = size;
            }
            0xd if e.index == 1 => {
                // XSAVEOPT, XSAVEC, XGETBV1; no XSAVES (no supervisor state).
                e.eax &= 0x7;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xd if e.index == 2 => {}
            0xd => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 => {
                e.ecx &= LX1_ECX_ALLOW;
                e.edx &= LX1_EDX_ALLOW;
            }
            _ => {}
        }
    }
}

/// CPUID for one vCPU: KVM's supported set, filtered through the template.
pub fn cpuid_for(kvm: &Kvm, cpu_id: u8, cpu_count: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    filter_cpuid(&mut cpuid, cpu_id, cpu_count);
    Ok(cpuid)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
// MTRRs enabled, default type write-back.
const MTRR_DEF_ENABLE_WB: u64 = (1 << 11) | 6;

/// Boot MSR values: syscall MSRs cleared, fast strings on, MTRR default write-back.
pub fn boot_msrs() -> Msrs {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_ENABLE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    Msrs::from_entries(&entries).expect("fixed small MSR list fits")
}

/// x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Encode one GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The KVM segment register matching GDT descriptor `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Which entry protocol the boot vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Long64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh32 { entry: u64 },
}

/// Write the GDT, an empty IDT and (for long mode) identity page tables covering 4 GiB.
pub fn write_boot_tables(
    mem: &GuestMemoryMmap,
    mode: BootMode,
) -> Result<[u64; 4], vm_memory::GuestMemoryError> {
    let gdt: [u64; 4] = match mode {
        BootMode::Long64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        BootMode::Pvh32 { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit flat code
            gdt_entry(0xc093, 0, 0xfffff), // flat data
            gdt_entry(0x008b, 0, 0x67),    // TSS
        ],
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    if let BootMode::Long64 { .. } = mode {
        mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
        for pd in 0..4u64 {
            let pd_addr = PD_ADDR + pd * 0x1000;
            mem.write_obj(pd_addr | 0x3, GuestAddress(PDPT_ADDR + pd * 8))?;
            for i in 0..512u64 {
                // Present, writable, 2 MiB page.
                let phys = ((pd * 512 + i) << 21) | 0x83;
                mem.write_obj(phys, GuestAddress(pd_addr + i * 8))?;
            }
        }
    }
    Ok(gdt)
}

/// Segment, control and paging registers for the boot vCPU.
pub fn boot_sregs(mut sregs: kvm_sregs, gdt: &[u64; 4], mode: BootMode) -> kvm_sregs {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        BootMode::Long64 { .. } => {
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootMode::Pvh32 { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// General registers for the boot vCPU.
pub fn boot_regs(mode: BootMode) -> kvm_regs {
    match mode {
        BootMode::Long64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK,
            rbp: BOOT_STACK,
            rsi: ZERO_PAGE,
            ..Default::default()
        },
        BootMode::Pvh32 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO,
            ..Default::default()
        },
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], off: usize) -> u32 {
    let b: Vec<u8> = regs[off..off + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as on a PC.
pub fn configure_lapic(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = vcpu.get_lapic()?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(
        &mut lapic.regs,
        APIC_LVT1,
        with_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn gdt_round_trips_into_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.l, 1);
        assert_eq!(code.db, 0);
        assert_eq!(code.present, 1);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.selector, 8);
        assert_eq!(code.limit, 0xffff_ffff);
        let data32 = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data32.db, 1);
        assert_eq!(data32.l, 0);
        assert_eq!(data32.type_, 3);
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!(tss.s, 0);
        assert_eq!(tss.type_, 0xb);
    }

    #[test]
    fn template_masks_features_we_do_not_virtualise() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: u32::MAX,
                ecx: u32::MAX,
                edx: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: u32::MAX,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xd,
                eax: 0xff,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        filter_cpuid(&mut cpuid, 1, 2);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx & (1 << 5), 0, "VMX hidden");
        assert_eq!(e[0].ecx & (1 << 3), 0, "MONITOR hidden");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit set");
        assert_eq!(e[0].ebx >> 24, 1, "APIC id");
        assert_eq!(e[1].ebx & (1 << 16), 0, "AVX-512F hidden");
        assert_eq!(e[1].ebx & (1 << 11), 0, "RTM hidden");
        assert_ne!(e[1].ebx & (1 << 5), 0, "AVX2 kept");
        assert_eq!(e[2].eax, 0, "no PMU");
        assert_eq!(e[3].eax, 0x7, "XCR0 limited to x87/SSE/AVX");
    }
}
