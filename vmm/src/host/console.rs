//! The guest's serial console on the host: output to a writer (the terminal, or a buffer in
//! tests), and the terminal in raw mode while the VM runs, restored on every exit path.
//! (Input from stdin is the control plane's `event::stdin`.)

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use devices::bus::lock;

/// A cloneable writer for the guest's console output.
#[derive(Clone)]
pub struct ConsoleOutput(Arc<Mutex<dyn Write + Send>>);

impl ConsoleOutput {
    pub fn stdout() -> ConsoleOutput {
        ConsoleOutput(Arc::new(Mutex::new(std::io::stdout())))
    }

    /// Output dropped.
    pub fn sink() -> ConsoleOutput {
        ConsoleOutput(Arc::new(Mutex::new(std::io::sink())))
    }

    /// Output written to `path`, made or truncated now.
    pub fn file(path: &std::path::Path) -> std::io::Result<ConsoleOutput> {
        Ok(ConsoleOutput(Arc::new(Mutex::new(std::fs::File::create(
            path,
        )?))))
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

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Puts the terminal on stdin in raw mode (keys go to the guest, Ctrl-C included) and restores
/// it when dropped (termination signals stop the VM first: see [`crate::event::signals`]) or when
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
