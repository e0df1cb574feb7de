//! What a VM uses on the host: the terminal (`console`), connections to backends outside
//! nixvmm (`vhost_user`: virtio-fs and virtio-vsock backends), networks (`slirp`, `vde`, `tap`), chardevs (`chardev`) and the kernel's payload, decompressed
//! once and cached (`kernel_unpack`). [`HostResources`] holds those that outlive one VM: the runner
//! owns it, and every VM a run builds (a guest reboot builds a new one) uses the same ones.

pub mod chardev;
pub mod console;
pub mod kernel_unpack;
pub mod slirp;
pub mod tap;
pub mod vde;
pub mod vhost_kernel;
pub mod vhost_user;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::net::{NetBackend, NicConfig, TapTarget};
use crate::config::{Share, VmConfig, VsockConfig};
use crate::seccomp::{self, DeviceKind, ThreadKind};
use devices::tpm::swtpm::{Swtpm, SwtpmError};
use devices::tpm::worker::{SwtpmBackend, SwtpmWorker};
use slirp::{SlirpError, UserNetwork};
use vhost_user::{ConnectError, Kind, SharedVhostUser, VhostUserDevice};

/// Raises this process's soft limit of open files to its hard limit, as virtiofsd does: a
/// share, a NIC or a vsock with many connections holds a descriptor each, and the usual
/// soft limit (1024) is below what the devices' own caps allow. Called by `nixvmm run` and
/// `nixvmm device`, not before handing a command line to QEMU (which gets it unchanged).
pub fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let raised = getrlimit(Resource::RLIMIT_NOFILE).and_then(|(soft, hard)| match soft < hard {
        true => setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map(|()| hard),
        false => Ok(soft),
    });
    match raised {
        Ok(limit) => log::debug!("open files: up to {limit}"),
        Err(e) => log::warn!("cannot raise the limit of open files: {e}"),
    }
}

/// Host resources made once per run and shared by every VM of the run.
pub struct HostResources {
    /// vhost-user backends by socket: one per `fs=vhost-user` share, and the vsock's.
    vhost_user: Vec<(PathBuf, SharedVhostUser)>,
    nics: Vec<Nic>,
    /// One per console port, in `VmConfig::ports` order.
    chardevs: Vec<chardev::Chardev>,
    /// The `--tpm` swtpm, served by its thread; shut down when the run ends (swtpm then
    /// exits, as under QEMU).
    tpm: Option<SwtpmWorker>,
    /// The guest was booted once: a TPM that cannot power on no longer stops the run.
    tpm_booted: AtomicBool,
}

/// A NIC's network and link, kept across guest reboots (forwarded ports stay bound).
pub struct Nic {
    pub mac: [u8; 6],
    pub link: virtio::net::Link,
    network: Network,
}

enum Network {
    User(UserNetwork),
    Vde(vde::VdePort),
    Tap(tap::Tap),
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Slirp(#[from] SlirpError),
    #[error(transparent)]
    Vde(#[from] vde::VdeError),
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error(transparent)]
    Chardev(#[from] chardev::ChardevError),
    #[error(transparent)]
    Tpm(#[from] SwtpmError),
    #[error("--net: cannot set up the NIC: {0}")]
    Nic(std::io::Error),
}

/// QEMU's MAC for the `n`th NIC that names none: 52:54:00:12:34:56, :57, …
fn default_mac(n: usize) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(n as u8)]
}

impl Nic {
    fn start(config: &NicConfig, unnamed: &mut usize) -> Result<Nic, HostError> {
        let mac = config.mac.unwrap_or_else(|| {
            *unnamed += 1;
            default_mac(*unnamed - 1)
        });
        let network = match &config.backend {
            NetBackend::User(user) => Network::User(UserNetwork::start(user)?),
            NetBackend::Vde { sock } => Network::Vde(vde::VdePort::connect(sock)?),
            NetBackend::Tap(TapTarget::Name(name)) => Network::Tap(tap::Tap::open(name)?),
            NetBackend::Tap(TapTarget::Fd(fd)) => Network::Tap(tap::Tap::from_fd(*fd)?),
        };
        Ok(Nic {
            mac,
            link: virtio::net::Link::new().map_err(HostError::Nic)?,
            network,
        })
    }

    /// What one VM's NIC model sends into and receives from.
    pub fn backend(&self) -> std::io::Result<Box<dyn virtio::net::Backend>> {
        match &self.network {
            Network::User(user) => Ok(Box::new(user.backend())),
            Network::Vde(port) => port.backend(),
            Network::Tap(tap) => tap.backend(),
        }
    }

    /// The user-mode network behind this NIC, if that is what it is.
    pub fn user_network(&self) -> Option<&UserNetwork> {
        match &self.network {
            Network::User(user) => Some(user),
            Network::Vde(_) | Network::Tap(_) => None,
        }
    }
}

impl HostResources {
    /// Connects to every backend `config` names.
    pub fn connect(config: &VmConfig) -> Result<HostResources, HostError> {
        let mut backends = Vec::new();
        for share in &config.shares {
            if let Share::VhostUser { tag, socket } = share {
                backends.push((socket, Kind::Fs { tag: tag.clone() }));
            }
        }
        if let Some(VsockConfig::VhostUser { socket }) = &config.vsock {
            backends.push((socket, Kind::Vsock));
        }
        let mut vhost_user = Vec::new();
        for (socket, kind) in backends {
            let device = VhostUserDevice::connect(socket, kind)?;
            vhost_user.push((
                socket.clone(),
                SharedVhostUser(Arc::new(Mutex::new(device))),
            ));
        }
        let mut unnamed = 0;
        let nics = config
            .nics
            .iter()
            .map(|nic| Nic::start(nic, &mut unnamed))
            .collect::<Result<_, _>>()?;
        let chardevs = config
            .ports
            .iter()
            .map(|port| chardev::Chardev::open(&port.chardev))
            .collect::<Result<_, _>>()?;
        let tpm = match &config.tpm {
            Some(socket) => {
                let (mode, needs) = (config.seccomp, seccomp::needs(config));
                let confine = Box::new(move || {
                    let kind = ThreadKind::Device(DeviceKind::Tpm);
                    seccomp::confine(kind, needs, mode).map_err(|e| e.to_string())
                });
                Some(SwtpmWorker::start(Swtpm::connect(socket)?, confine)?)
            }
            None => None,
        };
        Ok(HostResources {
            vhost_user,
            nics,
            chardevs,
            tpm,
            tpm_booted: AtomicBool::new(false),
        })
    }

    pub fn nics(&self) -> &[Nic] {
        &self.nics
    }

    pub fn chardevs(&self) -> &[chardev::Chardev] {
        &self.chardevs
    }

    /// The connection to the vhost-user backend at `socket`.
    pub fn vhost_user(&self, socket: &Path) -> Option<SharedVhostUser> {
        self.vhost_user
            .iter()
            .find(|(path, _)| path == socket)
            .map(|(_, fs)| fs.clone())
    }

    /// Shuts the TPM down when the run ends (swtpm then exits, as under QEMU).
    pub fn shut_down_tpm(&self) {
        if let Some(tpm) = &self.tpm {
            // A swtpm whose failure was said cannot shut down either.
            if let Err(e) = tpm.shut_down() {
                if !tpm.failed() {
                    log::warn!("TPM: {e}");
                }
            }
        }
    }

    /// A backend on the `--tpm` swtpm, powered on (TPM reset) for a new boot of the guest.
    /// A swtpm that cannot power on stops the first boot; on later ones (a guest reboot
    /// after swtpm died) the failure is said once and the guest's TPM commands fail, as
    /// on hardware whose TPM broke.
    pub fn tpm_powered_on(&self) -> Result<Option<SwtpmBackend>, SwtpmError> {
        let Some(tpm) = &self.tpm else {
            return Ok(None);
        };
        let first = !self.tpm_booted.swap(true, Ordering::Relaxed);
        match tpm.power_on() {
            Ok(()) => {}
            Err(e) if first => return Err(e),
            // Slow, not broken: the power-on still waits its turn, and the TPM may work.
            Err(e @ (SwtpmError::Unanswered { .. } | SwtpmError::Busy { .. })) => {
                log::warn!("TPM: {e}; the guest may find it failing in this boot")
            }
            Err(e) => tpm.say_failure(&e),
        }
        Ok(Some(tpm.backend()))
    }
}
