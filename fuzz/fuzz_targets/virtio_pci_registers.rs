//! Any sequence of guest accesses to a virtio-pci function — configuration space and BAR 0 —
//! with virtio-rng behind it: no panic, whatever the order (enable queues at wild addresses,
//! notify before DRIVER_OK, program MSI-X entries out of range…).

#![no_main]

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::pci::PciDevice;
use libfuzzer_sys::fuzz_target;
use virtio::pci::{MsiMessage, MsiSink, VirtioPciDevice, BAR_SIZE};
use virtio::rng::Rng;
use virtio::Memory;
use vm_memory::GuestAddress;

struct Ignore;

impl MsiSink for Ignore {
    fn send(&self, _: MsiMessage) {}
}

fuzz_target!(|data: &[u8]| {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    let mut dev = VirtioPciDevice::new(Box::new(Rng::new()), 0xc000_0000, mem, Arc::new(Ignore))
        .expect("device");
    // Each access: kind, size, offset (2 bytes), value (4 bytes).
    for op in data.chunks_exact(8) {
        let size = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[4..8]);
        match op[0] % 4 {
            0 => dev.write(offset % BAR_SIZE, &value[..size]),
            1 => dev.read(offset % BAR_SIZE, &mut value[..size]),
            2 => dev.write_config(
                usize::from(op[2]) % 64,
                usize::from(op[3] % 4),
                &value[..size.min(4 - usize::from(op[3] % 4))],
            ),
            _ => {
                let _ = dev.read_config(usize::from(op[2]));
            }
        }
        dev.process_queue(usize::from(op[1] >> 2));
    }
});
