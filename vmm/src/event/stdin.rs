//! Console input: what is typed on stdin goes to the running guest's UART.

use std::io::Read;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::Control;

/// Ctrl-A, then `x`: leave the console and stop the VM (as in QEMU's `-nographic`).
const ESCAPE: u8 = 0x01;
const QUIT: u8 = b'x';

/// The control plane's subscriber for stdin: forwards what is typed to the running guest's
/// UART, across guest reboots, until stdin closes. When the UART's receive FIFO is full it
/// stops reading stdin and waits for the guest to empty the FIFO (`room`).
pub struct StdinWatch {
    control: Control,
    room: EventFd,
    after_escape: bool,
    /// Typed bytes the guest has no room for yet.
    pending: Vec<u8>,
}

impl StdinWatch {
    pub fn new(control: Control, room: EventFd) -> StdinWatch {
        StdinWatch {
            control,
            room,
            after_escape: false,
            pending: Vec::new(),
        }
    }

    /// Ctrl-A handling; returns false once the user asked to quit.
    fn translate(&mut self, bytes: &[u8]) -> bool {
        for &byte in bytes {
            match (self.after_escape, byte) {
                (true, QUIT) => {
                    self.control.stop();
                    return false;
                }
                (false, ESCAPE) => self.after_escape = true,
                (true, ESCAPE) => {
                    self.pending.push(ESCAPE);
                    self.after_escape = false;
                }
                (true, other) => {
                    self.pending.extend([ESCAPE, other]);
                    self.after_escape = false;
                }
                (false, other) => self.pending.push(other),
            }
        }
        true
    }

    /// Hands the guest what fits; returns whether everything went.
    fn deliver(&mut self) -> bool {
        while !self.pending.is_empty() {
            let taken = self.control.send_input(&self.pending);
            if taken == 0 {
                return false;
            }
            self.pending.drain(..taken);
        }
        true
    }

    fn stdin_events() -> Events {
        Events::new_raw(libc::STDIN_FILENO, EventSet::IN)
    }

    fn room_events(&self) -> Events {
        Events::new(&self.room, EventSet::IN)
    }
}

impl MutEventSubscriber for StdinWatch {
    fn init(&mut self, ops: &mut EventOps) {
        // A regular file or /dev/null cannot be polled: nothing to forward then.
        if ops.add(Self::stdin_events()).is_err() {
            log::debug!("stdin cannot be polled; no console input");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
            if self.deliver() {
                let _ = ops.remove(self.room_events());
                let _ = ops.add(Self::stdin_events());
            }
            return;
        }
        let mut buf = [0u8; 256];
        let n = match std::io::stdin().read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(Self::stdin_events());
                return;
            }
            Ok(n) => n,
        };
        if !self.translate(&buf[..n]) {
            let _ = ops.remove(Self::stdin_events());
            return;
        }
        if !self.deliver() {
            // No room in the guest's FIFO: read no more until it has taken what it has.
            let _ = ops.remove(Self::stdin_events());
            let _ = ops.add(self.room_events());
        }
    }
}
