//! The MSI-X table of a virtio-pci function and the enable/mask bits of its capability. The
//! table only records what the guest programs; [`MsixTable::effective`] tells the transport
//! where each vector must be delivered now, and the platform's [`MsiVectors`] does the rest
//! (pending bits included).
//!
//! [`MsiVectors`]: crate::interrupt::MsiVectors

pub use crate::interrupt::MsiMessage;

pub const ENTRY_SIZE: usize = 16;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            addr: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }
}

/// The table and the enable/mask bits of the capability's control word.
pub struct MsixTable {
    entries: Vec<Entry>,
    pub enabled: bool,
    pub function_masked: bool,
}

impl MsixTable {
    pub fn new(vectors: u16) -> MsixTable {
        MsixTable {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Entry::default()
                };
                usize::from(vectors)
            ],
            enabled: false,
            function_masked: false,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where `vector` is delivered now: its message, or `None` while MSI-X is off or the
    /// function or the vector is masked.
    pub fn effective(&self, vector: usize) -> Option<MsiMessage> {
        let entry = self.entries.get(vector)?;
        let masked = !self.enabled || self.function_masked || entry.control & VECTOR_MASKED != 0;
        (!masked).then(|| entry.message())
    }

    /// Reads the table: 32-bit accesses at dword granularity (64-bit reads are split).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let mut value = [0xffu8; 8];
        for (i, chunk) in value.chunks_mut(4).enumerate() {
            let dword = offset as usize / 4 + i;
            let (entry, field) = (dword / 4, dword % 4);
            if let Some(e) = self.entries.get(entry) {
                let v = [e.addr_lo, e.addr_hi, e.data, e.control][field];
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
        let start = offset as usize % 4;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = value.get(start + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes the table (32- or 64-bit, aligned); returns the vectors whose entry changed.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Vec<usize> {
        let mut changed = Vec::new();
        if !offset.is_multiple_of(4) || (data.len() != 4 && data.len() != 8) {
            return changed;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let dword = offset as usize / 4 + i;
            let (entry, field) = (dword / 4, dword % 4);
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            let value = u32::from_le_bytes(bytes);
            let Some(e) = self.entries.get_mut(entry) else {
                break;
            };
            match field {
                0 => e.addr_lo = value,
                1 => e.addr_hi = value,
                2 => e.data = value,
                _ => e.control = value & VECTOR_MASKED,
            }
            if changed.last() != Some(&entry) {
                changed.push(entry);
            }
        }
        changed
    }

    pub fn reset(&mut self) {
        *self = MsixTable::new(self.entries.len() as u16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_is_delivered_only_when_enabled_and_unmasked() {
        let mut table = MsixTable::new(2);
        assert_eq!(table.write_table(16, &0xfee0_0000u32.to_le_bytes()), [1]);
        table.write_table(24, &0x41u32.to_le_bytes());
        let message = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(table.effective(1), None, "vectors start masked");
        table.write_table(28, &0u32.to_le_bytes()); // unmask
        assert_eq!(table.effective(1), None, "MSI-X is still off");
        table.enabled = true;
        assert_eq!(table.effective(1), Some(message));
        table.function_masked = true;
        assert_eq!(table.effective(1), None, "function mask");
        table.function_masked = false;
        // A 64-bit write of address low and high changes one vector.
        assert_eq!(table.write_table(16, &0xfee0_1000u64.to_le_bytes()), [1]);
        assert_eq!(table.effective(1).map(|m| m.addr), Some(0xfee0_1000));
        assert_eq!(table.effective(7), None, "no such vector");
        assert!(table.write_table(2, &[0; 4]).is_empty(), "unaligned");
        let mut read = [0u8; 4];
        table.read_table(24, &mut read);
        assert_eq!(u32::from_le_bytes(read), 0x41);
    }
}
