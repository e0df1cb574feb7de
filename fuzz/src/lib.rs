//! What the fuzz targets share.

use virtio_queue::desc::{split::Descriptor, RawDescriptor};

/// The guest memory the queue targets give their devices.
pub const MEMORY: usize = 1 << 20;

/// A descriptor table from fuzzer bytes, 16 a descriptor: addresses up to twice the guest
/// memory (so some lie outside it), lengths under 64 KiB, any of the three flags, and next
/// indexes within a 16-entry queue.
pub fn descriptors(table: &[u8]) -> Vec<RawDescriptor> {
    table
        .chunks_exact(16)
        .map(|d| {
            let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % (2 * MEMORY as u64);
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")) % 0x1_0000;
            let flags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
            let next = u16::from_le_bytes([d[14], d[15]]) % 16;
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect()
}
