//! The COM1 16550A UART (vm-superio's 8250 model) with its interrupt on an eventfd.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Raises the UART's interrupt by writing its eventfd (registered with KVM as an irqfd).
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals `room` each time the guest has read every byte of its receive FIFO, so the host
/// side knows it can queue more input.
pub struct InputRoom(pub EventFd);

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// The guest's serial console: what it transmits goes to `out`; host input is queued with
/// [`SerialConsole::enqueue_input`], and `room` is signalled when the guest has taken it all.
pub struct SerialConsole {
    uart: Serial<EventFdTrigger, InputRoom, Box<dyn Write + Send>>,
    /// Whether an output failure was already reported (a closed terminal fails every byte).
    output_failed: bool,
}

impl SerialConsole {
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>, room: EventFd) -> SerialConsole {
        SerialConsole {
            uart: Serial::with_events(EventFdTrigger(interrupt), InputRoom(room), out),
            output_failed: false,
        }
    }

    /// Queues host bytes for the guest to read; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *value) {
                if !self.output_failed {
                    log::warn!("serial output failed (further failures not reported): {e:?}");
                    self.output_failed = true;
                }
            }
        }
    }
}
