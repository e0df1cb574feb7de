//! The callbacks libslirp calls (frames to the guest, the clock, timers, poll sets) and
//! the state they reach through slirp's opaque pointer. They run only inside the slirp calls
//! the engine makes, under the engine's lock.

use std::collections::{HashSet, VecDeque};
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::time::Instant;

use super::ffi;

/// A timer libslirp made (it uses one, for IPv6 router advertisements).
pub(super) struct Timer {
    pub id: ffi::SlirpTimerId,
    pub callback: Option<ffi::SlirpTimerCb>,
    pub cb_opaque: *mut c_void,
    pub expire_ms: Option<i64>,
}

/// Frames slirp sent that the guest has not taken, at most this many (QEMU's net queues hold
/// up to 10000); beyond, frames are dropped as a network does, and TCP retransmits.
pub const GUEST_QUEUE: usize = 4096;

/// What slirp's callbacks reach through their opaque pointer.
pub(super) struct Callbacks {
    /// Frames for the guest, oldest first.
    pub guest: VecDeque<Vec<u8>>,
    pub started: Instant,
    pub timers: Vec<*mut Timer>,
    /// The host sockets slirp has open (it registers each as it makes it and unregisters
    /// it as it closes it).
    pub sockets: HashSet<c_int>,
}

impl Callbacks {
    pub fn now_ms(&self) -> i64 {
        self.started.elapsed().as_millis() as i64
    }
}

pub(super) static CALLBACKS: ffi::SlirpCb = ffi::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    register_poll_fd: Some(register_fd),
    unregister_poll_fd: Some(unregister_fd),
    notify: Some(notify),
    init_completed: None,
    timer_new_opaque: Some(timer_new_opaque),
};

/// # Safety
/// `opaque` is the `Callbacks` given to slirp_new.
unsafe fn callbacks<'a>(opaque: *mut c_void) -> &'a mut Callbacks {
    // SAFETY: the caller's contract; slirp calls back only on the network's thread.
    unsafe { &mut *opaque.cast::<Callbacks>() }
}

unsafe extern "C" fn send_packet(
    buf: *const c_void,
    len: libc::size_t,
    opaque: *mut c_void,
) -> libc::ssize_t {
    // SAFETY: slirp passes a frame of `len` bytes and the opaque of slirp_new.
    let (frame, callbacks) = unsafe {
        (
            std::slice::from_raw_parts(buf.cast::<u8>(), len),
            callbacks(opaque),
        )
    };
    if callbacks.guest.len() < GUEST_QUEUE {
        callbacks.guest.push_back(frame.to_vec());
    }
    len as libc::ssize_t
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    // SAFETY: slirp passes a NUL-terminated message.
    let msg = unsafe { CStr::from_ptr(msg) }.to_string_lossy();
    log::debug!("user network: the guest sent {msg}");
}

unsafe extern "C" fn clock_get_ns(opaque: *mut c_void) -> i64 {
    // SAFETY: the opaque of slirp_new.
    let callbacks = unsafe { callbacks(opaque) };
    callbacks.started.elapsed().as_nanos() as i64
}

fn new_timer(opaque: *mut c_void, timer: Timer) -> *mut c_void {
    let timer = Box::into_raw(Box::new(timer));
    // SAFETY: the opaque of slirp_new.
    unsafe { callbacks(opaque) }.timers.push(timer);
    timer.cast()
}

unsafe extern "C" fn timer_new(
    cb: ffi::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    new_timer(
        opaque,
        Timer {
            id: 0,
            callback: Some(cb),
            cb_opaque,
            expire_ms: None,
        },
    )
}

unsafe extern "C" fn timer_new_opaque(
    id: ffi::SlirpTimerId,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    new_timer(
        opaque,
        Timer {
            id,
            callback: None,
            cb_opaque,
            expire_ms: None,
        },
    )
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    // SAFETY: the opaque of slirp_new.
    let callbacks = unsafe { callbacks(opaque) };
    let timer = timer.cast::<Timer>();
    if let Some(n) = callbacks.timers.iter().position(|t| *t == timer) {
        callbacks.timers.swap_remove(n);
        // SAFETY: a Box made by timer_new*, now out of the list.
        drop(unsafe { Box::from_raw(timer) });
    }
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_ms: i64, opaque: *mut c_void) {
    // SAFETY: the opaque of slirp_new.
    let callbacks = unsafe { callbacks(opaque) };
    let timer = timer.cast::<Timer>();
    if callbacks.timers.contains(&timer) {
        // SAFETY: a live timer from the list.
        unsafe { (*timer).expire_ms = Some(expire_ms) };
    }
}

unsafe extern "C" fn register_fd(fd: c_int, opaque: *mut c_void) {
    // SAFETY: slirp passes the opaque pointer given to slirp_new.
    unsafe { callbacks(opaque) }.sockets.insert(fd);
}

unsafe extern "C" fn unregister_fd(fd: c_int, opaque: *mut c_void) {
    // SAFETY: slirp passes the opaque pointer given to slirp_new.
    unsafe { callbacks(opaque) }.sockets.remove(&fd);
}

/// Nothing to do: slirp calls this for guest forwards with write callbacks
/// (`slirp_add_guestfwd`), which nixvmm does not make; every engine step asks slirp for its
/// sockets again anyway.
unsafe extern "C" fn notify(_opaque: *mut c_void) {}

pub(super) unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: the Vec the loop passed to slirp_pollfds_fill.
    let fds = unsafe { &mut *opaque.cast::<Vec<libc::pollfd>>() };
    let mut wanted = 0;
    for (slirp, poll) in POLL_FLAGS {
        if events & slirp != 0 {
            wanted |= poll;
        }
    }
    fds.push(libc::pollfd {
        fd,
        events: wanted,
        revents: 0,
    });
    (fds.len() - 1) as c_int
}

pub(super) unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    // SAFETY: the Vec the loop passed to slirp_pollfds_poll.
    let fds = unsafe { &*opaque.cast::<Vec<libc::pollfd>>() };
    let Some(fd) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else {
        return 0;
    };
    let mut events = 0;
    for (slirp, poll) in POLL_FLAGS {
        if fd.revents & poll != 0 {
            events |= slirp;
        }
    }
    events
}

const POLL_FLAGS: [(c_int, libc::c_short); 5] = [
    (ffi::SLIRP_POLL_IN, libc::POLLIN),
    (ffi::SLIRP_POLL_OUT, libc::POLLOUT),
    (ffi::SLIRP_POLL_PRI, libc::POLLPRI),
    (ffi::SLIRP_POLL_ERR, libc::POLLERR),
    (ffi::SLIRP_POLL_HUP, libc::POLLHUP),
];
