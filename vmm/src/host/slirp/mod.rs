//! QEMU's user-mode network (`--net user`) on Debian's libslirp: the same engine as QEMU's
//! `-netdev user`, so DHCP, DNS forwarding, `restrict=on` and the forwards behave as there.
//!
//! The NIC's own worker thread runs slirp, as QEMU's main loop does: the NIC's backend
//! ([`UserNic`]) feeds transmitted frames to `slirp_input` and, when it has no frame for the
//! guest, lets slirp serve its sockets and timers for one step. The worker waits on one epoll
//! fd ([`engine::Engine`]) holding slirp's sockets, a timerfd for slirp's timeouts and an
//! eventfd that is readable while frames wait or a step is due. libslirp is not thread-safe:
//! the engine sits behind a mutex, so one thread at a time calls into it (the NIC's worker, or
//! the control plane adding a forward). No frame is served while no VM has the NIC active
//! (before the driver starts it, between reboots); forwarded ports stay bound meanwhile.

mod callbacks;
mod engine;
mod ffi;
mod relay;

pub use relay::{relay, MAX_GUESTFWD_CONNECTIONS};

use std::ffi::{CStr, CString};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::os::raw::{c_char, c_int};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use callbacks::{Callbacks, CALLBACKS};
use devices::bus::lock;
use engine::Engine;

use crate::config::net::{netmask, GuestFwd, GuestFwdTarget, HostFwd, UserNet};

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
    #[error("--net user: cannot set up the network: {0}")]
    Setup(std::io::Error),
}

/// A user-mode network and its forwards, for the whole run.
pub struct UserNetwork {
    engine: Arc<Mutex<Engine>>,
}

impl UserNetwork {
    /// Starts the network described by `config`, with its forwards in place. Fails (naming
    /// the forward) when libslirp rejects the configuration or a forward.
    pub fn start(config: &UserNet) -> Result<UserNetwork, SlirpError> {
        let network = Network::new(config)?;
        let engine = Engine::new(network).map_err(SlirpError::Setup)?;
        Ok(UserNetwork {
            engine: Arc::new(Mutex::new(engine)),
        })
    }

    /// What one VM's NIC sends into and receives from.
    pub fn backend(&self) -> UserNic {
        let fd = lock(&self.engine).fd();
        UserNic {
            engine: self.engine.clone(),
            fd,
        }
    }

    /// Adds a forward while the VM runs (HMP's `hostfwd_add`).
    pub fn add_hostfwd(&self, forward: &HostFwd) -> Result<(), SlirpError> {
        lock(&self.engine).change(|network| network.add_hostfwd(forward))
    }

    /// Removes a forward (HMP's `hostfwd_remove`); only protocol, address and port count.
    pub fn remove_hostfwd(&self, forward: &HostFwd) -> Result<(), SlirpError> {
        lock(&self.engine).change(|network| network.remove_hostfwd(forward))
    }
}

/// A NIC's way into the user network.
pub struct UserNic {
    engine: Arc<Mutex<Engine>>,
    fd: RawFd,
}

impl virtio::net::Backend for UserNic {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn recv(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        Ok(lock(&self.engine).next_frame())
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        lock(&self.engine).input(frame);
        Ok(())
    }
}

/// The version of the libslirp nixvmm runs on.
pub fn version() -> String {
    // SAFETY: libslirp returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(ffi::slirp_version_string()) }
        .to_string_lossy()
        .into_owned()
}

/// The slirp instance and what it owns.
struct Network {
    slirp: *mut ffi::Slirp,
    callbacks: Box<Callbacks>,
    /// Kept alive for slirp, which keeps pointers to them.
    _strings: Vec<CString>,
    _dnssearch: Vec<*const c_char>,
    /// The guestfwd programs' connection slots (see `relay`), removed with the network.
    slots: Option<tempfile::TempDir>,
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
    fn new(config: &UserNet) -> Result<Network, SlirpError> {
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
        let cfg = ffi::SlirpConfig {
            version: ffi::SLIRP_CONFIG_VERSION,
            restricted: c_int::from(config.restrict),
            in_enabled: config.ipv4,
            vnetwork: in_addr(config.net),
            vnetmask: in_addr(netmask(config.prefix_len)),
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
        // Made before slirp, whose error paths would otherwise have to free it.
        let slots = match config.guestfwd.is_empty() {
            true => None,
            false => Some(
                tempfile::Builder::new()
                    .prefix("nixvmm-guestfwd-")
                    .tempdir()
                    .map_err(SlirpError::Setup)?,
            ),
        };
        let mut callbacks = Box::new(Callbacks {
            guest: std::collections::VecDeque::new(),
            started: Instant::now(),
            timers: Vec::new(),
            sockets: Default::default(),
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
            slots,
        };
        for forward in &config.hostfwd {
            network.add_hostfwd(forward)?;
        }
        // The slots are made above whenever there is a guestfwd.
        if let Some(slots) = &network.slots {
            for forward in &config.guestfwd {
                network.add_guestfwd(forward, slots.path())?;
            }
        }
        Ok(network)
    }

    /// Has slirp run `nixvmm relay` (see [`guestfwd_command`]) per guest connection to the
    /// forward's address and port.
    fn add_guestfwd(&self, forward: &GuestFwd, slots: &std::path::Path) -> Result<(), SlirpError> {
        let command = cstring(&guestfwd_command(&forward.target, slots)?)?;
        let mut addr = in_addr(forward.addr.unwrap_or(Ipv4Addr::UNSPECIFIED));
        // SAFETY: a live Slirp owned by this Network, a NUL-terminated command and an
        // in_addr slirp may fill in; slirp copies the command.
        let rc = unsafe {
            ffi::slirp_add_exec(
                self.slirp,
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
        Ok(())
    }

    fn add_hostfwd(&self, f: &HostFwd) -> Result<(), SlirpError> {
        // SAFETY: a live Slirp owned by this Network; plain values.
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
        // SAFETY: a live Slirp owned by this Network; plain values.
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

    /// The sockets slirp wants watched, into `fds`; returns slirp's timeout in ms
    /// (`u32::MAX`: none).
    fn fill(&mut self, fds: &mut Vec<libc::pollfd>) -> u32 {
        fds.clear();
        let mut timeout: u32 = u32::MAX;
        // SAFETY: a live Slirp; `add_poll` only pushes onto the Vec `fds` points to, which
        // outlives the call.
        unsafe {
            ffi::slirp_pollfds_fill(
                self.slirp,
                &mut timeout,
                callbacks::add_poll,
                (fds as *mut Vec<libc::pollfd>).cast(),
            )
        };
        timeout
    }

    /// Lets slirp serve the sockets whose `revents` are set.
    fn serve(&mut self, fds: &mut Vec<libc::pollfd>, error: bool) {
        // SAFETY: a live Slirp; `get_revents` only reads the Vec `fds` points to.
        unsafe {
            ffi::slirp_pollfds_poll(
                self.slirp,
                c_int::from(error),
                callbacks::get_revents,
                (fds as *mut Vec<libc::pollfd>).cast(),
            )
        };
    }

    /// Hands slirp one frame from the guest.
    fn input(&mut self, frame: &[u8]) {
        if frame.len() <= c_int::MAX as usize {
            // SAFETY: a live Slirp and a frame buffer that outlives the call.
            unsafe { ffi::slirp_input(self.slirp, frame.as_ptr(), frame.len() as c_int) };
        }
    }

    /// The wait in ms (-1: none): slirp's timeout, shortened to the next timer.
    fn next_timer_in(&self, slirp_timeout: u32) -> i64 {
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
        timeout
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

/// The command libslirp runs per guest connection: `nixvmm relay` (through the running
/// binary, quoted for slirp's shell-style argument parsing), which takes one of the
/// network's connection slots in `slots` and then copies to a TCP target or runs the user's
/// command (whose words slirp splits as it would have).
fn guestfwd_command(
    target: &GuestFwdTarget,
    slots: &std::path::Path,
) -> Result<String, SlirpError> {
    let quote = |text: &str| format!("'{}'", text.replace('\'', "'\\''"));
    let exe = std::env::current_exe().map_err(SlirpError::Setup)?;
    let relay = format!(
        "{} relay --slots {}",
        quote(&exe.to_string_lossy()),
        quote(&slots.to_string_lossy())
    );
    Ok(match target {
        GuestFwdTarget::Command(command) => format!("{relay} --exec {command}"),
        GuestFwdTarget::Tcp { host, port } => format!("{relay} {host}:{port}"),
    })
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
