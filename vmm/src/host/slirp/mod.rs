//! QEMU's user-mode network (`--net user`) on Debian's libslirp: the same engine as QEMU's
//! `-netdev user`, so DHCP, DNS forwarding, `restrict=on` and the forwards behave as there.
//!
//! libslirp is not thread-safe, so each network gets a thread of its own that owns the
//! `Slirp` and runs a `poll()` loop over slirp's sockets, the frames the NIC transmits (one
//! end of a [`channel`]) and a wake-up eventfd for requests (add or remove a forward, stop).
//! Frames slirp sends to the guest go into the channel's other direction.

mod callbacks;
mod ffi;
mod relay;

pub use relay::relay;

use std::ffi::{CStr, CString};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::raw::{c_char, c_int};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use callbacks::{add_poll, get_revents, Callbacks, CALLBACKS};
use virtio::net::channel;
use vmm_sys_util::eventfd::EventFd;

use crate::config::net::{GuestFwdTarget, HostFwd, UserNet};

#[derive(Debug, thiserror::Error)]
pub enum SlirpError {
    #[error("--net user: libslirp refused the network configuration")]
    Refused,
    #[error("--net user: hostfwd={0}: cannot listen there (the port is taken, or not allowed)")]
    HostFwd(String),
    #[error("--net user: guestfwd to {0}: libslirp refused it (the address must be inside the network, once)")]
    GuestFwd(String),
    #[error("--net user: hostfwd_remove {0}: no such forward")]
    NoSuchForward(String),
    #[error("--net user: a text with a NUL byte: {0:?}")]
    Nul(String),
    #[error("--net user: cannot start the network thread: {0}")]
    Thread(std::io::Error),
    #[error("--net user: the network thread has ended")]
    Gone,
}

enum Request {
    AddHostFwd(HostFwd, Sender<Result<(), SlirpError>>),
    RemoveHostFwd(HostFwd, Sender<Result<(), SlirpError>>),
    Stop,
}

/// A running user-mode network. Dropping it stops the thread and closes every forward.
pub struct UserNetwork {
    requests: Sender<Request>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    /// The end the NIC uses.
    nic_end: channel::End,
}

impl UserNetwork {
    /// Starts the network described by `config`, with its forwards in place. Fails (naming
    /// the forward) when libslirp rejects the configuration or a forward.
    pub fn start(config: &UserNet) -> Result<UserNetwork, SlirpError> {
        let (nic_end, slirp_end) = channel::pair().map_err(SlirpError::Thread)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(SlirpError::Thread)?;
        let thread_wake = wake.try_clone().map_err(SlirpError::Thread)?;
        let (requests, request_rx) = mpsc::channel();
        let (started_tx, started_rx) = mpsc::channel();
        let config = config.clone();
        let thread = std::thread::Builder::new()
            .name("slirp".into())
            .spawn(move || {
                let network = match Network::new(&config, slirp_end) {
                    Ok(network) => network,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                network.run(&thread_wake, &request_rx);
            })
            .map_err(SlirpError::Thread)?;
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(SlirpError::Gone),
        }
        Ok(UserNetwork {
            requests,
            wake,
            thread: Some(thread),
            nic_end,
        })
    }

    /// The NIC's end of the network (each VM of a run gets a clone).
    pub fn nic_end(&self) -> channel::End {
        self.nic_end.clone()
    }

    fn ask(
        &self,
        make: impl FnOnce(Sender<Result<(), SlirpError>>) -> Request,
    ) -> Result<(), SlirpError> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(make(reply))
            .map_err(|_| SlirpError::Gone)?;
        let _ = self.wake.write(1);
        answer.recv().map_err(|_| SlirpError::Gone)?
    }

    /// Adds a forward while the VM runs (HMP's `hostfwd_add`).
    pub fn add_hostfwd(&self, forward: &HostFwd) -> Result<(), SlirpError> {
        self.ask(|reply| Request::AddHostFwd(forward.clone(), reply))
    }

    /// Removes a forward (HMP's `hostfwd_remove`); only protocol, address and port count.
    pub fn remove_hostfwd(&self, forward: &HostFwd) -> Result<(), SlirpError> {
        self.ask(|reply| Request::RemoveHostFwd(forward.clone(), reply))
    }
}

impl Drop for UserNetwork {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Stop);
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The version of the libslirp nixvmm runs on.
pub fn version() -> String {
    // SAFETY: libslirp returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::slirp_version_string()) }
        .to_string_lossy()
        .into_owned()
}

/// The slirp instance and what it owns, living on the network's thread.
struct Network {
    slirp: *mut ffi::Slirp,
    callbacks: Box<Callbacks>,
    /// Kept alive for slirp, which keeps pointers to them.
    _strings: Vec<CString>,
    _dnssearch: Vec<*const c_char>,
}

fn in_addr(addr: Ipv4Addr) -> libc::in_addr {
    libc::in_addr {
        s_addr: u32::from(addr).to_be(),
    }
}

fn in6_addr(addr: std::net::Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: addr.octets(),
    }
}

fn cstring(text: &str) -> Result<CString, SlirpError> {
    CString::new(text).map_err(|_| SlirpError::Nul(text.to_string()))
}

impl Network {
    fn new(config: &UserNet, guest: channel::End) -> Result<Network, SlirpError> {
        let mut strings = Vec::new();
        let mut keep = |text: &Option<String>| -> Result<*const c_char, SlirpError> {
            match text {
                None => Ok(std::ptr::null()),
                Some(t) => {
                    let c = cstring(t)?;
                    let p = c.as_ptr();
                    strings.push(c);
                    Ok(p)
                }
            }
        };
        let hostname = keep(&config.hostname)?;
        let domainname = keep(&config.domainname)?;
        let mut dnssearch = Vec::new();
        for domain in &config.dnssearch {
            dnssearch.push(keep(&Some(domain.clone()))?);
        }
        let dnssearch_ptr = if dnssearch.is_empty() {
            std::ptr::null()
        } else {
            dnssearch.push(std::ptr::null());
            dnssearch.as_ptr()
        };
        let mask = u32::MAX << (32 - config.prefix_len);
        let cfg = ffi::SlirpConfig {
            version: ffi::SLIRP_CONFIG_VERSION,
            restricted: c_int::from(config.restrict),
            in_enabled: config.ipv4,
            vnetwork: in_addr(config.net),
            vnetmask: in_addr(Ipv4Addr::from(mask)),
            vhost: in_addr(config.host),
            in6_enabled: config.ipv6,
            vprefix_addr6: in6_addr(config.ipv6_prefix),
            vprefix_len: config.ipv6_prefix_len,
            vhost6: in6_addr(config.ipv6_host),
            vhostname: hostname,
            tftp_server_name: std::ptr::null(),
            tftp_path: std::ptr::null(),
            bootfile: std::ptr::null(),
            vdhcp_start: in_addr(config.dhcp_start),
            vnameserver: in_addr(config.dns),
            vnameserver6: in6_addr(config.ipv6_dns),
            vdnssearch: dnssearch_ptr,
            vdomainname: domainname,
            if_mtu: 0,
            if_mru: 0,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: std::ptr::null_mut(),
            outbound_addr6: std::ptr::null_mut(),
            disable_dns: false,
            disable_dhcp: false,
        };
        let mut callbacks = Box::new(Callbacks {
            guest,
            started: Instant::now(),
            timers: Vec::new(),
        });
        let opaque: *mut Callbacks = &mut *callbacks;
        // SAFETY: `cfg` and the strings it points to live across the call (slirp copies what
        // it keeps; the strings stay alive in `Network` anyway); CALLBACKS is static;
        // `opaque` points to the boxed Callbacks, which `Network` owns for slirp's lifetime.
        let slirp = unsafe { ffi::slirp_new(&cfg, &CALLBACKS, opaque.cast()) };
        if slirp.is_null() {
            return Err(SlirpError::Refused);
        }
        let network = Network {
            slirp,
            callbacks,
            _strings: strings,
            _dnssearch: dnssearch,
        };
        for forward in &config.hostfwd {
            network.add_hostfwd(forward)?;
        }
        for forward in &config.guestfwd {
            let command = cstring(&guestfwd_command(&forward.target)?)?;
            let mut addr = in_addr(forward.addr.unwrap_or(Ipv4Addr::UNSPECIFIED));
            // SAFETY: a live Slirp owned by this thread, a NUL-terminated command and an
            // in_addr slirp may fill in; slirp copies the command.
            let rc = unsafe {
                ffi::slirp_add_exec(
                    network.slirp,
                    command.as_ptr(),
                    &mut addr,
                    c_int::from(forward.port),
                )
            };
            if rc < 0 {
                return Err(SlirpError::GuestFwd(format!(
                    "{}:{}",
                    forward.addr.map_or("(default)".into(), |a| a.to_string()),
                    forward.port
                )));
            }
        }
        Ok(network)
    }

    fn add_hostfwd(&self, f: &HostFwd) -> Result<(), SlirpError> {
        // SAFETY: a live Slirp owned by this thread; plain values.
        let rc = unsafe {
            ffi::slirp_add_hostfwd(
                self.slirp,
                c_int::from(f.udp),
                in_addr(f.host_addr),
                c_int::from(f.host_port),
                in_addr(f.guest_addr.unwrap_or(Ipv4Addr::UNSPECIFIED)),
                c_int::from(f.guest_port),
            )
        };
        if rc < 0 {
            return Err(SlirpError::HostFwd(hostfwd_text(f)));
        }
        Ok(())
    }

    fn remove_hostfwd(&self, f: &HostFwd) -> Result<(), SlirpError> {
        // SAFETY: a live Slirp owned by this thread; plain values.
        let rc = unsafe {
            ffi::slirp_remove_hostfwd(
                self.slirp,
                c_int::from(f.udp),
                in_addr(f.host_addr),
                c_int::from(f.host_port),
            )
        };
        if rc < 0 {
            return Err(SlirpError::NoSuchForward(hostfwd_text(f)));
        }
        Ok(())
    }

    /// Serves the network until asked to stop.
    fn run(mut self, wake: &EventFd, requests: &Receiver<Request>) {
        let own = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            fds.clear();
            fds.push(own(wake.as_raw_fd()));
            fds.push(own(self.callbacks.guest.ready_fd()));
            let mut timeout: u32 = u32::MAX;
            // SAFETY: a live Slirp; `add_poll` only pushes onto the Vec `fds` points to,
            // which outlives the call.
            unsafe {
                ffi::slirp_pollfds_fill(
                    self.slirp,
                    &mut timeout,
                    add_poll,
                    (&mut fds as *mut Vec<libc::pollfd>).cast(),
                )
            };
            let timeout = self.next_timer_in(timeout);
            // SAFETY: `fds` is a live, correctly sized array of pollfd.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            let error = ready < 0
                && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted;
            // SAFETY: a live Slirp; `get_revents` only reads the Vec `fds` points to.
            unsafe {
                ffi::slirp_pollfds_poll(
                    self.slirp,
                    c_int::from(error),
                    get_revents,
                    (&mut fds as *mut Vec<libc::pollfd>).cast(),
                )
            };
            self.fire_timers();
            while let Some(frame) = self.callbacks.guest.recv() {
                if frame.len() <= c_int::MAX as usize {
                    // SAFETY: a live Slirp and a frame buffer that outlives the call.
                    unsafe { ffi::slirp_input(self.slirp, frame.as_ptr(), frame.len() as c_int) };
                }
            }
            if fds[0].revents != 0 {
                let _ = wake.read();
                while let Ok(request) = requests.try_recv() {
                    match request {
                        Request::AddHostFwd(f, reply) => {
                            let _ = reply.send(self.add_hostfwd(&f));
                        }
                        Request::RemoveHostFwd(f, reply) => {
                            let _ = reply.send(self.remove_hostfwd(&f));
                        }
                        Request::Stop => return,
                    }
                }
            }
        }
    }

    /// The poll timeout in ms: slirp's, shortened to the next timer.
    fn next_timer_in(&self, slirp_timeout: u32) -> c_int {
        let now = self.callbacks.now_ms();
        let mut timeout = if slirp_timeout == u32::MAX {
            -1
        } else {
            i64::from(slirp_timeout)
        };
        for timer in &self.callbacks.timers {
            // SAFETY: every pointer in `timers` is a live Box made by timer_new*, removed
            // from the list before it is freed.
            if let Some(expire) = unsafe { (**timer).expire_ms } {
                let wait = (expire - now).max(0);
                if timeout < 0 || wait < timeout {
                    timeout = wait;
                }
            }
        }
        timeout.min(i64::from(c_int::MAX)) as c_int
    }

    fn fire_timers(&mut self) {
        let now = self.callbacks.now_ms();
        let mut due = Vec::new();
        for timer in &self.callbacks.timers {
            // SAFETY: as in next_timer_in.
            let t = unsafe { &mut **timer };
            if t.expire_ms.is_some_and(|e| e <= now) {
                t.expire_ms = None;
                due.push((t.id, t.callback, t.cb_opaque));
            }
        }
        for (id, callback, cb_opaque) in due {
            match callback {
                // SAFETY: the callback and its argument are what slirp gave timer_new.
                Some(callback) => unsafe { callback(cb_opaque) },
                // SAFETY: a live Slirp; the id and argument slirp gave timer_new_opaque.
                None => unsafe { ffi::slirp_handle_timer(self.slirp, id, cb_opaque) },
            }
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // SAFETY: the Slirp is live and dropped once; slirp frees its timers through
        // timer_free while `callbacks` is still alive.
        unsafe { ffi::slirp_cleanup(self.slirp) };
        for timer in self.callbacks.timers.drain(..) {
            // SAFETY: a Box made by timer_new* that slirp did not free.
            drop(unsafe { Box::from_raw(timer) });
        }
    }
}

/// The command libslirp runs per guest connection: the user's, or `nixvmm relay` for a TCP
/// target (through the running binary, quoted for slirp's shell-style argument parsing).
fn guestfwd_command(target: &GuestFwdTarget) -> Result<String, SlirpError> {
    match target {
        GuestFwdTarget::Command(command) => Ok(command.clone()),
        GuestFwdTarget::Tcp { host, port } => {
            let exe = std::env::current_exe().map_err(SlirpError::Thread)?;
            let exe = exe.to_string_lossy().replace('\'', "'\\''");
            Ok(format!("'{exe}' relay {host}:{port}"))
        }
    }
}

fn hostfwd_text(f: &HostFwd) -> String {
    format!(
        "{}:{}:{}-{}:{}",
        if f.udp { "udp" } else { "tcp" },
        f.host_addr,
        f.host_port,
        f.guest_addr.map_or(String::new(), |a| a.to_string()),
        f.guest_port
    )
}

#[cfg(test)]
mod tests;
