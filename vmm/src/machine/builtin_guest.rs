//! The tiny guest nixvmm boots when no kernel is given: it prints a greeting on COM1 and
//! powers off through the ACPI sleep register, entered exactly as a vmlinux is (64-bit mode at
//! 1 MiB). It shows a fresh machine that nixvmm, KVM and the console work.

/// x86-64 machine code, loaded at `firmware::layout::HIGH_MEMORY_START`.
pub fn code() -> Vec<u8> {
    #[rustfmt::skip]
    let mut code = vec![
        0x48, 0x8d, 0x35, 0x16, 0x00, 0x00, 0x00, //  0: lea rsi, [rip + 0x16]   ; the message
        0x66, 0xba, 0xf8, 0x03,                   //  7: mov dx, 0x3f8           ; COM1
        0xac,                                     // 11: lodsb
        0x84, 0xc0,                               // 12: test al, al
        0x74, 0x03,                               // 14: jz 19
        0xee,                                     // 16: out dx, al
        0xeb, 0xf8,                               // 17: jmp 11
        0x66, 0xba, 0xc0, 0x03,                   // 19: mov dx, 0x3c0           ; ACPI sleep
        0xb0, 0x34,                               // 23: mov al, 5 << 2 | SLP_EN ; S5
        0xee,                                     // 25: out dx, al
        0xf4,                                     // 26: hlt
        0xeb, 0xfd,                               // 27: jmp 26
    ];
    code.extend_from_slice(GREETING.as_bytes());
    code.push(0);
    code
}

pub const GREETING: &str =
    "Hello from nixvmm's built-in guest: KVM and the serial console work. Powering off.\r\n";
