//! The code a PC runs after a reset: at the reset vector (`F000:FFF0`, physical 0xFFFF0) a BIOS
//! starts. Linux jumps there for `reboot=b`, and on a hardware-reduced ACPI platform without
//! EFI its default reboot ends there too (`reboot_init` picks EFI, which falls back to the
//! BIOS). nixvmm has no BIOS; its "firmware" at the vector resets the machine through the ACPI
//! reset register, so the VMM reboots (or, with `--no-reboot`, ends) as it does for any other
//! reset.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{ACPI_RESET_VALUE, ACPI_SLEEP_PORT, RESET_VECTOR};
use crate::{Error, Result};

/// 16-bit real-mode code: `mov dx, ACPI_SLEEP_PORT; mov al, ACPI_RESET_VALUE; out dx, al;
/// cli; hlt; jmp $-1` (halt for good should the write not reset).
pub fn code() -> [u8; 11] {
    let [port_lo, port_hi] = ACPI_SLEEP_PORT.to_le_bytes();
    [
        0xba,
        port_lo,
        port_hi, // mov dx, port
        0xb0,
        ACPI_RESET_VALUE, // mov al, value
        0xee,             // out dx, al
        0xfa,             // cli
        0xf4,             // hlt
        0xeb,
        0xfd, // jmp back to hlt
        0x90, // nop (padding)
    ]
}

/// Writes [`code`] at the reset vector.
pub fn write<M: GuestMemory>(mem: &M) -> Result<()> {
    mem.write_slice(&code(), GuestAddress(RESET_VECTOR))
        .map_err(|source| Error::GuestWrite {
            what: "reset vector",
            source,
        })
}

#[cfg(test)]
mod tests {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, Register};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn writes_the_acpi_reset_register_in_real_mode() {
        let code = code();
        // Real mode: CS = 0xf000, IP = 0xfff0.
        let mut decoder = Decoder::with_ip(16, &code, 0xfff0, DecoderOptions::NONE);
        let insns: Vec<_> = decoder.iter().collect();
        let mnemonics: Vec<_> = insns.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            &mnemonics[..6],
            [
                Mnemonic::Mov,
                Mnemonic::Mov,
                Mnemonic::Out,
                Mnemonic::Cli,
                Mnemonic::Hlt,
                Mnemonic::Jmp
            ]
        );
        assert_eq!(insns[0].op0_register(), Register::DX);
        assert_eq!(insns[0].immediate16(), ACPI_SLEEP_PORT);
        assert_eq!(insns[1].op0_register(), Register::AL);
        assert_eq!(insns[1].immediate8(), ACPI_RESET_VALUE);
        // The jump goes back to the hlt, never past the end of the first MiB.
        assert_eq!(insns[5].near_branch_target(), insns[4].ip());
        assert!(RESET_VECTOR + code.len() as u64 <= 0x10_0000);
    }

    #[test]
    fn is_written_at_the_vector() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        write(&mem).unwrap();
        let mut found = [0u8; 11];
        mem.read_slice(&mut found, GuestAddress(0xffff0)).unwrap();
        assert_eq!(found, code());
    }
}
