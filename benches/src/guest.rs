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

/// The guest as an ELF that both VMMs boot (see the module comment).
pub fn pvh_elf() -> Vec<u8> {
    nixvmm_tests::tiny::pvh_elf64(&code(), LOAD_ADDR)
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
