//! virtio-net through mock virtqueues: what a driver sends reaches the backend without the
//! virtio-net header, what the backend receives lands in the guest's buffers behind one,
//! spread over mergeable buffers, held while the guest has none, and malformed or oversized
//! frames are dropped without harm.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio::interrupt::{MsiMessage, MsiVectors};
use virtio::net::{channel, Link, Net, HEADER_LEN, MAX_FRAME, RX, TX, VIRTIO_NET_F_MRG_RXBUF};
use virtio::{ActiveQueue, Interrupt, Memory, QueueDevice, COMMON_FEATURES};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..6].copy_from_slice(&MAC);
    f
}

/// A NIC whose backend is one end of a channel; the other end is "the network".
fn nic(features: u64) -> (Net, channel::End, Link) {
    let (device_end, network) = channel::pair().unwrap();
    let link = Link::new().unwrap();
    let mut net = Net::new(MAC, Box::new(device_end), link.clone());
    net.set_acked_features(features);
    (net, network, link)
}

fn used_len(mock: &MockSplitQueue<Memory>, n: usize) -> u32 {
    mock.used().ring().ref_at(n).unwrap().load().len()
}

fn used_idx(mock: &MockSplitQueue<Memory>) -> u16 {
    mock.used().idx().load()
}

#[test]
fn offers_mac_status_and_mergeable_buffers_and_says_the_link_state() {
    let (net, _network, link) = nic(0);
    let features = net.features();
    assert_eq!(features & COMMON_FEATURES, COMMON_FEATURES);
    assert_ne!(features & VIRTIO_NET_F_MRG_RXBUF, 0);
    assert_eq!(net.queue_max_sizes().len(), 2);
    let config = net.config();
    assert_eq!(&config[..6], &MAC);
    assert_eq!(&config[6..8], &[1, 0], "link up");
    let live = net.live_config().unwrap();
    link.set(false);
    assert_eq!(&live()[6..8], &[0, 0], "link down, seen live");
}

#[test]
fn transmitted_frames_reach_the_backend_without_the_header() {
    let mem = memory();
    let (mut net, network, _link) = nic(0);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let payload = frame(60, 0xab);
    mem.write_slice(&[0u8; HEADER_LEN], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&payload, GuestAddress(0x20_0000)).unwrap();
    let tiny = [0u8; HEADER_LEN + 4];
    mem.write_slice(&tiny, GuestAddress(0x30_0000)).unwrap();
    mock.add_desc_chains(
        &[
            // header and frame in two descriptors
            desc(0x10_0000, HEADER_LEN as u32, NEXT, 1),
            desc(0x20_0000, payload.len() as u32, 0, 0),
            // shorter than an Ethernet header
            desc(0x30_0000, tiny.len() as u32, 0, 0),
            // larger than any frame
            desc(0x40_0000, (HEADER_LEN + MAX_FRAME + 1) as u32, 0, 0),
            // a buffer the device may only write
            desc(0x50_0000, 100, WRITE, 0),
            // outside guest memory
            desc(0x2000_0000, 100, 0, 0),
        ],
        0,
    )
    .unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    assert!(net.process_queue(TX, &mut queue, &mem).unwrap());
    assert_eq!(network.recv(), Some(payload));
    assert_eq!(network.recv(), None, "bad chains are dropped");
    assert_eq!(used_idx(&mock), 5, "every chain goes back to the guest");
    let counters = net.counters();
    assert_eq!(counters.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(counters.tx_bad.load(Ordering::Relaxed), 4);
}

#[test]
fn received_frames_land_behind_a_header_and_wait_for_buffers() {
    let mem = memory();
    let (mut net, network, _link) = nic(0);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut queue: Queue = mock.create_queue().unwrap();
    let first = frame(100, 1);
    let second = frame(MAX_FRAME, 2);
    network.send(first.clone());
    network.send(second.clone());
    // No buffers yet: the frame waits and the backend is not read further.
    assert!(!net.process_queue(RX, &mut queue, &mem).unwrap());
    assert!(!net.backend_wanted(0), "backend paused while a frame waits");
    assert!(net.backend_wanted(1), "link changes are always watched");

    mock.add_desc_chains(
        &[
            desc(0x10_0000, 2048, WRITE, 0),
            desc(0x20_0000, 2048, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    assert!(net.process_queue(RX, &mut queue, &mem).unwrap());
    assert!(net.backend_wanted(0));
    assert_eq!(used_idx(&mock), 2);
    assert_eq!(used_len(&mock, 0) as usize, HEADER_LEN + first.len());
    assert_eq!(used_len(&mock, 1) as usize, HEADER_LEN + second.len());
    let mut header = [0xffu8; HEADER_LEN];
    mem.read_slice(&mut header, GuestAddress(0x10_0000))
        .unwrap();
    assert_eq!(
        header,
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        "num_buffers 1"
    );
    let mut got = vec![0u8; first.len()];
    mem.read_slice(&mut got, GuestAddress(0x10_0000 + HEADER_LEN as u64))
        .unwrap();
    assert_eq!(got, first);
}

#[test]
fn mergeable_buffers_carry_a_frame_larger_than_one_buffer() {
    let mem = memory();
    let (mut net, network, _link) = nic(VIRTIO_NET_F_MRG_RXBUF);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut queue: Queue = mock.create_queue().unwrap();
    mock.add_desc_chains(
        &[
            desc(0x10_0000, 1000, WRITE, 0),
            desc(0x20_0000, 1000, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let big = frame(1500, 7);
    network.send(big.clone());
    assert!(net.process_queue(RX, &mut queue, &mem).unwrap());
    assert_eq!(used_idx(&mock), 2);
    assert_eq!(used_len(&mock, 0), 1000);
    assert_eq!(used_len(&mock, 1) as usize, HEADER_LEN + 1500 - 1000);
    let mut num_buffers = [0u8; 2];
    mem.read_slice(&mut num_buffers, GuestAddress(0x10_0000 + 10))
        .unwrap();
    assert_eq!(u16::from_le_bytes(num_buffers), 2);
    let mut got = vec![0u8; 1500];
    mem.read_slice(&mut got[..1000 - HEADER_LEN], GuestAddress(0x10_0000 + 12))
        .unwrap();
    mem.read_slice(&mut got[1000 - HEADER_LEN..], GuestAddress(0x20_0000))
        .unwrap();
    assert_eq!(got, big);

    // Only one small buffer for the next large frame: none is used until there is room.
    mock.add_desc_chains(&[desc(0x30_0000, 1000, WRITE, 0)], 2)
        .unwrap();
    network.send(big.clone());
    assert!(!net.process_queue(RX, &mut queue, &mem).unwrap());
    assert_eq!(used_idx(&mock), 2, "the lone buffer stays with the device");
    mock.add_desc_chains(&[desc(0x40_0000, 1000, WRITE, 0)], 3)
        .unwrap();
    assert!(net.process_queue(RX, &mut queue, &mem).unwrap());
    assert_eq!(used_idx(&mock), 4);
}

#[test]
fn without_mergeable_buffers_a_too_small_buffer_drops_the_frame_not_the_buffer() {
    let mem = memory();
    let (mut net, network, _link) = nic(0);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut queue: Queue = mock.create_queue().unwrap();
    mock.add_desc_chains(&[desc(0x10_0000, 200, WRITE, 0)], 0)
        .unwrap();
    network.send(frame(1000, 3));
    network.send(frame(100, 4));
    assert!(net.process_queue(RX, &mut queue, &mem).unwrap());
    assert_eq!(used_idx(&mock), 1);
    assert_eq!(used_len(&mock, 0) as usize, HEADER_LEN + 100);
    assert_eq!(net.counters().rx_dropped.load(Ordering::Relaxed), 1);
}

struct NoVectors;

impl MsiVectors for NoVectors {
    fn irqfd(&self, _vector: u16) -> Option<&EventFd> {
        None
    }
    fn route(&self, _vector: u16, _message: Option<MsiMessage>) {}
}

#[test]
fn a_link_down_drops_frames_both_ways_and_a_change_interrupts_the_config() {
    let mem = memory();
    let (mut net, network, link) = nic(0);
    let rx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let tx = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
    rx.add_desc_chains(&[desc(0x10_0000, 2048, WRITE, 0)], 0)
        .unwrap();
    mem.write_slice(&frame(HEADER_LEN + 60, 9), GuestAddress(0x20_0000))
        .unwrap();
    tx.add_desc_chains(&[desc(0x20_0000, (HEADER_LEN + 60) as u32, 0, 0)], 0)
        .unwrap();
    let mut queues = vec![
        ActiveQueue {
            index: RX,
            queue: rx.create_queue().unwrap(),
            kick: EventFd::new(0).unwrap(),
        },
        ActiveQueue {
            index: TX,
            queue: tx.create_queue().unwrap(),
            kick: EventFd::new(0).unwrap(),
        },
    ];
    let interrupt = Interrupt::new(Arc::new(NoVectors), 2);
    link.set(false);
    net.backend_ready(1, &mut queues, &mem, &interrupt).unwrap();
    assert_eq!(interrupt.config_generation(), 1, "config change signalled");
    assert_eq!(interrupt.take_isr() & 2, 2);

    network.send(frame(60, 1));
    net.backend_ready(0, &mut queues, &mem, &interrupt).unwrap();
    assert_eq!(used_idx(&rx), 0, "nothing received while the link is down");
    net.process_queue(TX, &mut queues[1].queue, &mem).unwrap();
    assert_eq!(network.recv(), None, "nothing sent while the link is down");

    link.set(true);
    network.send(frame(60, 2));
    net.backend_ready(0, &mut queues, &mem, &interrupt).unwrap();
    assert_eq!(used_idx(&rx), 1);
}

#[test]
fn a_bad_receive_buffer_among_good_ones_is_returned_empty_once() {
    let mem = memory();
    let (mut net, network, _link) = nic(VIRTIO_NET_F_MRG_RXBUF);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut queue: Queue = mock.create_queue().unwrap();
    mock.add_desc_chains(
        &[
            desc(0x10_0000, 1000, WRITE, 0),
            desc(0x2000_0000, 1000, WRITE, 0), // outside guest memory
        ],
        0,
    )
    .unwrap();
    network.send(frame(1500, 5));
    assert!(!net.process_queue(RX, &mut queue, &mem).unwrap());
    assert_eq!(
        used_idx(&mock),
        0,
        "nothing used while the frame cannot be placed"
    );
    mock.add_desc_chains(&[desc(0x20_0000, 1000, WRITE, 0)], 2)
        .unwrap();
    assert!(net.process_queue(RX, &mut queue, &mem).unwrap());
    assert_eq!(
        used_idx(&mock),
        3,
        "two buffers carry the frame, the bad one comes back"
    );
    let lens: Vec<u32> = (0..3).map(|n| used_len(&mock, n)).collect();
    assert_eq!(lens.iter().filter(|l| **l == 0).count(), 1);
    assert_eq!(lens.iter().sum::<u32>() as usize, HEADER_LEN + 1500);
    assert_eq!(queue.next_avail(), 3);
}

#[test]
fn a_hostile_avail_index_does_not_hang_the_receive_path() {
    let mem = memory();
    let (mut net, network, _link) = nic(VIRTIO_NET_F_MRG_RXBUF);
    let mock = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let mut queue: Queue = mock.create_queue().unwrap();
    mock.avail().idx().store(1000);
    network.send(frame(100, 1));
    // Found by the net_queues fuzz target: this looped forever.
    let _ = net.process_queue(RX, &mut queue, &mem);
    assert_eq!(used_idx(&mock), 0);
}
