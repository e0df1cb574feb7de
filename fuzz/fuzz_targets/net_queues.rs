//! Any descriptor tables on a virtio-net NIC's transmit and receive queues, with frames waiting
//! to be received: the NIC answers without panicking, sends only well-sized frames to the
//! network and writes only inside guest memory.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::net::{channel, Link, Net, MAX_FRAME, MIN_FRAME, RX, TX, VIRTIO_NET_F_MRG_RXBUF};
use virtio::{Memory, QueueDevice};
use nixvmm_fuzz::{descriptors, MEMORY};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    let (tx_table, rest) = rest.split_at(rest.len().min(128));
    let (rx_table, contents) = rest.split_at(rest.len().min(128));
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
    let _ = mem.write_slice(contents, GuestAddress(0x8_0000));
    let (nic_end, network) = channel::pair().expect("channel");
    let link = Link::new().expect("link");
    let mut net = Net::new([0x52, 0x54, 0, 0x12, 0x34, 0x56], Box::new(nic_end), link.clone());
    net.set_acked_features(if control & 1 != 0 { VIRTIO_NET_F_MRG_RXBUF } else { 0 });
    link.set(control & 2 == 0);
    for n in 0..(control >> 4) {
        network.send(vec![n; 14 + usize::from(n) * 200]);
    }
    let tx = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let rx = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
    for (mock, table, index) in [(&tx, tx_table, TX), (&rx, rx_table, RX)] {
        let descriptors = descriptors(table);
        if descriptors.is_empty() || mock.add_desc_chains(&descriptors, 0).is_err() {
            continue;
        }
        let Ok(mut queue) = mock.create_queue::<Queue>() else { continue };
        let _ = net.process_queue(index, &mut queue, &mem);
    }
    while let Some(frame) = network.recv() {
        assert!((MIN_FRAME..=MAX_FRAME).contains(&frame.len()), "sent a {}-byte frame", frame.len());
    }
});
