//! The guest's serial console on the host: output to a writer (the terminal, or a buffer in
//! tests), input from stdin with the terminal in raw mode, restored on every exit path.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, OnceLock};

use devices::bus::lock;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::Control;

/// A cloneable writer for the guest's console output.
#[derive(Clone)]
pub struct ConsoleOutput(Arc<Mutex<dyn Write + Send>>);

impl ConsoleOutput {
    pub fn stdout() -> ConsoleOutput {
        ConsoleOutput(Arc::new(Mutex::new(std::io::stdout())))
    }

    /// Output collected in memory; the returned buffer fills as the guest writes.
    pub fn buffer() -> (ConsoleOutput, Arc<Mutex<Vec<u8>>>) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        (ConsoleOutput(buffer.clone()), buffer)
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// Ctrl-A, then `x`: leave the console and stop the VM (as in QEMU's `-nographic`).
const ESCAPE: u8 = 0x01;
const QUIT: u8 = b'x';

/// The control plane's subscriber for stdin: forwards what is typed to the running guest's
/// UART, across guest reboots, until stdin closes. When the UART's receive FIFO is full it
/// stops reading stdin and waits for the guest to empty the FIFO (`room`).
pub struct StdinWatch {
    control: Control,
    room: Arc<EventFd>,
    after_escape: bool,
    /// Typed bytes the guest has no room for yet.
    pending: Vec<u8>,
}

impl StdinWatch {
    pub fn new(control: Control, room: Arc<EventFd>) -> StdinWatch {
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
        Events::new(self.room.as_ref(), EventSet::IN)
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

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Puts the terminal on stdin in raw mode (keys go to the guest, Ctrl-C included) and restores
/// it when dropped (termination signals stop the VM first: see [`crate::signals`]) or when
/// nixvmm panics.
pub struct RawTerminal(());

impl RawTerminal {
    /// `None` when stdin is not a terminal.
    pub fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a terminal descriptor.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: stdin is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let saved = *SAVED_TERMIOS.get_or_init(|| saved);
        // Release builds abort on panic, so Drop would not run: restore in the hook too.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            default_hook(info);
        }));
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side messages still start at column 0.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios derived from the terminal's own settings.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        Some(RawTerminal(()))
    }
}

/// Puts the terminal back as [`RawTerminal::enter`] found it (async-signal-safe).
pub fn restore_terminal() {
    if let Some(saved) = SAVED_TERMIOS.get() {
        // SAFETY: restores settings read from this same terminal; async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}
