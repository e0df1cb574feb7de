//! PCI: the root complex on bus 0, reached through the legacy configuration ports
//! (0xCF8/0xCFC) and ECAM (advertised by the MCFG table), and the configuration space of each
//! function.

pub mod config;

use std::sync::{Arc, Mutex};

pub use config::{Bar, PciConfiguration, PciId};

use crate::bus::{lock, BusDevice};

/// A PCI function as the root complex sees it: its configuration space.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    fn read_config(&self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config_mut().write_reg(reg, offset, data);
    }
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Moves what a BAR decodes (its bus range, and whatever else the platform attached to its
/// addresses) when the guest places the BAR elsewhere.
pub trait BarRelocation: Send + Sync {
    /// Slot `slot`'s BAR `bar.index`, mapped at `bar.addr`, moves to `to`.
    fn relocate(&self, slot: u8, bar: &Bar, to: u64) -> Result<(), String>;
}

/// The command register's memory-space enable bit.
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_REG: usize = 1;
const BAR_REGS: std::ops::RangeInclusive<usize> = 4..=9;

/// A plugged function and where its BARs are mapped now.
struct Slot {
    device: SharedPciDevice,
    mapped: Mutex<Vec<Bar>>,
}

/// The host bridge at 00:00.0.
struct HostBridge(PciConfiguration);

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.0
    }
}

const SLOTS: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("all {SLOTS} PCI slots on bus 0 are in use")]
pub struct NoFreeSlot;

/// Bus 0: up to 32 single-function devices, the host bridge in slot 0.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    relocation: Option<Arc<dyn BarRelocation>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        PciRoot::new()
    }
}

impl PciRoot {
    pub fn new() -> PciRoot {
        let bridge = HostBridge(PciConfiguration::new(PciId {
            vendor: 0x8086,
            device: 0x0d57,
            class: 0x06, // bridge
            subclass: 0x00,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        }));
        let mut slots: Vec<Option<Slot>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(bridge)),
            mapped: Mutex::new(Vec::new()),
        });
        PciRoot {
            slots,
            relocation: None,
        }
    }

    /// Who moves a BAR's mapping when the guest re-programs it; without one, BARs stay where
    /// they were plugged.
    pub fn set_relocation(&mut self, relocation: Arc<dyn BarRelocation>) {
        self.relocation = Some(relocation);
    }

    /// Plugs `device` into the first free slot and returns the slot number.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, NoFreeSlot> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(NoFreeSlot)?;
        let mapped = Mutex::new(lock(&device).config().bars());
        self.slots[slot] = Some(Slot { device, mapped });
        Ok(slot as u8)
    }

    fn function(&self, bus: u8, slot: u8, function: u8) -> Option<&Slot> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// After a write to the command register or a BAR: a BAR that decodes memory somewhere
    /// other than where it is mapped moves there. Nothing moves while memory decoding is off
    /// (Linux turns it off while it sizes or rewrites 64-bit BARs) or for the all-ones sizing
    /// write.
    fn follow_bars(&self, slot: u8, reg: usize, data: &[u8]) {
        let (Some(relocation), Some(target)) = (&self.relocation, self.function(0, slot, 0)) else {
            return;
        };
        if !(reg == COMMAND_REG || BAR_REGS.contains(&reg)) {
            return;
        }
        if BAR_REGS.contains(&reg) && data.iter().all(|&b| b == 0xff) {
            return;
        }
        let (command, bars) = {
            let device = lock(&target.device);
            (
                device.config().read_reg(COMMAND_REG),
                device.config().bars(),
            )
        };
        if command & COMMAND_MEMORY == 0 {
            return;
        }
        let mut mapped = lock(&target.mapped);
        for (now, old) in bars.iter().zip(mapped.iter_mut()) {
            if now.addr == old.addr {
                continue;
            }
            match relocation.relocate(slot, old, now.addr) {
                Ok(()) => old.addr = now.addr,
                Err(e) => log::warn!(
                    "PCI 00:{slot:02x}.0 BAR {}: cannot move it to {:#x}: {e}",
                    old.index,
                    now.addr
                ),
            }
        }
    }

    /// Reads `data.len()` bytes at byte `offset` of register `reg`; absent functions read as
    /// all ones, as on real hardware.
    fn read(&self, bdf: (u8, u8, u8), reg: usize, offset: usize, data: &mut [u8]) {
        let value = match self.function(bdf.0, bdf.1, bdf.2) {
            Some(slot) => lock(&slot.device).read_config(reg),
            None => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&self, bdf: (u8, u8, u8), reg: usize, offset: usize, data: &[u8]) {
        if offset + data.len() > 4 {
            return;
        }
        if let Some(slot) = self.function(bdf.0, bdf.1, bdf.2) {
            lock(&slot.device).write_config(reg, offset, data);
            self.follow_bars(bdf.1, reg, data);
        }
    }
}

/// The legacy configuration mechanism #1: an address register at 0xCF8 and a data window at
/// 0xCFC..0xCFF (this device spans both, 8 ports).
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

impl PciConfigIo {
    pub const LEN: u64 = 8;

    pub fn new(root: Arc<PciRoot>) -> PciConfigIo {
        PciConfigIo { root, address: 0 }
    }

    fn target(&self) -> Option<((u8, u8, u8), usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some(((bus, slot, function), reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
            _ => match self.target() {
                Some((bdf, reg)) => self.root.read(bdf, reg, offset as usize - 4, data),
                None => data.fill(0xff),
            },
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.address = u32::from_le_bytes(bytes);
            }
            (4..=7, _) => {
                if let Some((bdf, reg)) = self.target() {
                    self.root.write(bdf, reg, offset as usize - 4, data);
                }
            }
            _ => {}
        }
    }
}

/// PCI Express enhanced configuration access (ECAM): 4 KiB of configuration space per
/// function, memory mapped.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> PciEcam {
        PciEcam { root }
    }

    fn decode(offset: u64) -> ((u8, u8, u8), usize, usize) {
        let bus = (offset >> 20) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        ((bus, slot, function), reg, (offset & 3) as usize)
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bdf, reg, byte) = Self::decode(offset);
        self.root.read(bdf, reg, byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bdf, reg, byte) = Self::decode(offset);
        self.root.write(bdf, reg, byte, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Plain(PciConfiguration);
    impl PciDevice for Plain {
        fn config(&self) -> &PciConfiguration {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.0
        }
    }

    fn root_with_device() -> Arc<PciRoot> {
        Arc::new(plugged(PciRoot::new()))
    }

    fn plugged(mut root: PciRoot) -> PciRoot {
        let mut config = PciConfiguration::new(PciId {
            vendor: 0x1af4,
            device: 0x1044,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar64(0, 0xc000_0000, 0x4000).unwrap();
        assert_eq!(root.add(Arc::new(Mutex::new(Plain(config)))), Ok(1));
        root
    }

    fn cf8(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | (slot << 11) | (reg << 2)).to_le_bytes());
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn legacy_ports_enumerate_bus_0() {
        let mut io = PciConfigIo::new(root_with_device());
        assert_eq!(cf8(&mut io, 0, 0), 0x0d57_8086, "host bridge");
        assert_eq!(cf8(&mut io, 1, 0), 0x1044_1af4, "device in slot 1");
        assert_eq!(cf8(&mut io, 2, 0), u32::MAX, "empty slot");
        // Sub-register reads: the device ID alone.
        io.write(0, &(0x8000_0000u32 | (1 << 11)).to_le_bytes());
        let mut word = [0u8; 2];
        io.read(6, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x1044);
        // Disabled address: nothing answers.
        io.write(0, &(1u32 << 11).to_le_bytes());
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn ecam_reaches_the_same_space_and_sizes_bars() {
        let root = root_with_device();
        let mut ecam = PciEcam::new(root.clone());
        let slot1 = 1u64 << 15;
        let mut data = [0u8; 4];
        ecam.read(slot1, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1044_1af4);
        ecam.write(slot1 + 0x10, &[0xff; 4]);
        ecam.read(slot1 + 0x10, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_c004);
        // Another bus or function is absent.
        ecam.read(1 << 20, &mut data);
        assert_eq!(data, [0xff; 4]);
        ecam.read(slot1 | (1 << 12), &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[derive(Default)]
    struct Moves(Mutex<Vec<(u8, u64, u64)>>);

    impl BarRelocation for Moves {
        fn relocate(&self, slot: u8, bar: &Bar, to: u64) -> Result<(), String> {
            self.0.lock().unwrap().push((slot, bar.addr, to));
            Ok(())
        }
    }

    #[test]
    fn a_reprogrammed_bar_moves_once_memory_decoding_is_on() {
        let moves = Arc::new(Moves::default());
        let mut root = plugged(PciRoot::new());
        root.set_relocation(moves.clone());
        let mut ecam = PciEcam::new(Arc::new(root));
        let slot1 = 1u64 << 15;
        let write = |ecam: &mut PciEcam, reg: u64, value: u32| {
            ecam.write(slot1 + reg, &value.to_le_bytes());
        };
        // As Linux rewrites a 64-bit BAR: decoding off, sizing, new address, decoding on.
        write(&mut ecam, 0x04, 0);
        write(&mut ecam, 0x10, 0xffff_ffff);
        write(&mut ecam, 0x10, 0xd000_0000);
        write(&mut ecam, 0x14, 0x1);
        assert!(
            moves.0.lock().unwrap().is_empty(),
            "moved while decoding was off"
        );
        write(&mut ecam, 0x04, 0x6);
        assert_eq!(*moves.0.lock().unwrap(), [(1, 0xc000_0000, 0x1_d000_0000)]);
        // While decoding is on: the sizing write moves nothing, a new address does.
        write(&mut ecam, 0x10, 0xffff_ffff);
        write(&mut ecam, 0x14, 0xffff_ffff);
        assert_eq!(moves.0.lock().unwrap().len(), 1, "sizing moved the BAR");
        write(&mut ecam, 0x14, 0);
        write(&mut ecam, 0x10, 0xc000_0000);
        assert_eq!(
            moves.0.lock().unwrap().last().map(|m| m.2),
            Some(0xc000_0000),
            "back where it started"
        );
    }
}
