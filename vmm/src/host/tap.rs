//! `--net tap,ifname=NAME` or `--net tap,fd=N`: a NIC on a host tap device, for users who
//! bridge their VMs. Frames carry a virtio-net header (IFF_VNET_HDR, 12 bytes), so checksum
//! and segmentation offloads pass between guest and host kernel untouched. Written by hand
//! (a few ioctls through libc): the tap crates on offer do not set vnet headers or offloads.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use virtio::net::{
    Backend, HEADER_LEN, MAX_GSO_FRAME, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
};

#[derive(Debug, thiserror::Error)]
#[error("--net tap,{what}: {step}: {source}")]
pub struct TapError {
    pub what: String,
    pub step: &'static str,
    pub source: std::io::Error,
}

/// An open tap device, held for the whole run.
pub struct Tap {
    file: File,
    vnet_header: bool,
}

/// `struct ifreq` for TUNSETIFF/TUNGETIFF: a name and the flags.
fn ifreq(name: &str) -> std::io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data (a name and a union of integers and addresses); all
    // zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(std::io::Error::other(format!(
            "`{name}` is not an interface name (at most {} bytes)",
            libc::IFNAMSIZ - 1
        )));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn ioctl_int(file: &File, request: libc::Ioctl, value: &libc::c_int) -> std::io::Result<()> {
    // SAFETY: a tap fd and an ioctl that reads one int through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, value as *const libc::c_int) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens (or creates, with CAP_NET_ADMIN) the tap interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let failed = |step: &'static str| {
            let what = format!("ifname={name}");
            move |source| TapError { what, step, source }
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(failed(
                "cannot open /dev/net/tun (is the tun module loaded?)",
            ))?;
        let mut req = ifreq(name).map_err(failed("bad name"))?;
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: the tun fd and a valid ifreq that TUNSETIFF reads and updates.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF,
                &mut req as *mut libc::ifreq,
            )
        };
        if rc < 0 {
            return Err(failed(
                "cannot attach (create it first with `ip tuntap add NAME mode tap user $USER`, or run with CAP_NET_ADMIN)",
            )(std::io::Error::last_os_error()));
        }
        let tap = Tap {
            file,
            vnet_header: true,
        };
        tap.set_header_size().map_err(failed("TUNSETVNETHDRSZ"))?;
        Ok(tap)
    }

    /// Takes over an open tap fd (inherited from the caller, as QEMU's `fd=`).
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let failed = |step: &'static str| {
            move |source| TapError {
                what: format!("fd={fd}"),
                step,
                source,
            }
        };
        // SAFETY: F_GETFD only asks whether `fd` is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(failed("not an open file descriptor")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: ifreq is plain old data; all zeroes is valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF on an open fd writes the interface's name and flags into `req`
        // (any other fd refuses it). The fd is not owned yet: a wrong number the user gave
        // (stdin, say) stays open.
        let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req as *mut libc::ifreq) };
        if rc < 0 {
            return Err(failed("not a tap device (TUNGETIFF)")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
        if flags & libc::IFF_TAP == 0 {
            return Err(failed("a tun device, not a tap")(std::io::Error::other(
                "IFF_TUN",
            )));
        }
        // SAFETY: `fd` is an open tap, which the user handed to nixvmm to own from now on.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFL with O_NONBLOCK on an open fd.
        unsafe {
            let old = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, old | libc::O_NONBLOCK);
        }
        let tap = Tap {
            file,
            vnet_header: flags & libc::IFF_VNET_HDR != 0,
        };
        if tap.vnet_header {
            tap.set_header_size().map_err(failed("TUNSETVNETHDRSZ"))?;
        }
        Ok(tap)
    }

    fn set_header_size(&self) -> std::io::Result<()> {
        ioctl_int(
            &self.file,
            libc::TUNSETVNETHDRSZ,
            &(HEADER_LEN as libc::c_int),
        )
    }

    /// What one VM's NIC sends into and receives from.
    pub fn backend(&self) -> std::io::Result<Box<dyn Backend>> {
        Ok(Box::new(TapBackend {
            file: self.file.try_clone()?,
            vnet_header: self.vnet_header,
            scratch: vec![0u8; HEADER_LEN + MAX_GSO_FRAME],
        }))
    }
}

struct TapBackend {
    file: File,
    vnet_header: bool,
    scratch: Vec<u8>,
}

impl Backend for TapBackend {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        match std::io::Read::read(&mut self.file, &mut self.scratch) {
            Ok(n) => Ok(Some(self.scratch[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match std::io::Write::write(&mut self.file, frame) {
            Ok(_) => Ok(()),
            // The tap's queue is full (or the interface is down): the frame is dropped.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
            // A malformed frame or header the host kernel refuses (a hostile guest): dropped.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn vnet_header(&self) -> bool {
        self.vnet_header
    }

    fn offloads(&self) -> u64 {
        VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_HOST_ECN
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_GUEST_ECN
    }

    fn set_offloads(&mut self, features: u64) -> std::io::Result<()> {
        if !self.vnet_header {
            return Ok(());
        }
        let mut flags = 0;
        for (feature, tun) in [
            (VIRTIO_NET_F_GUEST_CSUM, libc::TUN_F_CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, libc::TUN_F_TSO_ECN),
        ] {
            if features & feature != 0 {
                flags |= tun;
            }
        }
        // TSO needs checksum offload; a driver that took TSO without GUEST_CSUM gets neither.
        if flags & libc::TUN_F_CSUM == 0 {
            flags = 0;
        }
        // SAFETY: a tap fd; TUNSETOFFLOAD takes the flags by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bad_fds_and_names_are_clear_errors() {
        let err = Tap::from_fd(9999).err().unwrap().to_string();
        assert!(
            err.contains("fd=9999") && err.contains("not an open file descriptor"),
            "{err}"
        );
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(null);
        let err = Tap::from_fd(fd).err().unwrap().to_string();
        assert!(err.contains("not a tap device"), "{err}");
        // SAFETY: F_GETFD only asks whether `fd` is open.
        let still_open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        assert!(
            still_open,
            "a refused fd is not closed: it was never nixvmm's"
        );
        // SAFETY: the test's own fd, closed once.
        unsafe { libc::close(fd) };
        let err = Tap::open("a-name-longer-than-16")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ifname=a-name-longer-than-16"), "{err}");
    }
}
