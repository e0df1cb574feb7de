//! Tier 1: the virtio-pci transport driven as Linux's virtio_pci driver drives it, against
//! mock guest memory and mock MSI-X delivery that behaves as KVM's irqfds do.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::pci::PciDevice;
use virtio::interrupt::{is_signalled, MsiMessage, MsiVectors};
use virtio::pci::VirtioPciDevice;
use virtio::rng::Rng;
use virtio::worker::Hosted;
use virtio::{ActiveQueue, Interrupt, Memory, QueueDevice, VirtioDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// MSI-X delivery as KVM does it with irqfds: a vector's eventfd is consumed, and its message
/// recorded, only while the vector is routed; writes to a masked vector stay pending.
struct MockVectors {
    irqfds: Vec<EventFd>,
    routes: Mutex<Vec<Option<MsiMessage>>>,
    delivered: Mutex<Vec<MsiMessage>>,
}

impl MockVectors {
    fn new(count: usize) -> Arc<MockVectors> {
        Arc::new(MockVectors {
            irqfds: (0..count)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                .collect(),
            routes: Mutex::new(vec![None; count]),
            delivered: Mutex::new(Vec::new()),
        })
    }

    /// Delivers what routed vectors were raised with; returns every message delivered so far.
    fn delivered(&self) -> Vec<MsiMessage> {
        let routes = self.routes.lock().unwrap();
        let mut delivered = self.delivered.lock().unwrap();
        for (irqfd, route) in self.irqfds.iter().zip(routes.iter()) {
            if let Some(message) = route {
                if irqfd.read().is_ok() {
                    delivered.push(*message);
                }
            }
        }
        delivered.clone()
    }
}

impl MsiVectors for MockVectors {
    fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.irqfds.get(usize::from(vector))
    }

    fn route(&self, vector: u16, message: Option<MsiMessage>) {
        if let Some(route) = self.routes.lock().unwrap().get_mut(usize::from(vector)) {
            *route = message;
        }
    }

    fn pending(&self, vector: u16) -> bool {
        let routed = self.routes.lock().unwrap()[usize::from(vector)].is_some();
        !routed && is_signalled(&self.irqfds[usize::from(vector)])
    }
}

/// Waits up to 5 s for `done` (device workers run on their own threads).
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const BAR: u64 = 0xc000_0000;

fn w32(dev: &mut VirtioPciDevice, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}
fn w16(dev: &mut VirtioPciDevice, offset: u64, value: u16) {
    dev.write(offset, &value.to_le_bytes());
}
fn w8(dev: &mut VirtioPciDevice, offset: u64, value: u8) {
    dev.write(offset, &[value]);
}
fn r32(dev: &mut VirtioPciDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}
fn r16(dev: &mut VirtioPciDevice, offset: u64) -> u16 {
    let mut b = [0u8; 2];
    dev.read(offset, &mut b);
    u16::from_le_bytes(b)
}
fn r8(dev: &mut VirtioPciDevice, offset: u64) -> u8 {
    let mut b = [0u8; 1];
    dev.read(offset, &mut b);
    b[0]
}

/// Walks the capability list and returns (cfg_type, offset in BAR) of each virtio capability.
fn virtio_caps(dev: &VirtioPciDevice) -> Vec<(u8, u32)> {
    let byte = |off: usize| (dev.read_config(off / 4) >> ((off % 4) * 8)) as u8;
    let mut caps = Vec::new();
    let mut next = byte(0x34) as usize;
    while next != 0 {
        if byte(next) == 0x09 {
            caps.push((byte(next + 3), dev.read_config((next + 8) / 4)));
        }
        next = byte(next + 1) as usize;
    }
    caps
}

struct Driver {
    dev: VirtioPciDevice,
    vectors: Arc<MockVectors>,
    mem: Memory,
}

fn driver(device: Box<dyn VirtioDevice>) -> Driver {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let count = VirtioPciDevice::vector_count(device.queue_max_sizes().len());
    let vectors = MockVectors::new(usize::from(count));
    let dev = VirtioPciDevice::new(device, BAR, mem.clone(), vectors.clone()).unwrap();
    Driver { dev, vectors, mem }
}

fn rng_device() -> Driver {
    driver(Box::new(
        Hosted::new("test-rng", Box::new(Rng::new())).expect("a worker thread"),
    ))
}

const MESSAGE: MsiMessage = MsiMessage {
    addr: 0xfee0_0000,
    data: 0x31,
};

fn used_idx(mock: &MockSplitQueue<Memory>) -> u16 {
    mock.used().idx().load()
}

/// The virtio_pci_modern probe sequence up to DRIVER_OK with queue 0 at the mock's rings and
/// MSI-X vector 0 programmed and unmasked.
fn activate(d: &mut Driver, mock: &MockSplitQueue<Memory>) {
    configure(d, mock);
    w8(&mut d.dev, 0x14, 1 | 2 | 8 | 4);
}

fn msix_cap(dev: &VirtioPciDevice) -> usize {
    let byte = |off: usize| (dev.read_config(off / 4) >> ((off % 4) * 8)) as u8;
    let mut next = byte(0x34) as usize;
    while byte(next) != 0x11 {
        next = byte(next + 1) as usize;
    }
    next
}

/// Everything up to DRIVER_OK: features, MSI-X vector 0 and the config vector (1) programmed
/// and unmasked, queue 0 at the mock's rings with vector 0.
fn configure(d: &mut Driver, mock: &MockSplitQueue<Memory>) {
    let dev = &mut d.dev;
    w8(dev, 0x14, 0); // reset
    w8(dev, 0x14, 1 | 2); // ACKNOWLEDGE | DRIVER
    w32(dev, 0x00, 1);
    let high = r32(dev, 0x04);
    assert_ne!(high & 1, 0, "VIRTIO_F_VERSION_1 offered");
    w32(dev, 0x08, 1);
    w32(dev, 0x0c, 1); // accept VERSION_1 only
    w8(dev, 0x14, 1 | 2 | 8);
    assert_ne!(r8(dev, 0x14) & 8, 0, "FEATURES_OK accepted");
    // MSI-X: enable in the capability, program vectors 0 (queue) and 1 (config).
    let cap = msix_cap(dev);
    dev.write_config(cap / 4, 2, &0x8000u16.to_le_bytes());
    for (entry, data) in [(0x4000, MESSAGE.data), (0x4010, 0x32)] {
        w32(dev, entry, 0xfee0_0000);
        w32(dev, entry + 4, 0);
        w32(dev, entry + 8, data);
        w32(dev, entry + 12, 0); // unmask
    }
    w16(dev, 0x10, 1);
    assert_eq!(r16(dev, 0x10), 1, "config vector accepted");
    assert_eq!(r16(dev, 0x12), 1, "one queue");
    w16(dev, 0x16, 0);
    assert!(r16(dev, 0x18) >= 16, "the device's maximum queue size");
    w16(dev, 0x18, 16);
    w16(dev, 0x1a, 0);
    assert_eq!(r16(dev, 0x1a), 0, "vector accepted");
    let split = |addr: GuestAddress| (addr.0 as u32, (addr.0 >> 32) as u32);
    for (offset, addr) in [
        (0x20, mock.desc_table_addr()),
        (0x28, mock.avail_addr()),
        (0x30, mock.used_addr()),
    ] {
        let (lo, hi) = split(addr);
        w32(dev, offset, lo);
        w32(dev, offset + 4, hi);
    }
    w16(dev, 0x1c, 1);
    assert_eq!(r16(dev, 0x1c), 1, "queue enabled");
}

fn offer_buffer(mock: &MockSplitQueue<Memory>, addr: u64, len: u32) {
    let desc = RawDescriptor::from(Descriptor::new(addr, len, 2, 0)); // WRITE
    let index = mock.avail().idx().load();
    mock.add_desc_chains(&[desc], index).unwrap();
}

#[test]
fn capabilities_describe_the_bar_layout() {
    let d = rng_device();
    let caps = virtio_caps(&d.dev);
    let types: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(types, [1, 3, 4, 2], "common, ISR, device, notify");
    assert_eq!(d.dev.read_config(0), 0x1044_1af4, "modern virtio-rng");
    assert_eq!(d.dev.bar_addr(), BAR);
    assert_eq!(d.dev.queue_events().len(), 1);
    let mut dev = d.dev;
    w16(&mut dev, 0x16, 0);
    assert_eq!(r16(&mut dev, 0x18), 256, "rng's queue size");
}

#[test]
fn notify_processes_the_queue_and_sends_the_msix_message() {
    let mut d = rng_device();
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    activate(&mut d, &mock);
    offer_buffer(&mock, 0x20_0000, 32);
    w16(&mut d.dev, 0x3000, 0); // notify queue 0
    eventually("the buffer is used", || used_idx(&mock) == 1);
    let used = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(used.len(), 32);
    eventually("the queue's vector is raised", || {
        d.vectors.delivered() == [MESSAGE]
    });
    assert_eq!(r8(&mut d.dev, 0x1000) & 1, 1, "ISR: queue interrupt");
    assert_eq!(r8(&mut d.dev, 0x1000), 0, "ISR clears on read");
    let mut bytes = [0u8; 32];
    mem.read_slice(&mut bytes, GuestAddress(0x20_0000)).unwrap();
    assert!(bytes.iter().any(|b| *b != 0));
}

#[test]
fn reset_and_reactivation_keep_working() {
    let mut d = rng_device();
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    activate(&mut d, &mock);
    w8(&mut d.dev, 0x14, 0);
    assert_eq!(r8(&mut d.dev, 0x14), 0, "reset clears status");
    assert_eq!(r16(&mut d.dev, 0x1c), 0, "reset disables queues");
    // Buffers offered on the old rings after the reset are not served.
    offer_buffer(&mock, 0x20_0000, 8);
    w16(&mut d.dev, 0x3000, 0);
    // A driver reload uses fresh rings.
    let fresh = MockSplitQueue::create(&mem, GuestAddress(0x30_0000), 16);
    activate(&mut d, &fresh);
    offer_buffer(&fresh, 0x20_0000, 8);
    w16(&mut d.dev, 0x3000, 0);
    eventually("the new ring is served", || used_idx(&fresh) == 1);
    assert_eq!(fresh.used().ring().ref_at(0).unwrap().load().len(), 8);
    assert_eq!(used_idx(&mock), 0, "the old ring stays untouched");
    eventually("one interrupt", || d.vectors.delivered().len() == 1);
}

#[test]
fn unoffered_features_are_refused() {
    let mut d = rng_device();
    w8(&mut d.dev, 0x14, 1 | 2);
    w32(&mut d.dev, 0x08, 0);
    w32(&mut d.dev, 0x0c, 1 << 5); // a feature rng never offered
    w8(&mut d.dev, 0x14, 1 | 2 | 8);
    assert_eq!(r8(&mut d.dev, 0x14) & 8, 0, "FEATURES_OK refused");
}

#[test]
fn nothing_runs_before_driver_ok_and_an_early_kick_is_served_after() {
    let mut d = rng_device();
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    configure(&mut d, &mock);
    offer_buffer(&mock, 0x20_0000, 16);
    w16(&mut d.dev, 0x3000, 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(used_idx(&mock), 0, "served before DRIVER_OK");
    assert!(d.vectors.delivered().is_empty());
    w8(&mut d.dev, 0x14, 1 | 2 | 8 | 4);
    eventually("the early kick is served", || used_idx(&mock) == 1);
}

/// Linux moving an IRQ's affinity: mask the entry, write a new message, unmask.
fn rewrite_vector(d: &mut Driver, entry: u64, data: u32) {
    w32(&mut d.dev, entry + 12, 1);
    w32(&mut d.dev, entry + 8, data);
    w32(&mut d.dev, entry + 12, 0);
}

#[test]
fn a_rewritten_vector_delivers_its_new_message() {
    let mut d = rng_device();
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    activate(&mut d, &mock);
    rewrite_vector(&mut d, 0x4000, 0x45);
    offer_buffer(&mock, 0x20_0000, 16);
    w16(&mut d.dev, 0x3000, 0);
    let moved = MsiMessage {
        data: 0x45,
        ..MESSAGE
    };
    eventually("the new message", || d.vectors.delivered() == [moved]);
    // A 64-bit write of the address (as some drivers do) is followed too.
    w32(&mut d.dev, 0x400c, 1);
    d.dev.write(0x4000, &0xfee0_2000u64.to_le_bytes());
    w32(&mut d.dev, 0x400c, 0);
    offer_buffer(&mock, 0x20_0100, 16);
    w16(&mut d.dev, 0x3000, 0);
    let elsewhere = MsiMessage {
        addr: 0xfee0_2000,
        data: 0x45,
    };
    eventually("the new address", || {
        d.vectors.delivered() == [moved, elsewhere]
    });
}

#[test]
fn a_masked_vector_holds_its_interrupt_as_pending_until_unmasked() {
    let mut d = rng_device();
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    activate(&mut d, &mock);
    w32(&mut d.dev, 0x400c, 1); // mask vector 0
    offer_buffer(&mock, 0x20_0000, 16);
    w16(&mut d.dev, 0x3000, 0);
    eventually("the buffer is used", || used_idx(&mock) == 1);
    eventually("the PBA bit is set", || r8(&mut d.dev, 0x6000) == 1);
    assert!(d.vectors.delivered().is_empty(), "nothing while masked");
    w32(&mut d.dev, 0x400c, 0);
    assert_eq!(d.vectors.delivered(), [MESSAGE], "delivered on unmask");
    assert_eq!(r8(&mut d.dev, 0x6000), 0, "no longer pending");

    // The function mask holds every vector the same way.
    let cap = msix_cap(&d.dev);
    d.dev.write_config(cap / 4, 2, &0xc000u16.to_le_bytes());
    offer_buffer(&mock, 0x20_0100, 16);
    w16(&mut d.dev, 0x3000, 0);
    eventually("the second buffer is used", || used_idx(&mock) == 2);
    assert_eq!(d.vectors.delivered().len(), 1);
    d.dev.write_config(cap / 4, 2, &0x8000u16.to_le_bytes());
    assert_eq!(d.vectors.delivered().len(), 2);
}

/// A device driven by its backend: an eventfd standing in for a socket or a tap. Each event
/// changes the configuration; a second kind of event breaks the device.
struct BackendDriven {
    backend: EventFd,
}

impl QueueDevice for BackendDriven {
    fn device_type(&self) -> u32 {
        virtio::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        virtio::COMMON_FEATURES
    }
    fn process_queue(
        &mut self,
        _: usize,
        _: &mut Queue,
        _: &Memory,
    ) -> Result<bool, virtio::Error> {
        Err(virtio::Error::Backend(
            "this device fails every request".into(),
        ))
    }
    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.backend.as_raw_fd()]
    }
    fn backend_ready(
        &mut self,
        n: usize,
        _: &mut [ActiveQueue],
        _: &Memory,
        interrupt: &Interrupt,
    ) -> Result<(), virtio::Error> {
        assert_eq!(n, 0);
        self.backend.read().unwrap();
        interrupt.signal_config_change();
        Ok(())
    }
}

#[test]
fn a_backend_raises_config_changes_and_a_failing_device_asks_for_a_reset() {
    let backend = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device = BackendDriven {
        backend: backend.try_clone().unwrap(),
    };
    let mut d = driver(Box::new(
        Hosted::new("test-backend", Box::new(device)).expect("a worker thread"),
    ));
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    activate(&mut d, &mock);
    let generation = r8(&mut d.dev, 0x15);
    backend.write(1).unwrap();
    let config = MsiMessage {
        data: 0x32,
        ..MESSAGE
    };
    eventually("the config vector", || d.vectors.delivered() == [config]);
    assert_eq!(
        r8(&mut d.dev, 0x15),
        generation.wrapping_add(1),
        "new generation"
    );
    assert_eq!(r8(&mut d.dev, 0x1000), 2, "ISR: configuration change");

    offer_buffer(&mock, 0x20_0000, 16);
    w16(&mut d.dev, 0x3000, 0);
    eventually("DEVICE_NEEDS_RESET", || r8(&mut d.dev, 0x14) & 0x40 != 0);
    assert_eq!(
        d.vectors.delivered(),
        [config, config],
        "told by a config interrupt"
    );
    w8(&mut d.dev, 0x14, 0);
    assert_eq!(r8(&mut d.dev, 0x14), 0, "a reset clears it");
}
