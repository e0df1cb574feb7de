//! Tier 2: a tiny guest entered exactly as a Linux kernel is (vmlinux and bzImage) reports the
//! boot state it finds; a second vCPU starts through INIT/SIPI.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use firmware::layout::{e820_map, E820Entry, ACPI_START};
use iced_x86::code_asm::*;
use vmm::host::console::ConsoleOutput;
use vmm::{Control, Outcome, VmConfig};

use nixvmm_tests::tiny::Guest;
use nixvmm_tests::tiny_run::{config, hex, run, value, write_bzimage, write_guest};

/// Offsets into Linux's `struct boot_params`.
mod zero_page {
    pub const ACPI_RSDP_ADDR: i32 = 0x070;
    pub const EXT_RAMDISK_IMAGE: i32 = 0x0c0;
    pub const EXT_RAMDISK_SIZE: i32 = 0x0c4;
    pub const E820_ENTRIES: i32 = 0x1e8;
    pub const RAMDISK_IMAGE: i32 = 0x218;
    pub const RAMDISK_SIZE: i32 = 0x21c;
    pub const CMD_LINE_PTR: i32 = 0x228;
    pub const E820_TABLE: i32 = 0x2d0;
}

/// A guest entered as a kernel is, reporting what it finds: its registers, the boot params
/// (E820, command line, initrd, RSDP) and the memory they point to.
fn boot_state_reporter() -> Guest {
    use zero_page::*;
    let mut g = Guest::new();
    let r = || -> Result<Guest, IcedError> {
        g.a.mov(r15, rsi)?; // CPUID clobbers rbx: keep the boot params in r15
        g.text("RSI=")?;
        g.hex(r15)?;
        g.a.mov(r12, cr0)?;
        g.text("\nCR0=")?;
        g.hex(r12)?;
        g.a.mov(r12, cr3)?;
        g.text("\nCR3=")?;
        g.hex(r12)?;
        g.a.mov(r12, cr4)?;
        g.text("\nCR4=")?;
        g.hex(r12)?;
        g.a.mov(ecx, 0xc000_0080u32)?; // EFER
        g.a.rdmsr()?;
        g.a.shl(rdx, 32)?;
        g.a.or(rax, rdx)?;
        g.a.mov(r12, rax)?;
        g.text("\nEFER=")?;
        g.hex(r12)?;
        g.a.mov(r12, rsp)?;
        g.text("\nRSP=")?;
        g.hex(r12)?;
        // CPUID: APIC ID and hypervisor bit (leaf 1), the hypervisor leaf's signature.
        g.a.mov(eax, 1u32)?;
        g.a.cpuid()?;
        g.a.mov(r12d, ebx)?;
        g.a.mov(r13d, ecx)?;
        g.text("\nCPUID1_EBX=")?;
        g.hex(r12)?;
        g.text("\nCPUID1_ECX=")?;
        g.hex(r13)?;
        g.a.mov(eax, 0x4000_0000u32)?;
        g.a.cpuid()?;
        g.a.mov(r12d, ebx)?;
        g.a.mov(r13d, ecx)?;
        g.a.shl(r13, 32)?;
        g.a.or(r12, r13)?;
        g.text("\nHYPERVISOR_SIGNATURE=")?;
        g.hex(r12)?;

        // E820: count, then each entry (20 bytes: addr, size, type).
        g.a.movzx(r13, byte_ptr(r15 + E820_ENTRIES))?;
        g.text("\nE820_ENTRIES=")?;
        g.hex(r13)?;
        g.a.lea(r14, ptr(r15 + E820_TABLE))?;
        let mut entry = g.a.create_label();
        let mut entries_done = g.a.create_label();
        g.a.set_label(&mut entry)?;
        g.a.test(r13, r13)?;
        g.a.jz(entries_done)?;
        g.a.mov(r12, qword_ptr(r14))?;
        g.text("\nE820 ")?;
        g.hex(r12)?;
        g.a.mov(r12, qword_ptr(r14 + 8))?;
        g.text(" ")?;
        g.hex(r12)?;
        g.a.mov(r12d, dword_ptr(r14 + 16))?;
        g.text(" ")?;
        g.hex(r12)?;
        g.a.add(r14, 20)?;
        g.a.dec(r13)?;
        g.a.jmp(entry)?;
        g.a.set_label(&mut entries_done)?;

        // Command line.
        g.a.mov(r12d, dword_ptr(r15 + CMD_LINE_PTR))?;
        g.text("\nCMDLINE=")?;
        g.string_at(r12)?;

        // Initrd: 64-bit address and size from the split fields, and its first 8 bytes.
        g.a.mov(r12d, dword_ptr(r15 + EXT_RAMDISK_IMAGE))?;
        g.a.shl(r12, 32)?;
        g.a.mov(eax, dword_ptr(r15 + RAMDISK_IMAGE))?;
        g.a.or(r12, rax)?;
        g.text("\nINITRD_ADDR=")?;
        g.hex(r12)?;
        g.a.mov(r13d, dword_ptr(r15 + EXT_RAMDISK_SIZE))?;
        g.a.shl(r13, 32)?;
        g.a.mov(eax, dword_ptr(r15 + RAMDISK_SIZE))?;
        g.a.or(r13, rax)?;
        g.text("\nINITRD_SIZE=")?;
        g.hex(r13)?;
        g.a.mov(r12, qword_ptr(r12))?;
        g.text("\nINITRD_HEAD=")?;
        g.hex(r12)?;

        // RSDP address and the signature found there.
        g.a.mov(r12, qword_ptr(r15 + ACPI_RSDP_ADDR))?;
        g.text("\nRSDP=")?;
        g.hex(r12)?;
        g.a.mov(r12, qword_ptr(r12))?;
        g.text("\nRSDP_SIGNATURE=")?;
        g.hex(r12)?;
        g.text("\nEND\n")?;
        g.poweroff()?;
        Ok(g)
    };
    r().expect("reporter assembles")
}

#[test]
fn vmlinux_sees_the_linux_boot_state_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), boot_state_reporter());
    check_boot_state(dir.path(), &kernel);
}

#[test]
fn bzimage_sees_the_linux_boot_state_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_bzimage(dir.path(), boot_state_reporter());
    check_boot_state(dir.path(), &kernel);
}

#[test]
fn bzimage_command_line_limit_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_bzimage(dir.path(), boot_state_reporter());
    let (output, _) = ConsoleOutput::buffer();
    let err = vmm::run(
        &VmConfig {
            cmdline: "x".repeat(256),
            ..config(&kernel)
        },
        &output,
        &Control::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most 255"), "{err}");
}

fn check_boot_state(dir: &Path, kernel: &Path) {
    let initrd = dir.join("initrd.img");
    let mut initrd_bytes = b"INITRD!!".to_vec();
    initrd_bytes.resize(300_001, 0x5a);
    std::fs::write(&initrd, &initrd_bytes).unwrap();
    let cmdline =
        "console=ttyS0 init=/nix/store/abc-nixos-system/init regInfo=/nix/store/x/registration";
    // 256 MiB stays below the MMIO hole; 5 GiB puts RAM above 4 GiB.
    for memory in [256u64 << 20, 5 << 30] {
        let (outcome, text) = run(&VmConfig {
            initrd: Some(initrd.clone()),
            cmdline: cmdline.into(),
            memory,
            ..config(kernel)
        });
        assert_eq!(outcome, Outcome::PoweredOff, "{text}");
        assert!(text.ends_with("END\n"), "{text}");

        assert_eq!(hex(&text, "RSI"), 0x7000, "boot params in RSI");
        assert_eq!(
            hex(&text, "CR0") & 0x8000_0001,
            0x8000_0001,
            "paging, protected mode"
        );
        assert_eq!(hex(&text, "CR4") & 0x20, 0x20, "PAE");
        assert_eq!(
            hex(&text, "EFER") & 0x500,
            0x500,
            "long mode enabled and active"
        );
        assert_eq!(hex(&text, "CR3"), 0x9000);
        assert_eq!(hex(&text, "RSP"), 0x8ff0);
        assert_eq!(hex(&text, "CPUID1_EBX") >> 24, 0, "boot CPU's APIC ID");
        assert_ne!(hex(&text, "CPUID1_ECX") & (1 << 31), 0, "hypervisor bit");
        assert_eq!(
            &hex(&text, "HYPERVISOR_SIGNATURE").to_le_bytes(),
            b"KVMKVMKV",
            "KVM's hypervisor leaf (kvmclock is announced there)"
        );

        let reported: Vec<E820Entry> = text
            .lines()
            .filter_map(|l| l.strip_prefix("E820 "))
            .map(|l| {
                let f: Vec<u64> = l
                    .split(' ')
                    .map(|n| u64::from_str_radix(n, 16).unwrap())
                    .collect();
                E820Entry {
                    addr: f[0],
                    size: f[1],
                    kind: f[2] as u32,
                }
            })
            .collect();
        assert_eq!(hex(&text, "E820_ENTRIES") as usize, reported.len());
        assert_eq!(reported, e820_map(memory), "memory {memory:#x}");
        let ram: u64 = reported
            .iter()
            .filter(|e| e.kind == 1)
            .map(|e| e.size)
            .sum();
        assert!(
            ram <= memory && ram > memory - (1 << 20),
            "RAM {ram:#x} of {memory:#x}"
        );

        assert_eq!(value(&text, "CMDLINE"), cmdline);

        let addr = hex(&text, "INITRD_ADDR");
        assert_eq!(hex(&text, "INITRD_SIZE"), initrd_bytes.len() as u64);
        assert_eq!(addr % 4096, 0, "initrd page aligned");
        assert!(addr + initrd_bytes.len() as u64 <= memory.min(0xc000_0000));
        assert!(addr >= 0x100_0000, "initrd placed high, above the kernel");
        assert_eq!(
            hex(&text, "INITRD_HEAD").to_le_bytes(),
            initrd_bytes[..8],
            "initrd contents"
        );

        assert_eq!(hex(&text, "RSDP"), ACPI_START);
        assert_eq!(&hex(&text, "RSDP_SIGNATURE").to_le_bytes(), b"RSD PTR ");
    }
}

/// The application processor's start-up code, in real mode: it reports its APIC ID from
/// CPUID, then sets a flag the boot CPU waits for.
fn ap_trampoline() -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    let mut r = || -> Result<Vec<u8>, IcedError> {
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.shr(ebx, 24)?;
        a.mov(dx, 0x3f8u32)?;
        for byte in *b"AP apic_id=" {
            a.mov(al, byte as u32)?;
            a.out(dx, al)?;
        }
        a.mov(al, bl)?;
        a.add(al, b'0' as u32)?;
        a.out(dx, al)?;
        a.mov(al, b'\n' as u32)?;
        a.out(dx, al)?;
        a.mov(byte_ptr(AP_FLAG), 1u32)?;
        let mut halt = a.create_label();
        a.set_label(&mut halt)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(halt)?;
        a.assemble(AP_START)
    };
    r().expect("trampoline assembles")
}

const AP_START: u64 = 0x6000;
const AP_FLAG: u64 = 0x6ff0;

#[test]
fn second_vcpu_starts_through_init_sipi() {
    let mut g = Guest::new();
    let trampoline = ap_trampoline();
    let len = trampoline.len();
    let blob = g.blob(trampoline);
    let r = || -> Result<Guest, IcedError> {
        g.text("BSP\n")?;
        // Copy the trampoline below 1 MiB, where a SIPI can start a CPU.
        g.a.lea(rsi, ptr(blob))?;
        g.a.mov(rdi, AP_START)?;
        g.a.mov(rcx, len as u64)?;
        g.a.rep().movsb()?;
        g.a.mov(byte_ptr(AP_FLAG), 0u32)?;
        // INIT then SIPI to APIC ID 1 through the local APIC's ICR.
        g.a.mov(rbx, 0xfee0_0000u64)?;
        g.a.mov(dword_ptr(rbx + 0x310), 1u32 << 24)?;
        g.a.mov(dword_ptr(rbx + 0x300), 0x4500u32)?;
        g.a.mov(dword_ptr(rbx + 0x310), 1u32 << 24)?;
        g.a.mov(dword_ptr(rbx + 0x300), 0x4600u32 | (AP_START >> 12) as u32)?;
        let mut wait = g.a.create_label();
        g.a.set_label(&mut wait)?;
        g.a.pause()?;
        g.a.cmp(byte_ptr(AP_FLAG), 1u32)?;
        g.a.jne(wait)?;
        g.text("BSP saw the AP\n")?;
        g.poweroff()?;
        Ok(g)
    };
    let g = r().expect("guest assembles");
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), g);
    let (outcome, text) = run(&VmConfig {
        cpus: 2,
        ..config(&kernel)
    });
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    assert_eq!(text, "BSP\nAP apic_id=1\nBSP saw the AP\n");
}
