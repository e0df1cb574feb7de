//! Tiny guests: a few instructions assembled by the tests (iced-x86), wrapped in an ELF64 and
//! booted through nixvmm's real path, entered exactly as a vmlinux is (64-bit mode, nixvmm's
//! GDT and page tables, boot params in RSI). They report over COM1 and end through the same
//! devices Linux uses.

use iced_x86::code_asm::*;

/// Where the guest's code is loaded and entered (the kernel load address).
pub const LOAD_ADDR: u64 = 0x10_0000;
const COM1: u16 = 0x3f8;
const ACPI_SLEEP: u16 = 0x3c0;

/// Builds a guest program: `code` emits the body; helpers print text and hex numbers.
pub struct Guest {
    pub a: CodeAssembler,
    print_str: CodeLabel,
    print_hex: CodeLabel,
    strings: Vec<(CodeLabel, Vec<u8>)>,
    raw_blobs: Vec<(CodeLabel, Vec<u8>)>,
}

type R<T> = Result<T, IcedError>;

impl Guest {
    pub fn new() -> Guest {
        let mut a = CodeAssembler::new(64).expect("64-bit assembler");
        let print_str = a.create_label();
        let print_hex = a.create_label();
        Guest {
            a,
            print_str,
            print_hex,
            strings: Vec::new(),
            raw_blobs: Vec::new(),
        }
    }

    /// Prints `text` on COM1. Clobbers rax, rdx, rsi.
    pub fn text(&mut self, text: &str) -> R<()> {
        let label = self.a.create_label();
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        self.strings.push((label, bytes));
        self.a.lea(rsi, ptr(label))?;
        self.a.call(self.print_str)
    }

    /// Prints the NUL-terminated string at the address in `reg`. Clobbers rax, rdx, rsi.
    pub fn string_at(&mut self, reg: AsmRegister64) -> R<()> {
        self.a.mov(rsi, reg)?;
        self.a.call(self.print_str)
    }

    /// Prints the value of `reg` as 16 hex digits. Clobbers rax, rcx, rdx, rdi.
    pub fn hex(&mut self, reg: AsmRegister64) -> R<()> {
        self.a.mov(rax, reg)?;
        self.a.call(self.print_hex)
    }

    /// A label for bytes placed after the code (e.g. code copied elsewhere by the guest).
    pub fn blob(&mut self, bytes: Vec<u8>) -> CodeLabel {
        let label = self.a.create_label();
        self.raw_blobs.push((label, bytes));
        label
    }

    /// Powers off through the ACPI sleep register, as Linux's `poweroff` does.
    pub fn poweroff(&mut self) -> R<()> {
        self.a.mov(dx, ACPI_SLEEP as u32)?;
        self.a.mov(al, (5 << 2) | (1 << 5))?;
        self.a.out(dx, al)?;
        self.halt_forever()
    }

    /// Resets the machine through the i8042 (0xFE to port 0x64), as `reboot=k` does.
    pub fn i8042_reset(&mut self) -> R<()> {
        self.a.mov(al, 0xfe)?;
        self.a.out(0x64, al)?;
        self.halt_forever()
    }

    pub fn halt_forever(&mut self) -> R<()> {
        let mut again = self.a.create_label();
        self.a.set_label(&mut again)?;
        self.a.hlt()?;
        self.a.jmp(again)
    }

    /// Appends the helpers and data and assembles at the 64-bit entry address.
    fn build_code(mut self, at: u64) -> R<Vec<u8>> {
        self.halt_forever()?;
        let a = &mut self.a;

        // print_str: rsi -> NUL-terminated string.
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut self.print_str)?;
        a.mov(dx, COM1 as u32)?;
        a.set_label(&mut next)?;
        a.lodsb()?;
        a.test(al, al)?;
        a.jz(done)?;
        a.out(dx, al)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.ret()?;

        // print_hex: rax -> 16 hex digits.
        let mut digit = a.create_label();
        let mut decimal = a.create_label();
        a.set_label(&mut self.print_hex)?;
        a.mov(rdi, rax)?;
        a.mov(ecx, 16u32)?;
        a.mov(dx, COM1 as u32)?;
        a.set_label(&mut digit)?;
        a.rol(rdi, 4)?;
        a.mov(eax, edi)?;
        a.and(eax, 0xfu32)?;
        a.add(al, b'0' as u32)?;
        a.cmp(al, b'9' as u32)?;
        a.jbe(decimal)?;
        a.add(al, (b'a' - b'9' - 1) as u32)?;
        a.set_label(&mut decimal)?;
        a.out(dx, al)?;
        a.dec(ecx)?;
        a.jnz(digit)?;
        a.ret()?;

        for (mut label, bytes) in self.strings.into_iter().chain(self.raw_blobs) {
            a.set_label(&mut label)?;
            a.db(&bytes)?;
        }
        a.assemble(at)
    }

    /// Assembles the guest as an ELF vmlinux.
    pub fn build_elf(self) -> R<Vec<u8>> {
        Ok(elf64(&self.build_code(LOAD_ADDR)?, LOAD_ADDR))
    }

    /// Assembles the guest as a bzImage whose 64-bit entry (0x200 into the protected-mode
    /// part) is the guest's first instruction.
    pub fn build_bzimage(self) -> R<Vec<u8>> {
        Ok(bzimage(&self.build_code(LOAD_ADDR + BZIMAGE_ENTRY_OFFSET)?))
    }
}

impl Default for Guest {
    fn default() -> Self {
        Guest::new()
    }
}

/// A minimal x86-64 ELF executable: one PT_LOAD segment holding `code` at `addr`, entered at
/// its first byte — the shape of a vmlinux.
pub fn elf64(code: &[u8], addr: u64) -> Vec<u8> {
    build_elf(code, addr, None)
}

/// The same with a PT_NOTE carrying XEN_ELFNOTE_PHYS32_ENTRY = `addr`: the PVH entry point
/// QEMU's `-kernel` looks for (it enters there in 32-bit protected mode).
pub fn pvh_elf64(code: &[u8], addr: u64) -> Vec<u8> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&4u32.to_le_bytes()); // descsz
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(addr as u32).to_le_bytes());
    build_elf(code, addr, Some(&note))
}

fn build_elf(code: &[u8], addr: u64, note: Option<&[u8]>) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let headers = 1 + u16::from(note.is_some());
    let note_offset = EHDR + PHDR * u64::from(headers);
    let code_offset = note_offset + note.map_or(0, |n| n.len() as u64);
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"); // 64-bit, LE, SysV
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    elf.extend_from_slice(&addr.to_le_bytes()); // e_entry
    elf.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&headers.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let mut program_header =
        |kind: u32, flags: u32, offset: u64, paddr: u64, size: u64, align: u64| {
            elf.extend_from_slice(&kind.to_le_bytes());
            elf.extend_from_slice(&flags.to_le_bytes());
            for value in [offset, paddr, paddr, size, size, align] {
                elf.extend_from_slice(&value.to_le_bytes()); // offset, vaddr, paddr, filesz, memsz, align
            }
        };
    program_header(1, 7, code_offset, addr, code.len() as u64, 0x1000); // PT_LOAD, RWX
    if let Some(note) = note {
        program_header(4, 4, note_offset, 0, note.len() as u64, 4); // PT_NOTE
        elf.extend_from_slice(note);
    }
    elf.extend_from_slice(code);
    elf
}

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
pub const BZIMAGE_ENTRY_OFFSET: u64 = 0x200;

/// A minimal bzImage (boot protocol 2.15): one setup sector carrying the header, then the
/// protected-mode code loaded at 1 MiB, with `code` at its 64-bit entry point. The guest code
/// is assembled for `LOAD_ADDR + BZIMAGE_ENTRY_OFFSET`.
pub fn bzimage(code: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    let mut put =
        |offset: usize, bytes: &[u8]| image[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[setup_sects]);
    put(0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes()); // version
    put(0x211, &[1]); // loadflags: LOADED_HIGH
    put(0x214, &(LOAD_ADDR as u32).to_le_bytes()); // code32_start
    put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(0x238, &255u32.to_le_bytes()); // cmdline_size
    put(0x258, &LOAD_ADDR.to_le_bytes()); // pref_address
    image.extend_from_slice(&[0xf4; BZIMAGE_ENTRY_OFFSET as usize]); // 32-bit entry: hlt
    image.extend_from_slice(code);
    image
}
