//! Any sequence of guest accesses to a virtio-pci function — configuration space and BAR 0 —
//! with virtio-rng behind it: no panic, whatever the order (enable queues at wild addresses,
//! notify before DRIVER_OK, program MSI-X entries out of range…); the device's worker serves
//! the kicks as it does in the VMM.

#![no_main]

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::pci::PciDevice;
use libfuzzer_sys::fuzz_target;
use virtio::interrupt::{MsiMessage, MsiVectors};
use virtio::pci::{VirtioPciDevice, BAR_SIZE};
use virtio::rng::Rng;
use virtio::worker::Hosted;
use virtio::Memory;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

/// Vectors whose interrupts nobody receives.
struct Ignore(Vec<EventFd>);

impl MsiVectors for Ignore {
    fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.0.get(usize::from(vector))
    }
    fn route(&self, _: u16, _: Option<MsiMessage>) {}
}

fuzz_target!(|data: &[u8]| {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    let vectors = (0..VirtioPciDevice::vector_count(1))
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let rng = Box::new(Hosted::new("fuzz-rng", Box::new(Rng::new())).expect("a worker thread"));
    let mut dev = VirtioPciDevice::new(rng, 0xc000_0000, mem, Arc::new(Ignore(vectors)))
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
    }
});
