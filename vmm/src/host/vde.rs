//! `--net vde,sock=DIR`: a port on a VDE switch (`vde_switch --sock DIR`), as the NixOS test
//! driver joins machines to a VLAN (`-netdev vde,sock=$QEMU_VDE_SOCKET_N`).
//!
//! The protocol is vde_switch's version 3: on a stream connection to `DIR/ctl` the client
//! sends a request (magic 0xfeedface, version 3, "new port", the address of the client's own
//! datagram socket, a description) and the switch answers with the address of the port's
//! datagram socket. Then each Ethernet frame is one datagram; the port lives as long as the
//! control connection. Written here because no crate speaks it; Debian's libvdeplug would
//! add a C dependency and its plugin loader for a ~100-line exchange.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use virtio::net::Backend;

const SWITCH_MAGIC: u32 = 0xfeed_face;
const VERSION: u32 = 3;
const REQ_NEW_CONTROL: u32 = 0;
/// `struct sockaddr_un` on Linux: a 2-byte family and 108 bytes of path.
const SOCKADDR_UN_LEN: usize = 110;
const PATH_LEN: usize = 108;
/// The largest datagram read from the switch (a jumbo frame); larger ones are cut and then
/// dropped by the NIC as oversized.
const MAX_DATAGRAM: usize = 9018;

#[derive(Debug, thiserror::Error)]
#[error("--net vde,sock={}: {what}: {source}", dir.display())]
pub struct VdeError {
    pub dir: PathBuf,
    pub what: String,
    pub source: std::io::Error,
}

/// A port on a switch, held for the whole run.
pub struct VdePort {
    _control: UnixStream,
    data: UnixDatagram,
    switch: PathBuf,
    own_path: PathBuf,
}

fn sockaddr_un(path: &Path) -> std::io::Result<[u8; SOCKADDR_UN_LEN]> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= PATH_LEN {
        return Err(std::io::Error::other(format!(
            "the socket path {} is longer than {} bytes",
            path.display(),
            PATH_LEN - 1
        )));
    }
    let mut addr = [0u8; SOCKADDR_UN_LEN];
    addr[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    addr[2..2 + bytes.len()].copy_from_slice(bytes);
    Ok(addr)
}

impl VdePort {
    /// Asks the switch at `dir` for a new port.
    pub fn connect(dir: &Path) -> Result<VdePort, VdeError> {
        let failed = |what: &str| {
            let dir = dir.to_path_buf();
            let what = what.to_string();
            move |source| VdeError { dir, what, source }
        };
        let mut control = UnixStream::connect(dir.join("ctl")).map_err(failed(
            "cannot connect to its ctl socket (is `vde_switch --sock DIR` running?)",
        ))?;
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let own_path = dir.join(format!(
            ".nixvmm-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&own_path);
        let data =
            UnixDatagram::bind(&own_path).map_err(failed("cannot make the port's data socket"))?;
        let mut request = Vec::with_capacity(12 + SOCKADDR_UN_LEN + 64);
        request.extend_from_slice(&SWITCH_MAGIC.to_ne_bytes());
        request.extend_from_slice(&VERSION.to_ne_bytes());
        request.extend_from_slice(&REQ_NEW_CONTROL.to_ne_bytes());
        request.extend_from_slice(&sockaddr_un(&own_path).map_err(failed("bad data socket path"))?);
        request.extend_from_slice(format!("nixvmm pid {}\0", std::process::id()).as_bytes());
        control
            .write_all(&request)
            .map_err(failed("cannot send the port request"))?;
        let mut reply = [0u8; SOCKADDR_UN_LEN];
        control
            .read_exact(&mut reply)
            .map_err(failed("the switch refused the port (no reply)"))?;
        let path = &reply[2..];
        let end = path.iter().position(|b| *b == 0).unwrap_or(path.len());
        if end == 0 {
            return Err(failed("the switch replied without a socket path")(
                std::io::Error::other("empty path"),
            ));
        }
        let switch = PathBuf::from(std::ffi::OsStr::from_bytes(&path[..end]));
        data.set_nonblocking(true)
            .map_err(failed("cannot make the data socket non-blocking"))?;
        Ok(VdePort {
            _control: control,
            data,
            switch,
            own_path,
        })
    }

    /// What one VM's NIC sends into and receives from.
    pub fn backend(&self) -> std::io::Result<Box<dyn Backend>> {
        Ok(Box::new(VdeBackend {
            data: self.data.try_clone()?,
            switch: self.switch.clone(),
        }))
    }
}

impl Drop for VdePort {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.own_path);
    }
}

struct VdeBackend {
    data: UnixDatagram,
    switch: PathBuf,
}

impl Backend for VdeBackend {
    fn fd(&self) -> RawFd {
        self.data.as_raw_fd()
    }

    fn recv(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        match self.data.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match self.data.send_to(frame, &self.switch) {
            Ok(_) => Ok(()),
            // A busy switch drops the frame, as a network does.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            // The switch went away or restarts: frames are lost until it is back.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    struct Switch(Child);

    impl Drop for Switch {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn start_switch(dir: &Path) -> Switch {
        let child = Command::new("vde_switch")
            .args([
                "--sock",
                dir.to_str().unwrap(),
                "--dirmode",
                "0700",
                "--hub",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("vde_switch (Debian's vde2, installed by scripts/setup)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("ctl").exists() {
            assert!(Instant::now() < deadline, "vde_switch made no ctl socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Switch(child)
    }

    fn recv_within(backend: &mut dyn Backend, limit: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(frame) = backend.recv().unwrap() {
                return Some(frame);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn two_ports_on_a_hub_exchange_frames() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("switch");
        let _switch = start_switch(&dir);
        let a = VdePort::connect(&dir).unwrap();
        let b = VdePort::connect(&dir).unwrap();
        let (mut a, mut b) = (a.backend().unwrap(), b.backend().unwrap());
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[0x52, 0x54, 0, 0x12, 1, 1, 0x88, 0xb5]);
        frame.extend_from_slice(b"hello over vde");
        a.send(&frame).unwrap();
        assert_eq!(
            recv_within(b.as_mut(), Duration::from_secs(5)),
            Some(frame.clone())
        );
        b.send(&frame).unwrap();
        assert_eq!(recv_within(a.as_mut(), Duration::from_secs(5)), Some(frame));
    }

    #[test]
    fn no_switch_is_an_error_naming_the_option() {
        let tmp = tempfile::tempdir().unwrap();
        let err = VdePort::connect(tmp.path()).err().unwrap().to_string();
        assert!(err.starts_with("--net vde,sock="), "{err}");
        assert!(err.contains("vde_switch"), "{err}");
    }
}
