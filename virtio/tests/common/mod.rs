//! What the block tests share: guest memory, descriptors and one virtio-blk request on a
//! mock queue.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use virtio::block::Block;
use virtio::{Memory, QueueDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

pub const WRITE: u16 = 2; // VRING_DESC_F_WRITE
pub const HEADER: u64 = 0x10_0000;
pub const DATA: u64 = 0x20_0000;
pub const STATUS: u64 = 0x30_0000;

pub fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// Sends one request (header type/sector, then `descs`) and returns (status, used length).
pub fn request(
    block: &mut Block,
    mem: &Memory,
    kind: u32,
    sector: u64,
    data: &[RawDescriptor],
) -> (u8, u32) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut chain = vec![desc(HEADER, 16, 0)];
    chain.extend_from_slice(data);
    chain.push(desc(STATUS, 1, WRITE));
    let mock = MockSplitQueue::new(mem, 16);
    mock.build_desc_chain(&chain).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    assert!(block.process_queue(0, &mut queue, mem).unwrap());
    let used = mock.used().ring().ref_at(0).unwrap().load();
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), used.len())
}
