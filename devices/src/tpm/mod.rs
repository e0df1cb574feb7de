//! A TPM 2.0 behind the TIS (FIFO) interface, as QEMU's tpm-tis: five localities of 4 KiB
//! MMIO each from [`TPM_TIS_START`](firmware::layout::TPM_TIS_START), polled (no interrupt),
//! with the command run by a [`TpmBackend`] (swtpm, [`swtpm::Swtpm`]).
//!
//! The register state machine follows the TCG PC Client Platform TPM Profile: a locality
//! requests use through TPM_ACCESS; the active one writes commandReady, the command into the
//! data FIFO (TPM_STS.Expect tells whether more is due), then tpmGo; the response is read
//! back from the FIFO while TPM_STS.dataAvail is set. The backend runs the command
//! elsewhere (swtpm, through [`worker::SwtpmWorker`]'s thread): the tpmGo write returns at
//! once, the guest polls TPM_STS until dataAvail, and may cancel (commandCancel) or abort
//! (commandReady) meanwhile, so a slow or hung swtpm never holds a vCPU.

pub mod swtpm;
pub mod worker;

use crate::bus::BusDevice;

/// Runs TPM commands, one at a time, without blocking the caller.
pub trait TpmBackend: Send {
    /// Starts running `command` sent from `locality`; its response comes from
    /// [`TpmBackend::response`].
    fn start(&mut self, locality: u8, command: Vec<u8>);
    /// The started command's response once it is there, waiting for it at most `wait` (a
    /// backend that cannot run it answers with a TPM error response); `None` while it runs.
    fn response(&mut self, wait: std::time::Duration) -> Option<Vec<u8>>;
    /// Asks the TPM to cancel the running command (it may finish anyway).
    fn cancel(&mut self);
    /// Forgets the running command: its response, whenever it comes, is dropped.
    fn abandon(&mut self);
    /// The tpmEstablishment flag.
    fn established(&mut self) -> bool;
    fn reset_established(&mut self, locality: u8);
}

/// How long the vCPU that writes tpmGo waits for the response before it lets the guest poll:
/// a software TPM answers most commands within this, so the guest finds them done at its
/// first poll, as if the command ran on the vCPU (Linux gives some commands only 20 ms,
/// which a busy or emulated host can miss between polls); a slow command costs the vCPU no
/// more than this.
const GO_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

pub const LOCALITIES: u8 = 5;
/// The locality of a dynamic launch (the CPU's own).
const DRTM_LOCALITY: u8 = 4;
pub const LOCALITY_SIZE: u64 = 0x1000;
/// The command and response buffer.
pub const BUFFER_MAX: usize = swtpm::BUFFER_SIZE as usize;

pub const REG_ACCESS: u64 = 0x00;
const REG_INT_ENABLE: u64 = 0x08;
const REG_INT_VECTOR: u64 = 0x0c;
const REG_INT_STATUS: u64 = 0x10;
const REG_INTF_CAPABILITY: u64 = 0x14;
pub const REG_STS: u64 = 0x18;
pub const REG_DATA_FIFO: u64 = 0x24;
const REG_INTERFACE_ID: u64 = 0x30;
const REG_XDATA_FIFO: u64 = 0x80;
const REG_XDATA_FIFO_END: u64 = 0xc0;
const REG_DID_VID: u64 = 0xf00;
const REG_RID: u64 = 0xf04;

const ACCESS_ESTABLISHMENT: u8 = 1 << 0;
pub const ACCESS_REQUEST_USE: u8 = 1 << 1;
const ACCESS_PENDING_REQUEST: u8 = 1 << 2;
const ACCESS_SEIZE: u8 = 1 << 3;
const ACCESS_BEEN_SEIZED: u8 = 1 << 4;
pub const ACCESS_ACTIVE_LOCALITY: u8 = 1 << 5;
const ACCESS_REG_VALID: u8 = 1 << 7;

const STS_RESPONSE_RETRY: u32 = 1 << 1;
const STS_EXPECT: u32 = 1 << 3;
pub const STS_DATA_AVAIL: u32 = 1 << 4;
pub const STS_GO: u32 = 1 << 5;
pub const STS_COMMAND_READY: u32 = 1 << 6;
pub const STS_VALID: u32 = 1 << 7;
pub const STS_COMMAND_CANCEL: u32 = 1 << 24;
const STS_RESET_ESTABLISHMENT: u32 = 1 << 25;
const STS_FAMILY_TPM2: u32 = 1 << 26;

/// TPM_INTF_CAPABILITY: interface version 1.3 for TPM 2.0, 64-byte transfers, dynamic burst
/// count; no interrupts are raised, and none are advertised.
const INTF_CAPABILITY: u32 = (3 << 28) | (3 << 9);
/// TPM_INTERFACE_ID: the FIFO interface, five localities, TIS supported.
const INTERFACE_ID: u32 = (1 << 13) | (1 << 8);
/// TPM_DID_VID: QEMU's (IBM's vendor ID, device 1), which Linux prints and accepts.
const DID_VID: u32 = 0x0001_1014;
const RID: u32 = 0x01;

pub const TPM_RC_FAILURE: u32 = 0x101;
/// The TPM is busy: send the command again (a warning, TPM_RC_RETRY).
pub const TPM_RC_RETRY: u32 = 0x922;
pub const TPM_RC_COMMAND_SIZE: u32 = 0x142;

/// A TPM response with no body and result `code` (tag TPM_ST_NO_SESSIONS).
pub fn error_response(code: u32) -> Vec<u8> {
    let mut response = 0x8001u16.to_be_bytes().to_vec();
    response.extend_from_slice(&10u32.to_be_bytes());
    response.extend_from_slice(&code.to_be_bytes());
    response
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    Ready,
    Reception,
    /// The backend runs the command.
    Execution,
    Completion,
}

#[derive(Clone, Copy, Default)]
struct Locality {
    requested: bool,
    been_seized: bool,
    int_enable: u32,
    int_vector: u8,
}

pub struct TpmTis {
    backend: Box<dyn TpmBackend>,
    localities: [Locality; LOCALITIES as usize],
    active: Option<u8>,
    state: State,
    command: Vec<u8>,
    response: Vec<u8>,
    read_at: usize,
}

impl TpmTis {
    pub fn new(backend: Box<dyn TpmBackend>) -> TpmTis {
        TpmTis {
            backend,
            localities: [Locality::default(); LOCALITIES as usize],
            active: None,
            state: State::Idle,
            command: Vec::new(),
            response: Vec::new(),
            read_at: 0,
        }
    }

    /// The command's size from its header, once the header's first six bytes are in.
    fn expected_len(&self) -> Option<usize> {
        let size = self.command.get(2..6)?;
        Some(u32::from_be_bytes([size[0], size[1], size[2], size[3]]) as usize)
    }

    fn expecting(&self) -> bool {
        self.state == State::Reception
            && self.expected_len().is_none_or(|n| self.command.len() < n)
            && self.command.len() < BUFFER_MAX
    }

    /// Takes the running command's response if it is there (waiting for it at most `wait`).
    fn poll_execution(&mut self, wait: std::time::Duration) {
        if self.state == State::Execution {
            if let Some(response) = self.backend.response(wait) {
                self.response = response;
                self.read_at = 0;
                self.state = State::Completion;
            }
        }
    }

    fn status(&mut self) -> u32 {
        self.poll_execution(std::time::Duration::ZERO);
        let (bits, burst) = match self.state {
            State::Idle | State::Execution => (STS_VALID, 0),
            State::Ready => (STS_COMMAND_READY | STS_VALID, BUFFER_MAX),
            State::Reception => {
                let expect = if self.expecting() { STS_EXPECT } else { 0 };
                (expect | STS_VALID, BUFFER_MAX - self.command.len())
            }
            State::Completion => {
                let left = self.response.len() - self.read_at;
                let avail = if left > 0 { STS_DATA_AVAIL } else { 0 };
                (avail | STS_VALID, left)
            }
        };
        STS_FAMILY_TPM2 | bits | ((burst.min(0xffff) as u32) << 8)
    }

    fn access(&mut self, locality: u8) -> u8 {
        let mut value = ACCESS_REG_VALID;
        let l = &self.localities[usize::from(locality)];
        if self.active == Some(locality) {
            value |= ACCESS_ACTIVE_LOCALITY;
        }
        // As QEMU: set when another locality asks for use.
        let others_ask = (0..LOCALITIES)
            .filter(|&n| n != locality)
            .any(|n| self.localities[usize::from(n)].requested);
        if others_ask {
            value |= ACCESS_PENDING_REQUEST;
        }
        if l.requested {
            value |= ACCESS_REQUEST_USE;
        }
        if l.been_seized {
            value |= ACCESS_BEEN_SEIZED;
        }
        if !self.backend.established() {
            value |= ACCESS_ESTABLISHMENT;
        }
        value
    }

    /// A new active locality: whatever the previous one had in the FIFO is dropped.
    fn activate(&mut self, locality: Option<u8>) {
        if let Some(l) = locality {
            self.localities[usize::from(l)].requested = false;
        }
        self.active = locality;
        self.abort();
        self.state = State::Idle;
    }

    /// Drops the command or response in the FIFO, and a running command's coming response.
    fn abort(&mut self) {
        if self.state == State::Execution {
            self.backend.abandon();
        }
        self.command.clear();
        self.response.clear();
        self.read_at = 0;
    }

    fn write_access(&mut self, locality: u8, value: u8) {
        let l = usize::from(locality);
        if value & ACCESS_BEEN_SEIZED != 0 {
            self.localities[l].been_seized = false;
        }
        if value & ACCESS_SEIZE != 0 && self.active.is_none_or(|a| a < locality) {
            if let Some(previous) = self.active {
                self.localities[usize::from(previous)].been_seized = true;
            }
            self.activate(Some(locality));
            return;
        }
        if value & ACCESS_ACTIVE_LOCALITY != 0 {
            if self.active == Some(locality) {
                // Relinquished: the highest locality asking for use gets it.
                let next = (0..LOCALITIES)
                    .rev()
                    .find(|&n| self.localities[usize::from(n)].requested);
                self.activate(next);
            } else {
                // A locality not in use withdraws its request.
                self.localities[l].requested = false;
            }
            return;
        }
        if value & ACCESS_REQUEST_USE != 0 {
            match self.active {
                None => self.activate(Some(locality)),
                Some(a) if a == locality => {}
                Some(_) => self.localities[l].requested = true,
            }
        }
    }

    fn write_status(&mut self, locality: u8, value: u32) {
        if value & STS_RESET_ESTABLISHMENT != 0 && locality == 3 {
            self.backend.reset_established(locality);
        }
        if value & STS_COMMAND_CANCEL != 0 && self.state == State::Execution {
            self.backend.cancel();
        }
        // One command at a time; a write naming several does nothing (as QEMU).
        let command = value & (STS_COMMAND_READY | STS_GO | STS_RESPONSE_RETRY);
        if command == STS_COMMAND_READY {
            // Ready for a command, or abort the one received, running or answered.
            self.abort();
            self.state = State::Ready;
        } else if command == STS_GO {
            if self.state == State::Reception && !self.expecting() {
                let whole = self.expected_len() == Some(self.command.len());
                let command = std::mem::take(&mut self.command);
                if whole && command.len() >= 10 {
                    self.backend.start(locality, command);
                    self.state = State::Execution;
                    self.poll_execution(GO_WAIT);
                } else {
                    // A header whose size is not what came (too short, or beyond the
                    // buffer): answered here, as a TPM would.
                    self.response = error_response(TPM_RC_COMMAND_SIZE);
                    self.read_at = 0;
                    self.state = State::Completion;
                }
            }
        } else if command == STS_RESPONSE_RETRY && self.state == State::Completion {
            self.read_at = 0;
        }
    }

    fn write_fifo(&mut self, data: &[u8]) {
        if self.state == State::Ready {
            self.state = State::Reception;
        }
        for byte in data {
            if !self.expecting() {
                // Past the command's size (or the buffer): dropped, Expect stays clear.
                break;
            }
            self.command.push(*byte);
        }
    }

    fn read_fifo(&mut self, data: &mut [u8]) {
        self.poll_execution(std::time::Duration::ZERO);
        for byte in data.iter_mut() {
            *byte = match self.response.get(self.read_at) {
                Some(b) if self.state == State::Completion => {
                    self.read_at += 1;
                    *b
                }
                _ => 0xff,
            };
        }
    }

    /// A 32-bit register's value.
    fn register(&mut self, locality: u8, reg: u64) -> u32 {
        let l = self.localities[usize::from(locality)];
        match reg {
            REG_ACCESS => u32::from(self.access(locality)),
            REG_INT_ENABLE => l.int_enable,
            REG_INT_VECTOR => u32::from(l.int_vector),
            REG_INT_STATUS => 0,
            REG_INTF_CAPABILITY => INTF_CAPABILITY,
            REG_STS if self.active == Some(locality) => self.status(),
            REG_INTERFACE_ID => INTERFACE_ID,
            REG_DID_VID => DID_VID,
            REG_RID => RID,
            _ => u32::MAX,
        }
    }
}

/// Where an access lands: a locality, the register's start, and the byte in it.
fn decode(offset: u64) -> Option<(u8, u64, u64)> {
    let locality = u8::try_from(offset / LOCALITY_SIZE)
        .ok()
        .filter(|l| *l < LOCALITIES)?;
    let within = offset % LOCALITY_SIZE;
    Some((locality, within & !3, within & 3))
}

fn is_fifo(offset_in_locality: u64) -> bool {
    (REG_DATA_FIFO..REG_DATA_FIFO + 4).contains(&offset_in_locality)
        || (REG_XDATA_FIFO..REG_XDATA_FIFO_END).contains(&offset_in_locality)
}

impl BusDevice for TpmTis {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((locality, reg, byte)) = decode(offset) else {
            data.fill(0xff);
            return;
        };
        if is_fifo(reg + byte) {
            if self.active == Some(locality) {
                self.read_fifo(data);
            } else {
                data.fill(0xff);
            }
            return;
        }
        let value = self.register(locality, reg) >> (8 * byte);
        for (n, b) in data.iter_mut().enumerate() {
            *b = value.checked_shr(8 * n as u32).unwrap_or(0) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Locality 4 belongs to the CPU's dynamic launch (DRTM), never to software: the guest
        // can read its registers but not use it (as QEMU).
        let Some((locality, reg, byte)) = decode(offset).filter(|(l, _, _)| *l != DRTM_LOCALITY)
        else {
            return;
        };
        let active = self.active == Some(locality);
        if is_fifo(reg + byte) {
            if active {
                self.write_fifo(data);
            }
            return;
        }
        // The bytes that fall inside the 32-bit register; an access past its end (unaligned,
        // or 8 bytes wide) leaves the rest out.
        let mut value = 0u32;
        for (n, b) in data.iter().enumerate() {
            let Some(shift) = u32::try_from(8 * (byte as usize + n))
                .ok()
                .filter(|s| *s < 32)
            else {
                break;
            };
            value |= u32::from(*b) << shift;
        }
        let l = usize::from(locality);
        match reg {
            REG_ACCESS if byte == 0 => self.write_access(locality, value as u8),
            REG_INT_ENABLE if active => {
                let mask = mask(byte, data.len());
                let old = self.localities[l].int_enable;
                self.localities[l].int_enable = (old & !mask) | (value & mask);
            }
            REG_INT_VECTOR if active && byte == 0 => self.localities[l].int_vector = value as u8,
            REG_STS if active => self.write_status(locality, value),
            _ => {}
        }
    }
}

/// The bits of a 32-bit register that a `len`-byte access at byte `byte` covers.
fn mask(byte: u64, len: usize) -> u32 {
    let bits = (8 * len.min(4)) as u32;
    let low = if bits == 32 {
        u32::MAX
    } else {
        (1 << bits) - 1
    };
    low << (8 * byte as u32)
}

#[cfg(test)]
mod tests;
