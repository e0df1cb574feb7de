//! The CPU state a 64-bit Linux entry needs from its loader: a GDT with flat 64-bit code and
//! data segments and identity-mapped page tables covering the low 4 GiB (kernel, boot params,
//! command line and initrd all live there).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{GDT_START, PDPT_START, PD_START, PML4_START};
use crate::{Error, Result};

/// Selectors into [`GDT`] (index * 8).
pub const CODE_SELECTOR: u16 = 0x08;
pub const DATA_SELECTOR: u16 = 0x10;
pub const TSS_SELECTOR: u16 = 0x18;

/// Null, 64-bit code, data, TSS: the same flat layout Linux's own boot GDT uses.
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Packs a segment descriptor from its flags (access byte in the low 8 bits, the granularity
/// nibble in bits 12..16), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// A decoded descriptor, as the hypervisor's segment registers want it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
}

impl Segment {
    /// Decodes GDT entry `index` into the hidden part of a segment register.
    pub fn from_gdt(index: usize) -> Segment {
        let entry = GDT[index];
        let g = ((entry >> 55) & 1) as u8;
        let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
        Segment {
            base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
            // With 4 KiB granularity the limit counts pages.
            limit: if g == 1 {
                (raw_limit << 12) | 0xfff
            } else {
                raw_limit
            },
            selector: (index * 8) as u16,
            type_: ((entry >> 40) & 0xf) as u8,
            s: ((entry >> 44) & 1) as u8,
            dpl: ((entry >> 45) & 3) as u8,
            present: ((entry >> 47) & 1) as u8,
            avl: ((entry >> 52) & 1) as u8,
            l: ((entry >> 53) & 1) as u8,
            db: ((entry >> 54) & 1) as u8,
            g,
        }
    }
}

/// Page-table entry bits.
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const HUGE_PAGE: u64 = 1 << 7;

/// Writes the GDT at [`GDT_START`] and page tables identity-mapping 0..4 GiB with 2 MiB pages
/// at [`PML4_START`]; returns the value for CR3.
pub fn write_gdt_and_page_tables<M: GuestMemory>(mem: &M) -> Result<u64> {
    let write = |value: u64, addr: u64, what: &'static str| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite { what, source })
    };
    for (i, entry) in GDT.iter().enumerate() {
        write(*entry, GDT_START + i as u64 * 8, "GDT")?;
    }
    write(PDPT_START | PRESENT | WRITABLE, PML4_START, "PML4")?;
    for gib in 0..4u64 {
        let pd = PD_START + gib * 0x1000;
        write(pd | PRESENT | WRITABLE, PDPT_START + gib * 8, "PDPT")?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            write(
                phys | PRESENT | WRITABLE | HUGE_PAGE,
                pd + i * 8,
                "page directory",
            )?;
        }
    }
    Ok(PML4_START)
}

/// Size in bytes of the GDT minus one, as the GDTR limit wants it.
pub const GDT_LIMIT: u16 = (GDT.len() * 8 - 1) as u16;

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0() {
        let cs = Segment::from_gdt(1);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = Segment::from_gdt(2);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
        let tss = Segment::from_gdt(3);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }

    /// Walks the written tables like the MMU does and checks the identity mapping.
    #[test]
    fn page_tables_identity_map_low_4_gib() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("test memory");
        let cr3 = write_gdt_and_page_tables(&mem).expect("tables fit");
        for virt in [
            0u64,
            0x10_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(cr3 + ((virt >> 39) & 511) * 8))
                .unwrap();
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((virt >> 30) & 511) * 8))
                .unwrap();
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((virt >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & HUGE_PAGE, HUGE_PAGE);
            let phys = (pde & 0x000f_ffff_ffe0_0000) | (virt & 0x1f_ffff);
            assert_eq!(phys, virt, "virt {virt:#x}");
        }
        let gdt1: u64 = mem.read_obj(GuestAddress(GDT_START + 8)).unwrap();
        assert_eq!(gdt1, GDT[1]);
    }
}
