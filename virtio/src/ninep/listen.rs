//! The 9p server on a socket, which Linux's own 9p client mounts with `trans=unix` or
//! `trans=tcp`: messages framed by their size field, one server state per connection.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::server::{Server, ShareConfig, MAX_MSIZE};
use crate::{descriptor_budget, MIN_DESCRIPTOR_BUDGET};

/// Serves one connection until it closes or sends something that is not a 9p message. The
/// share's descriptor budget is split between the [`MAX_CONNECTIONS`] a listener serves (but
/// never below [`MIN_DESCRIPTOR_BUDGET`]).
pub fn serve_connection<S: Read + Write>(
    mut stream: S,
    config: ShareConfig,
) -> std::io::Result<()> {
    let budget = (descriptor_budget() / MAX_CONNECTIONS).max(MIN_DESCRIPTOR_BUDGET);
    let mut server = Server::with_budget(config, budget)?;
    loop {
        let mut size = [0u8; 4];
        match stream.read_exact(&mut size) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let size = u32::from_le_bytes(size);
        if !(7..=MAX_MSIZE).contains(&size) {
            return Err(std::io::Error::other(format!("a {size}-byte 9p message")));
        }
        let mut message = size.to_le_bytes().to_vec();
        message.resize(size as usize, 0);
        stream.read_exact(&mut message[4..])?;
        stream.write_all(&server.handle(&message))?;
    }
}

/// Where to listen: `unix:PATH` or `tcp:HOST:PORT`.
pub enum Address {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Address, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            Ok(Address::Unix(path.into()))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            Ok(Address::Tcp(addr.into()))
        } else {
            Err(format!("--listen {s}: give unix:PATH or tcp:HOST:PORT"))
        }
    }
}

/// Connections served at once; more are closed as they come (said once).
pub const MAX_CONNECTIONS: usize = 16;

/// Accepts connections forever, each served on its own thread, at most [`MAX_CONNECTIONS`]
/// at once. A failing accept (out of descriptors) is said once and tried again shortly.
pub fn listen(address: &Address, config: &ShareConfig) -> std::io::Result<()> {
    let mut accept: Box<dyn FnMut() -> std::io::Result<Box<dyn ReadWrite>>> = match address {
        Address::Unix(path) => {
            let listener = UnixListener::bind(path)?;
            Box::new(move || Ok(Box::new(listener.accept()?.0)))
        }
        Address::Tcp(addr) => {
            let listener = TcpListener::bind(addr)?;
            Box::new(move || Ok(Box::new(listener.accept()?.0)))
        }
    };
    let serving = Arc::new(AtomicUsize::new(0));
    let (mut said_full, mut said_accept) = (false, false);
    loop {
        let stream = match accept() {
            Ok(stream) => stream,
            Err(e) => {
                if !std::mem::replace(&mut said_accept, true) {
                    log::warn!("9p: cannot accept a connection: {e}; trying again");
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if serving.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            if !std::mem::replace(&mut said_full, true) {
                log::warn!(
                    "9p: {MAX_CONNECTIONS} connections at once (MAX_CONNECTIONS); closing more"
                );
            }
            continue;
        }
        let slot = Slot::take(&serving);
        let config = config.clone();
        let spawned = std::thread::Builder::new().spawn(move || {
            let _slot = slot;
            if let Err(e) = serve_connection(stream, config) {
                log::warn!("9p connection ended: {e}");
            }
        });
        if let Err(e) = spawned {
            log::warn!("9p: cannot start a thread for a connection: {e}");
        }
    }
}

/// One of the connections being served, counted in `serving` until it is dropped (also when
/// its thread panics or cannot be started).
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(serving: &Arc<AtomicUsize>) -> Slot {
        serving.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(serving))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connected stream of either kind.
pub trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}
