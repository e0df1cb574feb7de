//! ACPI tables for a hardware-reduced x86 platform: what lets Linux find its CPUs, its
//! interrupt controllers, the serial port and the real-time clock, and power off or reboot
//! through nixvmm.
//!
//! `RSDP → XSDT → {FADT → DSDT, MADT}`, written contiguously from [`ACPI_START`]. The FADT
//! points the sleep control/status and reset registers at one I/O port, which the VMM's ACPI
//! power device watches; the DSDT's `_S5_` gives the sleep type Linux writes for poweroff.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::layout::{
    ACPI_END, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_PORT, ACPI_START,
    CMOS_CENTURY_REGISTER, CMOS_PORT, COM1_IRQ, COM1_PORT, I8042_DATA_PORT, IOAPIC_START,
    KEYBOARD_IRQ, LAPIC_START, PCI_CONFIG_PORT, PCI_ECAM_START, PCI_MMIO_END, PCI_MMIO_START,
    POWER_BUTTON_GSI, TPM_TIS_SIZE, TPM_TIS_START,
};
use crate::{Error, Result};

pub const OEM_ID: [u8; 6] = *b"NIXVMM";
const OEM_TABLE_ID: [u8; 8] = *b"NIXVMM  ";
const OEM_REVISION: u32 = 1;

/// What the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    pub cpus: u8,
    /// A TPM TIS at [`TPM_TIS_START`]: the TPM2 table and a DSDT device for it.
    pub tpm: bool,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The one I/O byte the FADT names for sleep control, sleep status and reset.
fn sleep_register() -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ACPI_SLEEP_PORT),
    )
}

/// The PCI host bridge (bus 0): its configuration ports and the windows its BARs live in.
fn pci_root(body: &mut Vec<u8>) {
    use aml::{AddressSpace, AddressSpaceCacheable};
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08")),
            &aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &AddressSpace::new_bus_number(0u16, 0u16),
                    &aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8),
                    &AddressSpace::new_io(0u16, PCI_CONFIG_PORT - 1, None),
                    &AddressSpace::new_io(PCI_CONFIG_PORT + 8, 0xffffu16, None),
                    &AddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO_START as u32,
                        (PCI_MMIO_END - 1) as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The MCFG: ECAM for segment 0, bus 0.
pub fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
    to_bytes(&mcfg)
}

/// The CMOS RTC's two ports, and no IRQ: nixvmm raises none, and Linux's rtc_cmos, finding no
/// IRQ and no legacy PIC (hardware-reduced ACPI), then runs without alarms instead of
/// assuming IRQ 8.
fn rtc(body: &mut Vec<u8>) {
    aml::Device::new(
        "_SB_.RTC_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(CMOS_PORT, CMOS_PORT, 1, 2)]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The i8042 keyboard controller (PNP0303): data and command ports and IRQ 1, which Linux's
/// i8042 driver takes from here (with hardware-reduced ACPI there are no legacy ISA IRQs
/// it could assume).
fn keyboard(body: &mut Vec<u8>) {
    aml::Device::new(
        "_SB_.KBD_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                    &aml::IO::new(I8042_DATA_PORT + 4, I8042_DATA_PORT + 4, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, KEYBOARD_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The power button (PNP0C0C) and the Generic Event Device (ACPI0013) that signals it: a
/// hardware-reduced platform has no fixed power button, so its interrupt (GSI
/// [`POWER_BUTTON_GSI`]) runs `_EVT`, which notifies the button, and Linux's button driver
/// reports KEY_POWER (systemd-logind then powers off).
fn power_button(body: &mut Vec<u8>) {
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(body);
    aml::Device::new(
        "_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Interrupt::new(
                    true,
                    true,
                    false,
                    false,
                    POWER_BUTTON_GSI,
                )]),
            ),
            &aml::Method::new(
                "_EVT".into(),
                1,
                false,
                vec![&aml::If::new(
                    &aml::Equal::new(&aml::Arg(0), &POWER_BUTTON_GSI),
                    vec![&aml::Notify::new(&aml::Path::new("\\_SB_.PWRB"), &0x80u8)],
                )],
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The TPM (MSFT0101, a TPM 2.0 with a TIS or CRB interface): Linux's built-in tpm_tis
/// binds to it through ACPI when the TPM2 table says the start method is MMIO (TIS). No
/// interrupt: the driver polls.
fn tpm(body: &mut Vec<u8>) {
    aml::Device::new(
        "_SB_.TPM_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"MSFT0101"),
            &aml::Name::new("_STA".into(), &0xfu8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    true,
                    TPM_TIS_START as u32,
                    TPM_TIS_SIZE as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(body);
}

/// The TPM2 table of a TIS (FIFO) TPM: start method 6, no control area (QEMU's tpm-tis).
pub fn tpm2() -> Vec<u8> {
    use acpi_tables::tpm2::{PlatformClass, StartMethod, Tpm2};
    to_bytes(&Tpm2::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        PlatformClass::Client,
        0,
        StartMethod::Mmio,
    ))
}

/// The DSDT: the `_S5_` sleep state, the COM1 UART, the keyboard controller, the power
/// button, the RTC, the PCI host bridge and, with `with_tpm`, the TPM.
pub fn dsdt(with_tpm: bool) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::Interrupt::new(true, true, false, false, COM1_IRQ),
                    &aml::IO::new(COM1_PORT, COM1_PORT, 1, 8),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);
    keyboard(&mut body);
    power_button(&mut body);
    rtc(&mut body);
    pci_root(&mut body);
    if with_tpm {
        tpm(&mut body);
    }
    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// FADT IAPC_BOOT_ARCH bit 1: the platform has an 8042 keyboard controller.
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;

/// The FADT of a hardware-reduced platform whose DSDT is at `dsdt`.
pub fn fadt(dsdt: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    builder.sleep_control_reg = sleep_register();
    builder.sleep_status_reg = sleep_register();
    builder.reset_reg = sleep_register();
    builder.reset_value = ACPI_RESET_VALUE;
    // Where Linux reads (and writes) the century when it uses the RTC.
    builder.century = CMOS_CENTURY_REGISTER;
    // IA-PC boot architecture: an 8042 is there (Linux then probes the keyboard controller
    // at 0x60/0x64 without a PNP device for it).
    builder.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    to_bytes(&builder.finalize())
}

/// MADT Interrupt Source Override (type 2): ISA `source` is wired to `gsi`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    kind: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4): every CPU's LINT1 is the NMI line.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    kind: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip provides them).
const PCAT_COMPAT: u32 = 1;

/// The MADT: one local APIC per vCPU (APIC ID = vCPU index), the IOAPIC, the PIT's override.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    madt.add_structure(InterruptSourceOverride {
        kind: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2.into(),
        flags: 0.into(),
    });
    madt.add_structure(LocalApicNmi {
        kind: 4,
        length: 6,
        processor_uid: 0xff,
        flags: 0.into(),
        lint: 1,
    });
    let mut bytes = to_bytes(&madt);
    // acpi_tables leaves the header's flags at zero; set PCAT_COMPAT and fix the checksum.
    bytes[40..44].copy_from_slice(&PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes, 9);
    bytes
}

/// Makes the bytes of a table sum to zero by adjusting the byte at `at`.
fn fix_checksum(table: &mut [u8], at: usize) {
    table[at] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[at] = sum.wrapping_neg();
}

/// Writes all tables from [`ACPI_START`] and returns the RSDP's address.
pub fn write_acpi_tables<M: GuestMemory>(mem: &M, config: &AcpiConfig) -> Result<GuestAddress> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align8(next + len as u64);
        at
    };
    let dsdt = dsdt(config.tpm);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(config.cpus);
    let madt_addr = place(madt.len());
    let mcfg = mcfg();
    let mcfg_addr = place(mcfg.len());
    let tpm2 = if config.tpm { tpm2() } else { Vec::new() };
    let tpm2_addr = place(tpm2.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    if config.tpm {
        xsdt.add_entry(tpm2_addr);
    }
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    if next > ACPI_END {
        return Err(Error::MemoryTooSmall(format!(
            "ACPI tables need {} bytes, the legacy BIOS area holds {}",
            next - ACPI_START,
            ACPI_END - ACPI_START
        )));
    }
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (mcfg_addr, &mcfg),
        (tpm2_addr, &tpm2),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "ACPI tables",
                source,
            })?;
    }
    Ok(GuestAddress(rsdp_addr))
}

fn align8(addr: u64) -> u64 {
    (addr + 7) & !7
}
