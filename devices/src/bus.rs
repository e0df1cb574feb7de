//! An address space (port I/O or MMIO) mapped to devices. Ranges can move while the VM runs
//! (a guest re-programming a PCI BAR): the map is behind a read-write lock that an access
//! holds only to find its device, not while the device handles it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a [`Bus`]; `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error)]
#[error("device range {base:#x}+{len:#x} overlaps another device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

type Ranges = BTreeMap<u64, (u64, SharedDevice)>;

/// Non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<Ranges>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    fn ranges(&self) -> std::sync::RwLockReadGuard<'_, Ranges> {
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ranges_mut(&self) -> std::sync::RwLockWriteGuard<'_, Ranges> {
        self.ranges.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps `device` at `base..base + len`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        let mut ranges = self.ranges_mut();
        let before = ranges.range(..end).next_back();
        if len == 0 || before.is_some_and(|(start, (l, _))| start + l > base) {
            return Err(Overlap { base, len });
        }
        ranges.insert(base, (len, device));
        Ok(())
    }

    /// Moves the range at `from` to `to`, unless it would overlap another range.
    pub fn relocate(&self, from: u64, to: u64) -> Result<(), Overlap> {
        let mut ranges = self.ranges_mut();
        let Some((len, device)) = ranges.remove(&from) else {
            return Err(Overlap { base: from, len: 0 });
        };
        let end = to.checked_add(len);
        let before = end.and_then(|end| ranges.range(..end).next_back());
        if end.is_none() || before.is_some_and(|(start, (l, _))| start + l > to) {
            ranges.insert(from, (len, device));
            return Err(Overlap { base: to, len });
        }
        ranges.insert(to, (len, device));
        Ok(())
    }

    /// The device at `addr` and the offset into its range.
    fn find(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges();
        let (start, (len, device)) = ranges.range(..=addr).next_back()?;
        (addr - start < *len).then(|| (addr - start, device.clone()))
    }

    /// Reads from the device at `addr`; an unmapped address reads as all ones, like an
    /// unclaimed bus. Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(&device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; writes to unmapped addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another thread panicked while holding it: device state stays usable
/// (each access is self-contained), and a panic is reported by that thread itself.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [2]);
        assert!(bus.write(0x3ff, &[7]));
        assert!(!bus.write(0x400, &[7]));
        assert!(!bus.read(0x3f7, &mut buf));
        assert_eq!(buf, [0xff]);
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![7])]);
    }

    #[test]
    fn rejects_overlaps() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x10f, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x9, dev.clone()).is_err());
        assert!(bus.insert(0x0, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        bus.insert(0x110, 1, dev.clone()).unwrap();
        bus.insert(0xf0, 0x10, dev).unwrap();
    }

    #[test]
    fn a_range_moves_unless_it_would_overlap() {
        let (a, b) = (
            Arc::new(Mutex::new(Recorder::default())),
            Arc::new(Mutex::new(Recorder::default())),
        );
        let bus = Bus::new();
        bus.insert(0x1000, 0x100, a.clone()).unwrap();
        bus.insert(0x2000, 0x100, b).unwrap();
        assert!(bus.relocate(0x1000, 0x1f80).is_err(), "would overlap b");
        assert!(bus.write(0x1000, &[1]), "still at the old place");
        bus.relocate(0x1000, 0x3000).unwrap();
        assert!(!bus.write(0x1000, &[2]), "gone from the old place");
        assert!(bus.write(0x3004, &[3]));
        assert_eq!(a.lock().unwrap().writes, vec![(0, vec![1]), (4, vec![3])]);
        assert!(bus.relocate(0x5000, 0x6000).is_err(), "nothing at 0x5000");
    }
}
