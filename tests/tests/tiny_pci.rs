//! Tier 2: a tiny guest enumerates PCI and drives nixvmm's virtio-pci transport end to end,
//! taking an MSI-X interrupt.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use iced_x86::code_asm::*;
use vmm::{Outcome, VmConfig};

use nixvmm_tests::tiny::Guest;
use nixvmm_tests::tiny_run::{config, hex, run, write_guest};

/// Runs a tiny guest that ends by powering off; returns what it printed.
fn run_to_poweroff(g: Guest) -> String {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), g);
    let (outcome, text) = run(&config(&kernel));
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    text
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
    let text = run_to_poweroff(r().expect("guest assembles"));
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

/// Writes to the configuration address register take effect in order and before the next
/// access of either port, however many come in a row (KVM keeps them without exiting where
/// it can): the last address written is the one read back and the one the data port uses.
#[test]
fn configuration_address_writes_apply_in_order_before_the_next_access() {
    let mut g = Guest::new();
    let r = || -> Result<Guest, IcedError> {
        g.a.mov(dx, 0xcf8u32)?;
        for slot in [1u32, 2, 0] {
            g.a.mov(eax, 0x8000_0000u32 | (slot << 11))?;
            g.a.out(dx, eax)?;
        }
        // A byte write into the register, as Linux's type-1 probe makes, is ignored.
        g.a.mov(dx, 0xcfbu32)?;
        g.a.mov(al, 1)?;
        g.a.out(dx, al)?;
        g.a.mov(dx, 0xcf8u32)?;
        g.a.in_(eax, dx)?;
        g.a.mov(r12d, eax)?;
        g.text("ADDRESS=")?;
        g.hex(r12)?;
        g.a.mov(dx, 0xcfcu32)?;
        g.a.in_(eax, dx)?;
        g.a.mov(r12d, eax)?;
        g.text("\nID=")?;
        g.hex(r12)?;
        g.text("\n")?;
        g.poweroff()?;
        Ok(g)
    };
    let text = run_to_poweroff(r().expect("guest assembles"));
    assert_eq!(hex(&text, "ADDRESS"), 0x8000_0000, "{text}");
    assert_eq!(hex(&text, "ID"), 0x0d57_8086, "{text}");
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
    pub const TABLE: u64 = 0x20_3020;
    pub const COUNTER_MOVED: u64 = 0x20_3028;
    pub const BUF: u64 = 0x21_0000;
    pub const VECTOR: u32 = 0x40;
}

/// What the driver guest sends: to which function and queue, the request bytes (none for a
/// device that only fills buffers), and the room for the reply.
struct Request {
    pci_id: u32,
    queue: u16,
    readable: Vec<u8>,
    reply_len: u32,
    /// End with a reset (i8042) instead of a poweroff.
    reboot: bool,
    /// Move BAR 0 here before enabling memory decoding, as Linux does when it reassigns it.
    move_bar: Option<u64>,
    /// After DRIVER_OK, point MSI-X entry 0 at this vector (mask, rewrite, unmask), as Linux
    /// does when an IRQ's affinity moves.
    rewrite_vector: Option<u32>,
}

impl Request {
    fn new(pci_id: u32, queue: u16, readable: Vec<u8>, reply_len: u32) -> Request {
        Request {
            pci_id,
            queue,
            readable,
            reply_len,
            reboot: false,
            move_bar: None,
            rewrite_vector: None,
        }
    }
}

/// A guest acting as a virtio driver: finds the function on bus 0, walks its capabilities,
/// programs MSI-X vector 0, sets up one queue through the common configuration, offers the
/// request, notifies, and waits for the interrupt.
fn virtio_driver(request: &Request) -> Result<Guest, IcedError> {
    use virtio_guest::*;
    let mut g = Guest::new();
    let request_blob = (!request.readable.is_empty()).then(|| g.blob(request.readable.clone()));
    let mut handler = g.a.create_label();
    let mut moved_handler = g.a.create_label();
    let mut found = g.a.create_label();
    let mut scan = g.a.create_label();

    // IDT entries: 64-bit interrupt gates for VECTOR and the rewritten vector.
    let mut gates = vec![(VECTOR, handler)];
    if let Some(vector) = request.rewrite_vector {
        gates.push((vector, moved_handler));
    }
    for (vector, target) in gates {
        g.a.lea(rax, ptr(target))?;
        g.a.mov(rdi, IDT + u64::from(vector) * 16)?;
        g.a.mov(word_ptr(rdi), ax)?;
        g.a.mov(word_ptr(rdi + 2), 0x08u32)?;
        g.a.mov(word_ptr(rdi + 4), 0x8e00u32)?;
        g.a.shr(rax, 16)?;
        g.a.mov(word_ptr(rdi + 6), ax)?;
        g.a.shr(rax, 16)?;
        g.a.mov(dword_ptr(rdi + 8), eax)?;
        g.a.mov(dword_ptr(rdi + 12), 0u32)?;
    }
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
    g.a.cmp(eax, request.pci_id)?;
    g.a.je(found)?;
    g.a.inc(r13d)?;
    g.a.cmp(r13d, 32u32)?;
    g.a.jb(scan)?;
    g.text("NO_DEVICE\n")?;
    g.poweroff()?;
    g.a.set_label(&mut found)?;
    g.text("SLOT=")?;
    g.hex(r13)?;

    // BAR 0 (64-bit) into r14; enable memory decoding and bus mastering.
    cfg_read(&mut g, 0x14)?;
    g.a.mov(r14d, eax)?;
    g.a.shl(r14, 32)?;
    cfg_read(&mut g, 0x10)?;
    g.a.and(eax, 0xffff_fff0u32)?;
    g.a.or(r14, rax)?;
    if let Some(to) = request.move_bar {
        for (offset, half) in [(0x10u32, to as u32), (0x14, (to >> 32) as u32)] {
            g.a.mov(ecx, offset)?;
            cfg_select(&mut g, ecx)?;
            g.a.mov(eax, half)?;
            g.a.out(dx, eax)?;
        }
        cfg_read(&mut g, 0x14)?;
        g.a.mov(r14d, eax)?;
        g.a.shl(r14, 32)?;
        cfg_read(&mut g, 0x10)?;
        g.a.and(eax, 0xffff_fff0u32)?;
        g.a.or(r14, rax)?;
    }
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
    g.a.mov(qword_ptr(TABLE), rbx)?;
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
    g.a.mov(word_ptr(rbx + 0x16), u32::from(request.queue))?;
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

    // The request (if any) chained to a device-writable reply buffer; then notify the queue.
    let mut reply_desc = DESC;
    if let Some(blob) = request_blob {
        g.a.lea(rax, ptr(blob))?;
        g.a.mov(qword_ptr(DESC), rax)?;
        g.a.mov(dword_ptr(DESC + 8), request.readable.len() as u32)?;
        g.a.mov(word_ptr(DESC + 12), 1u32)?; // NEXT
        g.a.mov(word_ptr(DESC + 14), 1u32)?;
        reply_desc = DESC + 16;
    }
    g.a.mov(rax, BUF)?;
    g.a.mov(qword_ptr(reply_desc), rax)?;
    g.a.mov(dword_ptr(reply_desc + 8), request.reply_len)?;
    g.a.mov(word_ptr(reply_desc + 12), 2u32)?; // WRITE
    g.a.mov(word_ptr(reply_desc + 14), 0u32)?;
    g.a.mov(word_ptr(AVAIL), 0u32)?;
    g.a.mov(word_ptr(AVAIL + 4), 0u32)?;
    g.a.mov(word_ptr(AVAIL + 2), 1u32)?;
    g.a.mov(dword_ptr(COUNTER), 0u32)?;
    g.a.mov(dword_ptr(COUNTER_MOVED), 0u32)?;
    if let Some(vector) = request.rewrite_vector {
        g.a.mov(rbx, qword_ptr(TABLE))?;
        g.a.mov(dword_ptr(rbx + 12), 1u32)?; // mask
        g.a.mov(dword_ptr(rbx + 8), vector)?;
        g.a.mov(dword_ptr(rbx + 12), 0u32)?; // unmask
    }
    g.a.sti()?;
    g.a.mov(rbx, r14)?;
    g.a.add(rbx, qword_ptr(NOTIFY_OFF))?;
    g.a.mov(
        word_ptr(rbx + 4 * i32::from(request.queue)),
        u32::from(request.queue),
    )?;
    let mut wait = g.a.create_label();
    g.a.set_label(&mut wait)?;
    g.a.pause()?;
    g.a.cmp(dword_ptr(COUNTER), 0u32)?;
    g.a.je(wait)?;
    g.a.mov(r12d, dword_ptr(COUNTER))?;
    g.text("\nIRQS=")?;
    g.hex(r12)?;
    g.a.mov(r12d, dword_ptr(COUNTER_MOVED))?;
    g.text("\nIRQS_AT_NEW_VECTOR=")?;
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
    g.a.mov(r12, qword_ptr(BUF + 8))?;
    g.text("\nBUF2=")?;
    g.hex(r12)?;
    g.text("\n")?;
    if request.reboot {
        g.i8042_reset()?;
    } else {
        g.poweroff()?;
    }

    // The interrupt handler: count, EOI, return.
    g.a.set_label(&mut handler)?;
    g.a.push(rax)?;
    g.a.inc(dword_ptr(COUNTER))?;
    g.a.mov(rax, 0xfee0_00b0u64)?;
    g.a.mov(dword_ptr(rax), 0u32)?;
    g.a.pop(rax)?;
    g.a.iretq()?;

    // The rewritten vector's handler: count it apart as well.
    g.a.set_label(&mut moved_handler)?;
    g.a.inc(dword_ptr(COUNTER_MOVED))?;
    g.a.jmp(handler)?;
    Ok(g)
}

#[test]
fn guest_drives_virtio_rng_over_pci_and_gets_an_msix_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let rng = Request::new(0x1044_1af4, 0, Vec::new(), 16);
    let kernel = write_guest(dir.path(), virtio_driver(&rng).expect("guest assembles"));
    let (outcome, text) = run(&VmConfig {
        rng: true,
        ..config(&kernel)
    });
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    assert_eq!(hex(&text, "SLOT"), 1, "{text}");
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
    assert_eq!(hex(&text, "IRQS_AT_NEW_VECTOR"), 0, "{text}");
}

#[test]
fn a_moved_bar_and_a_rewritten_msix_vector_keep_the_device_working() {
    let dir = tempfile::tempdir().unwrap();
    let rng = Request {
        move_bar: Some(0xd000_0000),
        rewrite_vector: Some(0x51),
        ..Request::new(0x1044_1af4, 0, Vec::new(), 16)
    };
    let kernel = write_guest(dir.path(), virtio_driver(&rng).expect("guest assembles"));
    let (outcome, text) = run(&VmConfig {
        rng: true,
        ..config(&kernel)
    });
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    assert_eq!(
        hex(&text, "BAR0"),
        0xd000_0000,
        "the BAR took the address: {text}"
    );
    let caps: Vec<&str> = text.lines().filter(|l| l.starts_with("CAP ")).collect();
    assert_eq!(caps.len(), 4, "capabilities: {text}");
    assert_eq!(
        hex(&text, "STATUS"),
        0xf,
        "registers answer at the new BAR: {text}"
    );
    assert_eq!(
        hex(&text, "USED_IDX"),
        1,
        "the notification reached the device: {text}"
    );
    assert_eq!(hex(&text, "IRQS"), 1, "one interrupt: {text}");
    assert_eq!(
        hex(&text, "IRQS_AT_NEW_VECTOR"),
        1,
        "at the new vector: {text}"
    );
    assert_ne!(hex(&text, "BUF"), 0, "random bytes in the buffer: {text}");
}

/// `nixvmm device fs` on `socket`, once it listens. (Waiting for the socket file, not
/// connecting: the backend serves exactly one connection.)
fn start_fs_backend(socket: &std::path::Path, shared: &std::path::Path) -> std::process::Child {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let backend = Command::new(nixvmm_tests::nixvmm_bin())
        .args(["device", "fs", "--socket"])
        .arg(socket)
        .arg("--shared-dir")
        .arg(shared)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "nixvmm device fs did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    backend
}

/// The guest sends FUSE_INIT on the request queue of a virtio-fs device whose queues
/// `nixvmm device fs` serves over vhost-user: nixvmm as a vhost-user frontend, end to end
/// (shared guest RAM, the queue handed over, the backend's interrupt through an irqfd).
#[test]
fn guest_reaches_a_vhost_user_fs_backend_through_nixvmm() {
    use std::time::{Duration, Instant};
    use vmm::config::Share;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fs.sock");
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let mut backend = start_fs_backend(&socket, &shared);
    let mut init = Vec::new();
    for v in [56u32, 26] {
        init.extend_from_slice(&v.to_le_bytes()); // len, opcode FUSE_INIT
    }
    init.extend_from_slice(&1u64.to_le_bytes()); // unique
    init.extend_from_slice(&[0u8; 24]); // nodeid, uid, gid, pid, extlen, padding
    for v in [7u32, 31, 0x2_0000, 0] {
        init.extend_from_slice(&v.to_le_bytes()); // major, minor, max_readahead, flags
    }
    let request = Request::new(0x105a_1af4, 1, init.clone(), 4096);
    let kernel = write_guest(
        dir.path(),
        virtio_driver(&request).expect("guest assembles"),
    );
    let (outcome, text) = run(&VmConfig {
        shares: vec![Share::VhostUser {
            tag: "t".into(),
            socket: socket.clone(),
        }],
        ..config(&kernel)
    });
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(outcome, Outcome::PoweredOff, "{text}");
    assert_eq!(hex(&text, "STATUS"), 0xf, "DRIVER_OK: {text}");
    assert_eq!(
        hex(&text, "IRQS"),
        1,
        "the backend's interrupt arrived: {text}"
    );
    let header = hex(&text, "BUF");
    assert_eq!(header >> 32, 0, "FUSE_INIT succeeded: {text}");
    assert!((header & 0xffff_ffff) >= 16, "a reply header: {text}");
    assert_eq!(
        hex(&text, "BUF2"),
        1,
        "the reply answers our request: {text}"
    );
    assert_eq!(hex(&text, "USED_LEN"), header & 0xffff_ffff, "{text}");

    // After a guest reboot the new VM reaches the backend over the same connection.
    let _ = std::fs::remove_file(&socket);
    let mut backend = start_fs_backend(&socket, &shared);
    let rebooting = Request {
        reboot: true,
        ..request
    };
    let kernel = write_guest(
        dir.path(),
        virtio_driver(&rebooting).expect("guest assembles"),
    );
    let config = VmConfig {
        shares: vec![Share::VhostUser {
            tag: "t".into(),
            socket: socket.clone(),
        }],
        ..config(&kernel)
    };
    let (output, buffer) = vmm::host::console::ConsoleOutput::buffer();
    let control = vmm::Control::default();
    let runner = {
        let control = control.clone();
        std::thread::spawn(move || vmm::run(&config, &output, &control))
    };
    let replies = || {
        String::from_utf8_lossy(&buffer.lock().unwrap())
            .matches("BUF2=0000000000000001")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while replies() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    control.stop();
    let outcome = runner.join().unwrap();
    let _ = backend.kill();
    let _ = backend.wait();
    let text = String::from_utf8_lossy(&buffer.lock().unwrap()).to_string();
    assert!(outcome.is_ok(), "{outcome:?}: {text}");
    assert!(replies() >= 3, "three boots each got a FUSE reply: {text}");
}
