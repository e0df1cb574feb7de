//! Tier 1: the ACPI tables as an OS finds them (RSDP → XSDT → tables), checked by checksum and
//! decompiled by ACPICA's `iasl -d`, a real parser (Debian package acpica-tools).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;

use firmware::acpi::{write_acpi_tables, AcpiConfig};
use firmware::layout::ACPI_START;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn guest_with_tables(cpus: u8, tpm: bool) -> (GuestMemoryMmap, GuestAddress) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let rsdp = write_acpi_tables(&mem, &AcpiConfig { cpus, tpm }).unwrap();
    (mem, rsdp)
}

fn read_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// A table read whole through its header's length.
fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let header = read_bytes(mem, addr, 36);
    let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
    read_bytes(mem, addr, len)
}

/// Follows RSDP → XSDT → entries (and FADT → DSDT), checking every checksum on the way.
fn tables_by_signature(mem: &GuestMemoryMmap, rsdp: GuestAddress) -> Vec<(String, Vec<u8>)> {
    let rsdp = read_bytes(mem, rsdp.0, 36);
    assert_eq!(&rsdp[0..8], b"RSD PTR ");
    assert!(checksum_ok(&rsdp[0..20]), "RSDP v1 checksum");
    assert!(checksum_ok(&rsdp), "RSDP extended checksum");
    let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
    let xsdt = table_at(mem, xsdt_addr);
    let mut tables = vec![("XSDT".to_string(), xsdt.clone())];
    for entry in xsdt[36..].chunks(8) {
        let table = table_at(mem, u64::from_le_bytes(entry.try_into().unwrap()));
        let sig = String::from_utf8_lossy(&table[0..4]).to_string();
        if sig == "FACP" {
            let dsdt_addr = u64::from_le_bytes(table[140..148].try_into().unwrap());
            tables.push(("DSDT".into(), table_at(mem, dsdt_addr)));
        }
        tables.push((sig, table));
    }
    for (sig, table) in &tables {
        assert!(checksum_ok(table), "{sig} checksum");
    }
    tables
}

/// Decompiles one table with `iasl -d` and returns the .dsl text.
fn iasl_decompile(dir: &Path, sig: &str, table: &[u8]) -> String {
    let bin = dir.join(format!("{}.dat", sig.to_lowercase()));
    std::fs::write(&bin, table).unwrap();
    let out = Command::new("iasl")
        .arg("-d")
        .arg(&bin)
        .current_dir(dir)
        .output()
        .expect("iasl not found: install Debian's acpica-tools (scripts/setup does)");
    let dsl = bin.with_extension("dsl");
    assert!(
        out.status.success() && dsl.exists(),
        "iasl -d {sig} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dsl).unwrap()
}

fn decompiled(cpus: u8) -> Vec<(String, String)> {
    decompiled_with(cpus, false)
}

fn decompiled_with(cpus: u8, tpm: bool) -> Vec<(String, String)> {
    let (mem, rsdp) = guest_with_tables(cpus, tpm);
    assert_eq!(rsdp.0, ACPI_START, "Linux scans the BIOS area for the RSDP");
    let dir = tempfile::tempdir().unwrap();
    tables_by_signature(&mem, rsdp)
        .into_iter()
        .map(|(sig, table)| {
            let dsl = iasl_decompile(dir.path(), &sig, &table);
            (sig, dsl)
        })
        .collect()
}

fn find<'a>(tables: &'a [(String, String)], sig: &str) -> &'a str {
    &tables
        .iter()
        .find(|(s, _)| s == sig)
        .unwrap_or_else(|| panic!("no {sig} table"))
        .1
}

fn field<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
    dsl.lines()
        .filter(|l| l.contains(name))
        .filter_map(|l| l.split(" : ").nth(1))
        .map(str::trim)
        .collect()
}

#[test]
fn dsdt_has_s5_and_com1() {
    let tables = decompiled(1);
    let dsdt = find(&tables, "DSDT");
    assert!(dsdt.contains("Name (_S5, Package"), "{dsdt}");
    // The sleep type must be 5, what nixvmm's power device decodes.
    let s5 = dsdt.split("Name (_S5").nth(1).unwrap();
    assert!(s5.contains("0x05"), "{s5}");
    assert!(dsdt.contains("Device (_SB.COM1)"), "{dsdt}");
    assert!(dsdt.contains("EisaId (\"PNP0501\")"), "{dsdt}");
    assert!(dsdt.contains("0x03F8"), "{dsdt}");
    assert!(dsdt.contains("0x00000004"), "IRQ 4 in {dsdt}");
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let tables = decompiled(1);
    let fadt = find(&tables, "FACP");
    assert_eq!(field(fadt, "Hardware Reduced (V5)"), ["1"], "{fadt}");
    assert_eq!(field(fadt, "Reset Register Supported"), ["1"], "{fadt}");
    assert_eq!(field(fadt, "Value to cause reset"), ["01"], "{fadt}");
    // Sleep control, sleep status and reset register: SystemIO at 0x3C0.
    let io_addresses = field(fadt, "Address :")
        .into_iter()
        .filter(|a| *a == "00000000000003C0")
        .count();
    assert_eq!(io_addresses, 3, "{fadt}");
    assert!(fadt.contains("Sleep Control Register"), "{fadt}");
    assert!(fadt.contains("Sleep Status Register"), "{fadt}");
    // The CMOS RTC's century register.
    assert_eq!(field(fadt, "RTC Century Index"), ["32"], "{fadt}");
}

#[test]
fn dsdt_has_the_cmos_rtc_without_an_irq() {
    let tables = decompiled(1);
    let dsdt = find(&tables, "DSDT");
    let rtc = device(dsdt, "_SB.RTC");
    assert!(rtc.contains("EisaId (\"PNP0B00\")"), "{rtc}");
    // IO (Decode16, 0x0070, 0x0070, 0x01, 0x02): the index and data ports.
    let io: Vec<&str> = rtc
        .lines()
        .skip_while(|l| !l.contains("IO (Decode16"))
        .take(5)
        .map(|l| {
            l.split_whitespace()
                .next()
                .unwrap_or("")
                .trim_end_matches(',')
        })
        .collect();
    assert_eq!(io, ["IO", "0x0070", "0x0070", "0x01", "0x02"], "{rtc}");
    assert!(!rtc.contains("Interrupt"), "no IRQ in {rtc}");
    assert!(!rtc.contains("IRQ"), "no IRQ in {rtc}");
}

#[test]
fn madt_lists_every_cpu_and_the_ioapic() {
    for cpus in [1u8, 2, 8] {
        let tables = decompiled(cpus);
        let madt = find(&tables, "APIC");
        let lapics = madt.matches("Processor Local APIC").count();
        assert_eq!(lapics, cpus as usize, "{madt}");
        assert!(madt.contains("I/O APIC"), "{madt}");
        assert!(field(madt, "Address").contains(&"FEC00000"), "{madt}");
        assert_eq!(field(madt, "Local Apic Address"), ["FEE00000"], "{madt}");
        assert!(madt.contains("Interrupt Source Override"), "{madt}");
        assert_eq!(field(madt, "PC-AT Compatibility"), ["1"], "{madt}");
    }
}

#[test]
fn pci_root_bridge_and_mcfg_describe_ecam() {
    let tables = decompiled(1);
    let dsdt = find(&tables, "DSDT");
    assert!(dsdt.contains("Device (_SB.PCI0)"), "{dsdt}");
    assert!(dsdt.contains("EisaId (\"PNP0A08\")"), "{dsdt}");
    assert!(dsdt.contains("WordBusNumber"), "{dsdt}");
    assert!(
        dsdt.contains("0xC0000000"),
        "32-bit BAR window start in {dsdt}"
    );
    assert!(
        dsdt.contains("0xDFFFFFFF"),
        "32-bit BAR window end in {dsdt}"
    );
    let mcfg = find(&tables, "MCFG");
    assert_eq!(field(mcfg, "Base Address"), ["00000000E0000000"], "{mcfg}");
    assert_eq!(field(mcfg, "Start Bus Number"), ["00"], "{mcfg}");
    assert_eq!(field(mcfg, "End Bus Number"), ["00"], "{mcfg}");
}

/// The text of `device` in the decompiled DSDT, up to the next device.
fn device<'a>(dsdt: &'a str, device: &str) -> &'a str {
    let body = dsdt
        .split(&format!("Device ({device})"))
        .nth(1)
        .unwrap_or_else(|| panic!("no {device} in {dsdt}"));
    body.split("Device (").next().unwrap_or(body)
}

#[test]
fn dsdt_has_the_keyboard_controller_and_the_fadt_says_so() {
    let tables = decompiled(1);
    let kbd = device(find(&tables, "DSDT"), "_SB.KBD");
    assert!(kbd.contains("EisaId (\"PNP0303\")"), "{kbd}");
    assert!(kbd.contains("0x0060") && kbd.contains("0x0064"), "{kbd}");
    assert!(kbd.contains("0x00000001"), "IRQ 1 in {kbd}");
    let fadt = find(&tables, "FACP");
    assert_eq!(
        field(fadt, "8042 Present on ports 60/64 (V2)"),
        ["1"],
        "{fadt}"
    );
}

#[test]
fn dsdt_has_a_power_button_signalled_by_a_generic_event_device() {
    let tables = decompiled(1);
    let dsdt = find(&tables, "DSDT");
    let button = device(dsdt, "_SB.PWRB");
    assert!(button.contains("EisaId (\"PNP0C0C\")"), "{button}");
    let ged = device(dsdt, "_SB.GED");
    assert!(ged.contains("\"ACPI0013\""), "{ged}");
    assert!(ged.contains("0x00000005"), "GSI 5 in {ged}");
    assert!(ged.contains("Method (_EVT, 1"), "{ged}");
    assert!(ged.contains("Notify (\\_SB.PWRB, 0x80"), "{ged}");
    let fadt = find(&tables, "FACP");
    assert_eq!(
        field(fadt, "Control Method Power Button (V1)"),
        ["1"],
        "no fixed power button: {fadt}"
    );
}

#[test]
fn a_tpm_has_a_tpm2_table_with_the_tis_start_method_and_a_dsdt_device() {
    let tables = decompiled_with(2, true);
    let tpm2 = find(&tables, "TPM2");
    assert_eq!(
        field(tpm2, "Start Method"),
        ["06 [Memory Mapped I/O]"],
        "{tpm2}"
    );
    let dsdt = find(&tables, "DSDT");
    let tpm = device(dsdt, "_SB.TPM");
    assert!(tpm.contains("Name (_HID, \"MSFT0101\""), "{tpm}");
    assert!(tpm.contains("Memory32Fixed (ReadWrite,"), "{tpm}");
    assert!(tpm.contains("0xFED40000"), "{tpm}");
    assert!(tpm.contains("0x00005000"), "{tpm}");
    assert!(!tpm.contains("Interrupt"), "polled: {tpm}");
    // Without a TPM, neither.
    let tables = decompiled(1);
    assert!(tables.iter().all(|(sig, _)| sig != "TPM2"));
    assert!(!find(&tables, "DSDT").contains("MSFT0101"));
}
