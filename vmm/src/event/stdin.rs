//! Console input: what is typed on stdin goes to the running guest's UART, or, after
//! Ctrl-A c, to QEMU's human monitor on the same terminal (as QEMU's `-nographic`).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::Control;

/// Ctrl-A, then `x`: leave the console and stop the VM; then `c`: switch between the guest's
/// console and the monitor (as in QEMU's `-nographic`).
const ESCAPE: u8 = 0x01;
const QUIT: u8 = b'x';
const MONITOR: u8 = b'c';
const BACKSPACE: u8 = 0x7f;
/// The longest monitor line kept; what is typed beyond it is dropped.
const MONITOR_LINE: usize = 1024;

/// The control plane's subscriber for stdin: forwards what is typed to the running guest's
/// UART, across guest reboots, until stdin closes. When the UART's receive FIFO is full it
/// stops reading stdin and waits for the guest to empty the FIFO (`room`).
pub struct StdinWatch {
    control: Control,
    room: EventFd,
    /// Ctrl-A starts a command; without, every byte goes to the guest.
    escapes: bool,
    after_escape: bool,
    /// Typed bytes the guest has no room for yet.
    pending: Vec<u8>,
    /// Typing goes to the monitor, this line so far.
    monitor: Option<Vec<u8>>,
}

impl StdinWatch {
    pub fn new(control: Control, room: EventFd, escapes: bool) -> StdinWatch {
        StdinWatch {
            control,
            room,
            escapes,
            after_escape: false,
            pending: Vec::new(),
            monitor: None,
        }
    }

    /// Ctrl-A handling; returns false once the user asked to quit.
    fn translate(&mut self, bytes: &[u8]) -> bool {
        if !self.escapes {
            self.pending.extend_from_slice(bytes);
            return true;
        }
        for &byte in bytes {
            match (self.after_escape, byte) {
                (true, QUIT) => {
                    self.control.stop_for("host-ui");
                    return false;
                }
                (true, MONITOR) => {
                    self.after_escape = false;
                    self.monitor = match self.monitor.take() {
                        Some(_) => {
                            say("\r\n");
                            None
                        }
                        None => {
                            say(&format!("\r\n{}", super::hmp::banner()));
                            Some(Vec::new())
                        }
                    };
                }
                (false, ESCAPE) => self.after_escape = true,
                // At the monitor, other keys are its line (Ctrl-A Ctrl-A, Ctrl-A KEY too).
                (_, other) if self.monitor.is_some() => {
                    self.after_escape = false;
                    if !self.monitor_key(other) {
                        return false;
                    }
                }
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

    /// A key typed at the monitor: echoed, kept until Enter, then run. False once the
    /// monitor user quit.
    fn monitor_key(&mut self, key: u8) -> bool {
        let Some(line) = self.monitor.as_mut() else {
            return true;
        };
        match key {
            b'\r' | b'\n' => {
                let text = String::from_utf8_lossy(line).into_owned();
                line.clear();
                let answer = super::hmp::execute(&text, &self.control);
                say(&format!("\r\n{}", answer.text));
                if answer.quit {
                    return false;
                }
                say(super::hmp::PROMPT);
            }
            BACKSPACE | 0x08 if line.pop().is_some() => say("\x08 \x08"),
            BACKSPACE | 0x08 => {}
            key if line.len() < MONITOR_LINE => {
                line.push(key);
                let _ = std::io::stdout().write_all(&[key]);
                let _ = std::io::stdout().flush();
            }
            _ => {}
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

/// Text for the monitor user on the terminal (a closed stdout loses it).
fn say(text: &str) {
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
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
