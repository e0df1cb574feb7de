//! Chardevs: the host side of virtio-console ports, as QEMU's `-chardev socket|file|null`.
//! A chardev is made once per run and outlives guest reboots (the NixOS test driver keeps its
//! shell connection across `reboot()`); each VM's console model gets a handle.
//!
//! Every chardev waits through an epoll set of its own, whose descriptor is the one the
//! device's worker watches: it holds the listening socket while no peer is connected, and the
//! peer's connection with the events the port wants (input when the guest has room, output
//! room when output waits), so a stable descriptor covers peers that come and go.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use virtio::console::PortBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::config::console::ChardevSpec;

const LISTENER: u64 = 0;
const PEER: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    #[error("-chardev socket,path={path}: cannot connect: {source} (start the peer listening first, or give server=on)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("-chardev socket,path={path},server=on: cannot listen: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("-chardev file,path={path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a chardev: {0}")]
    Io(#[from] std::io::Error),
}

enum Kind {
    /// A socket: the peer we connected to, or a listener and its current peer.
    Socket {
        listener: Option<UnixListener>,
        peer: Option<UnixStream>,
        /// The socket path nixvmm created (removed again at the end).
        bound: Option<PathBuf>,
    },
    File(std::fs::File),
    Null,
}

struct State {
    kind: Kind,
    epoll: Epoll,
    interest: (bool, bool),
    /// Whether the peer is registered in `epoll`.
    peer_watched: bool,
    listener_watched: bool,
}

/// A chardev, shared by the console models of one run.
#[derive(Clone)]
pub struct Chardev(Arc<Mutex<State>>);

impl Chardev {
    pub fn open(spec: &ChardevSpec) -> Result<Chardev, ChardevError> {
        let kind = match spec {
            ChardevSpec::SocketClient { path } => Kind::Socket {
                listener: None,
                peer: Some(
                    UnixStream::connect(path).map_err(|source| ChardevError::Connect {
                        path: path.clone(),
                        source,
                    })?,
                ),
                bound: None,
            },
            ChardevSpec::SocketServer { path, wait } => {
                let listen = |source| ChardevError::Listen {
                    path: path.clone(),
                    source,
                };
                let listener = listen_replacing(path).map_err(listen)?;
                let peer = if *wait {
                    log::warn!(
                        "waiting for a connection on {} (-chardev socket,server=on,wait=on)",
                        path.display()
                    );
                    Some(listener.accept().map_err(listen)?.0)
                } else {
                    None
                };
                Kind::Socket {
                    listener: Some(listener),
                    peer,
                    bound: Some(path.clone()),
                }
            }
            ChardevSpec::File { path } => Kind::File(std::fs::File::create(path).map_err(
                |source| ChardevError::File {
                    path: path.clone(),
                    source,
                },
            )?),
            ChardevSpec::Null => Kind::Null,
        };
        let mut state = State {
            kind,
            epoll: Epoll::new()?,
            interest: (true, false),
            peer_watched: false,
            listener_watched: false,
        };
        if let Kind::Socket { listener, peer, .. } = &state.kind {
            if let Some(listener) = listener {
                listener.set_nonblocking(true)?;
            }
            if let Some(peer) = peer {
                peer.set_nonblocking(true)?;
            }
        }
        state.watch();
        Ok(Chardev(Arc::new(Mutex::new(state))))
    }

    /// A handle for one VM's console model.
    pub fn backend(&self) -> Box<dyn PortBackend> {
        Box::new(self.clone())
    }
}

/// Listens on the Unix socket `path`. As in QEMU, a socket left behind by an earlier run is
/// replaced; any other file there is an error, never removed.
pub fn listen_replacing(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is there; remove it or choose another path",
            ))
        }
        Err(_) => {}
    }
    UnixListener::bind(path)
}

impl State {
    /// Brings the epoll set in line with the state: the listener while no peer is there,
    /// the peer with the wanted events (a hang-up is always reported).
    fn watch(&mut self) {
        let Kind::Socket { listener, peer, .. } = &self.kind else {
            return;
        };
        let mut events = EventSet::READ_HANG_UP;
        if self.interest.0 {
            events |= EventSet::IN;
        }
        if self.interest.1 {
            events |= EventSet::OUT;
        }
        let result = match peer {
            Some(peer) => {
                let op = if self.peer_watched {
                    ControlOperation::Modify
                } else {
                    ControlOperation::Add
                };
                self.peer_watched = true;
                self.epoll
                    .ctl(op, peer.as_raw_fd(), EpollEvent::new(events, PEER))
            }
            None => Ok(()),
        };
        if let Err(e) = result {
            log::error!("a chardev cannot watch its peer: {e}");
        }
        if let Some(listener) = listener {
            let want = peer.is_none();
            if want != self.listener_watched {
                let op = if want {
                    ControlOperation::Add
                } else {
                    ControlOperation::Delete
                };
                let event = EpollEvent::new(EventSet::IN, LISTENER);
                match self.epoll.ctl(op, listener.as_raw_fd(), event) {
                    Ok(()) => self.listener_watched = want,
                    Err(e) => log::error!("a chardev cannot watch its listener: {e}"),
                }
            }
        }
    }

    fn drop_peer(&mut self) {
        if let Kind::Socket { peer, .. } = &mut self.kind {
            if let Some(gone) = peer.take() {
                if self.peer_watched {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        gone.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
                self.peer_watched = false;
            }
        }
        self.watch();
    }
}

impl PortBackend for Chardev {
    fn fd(&self) -> RawFd {
        lock(&self.0).epoll.as_raw_fd()
    }

    fn set_interest(&mut self, input: bool, output: bool) {
        let mut state = lock(&self.0);
        if state.interest != (input, output) {
            state.interest = (input, output);
            state.watch();
        }
    }

    fn poll(&mut self) {
        let mut state = lock(&self.0);
        let mut events = [EpollEvent::default(); 2];
        let ready = match state.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("a chardev's epoll: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            match event.data() {
                LISTENER => {
                    let accepted = match &state.kind {
                        Kind::Socket {
                            listener: Some(listener),
                            ..
                        } => listener.accept(),
                        _ => continue,
                    };
                    match accepted.and_then(|(peer, _)| peer.set_nonblocking(true).map(|()| peer)) {
                        Ok(new) => {
                            if let Kind::Socket { peer, .. } = &mut state.kind {
                                *peer = Some(new);
                            }
                            state.watch();
                        }
                        Err(e) => log::debug!("a chardev could not accept: {e}"),
                    }
                }
                _ => {
                    let set = event.event_set();
                    let gone = set.intersects(EventSet::HANG_UP | EventSet::ERROR)
                        || (set.contains(EventSet::READ_HANG_UP) && !state.interest.0);
                    if gone {
                        state.drop_peer();
                    }
                }
            }
        }
    }

    fn connected(&self) -> bool {
        match &lock(&self.0).kind {
            Kind::Socket { peer, .. } => peer.is_some(),
            Kind::File(_) | Kind::Null => true,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut state = lock(&self.0);
        let Kind::Socket {
            peer: Some(peer), ..
        } = &mut state.kind
        else {
            return Ok(0);
        };
        match peer.read(buf) {
            Ok(0) => {
                state.drop_peer();
                Ok(0)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => {
                state.drop_peer();
                Err(e)
            }
            Ok(n) => Ok(n),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = lock(&self.0);
        let result = match &mut state.kind {
            Kind::Socket {
                peer: Some(peer), ..
            } => peer.write(buf),
            Kind::Socket { peer: None, .. } | Kind::Null => Ok(buf.len()),
            Kind::File(file) => file.write(buf),
        };
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => {
                state.drop_peer();
                Err(e)
            }
            ok => ok,
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if let Kind::Socket {
            bound: Some(path), ..
        } = &self.kind
        {
            let _ = std::fs::remove_file(Path::new(path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_socket_replaces_a_stale_socket_but_no_other_file() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp");
        drop(UnixListener::bind(&socket).unwrap());
        assert!(
            listen_replacing(&socket).is_ok(),
            "a stale socket is replaced"
        );
        let file = dir.path().join("notes.txt");
        std::fs::write(&file, "keep me").unwrap();
        let err = listen_replacing(&file).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }
}
