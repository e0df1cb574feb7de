//! Chardevs: the host side of virtio-console ports, as QEMU's `-chardev
//! socket|file|null|pipe|pty|stdio`.
//! A chardev is made once per run and outlives guest reboots (the NixOS test driver keeps its
//! shell connection across `reboot()`); each VM's console model gets a handle.
//!
//! Every chardev waits through an epoll set of its own, whose descriptor is the one the
//! device's worker watches: it holds the listening socket while no peer is connected, and the
//! peer's connection with the events the port wants (input when the guest has room, output
//! room when output waits), so a stable descriptor covers peers that come and go. A client
//! socket with `reconnect` also holds a timer there while its peer is away. Pipes, a pty and
//! stdio are a pair of descriptors (input, output) watched the same way.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::host_listener::SpareFd;
use virtio::console::PortBackend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::config::console::ChardevSpec;

/// Whether a listening chardev ran out of file descriptors (said once per run).
static SAID_NO_FDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

const LISTENER: u64 = 0;
const PEER: u64 = 1;
const OUTPUT: u64 = 2;
const RECONNECT: u64 = 3;

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
    #[error(
        "-chardev pipe,path={path}: {source} (make the FIFOs {path}.in and {path}.out, or {path})"
    )]
    Pipe {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("-chardev pty: {0}")]
    Pty(std::io::Error),
    #[error("a chardev: {0}")]
    Io(#[from] std::io::Error),
}

enum Kind {
    /// A socket: the peer we connected to, or a listener and its current peer.
    Socket {
        listener: Option<(UnixListener, SpareFd)>,
        peer: Option<UnixStream>,
        /// The socket path nixvmm created (removed again at the end).
        bound: Option<PathBuf>,
        /// A client that reconnects: where to, and the timer that ticks while away.
        reconnect: Option<(PathBuf, TimerFd, std::time::Duration)>,
    },
    File(std::fs::File),
    Null,
    /// Input and output descriptors (a pipe's FIFOs, a pty's master twice, stdin and
    /// stdout). `input` goes once it ends; `_keep` holds a pty's slave open, so the master
    /// never reports a hang-up while no program has the terminal open.
    Fds {
        input: Option<std::fs::File>,
        output: std::fs::File,
        _keep: Option<std::fs::File>,
    },
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
            ChardevSpec::SocketClient { path, reconnect } => {
                let peer = match (UnixStream::connect(path), reconnect) {
                    (Ok(peer), _) => Some(peer),
                    (Err(e), Some(_)) => {
                        log::info!("{}: {e}; trying again", path.display());
                        None
                    }
                    (Err(source), None) => {
                        return Err(ChardevError::Connect {
                            path: path.clone(),
                            source,
                        })
                    }
                };
                let reconnect = match reconnect {
                    Some(interval) => {
                        let mut timer = TimerFd::new().map_err(sys)?;
                        timer.reset(*interval, Some(*interval)).map_err(sys)?;
                        if peer.is_some() {
                            timer.clear().map_err(sys)?;
                        }
                        Some((path.clone(), timer, *interval))
                    }
                    None => None,
                };
                Kind::Socket {
                    listener: None,
                    peer,
                    bound: None,
                    reconnect,
                }
            }
            ChardevSpec::Pipe { path } => open_pipe(path)?,
            ChardevSpec::Pty => open_pty()?,
            ChardevSpec::Stdio => Kind::Fds {
                input: Some(dup_nonblocking(libc::STDIN_FILENO)?),
                output: dup_nonblocking(libc::STDOUT_FILENO)?,
                _keep: None,
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
                    listener: Some((listener, SpareFd::default())),
                    peer,
                    bound: Some(path.clone()),
                    reconnect: None,
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
        if let Kind::Socket {
            listener,
            peer,
            reconnect,
            ..
        } = &state.kind
        {
            if let Some((listener, _)) = listener {
                listener.set_nonblocking(true)?;
            }
            if let Some(peer) = peer {
                peer.set_nonblocking(true)?;
            }
            if let Some((_, timer, _)) = reconnect {
                state.epoll.ctl(
                    ControlOperation::Add,
                    timer.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, RECONNECT),
                )?;
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

/// Starts a reconnecting client's timer again (it was cleared while connected).
fn rearm(timer: &mut TimerFd, interval: std::time::Duration) -> std::io::Result<()> {
    timer.reset(interval, Some(interval)).map_err(sys)
}

/// vmm-sys-util's errno as an I/O error.
fn sys(e: vmm_sys_util::errno::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// A duplicate of `fd`, non-blocking, closed on exec.
pub(crate) fn dup_nonblocking(fd: RawFd) -> std::io::Result<std::fs::File> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor for an open one and touches no memory;
    // the result is checked before it is owned.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just made and is owned by nobody else.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(new) };
    set_nonblocking(&file)?;
    Ok(file)
}

fn set_nonblocking(file: &std::fs::File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on the same descriptor, with an int argument; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// QEMU's pipe chardev: `PATH.in` and `PATH.out`, else `PATH` both ways. FIFOs are opened
/// read-write, so that opening does not wait for a peer and a peer that leaves is no
/// end of input.
fn open_pipe(path: &Path) -> Result<Kind, ChardevError> {
    let failed = |source| ChardevError::Pipe {
        path: path.to_path_buf(),
        source,
    };
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .and_then(|f| set_nonblocking(&f).map(|()| f))
    };
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let (input, output) = match (open(&with(".in")), open(&with(".out"))) {
        (Ok(input), Ok(output)) => (input, output),
        _ => {
            let both = open(path).map_err(failed)?;
            (both.try_clone().map_err(failed)?, both)
        }
    };
    Ok(Kind::Fds {
        input: Some(input),
        output,
        _keep: None,
    })
}

/// A new pseudo-terminal, named on stderr as QEMU does ("char device redirected to …").
fn open_pty() -> Result<Kind, ChardevError> {
    let mut master: RawFd = -1;
    let mut slave: RawFd = -1;
    // SAFETY: openpty writes the two descriptors it opens into the two ints; the name,
    // termios and window-size pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ChardevError::Pty(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    let (master, slave) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let name = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))
        .map_err(ChardevError::Pty)?;
    raw_mode(&slave);
    eprintln!("char device redirected to {} (nixvmm)", name.display());
    set_nonblocking(&master).map_err(ChardevError::Pty)?;
    Ok(Kind::Fds {
        input: Some(master.try_clone().map_err(ChardevError::Pty)?),
        output: master,
        _keep: Some(slave),
    })
}

/// Raw mode on a pty's slave: bytes pass as the guest wrote them (no echo, no newline
/// translation), as QEMU sets up its ptys.
fn raw_mode(slave: &std::fs::File) {
    // SAFETY: tcgetattr fills the termios it is given; cfmakeraw and tcsetattr read it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
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
        if let Kind::Fds { input, output, .. } = &self.kind {
            let input_events = if self.interest.0 {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            let output_events = if self.interest.1 {
                EventSet::OUT
            } else {
                EventSet::empty()
            };
            let watched = self.peer_watched;
            let op = move || {
                if watched {
                    ControlOperation::Modify
                } else {
                    ControlOperation::Add
                }
            };
            let mut result = self.epoll.ctl(
                op(),
                output.as_raw_fd(),
                EpollEvent::new(output_events, OUTPUT),
            );
            if let Some(input) = input {
                result = result.and(self.epoll.ctl(
                    op(),
                    input.as_raw_fd(),
                    EpollEvent::new(input_events, PEER),
                ));
            }
            if let Err(e) = result {
                log::debug!("a chardev cannot watch its descriptors: {e}");
            }
            self.peer_watched = true;
            return;
        }
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
        if let Some((listener, _)) = listener {
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
        match &mut self.kind {
            Kind::Socket {
                peer, reconnect, ..
            } => {
                if let Some(gone) = peer.take() {
                    if self.peer_watched {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            gone.as_raw_fd(),
                            EpollEvent::default(),
                        );
                    }
                    self.peer_watched = false;
                    if let Some((path, timer, interval)) = reconnect {
                        log::info!("{}: the peer left; reconnecting", path.display());
                        let _ = rearm(timer, *interval);
                    }
                }
            }
            // Input that ended (stdin at its end, say) is not watched again.
            Kind::Fds { input, .. } => {
                if let Some(gone) = input.take() {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        gone.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
            }
            Kind::File(_) | Kind::Null => {}
        }
        self.watch();
    }

    /// A reconnecting client's timer ticked: tries its socket once more.
    fn reconnect(&mut self) {
        let Kind::Socket {
            peer,
            reconnect: Some((path, timer, _)),
            ..
        } = &mut self.kind
        else {
            return;
        };
        let _ = timer.wait();
        if peer.is_some() {
            return;
        }
        match UnixStream::connect(&*path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                log::info!("{}: connected again", path.display());
                *peer = Some(stream);
                let _ = timer.clear();
                self.watch();
            }
            Err(e) => log::debug!("{}: {e}", path.display()),
        }
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
                RECONNECT => state.reconnect(),
                OUTPUT => {
                    // An output with no reader left (stdout closed) would be reported on
                    // every wait: it is watched no more, and writes to it fail.
                    if event
                        .event_set()
                        .intersects(EventSet::HANG_UP | EventSet::ERROR)
                    {
                        if let Kind::Fds { output, .. } = &state.kind {
                            let fd = output.as_raw_fd();
                            let _ = state.epoll.ctl(
                                ControlOperation::Delete,
                                fd,
                                EpollEvent::default(),
                            );
                        }
                    }
                }
                LISTENER => {
                    let accepted = match &mut state.kind {
                        Kind::Socket {
                            listener: Some((listener, spare)),
                            ..
                        } => spare.accept(listener, &SAID_NO_FDS, &"a chardev"),
                        _ => continue,
                    };
                    let ready = |peer: UnixStream| peer.set_nonblocking(true).map(|()| peer);
                    match accepted.and_then(|peer| peer.map(ready).transpose()) {
                        Ok(None) => {} // refused: out of descriptors
                        Ok(Some(new)) => {
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
            Kind::File(_) | Kind::Null | Kind::Fds { .. } => true,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut state = lock(&self.0);
        let result = match &mut state.kind {
            Kind::Socket {
                peer: Some(peer), ..
            } => peer.read(buf),
            Kind::Fds {
                input: Some(input), ..
            } => input.read(buf),
            _ => return Ok(0),
        };
        match result {
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
            Kind::Fds { output, .. } => output.write(buf),
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

    /// Polls `port` until `done` holds (or 5 s pass).
    fn poll_until(
        port: &mut Box<dyn PortBackend>,
        mut done: impl FnMut(&mut Box<dyn PortBackend>) -> bool,
    ) -> bool {
        for _ in 0..500 {
            port.poll();
            if done(port) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    }

    fn read_all(port: &mut Box<dyn PortBackend>, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        poll_until(port, |p| {
            let mut buf = [0u8; 64];
            if let Ok(n) = p.read(&mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            got.len() >= want
        });
        got
    }

    #[test]
    fn a_client_with_reconnect_comes_back_to_a_new_peer_and_waits_for_a_late_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shell");
        // Nothing listens yet: with reconnect that is no error.
        let spec = ChardevSpec::SocketClient {
            path: path.clone(),
            reconnect: Some(std::time::Duration::from_millis(50)),
        };
        let mut port = Chardev::open(&spec).unwrap().backend();
        assert!(!port.connected());
        let listener = UnixListener::bind(&path).unwrap();
        assert!(
            poll_until(&mut port, |p| p.connected()),
            "connected once it listens"
        );
        let (mut first, _) = listener.accept().unwrap();
        assert_eq!(port.write(b"one").unwrap(), 3);
        let mut buf = [0u8; 3];
        first.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"one");
        drop(first);
        assert!(poll_until(&mut port, |p| {
            let _ = p.read(&mut [0u8; 8]);
            !p.connected()
        }));
        assert!(poll_until(&mut port, |p| p.connected()), "reconnected");
        let (mut second, _) = listener.accept().unwrap();
        second.write_all(b"two").unwrap();
        assert_eq!(read_all(&mut port, 3), b"two");
        // Without reconnect, a missing peer is an error naming the socket.
        let err = Chardev::open(&ChardevSpec::SocketClient {
            path: dir.path().join("none"),
            reconnect: None,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("cannot connect"), "{err}");
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_pipe_chardev_reads_path_in_and_writes_path_out() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("port");
        mkfifo(&dir.path().join("port.in"));
        mkfifo(&dir.path().join("port.out"));
        let mut port = Chardev::open(&ChardevSpec::Pipe { path: base })
            .unwrap()
            .backend();
        assert!(port.connected());
        let mut out = std::fs::File::open(dir.path().join("port.out")).unwrap();
        assert_eq!(port.write(b"to host").unwrap(), 7);
        let mut buf = [0u8; 7];
        out.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to host");
        let mut input = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("port.in"))
            .unwrap();
        input.write_all(b"to guest").unwrap();
        assert_eq!(read_all(&mut port, 8), b"to guest");
        let err = Chardev::open(&ChardevSpec::Pipe {
            path: dir.path().join("missing"),
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("make the FIFOs"), "{err}");
    }

    #[test]
    fn a_pty_chardev_is_a_raw_terminal_both_ways() {
        let chardev = Chardev::open(&ChardevSpec::Pty).unwrap();
        let slave_name = {
            let state = lock(&chardev.0);
            let Kind::Fds {
                _keep: Some(slave), ..
            } = &state.kind
            else {
                panic!("a pty keeps its slave");
            };
            std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd())).unwrap()
        };
        let mut port = chardev.backend();
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&slave_name)
            .unwrap();
        assert_eq!(port.write(b"a\nb").unwrap(), 3);
        let mut buf = [0u8; 3];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"a\nb", "no newline translation");
        slave.write_all(b"typed\n").unwrap();
        assert_eq!(read_all(&mut port, 6), b"typed\n");
    }
}
