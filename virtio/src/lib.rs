//! virtio device models, independent of their transport.
//!
//! A device model implements [`VirtioDevice`]: it describes itself (type, queues, features,
//! configuration space) and processes a queue when given guest memory. It never raises
//! interrupts or parses descriptor flags: [`process_chains`] walks the queue, and the
//! transport (in-VMM virtio-pci, or vhost-user for `nixvmm device …`) signals the guest when
//! [`VirtioDevice::process_queue`] says buffers were used.

pub mod block;
pub mod fs;
pub mod ninep;
pub mod pci;
pub mod rng;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};

/// Feature bits every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// What [`VirtioDevice::features`] starts from.
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// virtio device IDs (virtio 1.2, section 5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const P9: u32 = 9;
    pub const FS: u32 = 26;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("no queue {0}")]
    NoQueue(usize),
    #[error("{0}")]
    Backend(String),
}

pub type Memory = GuestMemoryMmap;
pub type Chain<'a> = DescriptorChain<&'a Memory>;

/// A virtio device model.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits, [`COMMON_FEATURES`] included.
    fn features(&self) -> u64;
    /// The device-specific configuration space.
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The features the driver accepted, before the first [`VirtioDevice::process_queue`].
    fn set_acked_features(&mut self, _features: u64) {}
    /// Handles the buffers the guest made available on queue `index`. Returns whether any
    /// were used, so the transport knows to consider an interrupt.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error>;
    /// Forgets driver state (the driver reset the device).
    fn reset(&mut self) {}

    /// Whether the device is served outside the VMM (vhost-user): it then takes its queues at
    /// DRIVER_OK through [`VirtioDevice::activate_external`] instead of processing them.
    fn is_external(&self) -> bool {
        false
    }

    /// Hands a device served elsewhere the queues the driver set up.
    fn activate_external(
        &mut self,
        _mem: &Memory,
        _features: u64,
        _queues: Vec<ExternalQueue>,
    ) -> Result<(), Error> {
        Ok(())
    }
}

/// A queue as the driver set it up, for a device served outside the VMM.
pub struct ExternalQueue {
    pub index: usize,
    pub size: u16,
    pub desc: vm_memory::GuestAddress,
    pub avail: vm_memory::GuestAddress,
    pub used: vm_memory::GuestAddress,
    /// Written by KVM when the guest notifies the queue.
    pub kick: vmm_sys_util::eventfd::EventFd,
    /// Raises the queue's interrupt (an irqfd routed to its MSI-X message).
    pub call: vmm_sys_util::eventfd::EventFd,
}

/// Pops every available chain of `queue`, hands it to `handle` (which returns the number of
/// bytes it wrote into the chain), and returns it to the guest as used. Re-checks after
/// re-enabling notifications, so no buffer made available meanwhile is missed.
pub fn process_chains<F>(queue: &mut Queue, mem: &Memory, mut handle: F) -> Result<bool, Error>
where
    F: FnMut(Chain) -> u32,
{
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let written = handle(chain);
            queue.add_used(mem, head, written)?;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            return Ok(used_any);
        }
    }
}

/// Whether the guest must be interrupted after buffers were used (honours EVENT_IDX).
pub fn needs_interrupt(queue: &mut Queue, mem: &impl GuestMemory) -> bool {
    queue.needs_notification(mem).unwrap_or(true)
}
