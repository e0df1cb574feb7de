//! `-device vhost-vsock-pci,guest-cid=N` as QEMU runs it (`--vsock cid=N,backend=kernel`):
//! the host kernel's vhost-vsock (`/dev/vhost-vsock`, module vhost_vsock) serves the guest's
//! rx and tx queues, so host programs reach the guest with AF_VSOCK sockets to CID N (`ssh
//! vsock/N`, `socat - VSOCK-CONNECT:N:22`). nixvmm keeps the PCI transport, the config space
//! (the CID) and the event queue, which gets no events. The device is opened when the VM is
//! built (on the main thread: a vCPU's seccomp filter opens no files) and kept for the VM's
//! life, stopped and set up again when the driver resets and restarts it, as QEMU does (host
//! AF_VSOCK connections thus outlive a driver reset; the new driver answers their packets
//! with a reset).

use std::sync::Arc;

use vhost::vhost_kern::vsock::Vsock;
use vhost::vsock::VhostVsock;
use vhost::{VhostBackend, VringConfigData};
use virtio::{device_type, Activation, Error, Memory, VirtioDevice, COMMON_FEATURES};
use virtio_queue::QueueT;

/// rx, tx and event, sized as QEMU's vhost-vsock does.
const QUEUE_SIZES: &[u16] = &[128, 128, 128];
/// The queues the kernel serves: rx and tx.
const KERNEL_QUEUES: usize = 2;

pub struct KernelVsock {
    cid: u64,
    /// The kernel's device, owned by this process.
    device: Vsock<Arc<Memory>>,
    /// The guest's driver runs it.
    running: bool,
}

fn kernel(what: &str) -> impl Fn(vhost::Error) -> Error + '_ {
    move |e| Error::Backend(format!("vhost-vsock (/dev/vhost-vsock): {what}: {e}"))
}

impl KernelVsock {
    /// Opens /dev/vhost-vsock for a guest with `memory`.
    pub fn open(cid: u64, memory: Memory) -> Result<KernelVsock, Error> {
        let device = Vsock::new(Arc::new(memory)).map_err(kernel(
            "cannot open it (load the vhost_vsock module; nixvmm needs read-write access)",
        ))?;
        device.set_owner().map_err(kernel("SET_OWNER"))?;
        Ok(KernelVsock {
            cid,
            device,
            running: false,
        })
    }

    fn start(&mut self, activation: Activation) -> Result<(), Error> {
        let Activation {
            mem,
            features,
            interrupt,
            queues,
        } = activation;
        let device = &self.device;
        let offered = device.get_features().map_err(kernel("GET_FEATURES"))?;
        if features & !offered != 0 {
            return Err(kernel("features")(vhost::Error::InvalidOperation));
        }
        device
            .set_features(features)
            .map_err(kernel("SET_FEATURES"))?;
        let regions = super::vhost_user::memory_table(&mem)
            .map_err(|e| Error::Backend(format!("vhost-vsock: guest memory: {e}")))?;
        device
            .set_mem_table(&regions)
            .map_err(kernel("SET_MEM_TABLE"))?;
        for q in queues.iter().filter(|q| q.index < KERNEL_QUEUES) {
            let (desc, avail, used) = virtio::pci::queue_addresses(&q.queue);
            let call = interrupt.queue_irqfd(q.index).ok_or_else(|| {
                Error::Backend(format!(
                    "vhost-vsock: queue {} has no MSI-X vector",
                    q.index
                ))
            })?;
            let config = VringConfigData {
                queue_max_size: QUEUE_SIZES[q.index],
                queue_size: q.queue.size(),
                flags: 0,
                desc_table_addr: desc.0,
                used_ring_addr: used.0,
                avail_ring_addr: avail.0,
                log_addr: None,
            };
            device
                .set_vring_num(q.index, q.queue.size())
                .map_err(kernel("SET_VRING_NUM"))?;
            device
                .set_vring_addr(q.index, &config)
                .map_err(kernel("SET_VRING_ADDR"))?;
            device
                .set_vring_base(q.index, 0)
                .map_err(kernel("SET_VRING_BASE"))?;
            device
                .set_vring_call(q.index, &call)
                .map_err(kernel("SET_VRING_CALL"))?;
            device
                .set_vring_kick(q.index, &q.kick)
                .map_err(kernel("SET_VRING_KICK"))?;
        }
        device
            .set_guest_cid(self.cid)
            .map_err(kernel("SET_GUEST_CID (is another VM using this CID?)"))?;
        device.start().map_err(kernel("SET_RUNNING"))?;
        self.running = true;
        Ok(())
    }
}

impl VirtioDevice for KernelVsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn config(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        self.reset();
        self.start(activation)
    }

    fn reset(&mut self) {
        if std::mem::take(&mut self.running) {
            if let Err(e) = self.device.stop() {
                log::warn!("vhost-vsock: SET_RUNNING 0: {e}");
            }
        }
    }
}
