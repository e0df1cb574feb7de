//! A PCI function's configuration space (type 0 header) with BARs and a capability list, and
//! the BAR sizing protocol the guest uses to learn each BAR's size.

/// Size of PCI Express extended configuration space, in 32-bit registers.
const REGISTERS: usize = 1024;
const BAR0_REG: usize = 4;
pub const BAR_COUNT: usize = 6;
const STATUS_CAPABILITIES: u32 = 1 << 20;
const CAPABILITIES_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// First byte after the standard header, where capabilities start.
const FIRST_CAPABILITY: usize = 0x40;
/// Legacy configuration space ends here; capabilities must fit below it.
const LEGACY_END: usize = 0x100;

/// The identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A 64-bit memory BAR (or the pair of registers it occupies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
    /// A 64-bit BAR also takes register `index + 1`.
    pub is64: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is taken or out of range")]
    BarUnavailable(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("capabilities do not fit in the legacy configuration space")]
    NoRoomForCapability,
}

pub struct PciConfiguration {
    regs: [u32; REGISTERS],
    /// Bits the guest may change, per register.
    writable: [u32; REGISTERS],
    bars: Vec<Bar>,
    /// Offset of the last capability added (its "next" byte links the following one).
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    pub fn new(id: PciId) -> PciConfiguration {
        let mut config = PciConfiguration {
            regs: [0; REGISTERS],
            writable: [0; REGISTERS],
            bars: Vec::new(),
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        config.regs[0] = u32::from(id.vendor) | (u32::from(id.device) << 16);
        config.regs[2] = u32::from(id.revision)
            | (u32::from(id.prog_if) << 8)
            | (u32::from(id.subclass) << 16)
            | (u32::from(id.class) << 24);
        config.regs[11] = u32::from(id.subsystem_vendor) | (u32::from(id.subsystem) << 16);
        // Command: I/O, memory, bus master, interrupt disable are the guest's to set.
        config.writable[1] = 0x0000_0407;
        // Interrupt line is scratch space for the guest.
        config.writable[INTERRUPT_REG] = 0xff;
        config
    }

    /// Adds a 64-bit prefetchable-off memory BAR at `index` (taking `index` and `index + 1`).
    pub fn add_bar64(&mut self, index: usize, addr: u64, size: u64) -> Result<(), ConfigError> {
        let taken =
            |b: &Bar| b.index == index || b.index == index + 1 || (b.is64 && b.index + 1 == index);
        if index + 1 >= BAR_COUNT || self.bars.iter().any(taken) {
            return Err(ConfigError::BarUnavailable(index));
        }
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigError::BarSize(size));
        }
        const MEMORY_64BIT: u32 = 0b100;
        let mask = !(size - 1);
        self.regs[BAR0_REG + index] = (addr as u32 & 0xffff_fff0) | MEMORY_64BIT;
        self.regs[BAR0_REG + index + 1] = (addr >> 32) as u32;
        self.writable[BAR0_REG + index] = mask as u32 & 0xffff_fff0;
        self.writable[BAR0_REG + index + 1] = (mask >> 32) as u32;
        self.bars.push(Bar {
            index,
            addr,
            size,
            is64: true,
        });
        Ok(())
    }

    /// Adds a 32-bit memory BAR at `index` (below 4 GiB by construction).
    pub fn add_bar32(&mut self, index: usize, addr: u32, size: u32) -> Result<(), ConfigError> {
        if index >= BAR_COUNT
            || self
                .bars
                .iter()
                .any(|b| b.index == index || b.index + 1 == index && b.is64)
        {
            return Err(ConfigError::BarUnavailable(index));
        }
        if !size.is_power_of_two() || size < 16 {
            return Err(ConfigError::BarSize(u64::from(size)));
        }
        self.regs[BAR0_REG + index] = addr & 0xffff_fff0;
        self.writable[BAR0_REG + index] = !(size - 1) & 0xffff_fff0;
        self.bars.push(Bar {
            index,
            addr: u64::from(addr),
            size: u64::from(size),
            is64: false,
        });
        Ok(())
    }

    /// The BARs with the addresses the guest has programmed.
    pub fn bars(&self) -> Vec<Bar> {
        self.bars
            .iter()
            .map(|bar| Bar {
                addr: self.bar_address(bar.index),
                ..*bar
            })
            .collect()
    }

    fn bar_address(&self, index: usize) -> u64 {
        let low = u64::from(self.regs[BAR0_REG + index] & 0xffff_fff0);
        match self.bars.iter().find(|b| b.index == index) {
            Some(bar) if bar.is64 => low | (u64::from(self.regs[BAR0_REG + index + 1]) << 32),
            _ => low,
        }
    }

    /// Appends a capability: `body` starts with its ID byte, then a placeholder "next" byte,
    /// then its data. `writable` marks guest-writable bits, byte by byte. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        let end = offset + body.len();
        if end > LEGACY_END || body.len() < 2 {
            return Err(ConfigError::NoRoomForCapability);
        }
        for (i, byte) in body.iter().enumerate() {
            self.set_byte(offset + i, *byte);
        }
        for (i, mask) in writable.iter().enumerate().take(body.len()) {
            let reg = (offset + i) / 4;
            let shift = ((offset + i) % 4) * 8;
            self.writable[reg] |= u32::from(*mask) << shift;
        }
        self.set_byte(offset + 1, 0);
        match self.last_capability {
            Some(previous) => self.set_byte(previous + 1, offset as u8),
            None => {
                self.regs[CAPABILITIES_POINTER_REG] = offset as u32;
                self.regs[1] |= STATUS_CAPABILITIES;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = (end + 3) & !3;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = (offset % 4) * 8;
        let reg = &mut self.regs[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// Reads register `reg` (a 32-bit index); out-of-range reads as zero.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within register `reg`, keeping
    /// read-only bits.
    pub fn write_reg(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= REGISTERS || offset + data.len() > 4 {
            return;
        }
        let mut value = [0u8; 4];
        value[offset..offset + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value);
        let mut touched = [0u8; 4];
        touched[offset..offset + data.len()].fill(0xff);
        let mask = self.writable[reg] & u32::from_le_bytes(touched);
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
    }

    /// The byte at `offset`, for capability handlers.
    pub fn byte(&self, offset: usize) -> u8 {
        (self.read_reg(offset / 4) >> ((offset % 4) * 8)) as u8
    }

    /// Overwrites bytes the device itself owns (e.g. MSI-X control), bypassing write masks.
    pub fn set_bytes(&mut self, offset: usize, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            if offset + i < REGISTERS * 4 {
                self.set_byte(offset + i, *b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PciId {
        PciId {
            vendor: 0x1af4,
            device: 0x1042,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    #[test]
    fn header_carries_the_identity() {
        let c = PciConfiguration::new(id());
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        assert_eq!(c.read_reg(2), 0x0100_0001);
        assert_eq!(c.read_reg(11), 0x0040_1af4);
        assert_eq!(c.read_reg(5000), 0);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = PciConfiguration::new(id());
        c.add_bar64(0, 0x1_0000_0000, 0x4000).unwrap();
        assert_eq!(c.read_reg(4), 0x4);
        assert_eq!(c.read_reg(5), 0x1);
        // The guest writes all ones and reads back the size mask.
        c.write_reg(4, 0, &[0xff; 4]);
        c.write_reg(5, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(4), 0xffff_c004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        // Then programs an address.
        c.write_reg(4, 0, &0xe000_0000u32.to_le_bytes());
        c.write_reg(5, 0, &[0; 4]);
        assert_eq!(c.bars()[0].addr, 0xe000_0000);
        assert_eq!(
            c.add_bar64(1, 0, 0x1000),
            Err(ConfigError::BarUnavailable(1))
        );
        assert_eq!(
            c.add_bar64(5, 0, 0x1000),
            Err(ConfigError::BarUnavailable(5))
        );
        assert_eq!(c.add_bar64(2, 0, 0x1001), Err(ConfigError::BarSize(0x1001)));
        // A 32-bit BAR beside it.
        c.add_bar32(2, 0xc000_1000, 0x1000).unwrap();
        c.write_reg(6, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(6), 0xffff_f000);
        c.write_reg(6, 0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bars()[1].addr, 0xd000_0000);
        assert_eq!(
            c.add_bar32(1, 0, 0x1000),
            Err(ConfigError::BarUnavailable(1))
        );
        assert_eq!(
            c.add_bar32(2, 0, 0x1000),
            Err(ConfigError::BarUnavailable(2))
        );
    }

    #[test]
    fn read_only_fields_stay() {
        let mut c = PciConfiguration::new(id());
        c.write_reg(0, 0, &[0; 4]);
        assert_eq!(c.read_reg(0), 0x1042_1af4);
        c.write_reg(1, 0, &[0x07, 0x04]);
        assert_eq!(c.read_reg(1) & 0xffff, 0x0407);
        c.write_reg(15, 0, &[11]);
        assert_eq!(c.read_reg(15) & 0xff, 11);
    }

    #[test]
    fn capabilities_form_a_list() {
        let mut c = PciConfiguration::new(id());
        let first = c.add_capability(&[0x09, 0, 16, 1, 2, 3], &[]).unwrap();
        let second = c
            .add_capability(&[0x11, 0, 0, 0], &[0, 0, 0xff, 0xff])
            .unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);
        assert_ne!(c.read_reg(1) & STATUS_CAPABILITIES, 0);
        assert_eq!(c.read_reg(13), 0x40);
        assert_eq!(c.byte(first + 1), second as u8);
        assert_eq!(c.byte(second + 1), 0);
        c.write_reg(second / 4, 2, &[0x34, 0x12]);
        assert_eq!(c.read_reg(second / 4) >> 16, 0x1234);
        c.write_reg(first / 4, 0, &[0xff; 4]);
        assert_eq!(c.byte(first), 0x09, "capability ID is read-only");
    }
}
