//! The guest physical address map (x86-64, like a PC without a BIOS).
//!
//! ```text
//! 0x0000_0500  GDT                       0x0009_fc00  end of low RAM (EBDA reserved above)
//! 0x0000_7000  Linux boot params         0x000e_0000  ACPI tables (RSDP first)
//! 0x0000_8ff0  initial stack (grows down) 0x000f_fff0  reset vector (reboots through ACPI)
//!                                         0x0010_0000  kernel (1 MiB)
//! 0x0000_9000  page tables (PML4, PDPT, 4 PDs: identity map of the low 4 GiB)
//! 0x0002_0000  kernel command line
//! 0xc000_0000 .. 0x1_0000_0000  the 32-bit MMIO hole: PCI BARs, ECAM, IOAPIC, LAPIC
//! 0x1_0000_0000 ..              RAM above 4 GiB (whatever did not fit below the hole)
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const BOOT_PARAMS_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
/// Four page directories follow the PDPT, one per GiB below 4 GiB.
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// End of conventional memory; the EBDA and the legacy BIOS area above it are reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// The ACPI tables live in the legacy BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = RESET_VECTOR;
/// Where a PC's CPU starts after a reset (`F000:FFF0`): see [`crate::reset_vector`].
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Where the kernel is loaded (the protected-mode part of a bzImage).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;

/// The 32-bit hole for device memory below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where PCI BARs are allocated: the hole below ECAM.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_END: u64 = PCI_ECAM_START;
/// PCI configuration ports (mechanism #1).
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// PCI Express configuration space (ECAM), one bus: 1 MiB.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// The TPM TIS registers (five localities of 4 KiB), where PC firmware and QEMU put them.
pub const TPM_TIS_START: u64 = 0xfed4_0000;
pub const TPM_TIS_SIZE: u64 = 0x5000;
/// RAM resumes here when it does not fit below the hole.
pub const HIGH_RAM_START: u64 = MMIO_HOLE_END;

/// Legacy I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 keyboard's ISA interrupt.
pub const KEYBOARD_IRQ: u32 = 1;
/// The ACPI Generic Event Device's interrupt: the power button (QMP `system_powerdown`).
pub const POWER_BUTTON_GSI: u32 = 5;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The MC146818 CMOS RTC: index port here, data port at `CMOS_PORT + 1`.
pub const CMOS_PORT: u16 = 0x70;
/// The CMOS register holding the century (BCD), named by the FADT's `CENTURY` field.
pub const CMOS_CENTURY_REGISTER: u8 = 0x32;
/// ACPI hardware-reduced sleep control/status register, also the reset register.
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// Value Linux writes to the reset register (FADT RESET_VALUE) to reboot.
pub const ACPI_RESET_VALUE: u8 = 1;
/// `_S5_` sleep type advertised in the DSDT; Linux writes `SLP_TYP << 2 | SLP_EN` to poweroff.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
pub const ACPI_SLP_EN: u8 = 1 << 5;

/// Smallest guest that can hold the boot structures and a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The guest RAM ranges (start, size) for `mem_size` bytes of RAM: everything below the MMIO
/// hole first, the rest from 4 GiB up.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if mem_size > MMIO_HOLE_START {
        ranges.push((GuestAddress(HIGH_RAM_START), (mem_size - low) as usize));
    }
    ranges
}

/// E820 entry types (Linux `arch/x86/include/uapi/asm/e820.h`).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map handed to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map for `mem_size` bytes of RAM: low RAM, the reserved EBDA/BIOS area holding the
/// ACPI tables, RAM from 1 MiB to the hole, the hole's device ranges, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIGH_MEMORY_START,
            size: low_end - HIGH_MEMORY_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            kind: E820_RESERVED,
        },
    ];
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_size - low_end,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_guest_has_no_high_ram() {
        let mem = 512 << 20;
        assert_eq!(ram_ranges(mem), vec![(GuestAddress(0), 512 << 20)]);
        let map = e820_map(mem);
        assert!(map.iter().all(|e| e.addr + e.size <= MMIO_HOLE_END));
        // Only the reserved legacy area is lost to RAM.
        assert_eq!(ram_total(&map), mem - (HIGH_MEMORY_START - EBDA_START));
    }

    #[test]
    fn large_guest_splits_around_the_hole() {
        for gib in [3u64, 4, 8, 20] {
            let mem = gib << 30;
            let ranges = ram_ranges(mem);
            let total: usize = ranges.iter().map(|r| r.1).sum();
            assert_eq!(total as u64, mem, "{gib} GiB");
            let map = e820_map(mem);
            assert_eq!(ram_total(&map), mem - (HIGH_MEMORY_START - EBDA_START));
            for e in map.iter().filter(|e| e.kind == E820_RAM) {
                let end = e.addr + e.size;
                assert!(
                    end <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END,
                    "RAM {e:x?} overlaps the MMIO hole"
                );
            }
            if gib > 3 {
                assert_eq!(ranges[1].0, GuestAddress(HIGH_RAM_START));
            }
        }
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        let map = e820_map(6 << 30);
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:x?}");
        }
    }
}
