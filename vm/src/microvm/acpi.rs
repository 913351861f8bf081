//! ACPI tables describing the machine to Linux: MADT (LAPICs, IOAPIC), a
//! hardware-reduced FADT with a sleep control register (so `poweroff` works), and a
//! DSDT naming COM1 and every virtio-mmio device as `LNRO0005` with its window and
//! interrupt. That is how a stock kernel with `virtio_mmio` as a module, and without
//! virtio-mmio command-line devices, finds the disk and the NIC.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const OEM_ID: [u8; 6] = *b"CPUSHR";
const OEM_TABLE: [u8; 8] = *b"MICROVM ";
/// Value Linux writes (SLP_TYP) to enter S5, named by `\_S5` below.
pub const S5_SLP_TYP: u8 = 5;
/// SLP_EN bit of the sleep control register.
pub const SLP_EN: u8 = 1 << 5;

/// A virtio-mmio device as the DSDT names it.
pub struct MmioDesc {
    pub addr: u64,
    pub gsi: u32,
}

fn to_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

fn dsdt(devices: &[MmioDesc]) -> Vec<u8> {
    let mut body = Vec::new();
    // COM1, so ACPI-aware kernels see the UART where it is.
    let io = aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &com1_crs);
    body.extend(to_bytes(&aml::Device::new(
        "_SB_.COM1".into(),
        vec![&hid, &uid, &crs],
    )));
    for (i, d) in devices.iter().enumerate() {
        let mem32 = aml::Memory32Fixed::new(true, d.addr as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let res = aml::ResourceTemplate::new(vec![&mem32, &irq]);
        let uid_val = i as u32;
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &uid_val);
        let cca = aml::Name::new("_CCA".into(), &aml::ONE);
        let crs = aml::Name::new("_CRS".into(), &res);
        let name = format!("_SB_.V{i:03X}");
        body.extend(to_bytes(&aml::Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &cca, &crs],
        )));
    }
    // Power button: a control-method button (PNP0C0C) notified by a hardware-reduced
    // generic event device (ACPI0013) whose interrupt the VMM raises on stop.
    let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
    let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    body.extend(to_bytes(&aml::Device::new(
        "_SB_.PWRB".into(),
        vec![&pwrb_hid, &pwrb_uid],
    )));
    let ged_irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let ged_res = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ged_crs = aml::Name::new("_CRS".into(), &ged_res);
    let pwrb_path = aml::Path::new("\\_SB_.PWRB");
    let notify_value: u8 = 0x80;
    let notify = aml::Notify::new(&pwrb_path, &notify_value);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
    body.extend(to_bytes(&aml::Device::new(
        "_SB_.GED0".into(),
        vec![&ged_hid, &ged_uid, &ged_crs, &evt],
    )));
    let s5 = aml::Package::new(vec![&S5_SLP_TYP, &0u8]);
    body.extend(to_bytes(&aml::Name::new("_S5_".into(), &s5)));
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let sleep = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    b.sleep_control_reg = sleep(ACPI_SLEEP_CTL);
    b.sleep_status_reg = sleep(ACPI_SLEEP_STS);
    // IA-PC boot architecture flags: no VGA, no MSI, no CMOS RTC.
    b.iapc_boot_arch = ((1u16 << 2) | (1 << 3) | (1 << 5)).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"CPUSHARE").into();
    to_bytes(&b.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR as u32, 0));
    to_bytes(&m)
}

/// Write the tables at `ACPI_START`; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, vcpus: u8, devices: &[MmioDesc]) -> Result<u64, String> {
    let align = |a: u64| (a + 15) & !15;
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    // XSDT: header + three pointers.
    let dsdt_addr = align(xsdt_addr + 36 + 3 * 8);
    let dsdt = dsdt(devices);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(vcpus);
    if madt_addr + madt.len() as u64 > ACPI_END {
        return Err("ACPI tables do not fit below 1 MiB".into());
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (xsdt_addr, &xsdt),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| format!("cannot write ACPI tables: {e}"))?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn tables_have_valid_checksums_and_name_virtio_devices() {
        let d = dsdt(&[MmioDesc {
            addr: virtio_mmio_addr(0),
            gsi: 5,
        }]);
        assert_eq!(&d[0..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert_eq!(sum(&d), 0);
        let hay = String::from_utf8_lossy(&d);
        assert!(hay.contains("LNRO0005"));
        assert!(hay.contains("_S5_"));
        assert!(hay.contains("ACPI0013") && hay.contains("_EVT") && hay.contains("PWRB"));
        let f = fadt(0x1234);
        assert_eq!(&f[0..4], b"FACP");
        assert_eq!(sum(&f), 0);
        let m = madt(2);
        assert_eq!(sum(&m), 0);
        assert_eq!(
            u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize,
            m.len()
        );

        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_tables(
            &mem,
            2,
            &[MmioDesc {
                addr: virtio_mmio_addr(0),
                gsi: 5,
            }],
        )
        .unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
