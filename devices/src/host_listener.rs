//! Listening Unix sockets that stay quiet when the process runs out of file descriptors.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

/// A descriptor held in reserve by a listener. A level-triggered listener whose `accept`
/// fails for want of descriptors (EMFILE) would wake its event loop without end; with the
/// spare given up for a moment, the waiting client is taken and closed at once instead.
pub struct SpareFd(Option<std::fs::File>);

impl Default for SpareFd {
    fn default() -> SpareFd {
        SpareFd(std::fs::File::open("/dev/null").ok())
    }
}

impl SpareFd {
    /// The next client of `listener`. Out of descriptors, that client is refused (closed),
    /// `what` says so once (`said`), and the error is EMFILE: the caller may go on taking
    /// clients until `WouldBlock` (which `accept` returns once none is waiting, even out of
    /// descriptors, where the kernel's accept would say EMFILE again).
    pub fn accept(
        &mut self,
        listener: &UnixListener,
        said: &AtomicBool,
        what: &str,
    ) -> std::io::Result<UnixStream> {
        let error = match listener.accept() {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if out_of_descriptors(&e) => e,
            Err(e) => return Err(e),
        };
        self.0 = None;
        // The refused client is closed before the spare is taken back with its number.
        let refused = listener.accept().map(drop);
        self.0 = std::fs::File::open("/dev/null").ok();
        match refused {
            Ok(()) => {
                say_out_of_descriptors(said, what);
                Err(error)
            }
            // None waiting (WouldBlock), or no spare to give up.
            Err(e) => Err(e),
        }
    }
}

/// Whether `error` is the process's (EMFILE) or the system's (ENFILE) descriptor limit.
pub fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Says once (`said`) that `what` refuses clients for want of descriptors.
pub fn say_out_of_descriptors(said: &AtomicBool, what: &str) {
    if !said.swap(true, Ordering::Relaxed) {
        log::warn!("{what}: out of file descriptors; refusing clients");
    }
}
