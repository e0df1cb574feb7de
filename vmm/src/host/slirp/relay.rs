//! `nixvmm relay HOST:PORT` (hidden): what a `guestfwd=…-tcp:HOST:PORT` runs per guest
//! connection. libslirp starts it with the guest's connection as stdin and stdout; it
//! connects to HOST:PORT and copies both ways until both sides are done.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

/// Copies stdin to a new connection to `address` and the connection to stdout.
pub fn relay(address: &str) -> std::io::Result<()> {
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
