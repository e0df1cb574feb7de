//! The host side of nixvmm's own vsock device: guest connections as Unix-socket streams, with
//! Firecracker's protocol (its `vsock.md`), which vhost-device-vsock speaks too.
//!
//! - A host program connects to the socket at `uds` and writes `CONNECT PORT\n`; the muxer
//!   asks the guest for a connection to PORT (REQUEST) and, once the guest answers, writes
//!   `OK HOSTPORT\n` back; after that the stream carries the connection's bytes. A refused
//!   connection closes the stream.
//! - A guest connection to the host (CID 2) port P is connected to the Unix socket `uds_P`;
//!   nothing listening there refuses the guest (RST).
//!
//! Flow control is virtio-vsock's credit: the guest may have at most [`BUF_ALLOC`] bytes
//! unforwarded to a host stream (they wait in the connection's buffer when the host program
//! reads slowly), and the muxer reads a host stream only while the guest has room
//! (`buf_alloc - (sent - fwd_cnt)`). The muxer has its own epoll set (the listener, the
//! streams, a wake eventfd): the device's worker waits on that one fd.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use devices::host_listener::{out_of_descriptors, SpareFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

pub const HOST_CID: u64 = 2;
pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// How many bytes of one connection the muxer buffers for a slow host program: the credit
/// the guest gets.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Connections at once; more are refused (RST) and said once in the log.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets (RST, RESPONSE, credit updates, …) waiting for the guest's receive
/// buffers; a guest that sends without taking them gets no more past this.
pub const MAX_CONTROL_BACKLOG: usize = 4 * MAX_CONNECTIONS;
/// Host programs that connected but have not yet written their `CONNECT PORT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// The longest `CONNECT PORT\n` line.
const MAX_HANDSHAKE_LINE: usize = 32;
/// Read from a host stream at most this much at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Host ports the muxer gives host-initiated connections, from here up.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// How long a host program may take to write its `CONNECT PORT` line before it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer a host program's connection request before the
/// program is closed and the guest gets RST (Firecracker's timeout).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Epoll tokens: the listener, the wake eventfd, the timeouts' timer, then one per stream
/// (see `sources`).
const LISTENER: u64 = 0;
const WAKE: u64 = 1;
const TIMER: u64 = 2;
const FIRST_STREAM_TOKEN: u64 = 3;

/// A virtio-vsock packet header, as the muxer sees it (virtio 1.2, 5.10.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// A connection by (host port, guest port).
type Key = (u32, u32);

/// What an epoll token stands for.
#[derive(Clone, Copy, Debug)]
enum Source {
    Handshake,
    Connection(Key),
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: the guest has not answered the REQUEST yet.
    Requested,
    Established,
}

struct Connection {
    stream: UnixStream,
    state: State,
    /// When a host-initiated connection the guest has not answered is given up.
    deadline: Option<Instant>,
    /// Guest bytes the host program has not taken yet.
    to_host: VecDeque<u8>,
    /// Bytes of the guest forwarded to the host program, and the count last told the guest.
    fwd_cnt: u32,
    told_fwd_cnt: u32,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    rx_cnt: u32,
    /// Read from the host stream, not yet in a guest buffer.
    staged: Vec<u8>,
    /// The stream may have more to read (epoll said so, no EAGAIN since).
    readable: bool,
    /// The host program closed its side (or it failed); a SHUTDOWN went to the guest.
    host_done: bool,
    /// The guest will send no more: shut the stream's write side once `to_host` is out.
    guest_done: bool,
    /// The epoll interest registered now, and under which token; `watched` is false once
    /// the stream left the epoll set for good (its host program closed it: a hang-up would
    /// otherwise be reported at every wait until the guest resets the connection).
    interest: EventSet,
    token: u64,
    watched: bool,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Connection {
        Connection {
            stream,
            deadline: (state == State::Requested).then(|| Instant::now() + REQUEST_TIMEOUT),
            state,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            told_fwd_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            staged: Vec::new(),
            readable: false,
            host_done: false,
            guest_done: false,
            interest: EventSet::empty(),
            token: 0,
            watched: true,
        }
    }

    /// How many more bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wanted_interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let room = self.peer_credit() as usize > self.staged.len();
        if self.state == State::Established && !self.host_done && room && !self.readable {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Writes what the stream takes of `to_host`; returns the bytes written.
    fn flush(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    written += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        if self.to_host.is_empty() && self.guest_done {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(written)
    }
}

/// A host program that connected to `uds` and is writing its `CONNECT PORT` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    /// When the program is closed if its line is not complete.
    deadline: Instant,
}

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    spare: SpareFd,
    said_no_fds: AtomicBool,
    epoll: Epoll,
    wake: EventFd,
    /// Fires at the earliest deadline of a handshake or an unanswered request (`armed`).
    timer: TimerFd,
    armed: Option<Instant>,
    handshakes: HashMap<u64, Handshake>,
    sources: HashMap<u64, Source>,
    next_token: u64,
    connections: HashMap<Key, Connection>,
    /// Packets without data waiting for a guest buffer, in order.
    control: VecDeque<Header>,
    next_host_port: u32,
    /// Keys of connections that may have data for the guest, round-robin.
    ready: VecDeque<Key>,
    said_full: bool,
    said_backlog: bool,
}

impl Muxer {
    /// Listens on `uds` for host programs; a stale socket file there is replaced.
    pub fn new(guest_cid: u64, uds: &Path) -> io::Result<Muxer> {
        if std::fs::symlink_metadata(uds).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(uds)?;
        }
        let listener = UnixListener::bind(uds)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", uds.display())))?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        Ok(Muxer {
            guest_cid,
            uds: uds.to_path_buf(),
            listener,
            spare: SpareFd::default(),
            said_no_fds: AtomicBool::new(false),
            epoll,
            wake,
            timer,
            armed: None,
            handshakes: HashMap::new(),
            sources: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            connections: HashMap::new(),
            control: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            ready: VecDeque::new(),
            said_full: false,
            said_backlog: false,
        })
    }

    /// The one fd the device's worker waits on: readable when anything here needs handling.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Drops every connection and handshake (the driver reset the device).
    pub fn reset(&mut self) {
        for (_, c) in self.connections.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        for (_, h) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                h.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.control.clear();
        self.ready.clear();
        self.sources.clear();
        // The timer is left as it is (a reset comes from a vCPU, which may not set timers):
        // firing with nothing left to time out, it is disarmed by the worker.
    }

    fn new_token(&mut self, source: Source) -> u64 {
        let token = self.next_token;
        self.next_token = self.next_token.checked_add(1).unwrap_or(FIRST_STREAM_TOKEN);
        self.sources.insert(token, source);
        token
    }

    /// Handles what the epoll set reports: new host programs, handshake lines, streams
    /// readable or writable again.
    pub fn poll(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("vsock {}: epoll: {e}", self.uds.display());
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                LISTENER => self.accept(),
                WAKE => {
                    let _ = self.wake.read();
                }
                TIMER => self.expire(),
                t => match self.sources.get(&t) {
                    Some(Source::Handshake) => self.read_handshake(t),
                    Some(Source::Connection(key)) => self.stream_event(*key, event.event_set()),
                    None => {}
                },
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let accepted = self.spare.accept(
                &self.listener,
                &self.said_no_fds,
                &format_args!("vsock {}", self.uds.display()),
            );
            let stream = match accepted {
                Ok(Some(stream)) => stream,
                Ok(None) => continue, // refused: out of descriptors
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // Said already (no spare to refuse with).
                Err(e) if out_of_descriptors(&e) => return,
                Err(e) => {
                    log::warn!("vsock {}: accept: {e}", self.uds.display());
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES || stream.set_nonblocking(true).is_err() {
                continue; // dropped: closed
            }
            let t = self.new_token(Source::Handshake);
            let add = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, t),
            );
            if add.is_ok() {
                self.handshakes.insert(
                    t,
                    Handshake {
                        stream,
                        line: Vec::new(),
                        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                    },
                );
                self.arm_for(Instant::now() + HANDSHAKE_TIMEOUT);
            } else {
                self.sources.remove(&t);
            }
        }
    }

    fn read_handshake(&mut self, t: u64) {
        let Some(h) = self.handshakes.get_mut(&t) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match h.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&h.line),
                Ok(1) if h.line.len() < MAX_HANDSHAKE_LINE => h.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                _ => break None, // EOF, an error or a line too long
            }
        };
        let Some(h) = self.remove_handshake(t) else {
            return;
        };
        let Some(port) = port else {
            return; // closed: not the protocol
        };
        if !self.room_for_one_more() {
            return;
        }
        let key = (self.free_host_port(port), port);
        let conn = Connection::new(h.stream, State::Requested);
        let deadline = conn.deadline;
        self.add_connection(key, conn);
        self.send(key, OP_REQUEST, 0);
        if let Some(deadline) = deadline {
            self.arm_for(deadline);
        }
    }

    /// Has the timer fire by `deadline` (the deadlines come in order: the one armed is the
    /// earliest unless none is).
    fn arm_for(&mut self, deadline: Instant) {
        if self.armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.armed = Some(deadline),
            Err(e) => log::warn!("vsock {}: cannot arm a timer: {e}", self.uds.display()),
        }
    }

    /// Closes the handshakes and unanswered requests whose time is up (the guest gets RST
    /// for the requests) and arms the timer for the next deadline.
    fn expire(&mut self) {
        // Setting the timer again below (or disarming it) also clears its expiry: no read,
        // which would block on a timer set again meanwhile.
        self.armed = None;
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in late {
            self.remove_handshake(t); // its stream closes
        }
        let late: Vec<Key> = self
            .connections
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            self.reset_connection(key);
        }
        let next = (self.handshakes.values().map(|h| h.deadline))
            .chain(self.connections.values().filter_map(|c| c.deadline))
            .min();
        match next {
            Some(next) => self.arm_for(next),
            None => {
                let _ = self.timer.reset(Duration::ZERO, None);
            }
        }
    }

    /// Forgets handshake `t`: it leaves the epoll set and its token; the caller has its
    /// stream (dropped: closed).
    fn remove_handshake(&mut self, t: u64) -> Option<Handshake> {
        let h = self.handshakes.remove(&t)?;
        self.sources.remove(&t);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            h.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(h)
    }

    fn room_for_one_more(&mut self) -> bool {
        if self.connections.len() < MAX_CONNECTIONS {
            return true;
        }
        if !self.said_full {
            log::warn!(
                "vsock {}: {MAX_CONNECTIONS} connections open (MAX_CONNECTIONS); refusing more",
                self.uds.display()
            );
            self.said_full = true;
        }
        false
    }

    fn free_host_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.connections.contains_key(&(port, guest_port)) {
                return port;
            }
        }
    }

    fn add_connection(&mut self, key: Key, mut conn: Connection) {
        conn.interest = EventSet::empty();
        conn.token = self.new_token(Source::Connection(key));
        let add = self.epoll.ctl(
            ControlOperation::Add,
            conn.stream.as_raw_fd(),
            EpollEvent::new(EventSet::empty(), conn.token),
        );
        if add.is_ok() {
            self.connections.insert(key, conn);
        } else {
            self.sources.remove(&conn.token);
        }
    }

    /// Forgets a connection (its stream closes).
    fn remove_connection(&mut self, key: Key) {
        if let Some(conn) = self.connections.remove(&key) {
            self.sources.remove(&conn.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn stream_event(&mut self, key: Key, events: EventSet) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        let hung_up = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if hung_up && conn.state == State::Requested {
            // The host program left before the guest answered: the guest forgets it too.
            self.reset_connection(key);
            return;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            conn.readable = true;
            if !self.ready.contains(&key) {
                self.ready.push_back(key);
            }
        }
        if events.contains(EventSet::OUT) {
            self.forward_to_host(key);
        }
        self.update_interest(key);
    }

    /// Re-registers what the epoll set watches of a connection, when that changed.
    fn update_interest(&mut self, key: Key) {
        let Some(conn) = self.connections.get_mut(&key).filter(|c| c.watched) else {
            return;
        };
        let wanted = conn.wanted_interest();
        if wanted != conn.interest {
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                conn.stream.as_raw_fd(),
                EpollEvent::new(wanted, conn.token),
            );
            conn.interest = wanted;
        }
    }

    fn forward_to_host(&mut self, key: Key) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        match conn.flush() {
            Ok(_) => {
                let untold = conn.fwd_cnt.wrapping_sub(conn.told_fwd_cnt);
                if untold > 0 && (conn.to_host.is_empty() || untold >= BUF_ALLOC / 4) {
                    self.send(key, OP_CREDIT_UPDATE, 0);
                }
            }
            Err(_) => self.reset_connection(key),
        }
    }

    /// Closes a connection and tells the guest (RST).
    fn reset_connection(&mut self, key: Key) {
        self.remove_connection(key);
        self.queue_control(self.header(key, OP_RST, 0, None));
    }

    fn header(&self, key: Key, op: u16, flags: u32, conn: Option<&Connection>) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: if conn.is_some() { BUF_ALLOC } else { 0 },
            fwd_cnt: conn.map_or(0, |c| c.fwd_cnt),
        }
    }

    /// Queues a control packet for the guest. A connection's packet replaces one of the same
    /// kind still waiting (the guest needs only the latest credit update). Past
    /// [`MAX_CONTROL_BACKLOG`] (a guest that sends without taking what it is answered) a
    /// packet is dropped, said once, and a connection whose packet it was is closed on the
    /// host's side (the guest gets RST for it later, or times it out).
    fn queue_control(&mut self, header: Header) {
        let key = (header.src_port, header.dst_port);
        if header.op != OP_RST {
            let same =
                |h: &&mut Header| (h.src_port, h.dst_port, h.op) == (key.0, key.1, header.op);
            if let Some(waiting) = self.control.iter_mut().find(same) {
                *waiting = header;
                return;
            }
        }
        if self.control.len() < MAX_CONTROL_BACKLOG {
            self.control.push_back(header);
            return;
        }
        if !self.said_backlog {
            log::warn!(
                "vsock {}: {MAX_CONTROL_BACKLOG} control packets wait for the guest \
                 (MAX_CONTROL_BACKLOG); dropping more",
                self.uds.display()
            );
            self.said_backlog = true;
        }
        if header.op != OP_RST {
            self.remove_connection(key);
        }
    }

    /// Queues a control packet of connection `key` for the guest.
    fn send(&mut self, key: Key, op: u16, flags: u32) {
        let header = self.header(key, op, flags, self.connections.get(&key));
        if let Some(conn) = self.connections.get_mut(&key) {
            conn.told_fwd_cnt = conn.fwd_cnt;
        }
        self.queue_control(header);
    }

    /// A packet from the guest's transmit queue, with its data.
    pub fn from_guest(&mut self, h: &Header, data: &[u8]) {
        if h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            return; // not ours to answer: dropped
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_control(self.header(key, OP_RST, 0, None));
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connects(key, h);
        } else if let Some(conn) = self.connections.get_mut(&key) {
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
            self.established_packet(key, h, data);
        } else if h.op != OP_RST {
            self.queue_control(self.header(key, OP_RST, 0, None));
        }
        self.update_interest(key);
        if !self.ready.contains(&key) && self.connections.get(&key).is_some_and(|c| c.readable) {
            self.ready.push_back(key);
        }
    }

    fn guest_connects(&mut self, key: Key, h: &Header) {
        if self.connections.contains_key(&key) || !self.room_for_one_more() {
            self.queue_control(self.header(key, OP_RST, 0, None));
            return;
        }
        let path = format!("{}_{}", self.uds.display(), key.0);
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        match stream {
            Ok(stream) => {
                let mut conn = Connection::new(stream, State::Established);
                conn.peer_buf_alloc = h.buf_alloc;
                conn.peer_fwd_cnt = h.fwd_cnt;
                self.add_connection(key, conn);
                self.send(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                log::debug!("vsock: guest port {} → {path}: {e}", key.1);
                self.queue_control(self.header(key, OP_RST, 0, None));
            }
        }
    }

    fn established_packet(&mut self, key: Key, h: &Header, data: &[u8]) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        match (h.op, &conn.state) {
            (OP_RESPONSE, State::Requested) => {
                conn.state = State::Established;
                conn.deadline = None;
                // A fresh stream's buffer takes these few bytes at once.
                let ok = format!("OK {}\n", key.0);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_connection(key);
                }
            }
            (OP_RW, State::Established) => {
                if conn.to_host.len() + data.len() > BUF_ALLOC as usize {
                    // The guest sent past its credit.
                    self.reset_connection(key);
                    return;
                }
                conn.to_host.extend(data);
                self.forward_to_host(key);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => self.send(key, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, _)
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND =>
            {
                let _ = conn.flush();
                self.reset_connection(key);
            }
            (OP_SHUTDOWN, _) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_done = true;
                    let _ = conn.flush();
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    conn.host_done = true;
                }
            }
            (OP_RST, _) => self.remove_connection(key),
            _ => self.reset_connection(key),
        }
    }

    /// Whether a packet is waiting for a guest receive buffer. Reads from the streams that
    /// are ready (what is read waits in the connection), so that the answer is exact.
    pub fn has_packets(&mut self) -> bool {
        while self.control.is_empty() {
            let Some(&key) = self.ready.front() else {
                return false;
            };
            if self.stage(key) {
                return true;
            }
            self.ready.pop_front();
        }
        true
    }

    /// The next packet for the guest, its data at most `room` bytes; `None` when there is
    /// none. Control packets go first, then connections' data in turn.
    pub fn next_for_guest(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if !self.has_packets() {
            return None;
        }
        if let Some(h) = self.control.pop_front() {
            return Some((h, Vec::new()));
        }
        let key = self.ready.pop_front()?;
        let conn = self.connections.get_mut(&key)?;
        let n = conn.staged.len().min(room).min(conn.peer_credit() as usize);
        if n == 0 {
            self.ready.push_front(key);
            return None;
        }
        let data: Vec<u8> = conn.staged.drain(..n).collect();
        conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
        conn.told_fwd_cnt = conn.fwd_cnt;
        if !conn.staged.is_empty() || conn.readable {
            self.ready.push_back(key);
        }
        let mut header = self.header(key, OP_RW, 0, self.connections.get(&key));
        header.len = n as u32;
        self.update_interest(key);
        Some((header, data))
    }

    /// Whether connection `key` has data the guest can take now, reading some from its
    /// stream if none is waiting. A stream at its end queues a SHUTDOWN instead.
    fn stage(&mut self, key: Key) -> bool {
        let Some(conn) = self.connections.get_mut(&key) else {
            return false;
        };
        let credit = conn.peer_credit() as usize;
        if conn.state != State::Established || credit == 0 {
            return false;
        }
        if !conn.staged.is_empty() {
            return true;
        }
        if !conn.readable || conn.host_done {
            return false;
        }
        let mut chunk = vec![0u8; credit.min(READ_CHUNK)];
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                conn.host_done = true;
                conn.readable = false;
                conn.watched = false;
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.send(key, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND);
            }
            Ok(n) => {
                chunk.truncate(n);
                conn.staged = chunk;
                return true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => return self.stage(key),
            Err(_) => self.reset_connection(key),
        }
        self.update_interest(key);
        false
    }

    /// Makes the epoll fd readable, so the worker comes back to deliver queued packets.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// `CONNECT PORT` (Firecracker's handshake line, without its newline).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.trim_end_matches('\r')
        .strip_prefix("CONNECT ")?
        .trim()
        .parse()
        .ok()
}
