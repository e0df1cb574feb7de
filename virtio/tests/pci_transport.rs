//! Tier 1: the virtio-pci transport driven as Linux's virtio_pci driver drives it, against
//! mock guest memory and a recording interrupt sink.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::{Arc, Mutex};

use devices::bus::BusDevice;
use devices::pci::PciDevice;
use virtio::pci::{MsiMessage, MsiSink, VirtioPciDevice};
use virtio::rng::Rng;
use virtio::Memory;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

#[derive(Default)]
struct Recorder(Mutex<Vec<MsiMessage>>);

impl MsiSink for Recorder {
    fn send(&self, message: MsiMessage) {
        self.0.lock().unwrap().push(message);
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
    sink: Arc<Recorder>,
    mem: Memory,
}

fn rng_device() -> Driver {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let sink = Arc::new(Recorder::default());
    let dev = VirtioPciDevice::new(Box::new(Rng::new()), BAR, mem.clone(), sink.clone()).unwrap();
    Driver { dev, sink, mem }
}

/// The virtio_pci_modern probe sequence up to DRIVER_OK with queue 0 at the mock's rings and
/// MSI-X vector 0 programmed and unmasked.
fn activate(d: &mut Driver, mock: &MockSplitQueue<Memory>) {
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
    // MSI-X: enable in the capability, program vector 0.
    let msix_cap = {
        let byte = |off: usize| (dev.read_config(off / 4) >> ((off % 4) * 8)) as u8;
        let mut next = byte(0x34) as usize;
        while byte(next) != 0x11 {
            next = byte(next + 1) as usize;
        }
        next
    };
    dev.write_config(msix_cap / 4, 2, &0x8000u16.to_le_bytes());
    w32(dev, 0x4000, 0xfee0_0000);
    w32(dev, 0x4004, 0);
    w32(dev, 0x4008, 0x31);
    w32(dev, 0x400c, 0); // unmask
    assert_eq!(r16(dev, 0x12), 1, "rng has one queue");
    w16(dev, 0x16, 0);
    assert_eq!(r16(dev, 0x18), 256);
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
    w8(dev, 0x14, 1 | 2 | 8 | 4);
}

fn offer_buffer(d: &Driver, mock: &MockSplitQueue<Memory>, addr: u64, len: u32) {
    let desc = RawDescriptor::from(Descriptor::new(addr, len, 2, 0)); // WRITE
    let index = mock.avail().idx().load();
    mock.add_desc_chains(&[desc], index).unwrap();
    let _ = &d.mem;
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
}

#[test]
fn notify_processes_the_queue_and_sends_the_msix_message() {
    let mut d = rng_device();
    let mem = d.mem.clone();
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
    activate(&mut d, &mock);
    offer_buffer(&d, &mock, 0x20_0000, 32);
    w16(&mut d.dev, 0x3000, 0); // notify queue 0
    let used = mock.used().ring().ref_at(0).unwrap().load();
    assert_eq!(used.len(), 32);
    let expected = MsiMessage {
        addr: 0xfee0_0000,
        data: 0x31,
    };
    assert_eq!(*d.sink.0.lock().unwrap(), [expected]);
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
    // A driver reload uses fresh rings.
    let mock = MockSplitQueue::create(&mem, GuestAddress(0x30_0000), 16);
    activate(&mut d, &mock);
    offer_buffer(&d, &mock, 0x20_0000, 8);
    w16(&mut d.dev, 0x3000, 0);
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 8);
    assert_eq!(d.sink.0.lock().unwrap().len(), 1);
}

#[test]
fn unoffered_features_are_refused_and_nothing_runs_before_driver_ok() {
    let mut d = rng_device();
    w8(&mut d.dev, 0x14, 1 | 2);
    w32(&mut d.dev, 0x08, 0);
    w32(&mut d.dev, 0x0c, 1 << 5); // a feature rng never offered
    w8(&mut d.dev, 0x14, 1 | 2 | 8);
    assert_eq!(r8(&mut d.dev, 0x14) & 8, 0, "FEATURES_OK refused");
    w16(&mut d.dev, 0x3000, 0); // notify before DRIVER_OK: ignored
    assert!(d.sink.0.lock().unwrap().is_empty());
}
