//! Devices whose queues an external backend serves over vhost-user: virtio-fs (`--share
//! …,fs=vhost-user,socket=S`: virtiofsd or `nixvmm device fs`, one per share as qemu-vm.nix
//! runs them) and virtio-vsock (`--vsock vhost-user=S`: vhost-device-vsock, as the NixOS test
//! driver starts it). nixvmm is the frontend: it keeps the PCI transport and the device's
//! identity and hands the backend guest memory and the queues. The guest's RAM is a shared
//! memfd so the backend can map it.

use std::os::fd::AsRawFd;
use std::path::Path;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio::{device_type, Activation, Error, VirtioDevice, COMMON_FEATURES};
use virtio_queue::QueueT;
use vm_memory::{GuestMemory, GuestMemoryRegion};

/// Which device the backend serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// virtio-fs with this tag (nixvmm writes the tag into the config space).
    Fs { tag: String },
    /// virtio-vsock; the guest's CID is the backend's (its config space, GET_CONFIG).
    Vsock,
}

/// virtio-vsock's queues (rx, tx, event), sized as QEMU's vhost-vsock does.
const VSOCK_QUEUE_SIZES: &[u16] = &[128, 128, 128];
/// virtio-vsock's config space: the guest's CID (le64).
const VSOCK_CONFIG_SIZE: u32 = 8;
/// VIRTIO_VSOCK_F_SEQPACKET: passed through when the backend offers it.
const VSOCK_F_SEQPACKET: u64 = 1 << 1;

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Fs { .. } => "virtio-fs",
            Kind::Vsock => "virtio-vsock",
        }
    }

    fn queue_sizes(&self) -> &'static [u16] {
        match self {
            Kind::Fs { .. } => virtio::fs::QUEUE_SIZES,
            Kind::Vsock => VSOCK_QUEUE_SIZES,
        }
    }

    /// Queues the backend serves: vsock's event queue stays with the frontend (as in QEMU's
    /// vhost-vsock-common), which sends no events.
    fn backend_queues(&self) -> usize {
        match self {
            Kind::Fs { .. } => self.queue_sizes().len(),
            Kind::Vsock => 2,
        }
    }

    /// The device-specific feature bits the guest may see, besides COMMON_FEATURES.
    fn device_features(&self) -> u64 {
        match self {
            Kind::Fs { .. } => 0,
            Kind::Vsock => VSOCK_F_SEQPACKET,
        }
    }
}

/// A vhost-user backend that could not be reached or refused the handshake.
#[derive(Debug, thiserror::Error)]
#[error("{device} backend at {}: {step}: {source}", socket.display())]
pub struct ConnectError {
    pub device: &'static str,
    pub socket: std::path::PathBuf,
    pub step: &'static str,
    pub source: vhost::Error,
}

/// How long nixvmm waits for a backend's socket to accept (the error names the 10 s).
const SOCKET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct VhostUserDevice {
    frontend: Frontend,
    kind: Kind,
    /// The config space the guest reads.
    config: Vec<u8>,
    backend_features: u64,
    /// Queues the backend is running, stopped before the next activation (after a guest
    /// reboot the same connection serves the new VM).
    running: Vec<usize>,
}

/// One connection to a backend, kept across guest reboots: virtiofsd serves one frontend
/// connection and exits when it closes.
#[derive(Clone)]
pub struct SharedVhostUser(pub std::sync::Arc<std::sync::Mutex<VhostUserDevice>>);

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("vhost-user backend: {e}"))
}

impl VhostUserDevice {
    /// Connects to the backend of a `kind` device listening on `socket`.
    pub fn connect(socket: &Path, kind: Kind) -> Result<VhostUserDevice, ConnectError> {
        let device = kind.name();
        let failed = |step: &'static str| {
            move |source| ConnectError {
                device,
                socket: socket.to_path_buf(),
                step,
                source,
            }
        };
        // runInLinuxVM starts virtiofsd and the VMM at once: the socket may not be there yet.
        let deadline = std::time::Instant::now() + SOCKET_WAIT;
        let mut frontend = loop {
            match Frontend::connect(socket, kind.queue_sizes().len() as u64) {
                Ok(frontend) => break frontend,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(failed(match kind {
                        Kind::Fs { .. } => {
                            "no connection within 10 s (is virtiofsd or `nixvmm device fs` \
                             listening there?)"
                        }
                        Kind::Vsock => {
                            "no connection within 10 s (is vhost-device-vsock listening there?)"
                        }
                    })(e))
                }
            }
        };
        frontend.set_owner().map_err(failed("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(failed("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(failed("GET_PROTOCOL_FEATURES"))?;
            protocol =
                offered & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG);
            frontend
                .set_protocol_features(protocol)
                .map_err(failed("SET_PROTOCOL_FEATURES"))?;
        }
        let config = match &kind {
            Kind::Fs { tag } => virtio::fs::config_space(tag),
            Kind::Vsock => {
                if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
                    return Err(failed(
                        "the backend does not give its configuration (the guest's CID)",
                    )(vhost::Error::VhostUserProtocol(
                        vhost::vhost_user::Error::FeatureMismatch,
                    )));
                }
                let zeros = [0u8; VSOCK_CONFIG_SIZE as usize];
                let (_, payload) = frontend
                    .get_config(0, VSOCK_CONFIG_SIZE, VhostUserConfigFlags::empty(), &zeros)
                    .map_err(failed("GET_CONFIG"))?;
                payload
            }
        };
        Ok(VhostUserDevice {
            frontend,
            kind,
            config,
            backend_features,
            running: Vec::new(),
        })
    }

    /// The guest's CID, for a vsock device.
    pub fn guest_cid(&self) -> Option<u64> {
        let bytes = self.config.get(..8)?.try_into().ok()?;
        (self.kind == Kind::Vsock).then(|| u64::from_le_bytes(bytes))
    }
}

impl VhostUserDevice {
    /// GET_VRING_BASE stops a ring: rings of an earlier activation stop before the next one,
    /// and when the driver resets the device.
    fn stop_rings(&mut self) -> Result<(), Error> {
        for index in std::mem::take(&mut self.running) {
            self.frontend.get_vring_base(index).map_err(backend)?;
        }
        Ok(())
    }

    fn guest_features(&self) -> u64 {
        self.backend_features & (COMMON_FEATURES | self.kind.device_features())
    }

    /// Hands the backend guest memory and each enabled queue: its rings, its kick eventfd and
    /// the irqfd of its MSI-X vector (which follows the guest's rewrites of that vector).
    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        let Activation {
            mem,
            features,
            interrupt,
            queues,
        } = activation;
        let protocol = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.stop_rings()?;
        self.frontend
            .set_features(features | protocol)
            .map_err(backend)?;
        let regions = memory_table(&mem).map_err(backend)?;
        if regions.iter().any(|r| r.mmap_handle < 0) {
            return Err(backend("guest memory is not shareable"));
        }
        self.frontend.set_mem_table(&regions).map_err(backend)?;
        let host = |addr| {
            mem.get_host_address(addr)
                .map(|p| p as u64)
                .map_err(backend)
        };
        let sizes = self.kind.queue_sizes();
        for q in queues
            .into_iter()
            .filter(|q| q.index < self.kind.backend_queues())
        {
            let size = q.queue.size();
            let (desc, avail, used) = virtio::pci::queue_addresses(&q.queue);
            let call = interrupt
                .queue_irqfd(q.index)
                .ok_or_else(|| backend(format!("queue {} has no MSI-X vector", q.index)))?;
            self.frontend
                .set_vring_num(q.index, size)
                .map_err(backend)?;
            let config = VringConfigData {
                queue_max_size: sizes[q.index.min(sizes.len() - 1)],
                queue_size: size,
                flags: 0,
                desc_table_addr: host(desc)?,
                used_ring_addr: host(used)?,
                avail_ring_addr: host(avail)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(q.index, &config)
                .map_err(backend)?;
            self.frontend.set_vring_base(q.index, 0).map_err(backend)?;
            self.frontend
                .set_vring_call(q.index, &call)
                .map_err(backend)?;
            self.frontend
                .set_vring_kick(q.index, &q.kick)
                .map_err(backend)?;
            if protocol != 0 {
                self.frontend
                    .set_vring_enable(q.index, true)
                    .map_err(backend)?;
            }
            self.running.push(q.index);
        }
        Ok(())
    }
}

/// The guest's RAM as a vhost memory table: guest-physical range, nixvmm's mapping of it and,
/// for memory a backend process can map, its file and offset (`mmap_handle` -1 otherwise;
/// the kernel's vhost uses only the addresses).
pub(crate) fn memory_table(
    mem: &virtio::Memory,
) -> Result<Vec<VhostUserMemoryRegionInfo>, vm_memory::GuestMemoryError> {
    mem.iter()
        .map(|region| {
            let host = mem.get_host_address(region.start_addr())?;
            let (mmap_offset, mmap_handle) = region
                .file_offset()
                .map_or((0, -1), |f| (f.start(), f.file().as_raw_fd()));
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset,
                mmap_handle,
            })
        })
        .collect()
}

fn shared(device: &SharedVhostUser) -> std::sync::MutexGuard<'_, VhostUserDevice> {
    devices::bus::lock(&device.0)
}

impl VirtioDevice for SharedVhostUser {
    fn device_type(&self) -> u32 {
        match shared(self).kind {
            Kind::Fs { .. } => device_type::FS,
            Kind::Vsock => device_type::VSOCK,
        }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        shared(self).kind.queue_sizes()
    }

    fn features(&self) -> u64 {
        shared(self).guest_features()
    }

    fn config(&self) -> Vec<u8> {
        shared(self).config.clone()
    }

    fn reset(&mut self) {
        if let Err(e) = shared(self).stop_rings() {
            log::warn!("{e}");
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        shared(self).activate(activation)
    }
}
