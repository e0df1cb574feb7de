//! The MSI-X table and pending-bit array of a virtio-pci function.

/// An MSI message: what the function writes, and where, to interrupt a CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// Delivers MSI messages to the guest (the VMM implements it with KVM; tests count).
pub trait MsiSink: Send + Sync {
    fn send(&self, message: MsiMessage);

    /// An eventfd that raises `message` when written (an irqfd), for backends outside the VMM.
    fn irqfd(&self, _message: MsiMessage) -> Option<vmm_sys_util::eventfd::EventFd> {
        None
    }
}

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

/// The table, its pending bits, and the enable/mask bits of the capability's control word.
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
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
            pending: vec![false; usize::from(vectors)],
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

    fn masked(&self, vector: usize) -> bool {
        self.function_masked
            || self
                .entries
                .get(vector)
                .is_none_or(|e| e.control & VECTOR_MASKED != 0)
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

    /// Writes the table; unmasking a vector with a pending interrupt delivers it.
    pub fn write_table(&mut self, offset: u64, data: &[u8], sink: &dyn MsiSink) {
        if !offset.is_multiple_of(4) || (data.len() != 4 && data.len() != 8) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let dword = offset as usize / 4 + i;
            let (entry, field) = (dword / 4, dword % 4);
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            let value = u32::from_le_bytes(bytes);
            let Some(e) = self.entries.get_mut(entry) else {
                return;
            };
            match field {
                0 => e.addr_lo = value,
                1 => e.addr_hi = value,
                2 => e.data = value,
                _ => e.control = value & VECTOR_MASKED,
            }
            self.deliver_pending(entry, sink);
        }
    }

    /// Reads the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0, |acc, bit| acc | (1 << bit));
        }
    }

    /// The message programmed for `vector`.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries.get(usize::from(vector)).map(Entry::message)
    }

    /// Sends `vector`'s message, or marks it pending while masked.
    pub fn trigger(&mut self, vector: u16, sink: &dyn MsiSink) {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            sink.send(self.entries[v].message());
        }
    }

    /// After the function mask or a vector mask clears: deliver what was held back.
    pub fn deliver_all_pending(&mut self, sink: &dyn MsiSink) {
        for v in 0..self.entries.len() {
            self.deliver_pending(v, sink);
        }
    }

    fn deliver_pending(&mut self, vector: usize, sink: &dyn MsiSink) {
        if self.enabled && !self.masked(vector) && self.pending.get(vector) == Some(&true) {
            self.pending[vector] = false;
            sink.send(self.entries[vector].message());
        }
    }

    pub fn reset(&mut self) {
        *self = MsixTable::new(self.entries.len() as u16);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct Recorder(pub Mutex<Vec<MsiMessage>>);

    impl MsiSink for Recorder {
        fn send(&self, message: MsiMessage) {
            self.0.lock().unwrap().push(message);
        }
    }

    #[test]
    fn masked_vectors_hold_interrupts_until_unmasked() {
        let sink = Recorder::default();
        let mut table = MsixTable::new(2);
        table.enabled = true;
        table.write_table(16, &0xfee0_0000u32.to_le_bytes(), &sink);
        table.write_table(24, &0x41u32.to_le_bytes(), &sink);
        table.trigger(1, &sink);
        assert!(sink.0.lock().unwrap().is_empty(), "vectors start masked");
        let mut pba = [0u8; 1];
        table.read_pba(0, &mut pba);
        assert_eq!(pba, [0b10]);
        table.write_table(28, &0u32.to_le_bytes(), &sink); // unmask
        let expected = MsiMessage {
            addr: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(*sink.0.lock().unwrap(), [expected]);
        table.read_pba(0, &mut pba);
        assert_eq!(pba, [0]);
        table.trigger(1, &sink);
        assert_eq!(sink.0.lock().unwrap().len(), 2);
        table.trigger(7, &sink); // no such vector: ignored
        let mut read = [0u8; 4];
        table.read_table(24, &mut read);
        assert_eq!(u32::from_le_bytes(read), 0x41);
    }
}
