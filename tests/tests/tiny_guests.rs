//! Tier 2: tiny guests under KVM through nixvmm's real `Vm` (and its binary). Here KVM is PVM
//! and runs these guests through its instruction emulator; they are small enough for that.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use firmware::layout::{e820_map, E820Entry, ACPI_START};
use iced_x86::code_asm::*;
use nixvmm_tests::nixvmm_bin;
use nixvmm_tests::tiny::Guest;
use vmm::console::ConsoleOutput;
use vmm::{Control, Kernel, Outcome, VmConfig};

fn write_guest(dir: &Path, guest: Guest) -> std::path::PathBuf {
    let path = dir.join("guest.elf");
    std::fs::write(&path, guest.build_elf().expect("guest assembles")).unwrap();
    path
}

fn write_bzimage(dir: &Path, guest: Guest) -> std::path::PathBuf {
    let path = dir.join("bzImage");
    std::fs::write(&path, guest.build_bzimage().expect("guest assembles")).unwrap();
    path
}

fn config(kernel: &Path) -> VmConfig {
    VmConfig {
        kernel: Kernel::File(kernel.to_path_buf()),
        memory: 64 << 20,
        ..VmConfig::default()
    }
}

/// Runs `config` in-process and returns the outcome and everything the guest printed. A guest
/// still running after a minute is stopped and the test fails with what it printed.
fn run(config: &VmConfig) -> (Outcome, String) {
    let (output, buffer) = ConsoleOutput::buffer();
    let control = Control::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let runner = {
        let (config, control) = (config.clone(), control.clone());
        std::thread::spawn(move || {
            let result = vmm::run(&config, &output, &control);
            let _ = done_tx.send(());
            result
        })
    };
    let timed_out = done_rx.recv_timeout(Duration::from_secs(60)).is_err();
    control.stop();
    let outcome = runner.join().unwrap().expect("VM runs");
    let text = String::from_utf8_lossy(&buffer.lock().unwrap()).to_string();
    assert!(
        !timed_out,
        "guest still running after 60 s; it printed:\n{text}"
    );
    (outcome, text)
}

#[test]
fn guest_output_reaches_the_console_and_poweroff_ends_nixvmm_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    g.text("hello from a tiny guest\n").unwrap();
    g.poweroff().unwrap();
    let kernel = write_guest(dir.path(), g);
    let out = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a tiny guest\n"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn builtin_guest_greets_and_powers_off() {
    let out = Command::new(nixvmm_bin()).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        vmm::builtin_guest::GREETING
    );
}

fn resetting_guest(dir: &Path) -> std::path::PathBuf {
    let mut g = Guest::new();
    g.text("boot\n").unwrap();
    g.i8042_reset().unwrap();
    write_guest(dir, g)
}

#[test]
fn i8042_reset_with_no_reboot_ends_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = resetting_guest(dir.path());
    let (outcome, text) = run(&VmConfig {
        no_reboot: true,
        ..config(&kernel)
    });
    assert_eq!(outcome, Outcome::Rebooted);
    assert_eq!(text, "boot\n");
    let out = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--no-reboot", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "boot\n");
}

#[test]
fn i8042_reset_without_no_reboot_boots_again() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = resetting_guest(dir.path());
    let (output, buffer) = ConsoleOutput::buffer();
    let control = Control::default();
    let config = config(&kernel);
    let runner = {
        let control = control.clone();
        std::thread::spawn(move || vmm::run(&config, &output, &control))
    };
    let boots = |buffer: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&buffer.lock().unwrap())
            .matches("boot\n")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while boots(&buffer) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    control.stop();
    let outcome = runner.join().unwrap().expect("VM runs");
    assert_eq!(outcome, Outcome::Stopped);
    assert!(
        boots(&buffer) >= 3,
        "the guest booted {} times",
        boots(&buffer)
    );
}

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

fn value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("guest did not report {key}:\n{text}"))
}

fn hex(text: &str, key: &str) -> u64 {
    u64::from_str_radix(value(text, key), 16).unwrap()
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

/// Reads the vendor/device register of bus 0 slots 0..3 through both configuration
/// mechanisms and reports them.
#[test]
fn guest_enumerates_pci_through_cf8_and_ecam() {
    let mut g = Guest::new();
    let r = || -> Result<Guest, IcedError> {
        for slot in 0..3u32 {
            g.a.mov(eax, 0x8000_0000u32 | (slot << 11))?;
            g.a.mov(dx, 0xcf8u32)?;
            g.a.out(dx, eax)?;
            g.a.mov(dx, 0xcfcu32)?;
            g.a.in_(eax, dx)?;
            g.a.mov(r12d, eax)?;
            g.text(&format!("CF8_SLOT{slot}="))?;
            g.hex(r12)?;
            g.a.mov(rbx, 0xe000_0000u64 + (u64::from(slot) << 15))?;
            g.a.mov(r12d, dword_ptr(rbx))?;
            g.text(&format!("\nECAM_SLOT{slot}="))?;
            g.hex(r12)?;
            g.text("\n")?;
        }
        g.poweroff()?;
        Ok(g)
    };
    let g = r().expect("guest assembles");
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), g);
    let (outcome, text) = run(&config(&kernel));
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    for mechanism in ["CF8", "ECAM"] {
        assert_eq!(
            hex(&text, &format!("{mechanism}_SLOT0")),
            0x0d57_8086,
            "host bridge"
        );
        assert_eq!(
            hex(&text, &format!("{mechanism}_SLOT1")),
            0xffff_ffff,
            "empty slot"
        );
    }
}

/// Guest addresses used by the virtio guest.
mod virtio_guest {
    pub const IDT: u64 = 0x3000;
    pub const IDTR: u64 = 0x20_3100;
    pub const DESC: u64 = 0x20_0000;
    pub const AVAIL: u64 = 0x20_1000;
    pub const USED: u64 = 0x20_2000;
    pub const COUNTER: u64 = 0x20_3000;
    pub const COMMON_OFF: u64 = 0x20_3010;
    pub const NOTIFY_OFF: u64 = 0x20_3018;
    pub const BUF: u64 = 0x21_0000;
    pub const VECTOR: u32 = 0x40;
}

/// A guest acting as a virtio driver: finds the virtio-rng function on bus 0, walks its
/// capabilities, programs MSI-X vector 0, sets up queue 0 through the common configuration,
/// offers a buffer, notifies, and waits for the interrupt.
fn virtio_rng_driver() -> Result<Guest, IcedError> {
    use virtio_guest::*;
    let mut g = Guest::new();
    let mut handler = g.a.create_label();
    let mut found = g.a.create_label();
    let mut scan = g.a.create_label();

    // IDT entry for VECTOR: a 64-bit interrupt gate to `handler`.
    g.a.lea(rax, ptr(handler))?;
    g.a.mov(rdi, IDT + u64::from(VECTOR) * 16)?;
    g.a.mov(word_ptr(rdi), ax)?;
    g.a.mov(word_ptr(rdi + 2), 0x08u32)?;
    g.a.mov(word_ptr(rdi + 4), 0x8e00u32)?;
    g.a.shr(rax, 16)?;
    g.a.mov(word_ptr(rdi + 6), ax)?;
    g.a.shr(rax, 16)?;
    g.a.mov(dword_ptr(rdi + 8), eax)?;
    g.a.mov(dword_ptr(rdi + 12), 0u32)?;
    g.a.mov(rdi, IDTR)?;
    g.a.mov(word_ptr(rdi), 0xfffu32)?;
    g.a.mov(rax, IDT)?;
    g.a.mov(qword_ptr(rdi + 2), rax)?;
    g.a.lidt(ptr(rdi))?;
    // Software-enable the local APIC.
    g.a.mov(rbx, 0xfee0_0000u64)?;
    g.a.mov(eax, dword_ptr(rbx + 0xf0))?;
    g.a.or(eax, 0x1ffu32)?;
    g.a.mov(dword_ptr(rbx + 0xf0), eax)?;

    // Configuration reads/writes through 0xCF8/0xCFC for slot r13.
    fn cfg_select(g: &mut Guest, offset: AsmRegister32) -> Result<(), IcedError> {
        g.a.mov(eax, r13d)?;
        g.a.shl(eax, 11)?;
        g.a.or(eax, offset)?;
        g.a.or(eax, 0x8000_0000u32)?;
        g.a.mov(dx, 0xcf8u32)?;
        g.a.out(dx, eax)?;
        g.a.mov(dx, 0xcfcu32)
    }
    fn cfg_read(g: &mut Guest, offset: u32) -> Result<(), IcedError> {
        g.a.mov(ecx, offset)?;
        cfg_select(g, ecx)?;
        g.a.in_(eax, dx)
    }

    g.a.xor(r13d, r13d)?;
    g.a.set_label(&mut scan)?;
    cfg_read(&mut g, 0)?;
    g.a.cmp(eax, 0x1044_1af4u32)?;
    g.a.je(found)?;
    g.a.inc(r13d)?;
    g.a.cmp(r13d, 32u32)?;
    g.a.jb(scan)?;
    g.text("NO_DEVICE\n")?;
    g.poweroff()?;
    g.a.set_label(&mut found)?;
    g.text("RNG_SLOT=")?;
    g.hex(r13)?;

    // BAR 0 (64-bit) into r14; enable memory decoding and bus mastering.
    cfg_read(&mut g, 0x14)?;
    g.a.mov(r14d, eax)?;
    g.a.shl(r14, 32)?;
    cfg_read(&mut g, 0x10)?;
    g.a.and(eax, 0xffff_fff0u32)?;
    g.a.or(r14, rax)?;
    g.text("\nBAR0=")?;
    g.hex(r14)?;
    cfg_read(&mut g, 0x04)?;
    g.a.or(eax, 0x6u32)?;
    g.a.mov(ebx, eax)?;
    g.a.mov(ecx, 0x04u32)?;
    cfg_select(&mut g, ecx)?;
    g.a.mov(eax, ebx)?;
    g.a.out(dx, eax)?;

    // Walk the capability list: remember common/notify offsets and the MSI-X capability.
    cfg_read(&mut g, 0x34)?;
    g.a.movzx(r12d, al)?;
    let mut walk = g.a.create_label();
    let mut walked = g.a.create_label();
    let mut not_vendor = g.a.create_label();
    let mut next_cap = g.a.create_label();
    let mut not_common = g.a.create_label();
    g.a.set_label(&mut walk)?;
    g.a.test(r12d, r12d)?;
    g.a.jz(walked)?;
    cfg_select(&mut g, r12d)?;
    g.a.in_(eax, dx)?;
    g.a.mov(ebx, eax)?; // id | next << 8 | len << 16 | cfg_type << 24
    g.a.cmp(bl, 0x11u32)?;
    g.a.jne(not_vendor)?;
    g.a.mov(r15d, r12d)?; // MSI-X capability
    g.a.jmp(next_cap)?;
    g.a.set_label(&mut not_vendor)?;
    g.a.cmp(bl, 0x09u32)?;
    g.a.jne(next_cap)?;
    g.a.mov(ecx, ebx)?;
    g.a.shr(ecx, 24)?;
    g.a.mov(r8d, ecx)?; // cfg_type
    g.a.lea(ecx, ptr(r12 + 8))?;
    cfg_select(&mut g, ecx)?;
    g.a.in_(eax, dx)?;
    g.a.mov(r9d, eax)?; // offset in BAR
    g.text("\nCAP ")?;
    g.hex(r8)?;
    g.text(" ")?;
    g.hex(r9)?;
    g.a.cmp(r8d, 1u32)?;
    g.a.jne(not_common)?;
    g.a.mov(qword_ptr(COMMON_OFF), r9)?;
    g.a.set_label(&mut not_common)?;
    g.a.cmp(r8d, 2u32)?;
    g.a.jne(next_cap)?;
    g.a.mov(qword_ptr(NOTIFY_OFF), r9)?;
    g.a.set_label(&mut next_cap)?;
    g.a.mov(r12d, ebx)?;
    g.a.shr(r12d, 8)?;
    g.a.and(r12d, 0xffu32)?;
    g.a.jmp(walk)?;
    g.a.set_label(&mut walked)?;

    // MSI-X: enable in the capability, program entry 0 (table at BAR + its offset).
    g.a.mov(ecx, r15d)?;
    cfg_select(&mut g, ecx)?;
    g.a.in_(eax, dx)?;
    g.a.or(eax, 0x8000_0000u32)?;
    g.a.out(dx, eax)?;
    g.a.lea(ecx, ptr(r15 + 4))?;
    cfg_select(&mut g, ecx)?;
    g.a.in_(eax, dx)?;
    g.a.and(eax, 0xffff_fff8u32)?;
    g.a.lea(rbx, ptr(r14 + rax))?;
    g.a.mov(dword_ptr(rbx), 0xfee0_0000u32)?;
    g.a.mov(dword_ptr(rbx + 4), 0u32)?;
    g.a.mov(dword_ptr(rbx + 8), VECTOR)?;
    g.a.mov(dword_ptr(rbx + 12), 0u32)?;

    // Virtio initialisation through the common configuration.
    g.a.mov(rbx, r14)?;
    g.a.add(rbx, qword_ptr(COMMON_OFF))?;
    g.a.mov(byte_ptr(rbx + 0x14), 0u32)?;
    g.a.mov(byte_ptr(rbx + 0x14), 3u32)?;
    g.a.mov(dword_ptr(rbx + 0x08), 1u32)?;
    g.a.mov(dword_ptr(rbx + 0x0c), 1u32)?; // VIRTIO_F_VERSION_1
    g.a.mov(byte_ptr(rbx + 0x14), 0xbu32)?;
    g.a.mov(word_ptr(rbx + 0x16), 0u32)?;
    g.a.mov(word_ptr(rbx + 0x18), 8u32)?;
    g.a.mov(word_ptr(rbx + 0x1a), 0u32)?;
    for (offset, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
        g.a.mov(dword_ptr(rbx + offset), addr as u32)?;
        g.a.mov(dword_ptr(rbx + offset + 4), 0u32)?;
    }
    g.a.mov(word_ptr(rbx + 0x1c), 1u32)?;
    g.a.mov(byte_ptr(rbx + 0x14), 0xfu32)?; // DRIVER_OK
    g.a.movzx(r12d, byte_ptr(rbx + 0x14))?;
    g.text("\nSTATUS=")?;
    g.hex(r12)?;

    // One 16-byte device-writable buffer, made available, then notify queue 0.
    g.a.mov(rax, BUF)?;
    g.a.mov(qword_ptr(DESC), rax)?;
    g.a.mov(dword_ptr(DESC + 8), 16u32)?;
    g.a.mov(word_ptr(DESC + 12), 2u32)?;
    g.a.mov(word_ptr(DESC + 14), 0u32)?;
    g.a.mov(word_ptr(AVAIL), 0u32)?;
    g.a.mov(word_ptr(AVAIL + 4), 0u32)?;
    g.a.mov(word_ptr(AVAIL + 2), 1u32)?;
    g.a.mov(dword_ptr(COUNTER), 0u32)?;
    g.a.sti()?;
    g.a.mov(rbx, r14)?;
    g.a.add(rbx, qword_ptr(NOTIFY_OFF))?;
    g.a.mov(word_ptr(rbx), 0u32)?;
    let mut wait = g.a.create_label();
    g.a.set_label(&mut wait)?;
    g.a.pause()?;
    g.a.cmp(dword_ptr(COUNTER), 0u32)?;
    g.a.je(wait)?;
    g.a.mov(r12d, dword_ptr(COUNTER))?;
    g.text("\nIRQS=")?;
    g.hex(r12)?;
    g.a.movzx(r12d, word_ptr(USED + 2))?;
    g.text("\nUSED_IDX=")?;
    g.hex(r12)?;
    g.a.mov(r12d, dword_ptr(USED + 8))?;
    g.text("\nUSED_LEN=")?;
    g.hex(r12)?;
    g.a.mov(r12, qword_ptr(BUF))?;
    g.text("\nBUF=")?;
    g.hex(r12)?;
    g.text("\n")?;
    g.poweroff()?;

    // The interrupt handler: count, EOI, return.
    g.a.set_label(&mut handler)?;
    g.a.push(rax)?;
    g.a.inc(dword_ptr(COUNTER))?;
    g.a.mov(rax, 0xfee0_00b0u64)?;
    g.a.mov(dword_ptr(rax), 0u32)?;
    g.a.pop(rax)?;
    g.a.iretq()?;
    Ok(g)
}

#[test]
fn guest_drives_virtio_rng_over_pci_and_gets_an_msix_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), virtio_rng_driver().expect("guest assembles"));
    let (outcome, text) = run(&VmConfig {
        rng: true,
        ..config(&kernel)
    });
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    assert_eq!(hex(&text, "RNG_SLOT"), 1, "{text}");
    assert_eq!(hex(&text, "BAR0"), 0xc000_0000, "{text}");
    let caps: Vec<&str> = text.lines().filter(|l| l.starts_with("CAP ")).collect();
    assert_eq!(
        caps.len(),
        4,
        "common, ISR, device, notify capabilities: {text}"
    );
    assert_eq!(hex(&text, "STATUS"), 0xf, "DRIVER_OK accepted: {text}");
    assert_eq!(hex(&text, "IRQS"), 1, "one MSI-X interrupt: {text}");
    assert_eq!(hex(&text, "USED_IDX"), 1, "{text}");
    assert_eq!(hex(&text, "USED_LEN"), 16, "{text}");
    assert_ne!(hex(&text, "BUF"), 0, "random bytes in the buffer: {text}");
}

/// A guest that echoes what it reads from the UART until a newline, then powers off.
fn echo_guest() -> Result<Guest, IcedError> {
    let mut g = Guest::new();
    let mut wait = g.a.create_label();
    let mut done = g.a.create_label();
    g.text("ready\n")?;
    g.a.set_label(&mut wait)?;
    g.a.mov(dx, 0x3fdu32)?; // line status: bit 0 = data ready
    g.a.in_(al, dx)?;
    g.a.test(al, 1u32)?;
    g.a.jz(wait)?;
    g.a.mov(dx, 0x3f8u32)?;
    g.a.in_(al, dx)?;
    g.a.cmp(al, b'\n' as u32)?;
    g.a.je(done)?;
    g.a.xor(al, 0x20u32)?; // swap case, so the test sees the guest's work
    g.a.out(dx, al)?;
    g.a.jmp(wait)?;
    g.a.set_label(&mut done)?;
    g.text("\n")?;
    g.poweroff()?;
    Ok(g)
}

#[test]
fn stdin_reaches_the_guest_uart() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), echo_guest().expect("guest assembles"));
    let mut child = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello, Guest\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ready\nhELLO\x0c\x00gUEST\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

/// The terminal's settings are the same after nixvmm as before (run under a pseudo-terminal
/// by util-linux's `script`), whether the guest powers off or nixvmm is killed.
#[test]
fn terminal_is_restored_on_exit_and_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    g.text("hi\n").unwrap();
    g.poweroff().unwrap();
    let poweroff = write_guest(dir.path(), g);
    let spinning = dir.path().join("spin.elf");
    let mut g = Guest::new();
    g.halt_forever().unwrap();
    std::fs::write(&spinning, g.build_elf().unwrap()).unwrap();
    let bin = nixvmm_bin();
    let during = dir.path().join("during");
    let kill = format!(
        "< /dev/tty & sleep 1; stty -g > {}; kill -TERM $!; wait",
        during.display()
    );
    for (kernel, how) in [(&poweroff, ""), (&spinning, kill.as_str())] {
        let before = dir.path().join("before");
        let after = dir.path().join("after");
        let shell = format!(
            "stty -g > {b}; {bin} run --memory 64M --kernel {k} {how}; stty -g > {a}",
            b = before.display(),
            a = after.display(),
            bin = bin.display(),
            k = kernel.display(),
        );
        let out = Command::new("script")
            .args(["-qec", &shell, "/dev/null"])
            .output()
            .expect("util-linux's script runs");
        let before = std::fs::read_to_string(&before).unwrap();
        let after = std::fs::read_to_string(&after).unwrap();
        assert!(
            !before.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(before, after, "terminal settings changed ({how:?})");
    }
    let during = std::fs::read_to_string(&during).unwrap();
    let after = std::fs::read_to_string(dir.path().join("after")).unwrap();
    assert_ne!(
        during, after,
        "the terminal was in raw mode while the guest ran"
    );
}
