//! Any descriptor tables on every queue of a virtio-console (two ports, multiport) and of
//! nixvmm's virtio-vsock (with its Unix-socket muxer): hostile control messages, port
//! numbers, packet headers and lengths. The devices answer without panicking and write only
//! inside guest memory.

#![no_main]

use std::os::fd::{AsRawFd, RawFd};

use libfuzzer_sys::fuzz_target;
use virtio::console::{Console, PortBackend, PortConfig, VIRTIO_CONSOLE_F_MULTIPORT};
use virtio::vsock::{muxer::Muxer, Vsock};
use virtio::{Memory, QueueDevice};
use nixvmm_fuzz::{descriptors, MEMORY};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const GUEST_CID: u64 = 3;

/// A host side that takes everything and always has a few bytes to send.
struct Host(EventFd);

impl PortBackend for Host {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    fn set_interest(&mut self, _input: bool, _output: bool) {}
    fn poll(&mut self) {}
    fn connected(&self) -> bool {
        true
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(3);
        buf[..n].fill(b'x');
        Ok(n)
    }
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
}

fn port(console: bool) -> Option<PortConfig> {
    Some(PortConfig {
        console,
        name: (!console).then(|| "org.test.0".to_string()),
        backend: Box::new(Host(EventFd::new(0).expect("eventfd"))),
    })
}

/// Puts each table on the next queue of `device` (a queue index from the table's first byte)
/// and processes it.
fn drive(device: &mut dyn QueueDevice, mem: &Memory, tables: &[u8]) {
    let queues = device.queue_max_sizes().len();
    for (n, table) in tables.chunks(129).enumerate() {
        let Some((&which, table)) = table.split_first() else { continue };
        let index = usize::from(which) % queues;
        let mock = MockSplitQueue::create(mem, GuestAddress(0x4000 * n as u64 % 0x4_0000), 16);
        let descriptors = descriptors(table);
        if descriptors.is_empty() || mock.add_desc_chains(&descriptors, 0).is_err() {
            continue;
        }
        let Ok(mut queue) = mock.create_queue::<Queue>() else { continue };
        let _ = device.process_queue(index, &mut queue, mem);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    // Up to six queue tables first, then what guest memory holds at 0x80000.
    let (tables, contents) = rest.split_at(rest.len().min(129 * 6));
    let mem = Memory::from_ranges(&[(GuestAddress(0), MEMORY)]).expect("memory");
    let _ = mem.write_slice(contents, GuestAddress(0x8_0000));
    if control & 1 == 0 {
        let mut console = Console::new(vec![port(true), port(false)]).expect("console");
        console.set_acked_features(VIRTIO_CONSOLE_F_MULTIPORT);
        drive(&mut console, &mem, tables);
    } else {
        let dir = tempfile::tempdir().expect("a folder");
        let muxer = Muxer::new(GUEST_CID, &dir.path().join("vsock")).expect("muxer");
        let mut vsock = Vsock::new(GUEST_CID, muxer);
        drive(&mut vsock, &mem, tables);
    }
});
