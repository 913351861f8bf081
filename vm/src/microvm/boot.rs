//! Kernel loading (bzImage, ELF with or without a PVH note), initrd, command line,
//! and the boot information handed to the guest (zero page + e820, or PVH start info).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::cpu::BootMode;
use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PVH_START_MAGIC: u32 = 0x336e_c578;

/// What was loaded, for building the boot information.
pub struct Loaded {
    pub mode: BootMode,
    pub kernel_end: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Why a kernel image was refused.
pub type BootError = String;

/// The e820 map: RAM below the EBDA, the BIOS area reserved (ACPI tables), RAM from
/// 1 MiB, and RAM above 4 GiB when memory does not fit below the MMIO gap.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

fn is_elf(image: &mut File) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    let n = image.read(&mut magic)?;
    image.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && &magic == b"\x7fELF")
}

/// Load `kernel` into guest memory: ELF (PVH entry when it has the note, else the
/// 64-bit entry) or bzImage (64-bit entry at load address + 0x200).
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<Loaded, BootError> {
    let elf = is_elf(kernel).map_err(|e| format!("cannot read the kernel: {e}"))?;
    let res: KernelLoaderResult = if elf {
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| format!("not a loadable x86_64 ELF kernel: {e}"))?
    } else {
        BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            format!("neither an ELF kernel nor a bzImage (or it does not fit in guest memory): {e}")
        })?
    };
    let mode = match (elf, res.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(entry)) => BootMode::Pvh32 {
            entry: entry.raw_value(),
        },
        (true, _) => {
            // The ELF entry point (vmlinux: startup_64) is a physical address here.
            let mut ehdr = [0u8; 64];
            kernel
                .seek(SeekFrom::Start(0))
                .and_then(|_| kernel.read_exact(&mut ehdr))
                .map_err(|e| format!("cannot read the ELF header: {e}"))?;
            let entry = u64::from_le_bytes(ehdr[24..32].try_into().expect("8 bytes"));
            BootMode::Long64 { entry }
        }
        (false, _) => BootMode::Long64 {
            entry: res.kernel_load.raw_value() + 0x200,
        },
    };
    Ok(Loaded {
        mode,
        kernel_end: res.kernel_end,
        setup_header: res.setup_header,
    })
}

/// Place the initrd page-aligned at the top of low RAM (below the MMIO gap and the
/// kernel's `initrd_addr_max`), above the kernel. Returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    loaded: &Loaded,
    initrd: &mut File,
) -> Result<(u64, u64), BootError> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(|e| format!("cannot read the initrd: {e}"))?;
    initrd
        .seek(SeekFrom::Start(0))
        .map_err(|e| format!("cannot read the initrd: {e}"))?;
    let mut top = mem_bytes.min(MMIO_START);
    if let Some(hdr) = loaded.setup_header {
        if hdr.initrd_addr_max != 0 {
            top = top.min(u64::from(hdr.initrd_addr_max) + 1);
        }
    }
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= loaded.kernel_end)
        .ok_or_else(|| {
            format!("initrd of {size} bytes does not fit in guest memory after the kernel")
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, size as usize)
        .map_err(|e| format!("cannot load the initrd: {e}"))?;
    Ok((addr, size))
}

/// Write the command line and the boot information for `loaded`.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    loaded: &Loaded,
    cmdline: &str,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| format!("command line: {e}"))?;
    cl.insert_str(cmdline)
        .map_err(|e| format!("command line refused: {e}"))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| format!("cannot write the command line: {e}"))?;
    let cmdline_len = cmdline.len() as u32 + 1;
    let e820 = e820_map(mem_bytes);
    match loaded.mode {
        BootMode::Pvh32 { .. } => {
            let mut info = hvm_start_info {
                magic: PVH_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_ADDR,
                rsdp_paddr: rsdp,
                memmap_paddr: PVH_MEMMAP,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let mut modules = Vec::new();
            if let Some((addr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MEMMAP + (e820.len() * 24) as u64;
                modules.push(linux_loader::loader::elf::start_info::hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                });
            }
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|&(addr, size, type_)| hvm_memmap_table_entry {
                    addr,
                    size,
                    type_,
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
            if !modules.is_empty() {
                params.set_modules(&modules, GuestAddress(info.modlist_paddr));
            }
            PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
                .map_err(|e| format!("cannot write the PVH start info: {e}"))?;
        }
        BootMode::Long64 { .. } => {
            let mut bp = boot_params::default();
            if let Some(hdr) = loaded.setup_header {
                bp.hdr = hdr;
            } else {
                bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
                bp.hdr.header = KERNEL_HDR_MAGIC;
                bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            bp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            bp.hdr.cmdline_size = cmdline_len;
            if let Some((addr, size)) = initrd {
                bp.hdr.ramdisk_image = addr as u32;
                bp.hdr.ramdisk_size = size as u32;
            }
            bp.acpi_rsdp_addr = rsdp;
            for (i, &(addr, size, type_)) in e820.iter().enumerate() {
                bp.e820_table[i] = boot_e820_entry {
                    addr,
                    size,
                    r#type: type_,
                };
            }
            bp.e820_entries = e820.len() as u8;
            let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
                .map_err(|e| format!("cannot write the zero page: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_bios_area_and_splits_high_memory() {
        let m = e820_map(64 << 20);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1].2, E820_RESERVED);
        assert_eq!(m[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
        let big = e820_map(6 << 30);
        assert_eq!(big.last().unwrap().0, FOUR_GIB);
        let total: u64 = big.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(total, (6u64 << 30) - (HIMEM_START - EBDA_START));
    }
}
