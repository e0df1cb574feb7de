//! The benchmark's tiny guest: one ELF both VMMs boot. nixvmm enters it as a vmlinux (64-bit
//! mode at `e_entry`); QEMU's `-kernel` enters it through its PVH note (32-bit protected mode).
//! Its code uses only instructions that encode the same in both modes.

use nixvmm_tests::tiny::LOAD_ADDR;

pub const MARKER: &str = "NIXVMM-BENCH-MARKER";

/// `mov dx, imm16` (0x66 makes it 16-bit in both modes).
fn mov_dx(code: &mut Vec<u8>, port: u16) {
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&port.to_le_bytes());
}

/// `mov al, imm8; out dx, al`.
fn out_byte(code: &mut Vec<u8>, value: u8) {
    code.extend_from_slice(&[0xb0, value, 0xee]);
}

/// Prints a greeting and the marker on COM1, then powers off: nixvmm through its ACPI sleep
/// register (port 0x3c0), QEMU through `isa-debug-exit` at port 0xf4.
pub fn code() -> Vec<u8> {
    let mut code = Vec::new();
    mov_dx(&mut code, 0x3f8);
    for byte in format!("tiny guest up\n{MARKER}\n").bytes() {
        out_byte(&mut code, byte);
    }
    mov_dx(&mut code, 0x3c0);
    out_byte(&mut code, (5 << 2) | (1 << 5));
    mov_dx(&mut code, 0xf4);
    out_byte(&mut code, 0);
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// An ELF64 with the code in one PT_LOAD at [`LOAD_ADDR`] and a PT_NOTE carrying
/// XEN_ELFNOTE_PHYS32_ENTRY (the PVH entry point QEMU looks for).
pub fn pvh_elf() -> Vec<u8> {
    let code = code();
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD_ADDR as u32).to_le_bytes());
    let ehdr = 64u64;
    let phdr = 56u64;
    let note_offset = ehdr + 2 * phdr;
    let code_offset = note_offset + note.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    elf.extend_from_slice(&ehdr.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(ehdr as u16).to_le_bytes());
    elf.extend_from_slice(&(phdr as u16).to_le_bytes());
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[64, 0, 0, 0, 0, 0]); // e_shentsize, e_shnum, e_shstrndx
    let program_header = |kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64| {
        let mut h = Vec::new();
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        for v in [offset, addr, addr, size, size, align] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    };
    elf.extend(program_header(
        1,
        5,
        code_offset,
        LOAD_ADDR,
        code.len() as u64,
        0x1000,
    ));
    elf.extend(program_header(4, 4, note_offset, 0, note.len() as u64, 4));
    elf.extend_from_slice(&note);
    elf.extend_from_slice(&code);
    elf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_carries_the_pvh_note_and_the_code() {
        let elf = pvh_elf();
        assert_eq!(&elf[..4], b"\x7fELF");
        let note_at = 64 + 2 * 56;
        assert_eq!(
            u32::from_le_bytes(elf[note_at + 8..note_at + 12].try_into().unwrap()),
            18
        );
        assert_eq!(&elf[note_at + 12..note_at + 16], b"Xen\0");
        let entry = u32::from_le_bytes(elf[note_at + 16..note_at + 20].try_into().unwrap());
        assert_eq!(u64::from(entry), LOAD_ADDR);
        assert!(elf.ends_with(&code()));
    }
}
