//! Guest physical address map of the microvm (x86_64).
//!
//! RAM starts at 0 and runs up to `MMIO_START`; whatever does not fit below it continues
//! at 4 GiB. The gap `[MMIO_START, 4 GiB)` holds the virtio-mmio windows, the IOAPIC and
//! the LAPIC; guest accesses there (or anywhere outside RAM) exit to the VMM.

/// GDT for the boot vCPU state.
pub const GDT_ADDR: u64 = 0x500;
/// Empty IDT (the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4, PDPT and four PDs identity-map the first 4 GiB with 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO: u64 = 0x6000;
pub const PVH_MEMMAP: u64 = 0x6040;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// End of conventional low memory (start of the EBDA on a PC).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first) live in the BIOS read-only area, where Linux also scans.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x100000;
/// Kernels are loaded at 1 MiB and up.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_START: u64 = 0xc000_0000;
/// virtio-mmio device windows, one 4 KiB page each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map on Intel; keep them
/// in the gap, below the IOAPIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// Legacy IRQ of COM1 and the first GSI handed to virtio devices.
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The ACPI generic event device (power button) uses the last IOAPIC pin.
pub const GED_IRQ: u32 = 23;
/// IOAPIC has 24 pins; 5..=22 are free for virtio devices.
pub const MAX_VIRTIO_DEVICES: usize = 18;

/// COM1 and the i8042 controller.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_CMD: u16 = 0x64;
/// ACPI hardware-reduced sleep control / status registers (one byte each).
pub const ACPI_SLEEP_CTL: u16 = 0x3c0;
pub const ACPI_SLEEP_STS: u16 = 0x3c1;

// Fixed boot tables sit below the kernel and do not overlap each other.
const _: () = {
    assert!(ZERO_PAGE + 4096 <= BOOT_STACK);
    assert!(PD_ADDR + 4 * 4096 <= CMDLINE_ADDR);
    assert!(PVH_MEMMAP < ZERO_PAGE);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= EBDA_START);
};

/// Guest RAM ranges for `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_START), (FOUR_GIB, mem_bytes - MMIO_START)]
    }
}

/// Address of the virtio-mmio window of device `idx`.
pub fn virtio_mmio_addr(idx: usize) -> u64 {
    VIRTIO_MMIO_BASE + idx as u64 * VIRTIO_MMIO_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_START), (FOUR_GIB, (4u64 << 30) - MMIO_START)]
        );
        assert!(virtio_mmio_addr(MAX_VIRTIO_DEVICES) < IOAPIC_ADDR);
        assert!(VIRTIO_IRQ_BASE + (MAX_VIRTIO_DEVICES as u32) <= GED_IRQ);
    }
}
