//! Termination signals while a VM runs: SIGTERM, SIGINT and SIGHUP stop the VM the way its
//! own poweroff would (devices flushed and dropped, the terminal restored) and nixvmm exits
//! with status 0, as QEMU does ("terminating on signal N"). A second signal, for a VM that
//! does not stop, ends the process at once with 128 + the signal number.
//!
//! The signals are blocked in every thread (a mask set before any thread starts is inherited)
//! and read from a signalfd by the control plane. After the first one, the main thread takes
//! them again with a handler that restores the terminal and exits: the main thread may then
//! be waiting for a VM that does not stop, and the second signal must still work.

use std::fs::File;
use std::io::Read;
use std::os::fd::FromRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::Control;

const SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for signal in SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
    }
    set
}

/// Blocks the termination signals in this thread and every thread it starts later: call it
/// before starting any thread.
pub fn block_termination_signals() -> std::io::Result<()> {
    let set = signal_set();
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

extern "C" fn exit_at_once(signal: libc::c_int) {
    crate::host::console::restore_terminal();
    // SAFETY: async-signal-safe; ends the process without running anything else.
    unsafe { libc::_exit(128 + signal) };
}

/// From now on a termination signal reaching this thread restores the terminal and ends the
/// process with 128 + its number.
fn exit_on_next_signal() -> std::io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty action we then fill.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = exit_at_once as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in SIGNALS {
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let set = signal_set();
    // SAFETY: `set` is a valid signal set; only this thread's mask changes.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// The control plane's subscriber for the blocked termination signals.
pub struct SignalWatch {
    signals: File,
    control: Control,
    stopping: bool,
}

impl SignalWatch {
    pub fn new(control: Control) -> std::io::Result<SignalWatch> {
        let set = signal_set();
        // SAFETY: `set` is valid; -1 asks for a new descriptor, which we then own.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SignalWatch {
            // SAFETY: `fd` is a new descriptor nothing else owns.
            signals: unsafe { File::from_raw_fd(fd) },
            control,
            stopping: false,
        })
    }

    fn take(&mut self, signal: libc::c_int) {
        if self.stopping {
            crate::host::console::restore_terminal();
            std::process::exit(128 + signal);
        }
        self.stopping = true;
        log::warn!("terminating on signal {signal}");
        if let Err(e) = exit_on_next_signal() {
            log::warn!("a second signal will not end nixvmm at once: {e}");
        }
        self.control.stop();
    }
}

/// struct signalfd_siginfo: 128 bytes, the signal number first.
const SIGINFO_SIZE: usize = 128;

impl MutEventSubscriber for SignalWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            log::warn!("SIGTERM and SIGINT will not stop the VM cleanly: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; SIGINFO_SIZE];
        while let Ok(SIGINFO_SIZE) = self.signals.read(&mut info) {
            let signal = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
            self.take(signal as libc::c_int);
        }
    }
}
