//! Listening Unix sockets that stay quiet when the process runs out of file descriptors.

use std::fmt::Display;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::AtomicBool;

/// A descriptor held in reserve by a listener. A level-triggered listener whose `accept`
/// fails for want of descriptors (EMFILE) would wake its event loop without end; with the
/// spare given up for a moment, the waiting client is taken and closed at once instead.
pub struct SpareFd(Option<std::fs::File>);

impl Default for SpareFd {
    fn default() -> SpareFd {
        SpareFd(open_spare())
    }
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

impl SpareFd {
    /// The next client of `listener`: `Ok(Some(client))`, or `Ok(None)` when one was refused
    /// (closed) for want of descriptors, said once (`said`) as `what`'s; the caller may go on
    /// taking clients. An error ends the round: `WouldBlock` when none waits, EMFILE when
    /// not even the spare could be had (another thread took its number).
    pub fn accept(
        &mut self,
        listener: &UnixListener,
        said: &AtomicBool,
        what: &dyn Display,
    ) -> std::io::Result<Option<UnixStream>> {
        let error = match listener.accept() {
            Ok((stream, _)) => return Ok(Some(stream)),
            Err(e) if out_of_descriptors(&e) => e,
            Err(e) => return Err(e),
        };
        say_out_of_descriptors(said, what);
        if self.0.take().or_else(open_spare).is_none() {
            return Err(error);
        }
        // The refused client is closed before the spare is taken back with its number.
        let refused = listener.accept().map(drop);
        self.0 = open_spare();
        refused.map(|()| None)
    }
}

/// Whether `error` is the process's (EMFILE) or the system's (ENFILE) descriptor limit.
pub fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Says once (`said`) that `what` refuses clients for want of descriptors.
pub fn say_out_of_descriptors(said: &AtomicBool, what: &dyn Display) {
    crate::warn_once(
        said,
        format_args!("{what}: out of file descriptors; refusing clients"),
    );
}
