//! `--share …,fs=vhost-user,socket=S`: a virtio-fs device whose queues an external virtiofsd
//! (or `nixvmm device fs`) serves over vhost-user, as qemu-vm.nix runs virtiofsd per share.
//! The guest's RAM is a shared memfd so the backend can map it.

use std::os::fd::AsRawFd;
use std::path::Path;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio::{device_type, Activation, Error, VirtioDevice, COMMON_FEATURES};
use virtio_queue::QueueT;
use vm_memory::{GuestMemory, GuestMemoryRegion};

use virtio::fs::QUEUE_SIZES;

/// A vhost-user-fs backend that could not be reached or refused the handshake.
#[derive(Debug, thiserror::Error)]
#[error("virtio-fs backend at {}: {step}: {source}", socket.display())]
pub struct ConnectError {
    pub socket: std::path::PathBuf,
    pub step: &'static str,
    pub source: vhost::Error,
}

/// How long nixvmm waits for a backend's socket to accept (the error names the 10 s).
const SOCKET_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct VhostUserFs {
    frontend: Frontend,
    tag: String,
    backend_features: u64,
    /// Queues the backend is running, stopped before the next activation (after a guest
    /// reboot the same connection serves the new VM).
    running: Vec<usize>,
}

/// One connection to a backend, kept across guest reboots: virtiofsd serves one frontend
/// connection and exits when it closes.
#[derive(Clone)]
pub struct SharedVhostUserFs(pub std::sync::Arc<std::sync::Mutex<VhostUserFs>>);

fn backend(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("vhost-user-fs backend: {e}"))
}

impl VhostUserFs {
    /// Connects to the backend listening on `socket`.
    pub fn connect(socket: &Path, tag: &str) -> Result<VhostUserFs, ConnectError> {
        let failed = |step: &'static str| {
            move |source| ConnectError {
                socket: socket.to_path_buf(),
                step,
                source,
            }
        };
        // runInLinuxVM starts virtiofsd and the VMM at once: the socket may not be there yet.
        let deadline = std::time::Instant::now() + SOCKET_WAIT;
        let mut frontend = loop {
            match Frontend::connect(socket, QUEUE_SIZES.len() as u64) {
                Ok(frontend) => break frontend,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(failed(
                        "no connection within 10 s (is virtiofsd or `nixvmm device fs` \
                         listening there?)",
                    )(e))
                }
            }
        };
        frontend.set_owner().map_err(failed("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(failed("GET_FEATURES"))?;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(failed("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(failed("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(VhostUserFs {
            frontend,
            tag: tag.to_string(),
            backend_features,
            running: Vec::new(),
        })
    }
}

impl VhostUserFs {
    /// GET_VRING_BASE stops a ring: rings of an earlier activation stop before the next one,
    /// and when the driver resets the device.
    fn stop_rings(&mut self) -> Result<(), Error> {
        for index in std::mem::take(&mut self.running) {
            self.frontend.get_vring_base(index).map_err(backend)?;
        }
        Ok(())
    }

    fn guest_features(&self) -> u64 {
        self.backend_features & COMMON_FEATURES
    }

    fn config(&self) -> Vec<u8> {
        virtio::fs::config_space(&self.tag)
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
        let mut regions = Vec::new();
        for region in mem.iter() {
            let file = region
                .file_offset()
                .ok_or_else(|| backend("guest memory is not shareable"))?;
            let host = mem.get_host_address(region.start_addr()).map_err(backend)?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }
        self.frontend.set_mem_table(&regions).map_err(backend)?;
        let host = |addr| {
            mem.get_host_address(addr)
                .map(|p| p as u64)
                .map_err(backend)
        };
        for q in queues {
            let size = q.queue.size();
            let (desc, avail, used) = virtio::pci::queue_addresses(&q.queue);
            let call = interrupt
                .queue_irqfd(q.index)
                .ok_or_else(|| backend(format!("queue {} has no MSI-X vector", q.index)))?;
            self.frontend
                .set_vring_num(q.index, size)
                .map_err(backend)?;
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZES[q.index.min(QUEUE_SIZES.len() - 1)],
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

fn shared(fs: &SharedVhostUserFs) -> std::sync::MutexGuard<'_, VhostUserFs> {
    devices::bus::lock(&fs.0)
}

impl VirtioDevice for SharedVhostUserFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        shared(self).guest_features()
    }

    fn config(&self) -> Vec<u8> {
        shared(self).config()
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
