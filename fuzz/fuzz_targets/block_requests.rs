//! Any descriptor table and request bytes on a virtio-blk queue: the device answers without
//! panicking and never touches memory outside the guest's or bytes outside the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::block::{Block, BlockConfig};
use virtio::{Memory, QueueDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const MEMORY: usize = 1 << 20;

/// A fresh disk for each input, so no input sees what an earlier one wrote (a crash then
/// reproduces from its own input alone).
fn disk() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("disk.raw"), vec![0u8; 64 << 10]).expect("disk");
    dir
}

fuzz_target!(|data: &[u8]| {
    let dir = disk();
    let mut block = Block::open(&BlockConfig {
        path: dir.path().join("disk.raw"),
        format: None,
        readonly: data.first().is_some_and(|b| b & 1 == 1),
        serial: Some("fuzz".into()),
    })
    .expect("disk opens");
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
    // Up to 8 descriptors of 16 bytes each, then the rest as guest memory contents.
    let (table, contents) = data.get(1..).unwrap_or_default().split_at(data.len().saturating_sub(1).min(128));
    let _ = mem.write_slice(contents, GuestAddress(0x8_0000));
    let descriptors: Vec<RawDescriptor> = table
        .chunks_exact(16)
        .map(|d| {
            let addr = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) % (2 * MEMORY as u64);
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
            let next = u16::from_le_bytes([d[14], d[15]]) % 16;
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    if descriptors.is_empty() {
        return;
    }
    let mock = MockSplitQueue::new(&mem, 16);
    if mock.add_desc_chains(&descriptors, 0).is_err() {
        return;
    }
    let Ok(mut queue) = mock.create_queue::<Queue>() else { return };
    let _ = block.process_queue(0, &mut queue, &mem);
});
