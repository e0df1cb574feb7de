//! [`Engine`]: a slirp [`Network`] driven from outside, one step at a time, by whoever holds
//! it (the NIC's worker). Its epoll fd is readable when a step has work: a socket slirp
//! watches is ready, slirp's timeout or a timer is due (a timerfd), or frames for the guest
//! wait or a guest frame left work behind (an eventfd).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{Network, SlirpError};

/// Host sockets slirp may hold for one network (the guest's connections and datagram flows,
/// forwards); at the cap, frames that would open another are dropped (said once), as a
/// network that is full drops them: TCP connection requests, UDP datagrams but DHCP's (those
/// of open flows too), ICMP echo requests, IPv4 fragments (slirp reassembles them into any of
/// these), and host forwards accept no more connections. TCP connections already open go on;
/// the guest's retries succeed once some end.
pub const MAX_FLOWS: usize = 4096;

/// Tokens of the engine's own fds in its epoll set (slirp's sockets use their fd + 2).
const WAKE: u64 = 0;
const TIMER: u64 = 1;

pub(super) struct Engine {
    network: Network,
    epoll: Epoll,
    /// Readable while frames wait for the guest or a step is due.
    wake: EventFd,
    wake_signalled: bool,
    step_due: bool,
    timer: File,
    /// slirp's sockets in the epoll set, with the events asked for.
    watched: HashMap<RawFd, EventSet>,
    fds: Vec<libc::pollfd>,
    said_full: bool,
    said_forwards_full: bool,
}

// SAFETY: the raw pointers inside (the Slirp, its timers and strings) are owned by the
// engine and used only through `&mut Engine`, which the mutex around it gives to one thread
// at a time; libslirp keeps no thread-local state, it only must not be called concurrently.
unsafe impl Send for Engine {}

fn timerfd() -> std::io::Result<File> {
    // SAFETY: plain flags; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn events_of(poll: libc::c_short) -> EventSet {
    let mut set = EventSet::empty();
    if poll & libc::POLLIN != 0 {
        set |= EventSet::IN;
    }
    if poll & libc::POLLOUT != 0 {
        set |= EventSet::OUT;
    }
    if poll & libc::POLLPRI != 0 {
        set |= EventSet::PRIORITY;
    }
    set
}

impl Engine {
    pub fn new(network: Network) -> std::io::Result<Engine> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let timer = timerfd()?;
        for (fd, token) in [(wake.as_raw_fd(), WAKE), (timer.as_raw_fd(), TIMER)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let mut engine = Engine {
            network,
            epoll,
            wake,
            wake_signalled: false,
            step_due: true,
            timer,
            watched: HashMap::new(),
            fds: Vec::new(),
            said_full: false,
            said_forwards_full: false,
        };
        engine.update_wake();
        Ok(engine)
    }

    /// The fd to wait on.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// A frame from the guest; one that would open a flow past [`MAX_FLOWS`] is dropped.
    pub fn input(&mut self, frame: &[u8]) {
        if self.network.callbacks.sockets.len() >= MAX_FLOWS && opens_a_flow(frame) {
            if !std::mem::replace(&mut self.said_full, true) {
                log::warn!(
                    "user network: {MAX_FLOWS} connections and flows open (MAX_FLOWS); \
                     dropping the guest's new ones until some end"
                );
            }
            return;
        }
        self.network.input(frame);
        self.step_due = true;
        self.update_wake();
    }

    /// The next frame for the guest; lets slirp serve its sockets and timers first when none
    /// waits.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        if self.network.callbacks.guest.is_empty() {
            self.step();
        }
        let frame = self.network.callbacks.guest.pop_front();
        self.update_wake();
        frame
    }

    /// Changes the network (a forward added or removed) and has the next step watch what
    /// changed.
    pub fn change(
        &mut self,
        f: impl FnOnce(&mut Network) -> Result<(), SlirpError>,
    ) -> Result<(), SlirpError> {
        let result = f(&mut self.network);
        self.step_due = true;
        self.update_wake();
        result
    }

    /// One round of slirp's loop without waiting: serve the ready sockets and due timers,
    /// then watch what slirp wants watched next and arm the timer for its next deadline.
    fn step(&mut self) {
        let mut expirations = [0u8; 8];
        let _ = std::io::Read::read(&mut self.timer, &mut expirations);
        let mut fds = std::mem::take(&mut self.fds);
        self.network.fill(&mut fds);
        self.hold_back_forwards(&mut fds);
        // SAFETY: `fds` is a live, correctly sized array of pollfd; a zero timeout.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        let error =
            ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted;
        self.network.serve(&mut fds, error);
        self.network.fire_timers();
        let timeout = self.network.fill(&mut fds);
        self.hold_back_forwards(&mut fds);
        self.watch(&fds);
        self.arm(self.network.next_timer_in(timeout));
        self.fds = fds;
        self.step_due = false;
    }

    /// At [`MAX_FLOWS`], leaves the TCP forwards' listening sockets unwatched, so slirp
    /// accepts no more host connections: they wait in the kernel's backlog (beyond it the
    /// kernel drops their SYNs and clients retry) until some flow ends. slirp does not
    /// register its listeners (only the sockets of flows), so they are told by asking the
    /// socket.
    fn hold_back_forwards(&mut self, fds: &mut [libc::pollfd]) {
        let callbacks = &self.network.callbacks;
        if callbacks.sockets.len() < MAX_FLOWS {
            return;
        }
        let mut held = false;
        for fd in fds.iter_mut() {
            if !callbacks.sockets.contains(&fd.fd) && is_listening(fd.fd) {
                fd.events = 0;
                held = true;
            }
        }
        if held && !std::mem::replace(&mut self.said_forwards_full, true) {
            log::warn!(
                "user network: {MAX_FLOWS} connections and flows open (MAX_FLOWS); \
                 host forwards accept no more connections until some end"
            );
        }
    }

    /// Makes the epoll set hold exactly the sockets in `fds`, with their events.
    fn watch(&mut self, fds: &[libc::pollfd]) {
        let mut wanted: HashMap<RawFd, EventSet> = HashMap::new();
        for fd in fds {
            *wanted.entry(fd.fd).or_insert(EventSet::empty()) |= events_of(fd.events);
        }
        self.watched.retain(|fd, _| {
            if wanted.contains_key(fd) {
                return true;
            }
            // A socket slirp closed has left the set already; the error is expected then.
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
            false
        });
        for (fd, events) in wanted {
            if self.watched.get(&fd) == Some(&events) {
                continue;
            }
            let event = EpollEvent::new(events, fd as u64 + 2);
            // Modify when known; a number slirp closed and reused is gone from the set, so
            // fall back to Add.
            let done = self.watched.contains_key(&fd)
                && self.epoll.ctl(ControlOperation::Modify, fd, event).is_ok();
            if done || self.epoll.ctl(ControlOperation::Add, fd, event).is_ok() {
                self.watched.insert(fd, events);
            } else {
                log::warn!("user network: cannot watch socket {fd}");
            }
        }
    }

    /// Arms the timerfd `ms` from now (-1: disarms it).
    fn arm(&self, ms: i64) {
        let value = if ms < 0 {
            libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }
        } else {
            // Zero would disarm: a due deadline fires after a nanosecond.
            let ns = (ms.max(0) as u64).saturating_mul(1_000_000).max(1);
            libc::timespec {
                tv_sec: (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            }
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: our timerfd and a valid itimerspec; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut())
        };
        if rc < 0 {
            log::warn!(
                "user network: cannot arm the timer: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Keeps the wake eventfd readable exactly while frames wait or a step is due.
    fn update_wake(&mut self) {
        let wanted = self.step_due || !self.network.callbacks.guest.is_empty();
        if wanted == self.wake_signalled {
            return;
        }
        if wanted {
            let _ = self.wake.write(1);
        } else {
            let _ = self.wake.read();
        }
        self.wake_signalled = wanted;
    }
}

/// Whether `fd` is a listening socket.
fn is_listening(fd: RawFd) -> bool {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `listening` and `len` are valid for the call and sized for SO_ACCEPTCONN's
    // int; a descriptor that is not a socket gives an error, not a write.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        )
    };
    rc == 0 && listening != 0
}

/// Whether a guest's Ethernet frame may make slirp open a host socket: a TCP connection
/// request (SYN without ACK), a UDP datagram other than DHCP's, an ICMP echo request, over
/// IPv4 or IPv6 (slirp takes no extension headers); an IPv4 fragment, which slirp reassembles
/// into any of these.
pub fn opens_a_flow(frame: &[u8]) -> bool {
    const TCP: u8 = 6;
    const UDP: u8 = 17;
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    let (protocol, l4, echo_request, dhcp_port) = match ethertype {
        [0x08, 0x00] => {
            let Some(&version_ihl) = frame.get(14) else {
                return false;
            };
            let fragment = frame
                .get(20..22)
                .map(|f| u16::from_be_bytes([f[0], f[1]]) & 0x3fff);
            if fragment != Some(0) {
                return true; // more fragments, or not the first (or cut short)
            }
            let header = usize::from(version_ihl & 0x0f) * 4;
            (frame.get(23).copied(), 14 + header, (1, 8), 67)
        }
        [0x86, 0xdd] => (frame.get(20).copied(), 14 + 40, (58, 128), 547),
        _ => return false,
    };
    let at = |offset: usize| frame.get(l4 + offset).copied();
    match protocol {
        Some(TCP) => at(13).is_some_and(|flags| flags & 0x02 != 0 && flags & 0x10 == 0),
        Some(UDP) => {
            let port = at(2)
                .zip(at(3))
                .map(|(hi, lo)| u16::from_be_bytes([hi, lo]));
            port.is_some_and(|port| port != dhcp_port)
        }
        Some(icmp) if icmp == echo_request.0 => at(0) == Some(echo_request.1),
        _ => false,
    }
}
