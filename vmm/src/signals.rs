//! Termination signals while a VM runs: SIGTERM, SIGINT and SIGHUP stop the VM the way its
//! own poweroff would (devices flushed and dropped, the terminal restored) and nixvmm exits
//! with status 0, as QEMU does ("terminating on signal N"). A second signal, for a VM that
//! does not stop, ends the process at once with 128 + the signal number.
//!
//! The signals are blocked in every thread (a mask set before any thread starts is inherited)
//! and taken synchronously by one thread with `sigwait`, so no code runs in signal context
//! except for the second signal's exit.

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

/// Blocks the termination signals in this thread (and so in every thread it starts later)
/// and starts the thread that turns them into [`Control::stop`]. Call it before starting any
/// other thread.
pub fn stop_on_termination_signals(control: Control) -> std::io::Result<()> {
    let set = signal_set();
    // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stopping = false;
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `set` is valid and every signal in it is blocked in this thread.
                if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                    continue;
                }
                if stopping {
                    crate::console::restore_terminal();
                    // SAFETY: ends the process at once; nothing is left to clean up.
                    unsafe { libc::_exit(128 + signal) };
                }
                stopping = true;
                log::warn!("terminating on signal {signal}");
                control.stop();
            }
        })?;
    Ok(())
}
