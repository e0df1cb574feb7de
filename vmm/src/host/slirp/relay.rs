//! `nixvmm relay --slots DIR HOST:PORT | --exec PROGRAM…` (hidden): what a guestfwd runs per
//! guest connection. libslirp starts it with the guest's connection as stdin and stdout.
//! It first takes one of the network's [`MAX_GUESTFWD_CONNECTIONS`] slots (a lock on a file
//! in DIR, held until it exits): a guest cannot make the host run a process per connection
//! without end. Without a free slot it ends at once, which closes the guest's connection,
//! and the first such refusal is said on stderr. With a slot it connects to HOST:PORT
//! (`guestfwd=…-tcp:`) and copies both ways until both sides are done, or runs the user's
//! program (`guestfwd=…-cmd:`), which keeps the slot.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;

/// Guest connections through one network's guestfwds at once.
pub const MAX_GUESTFWD_CONNECTIONS: usize = 64;

/// Runs one guest connection's relay: `target` is HOST:PORT, or with `exec` a program and
/// its arguments.
pub fn relay(slots: &Path, exec: bool, target: &[String]) -> std::io::Result<()> {
    let Some(slot) = take_slot(slots)? else {
        return Ok(());
    };
    let Some((first, rest)) = target.split_first() else {
        return Err(std::io::Error::other("nothing to relay to"));
    };
    if !exec {
        return copy_both_ways(first);
    }
    // The program keeps the slot: its lock goes with the descriptor across exec.
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(&slot, FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
    Err(std::process::Command::new(first).args(rest).exec())
}

/// Locks a free slot file in `dir`; `None` when all are taken.
fn take_slot(dir: &Path) -> std::io::Result<Option<File>> {
    for n in 0..MAX_GUESTFWD_CONNECTIONS {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("slot-{n}")))?;
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(e),
        }
    }
    // Said by the first relay that finds no room: it makes the marker.
    let marker = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(dir.join("said-full"));
    if marker.is_ok() {
        let _ = writeln!(
            std::io::stderr(),
            "nixvmm: warn: guestfwd: {MAX_GUESTFWD_CONNECTIONS} guest connections at once \
             (MAX_GUESTFWD_CONNECTIONS); closing further ones"
        );
    }
    Ok(None)
}

/// Copies stdin to a new connection to `address` and the connection to stdout.
fn copy_both_ways(address: &str) -> std::io::Result<()> {
    let stream = TcpStream::connect(address)?;
    let mut to_target = stream.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let copied = std::io::copy(&mut std::io::stdin().lock(), &mut to_target);
        let _ = to_target.shutdown(Shutdown::Write);
        copied
    });
    let mut from_target = stream;
    let mut buf = [0u8; 16 << 10];
    let mut stdout = std::io::stdout().lock();
    loop {
        let n = from_target.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(stdout);
    // The guest's side may still be sending; its end closes stdin, which ends the copy.
    let _ = upstream.join();
    Ok(())
}
