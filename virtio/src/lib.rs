//! virtio device models, independent of their transport.
//!
//! The transport (virtio-pci) drives a [`VirtioDevice`]: it describes itself, and at
//! DRIVER_OK gets its queues, guest memory and an [`Interrupt`] handle in an [`Activation`];
//! a reset takes them back. Most models only answer the guest's requests: they implement
//! [`QueueDevice`] (`process_queue`, walking chains with [`process_chains`]), and
//! [`worker::Hosted`] runs them in a worker thread of their own inside the VMM, while
//! `nixvmm device …` serves the same models over vhost-user. A device served by another
//! process (a vhost-user frontend) implements [`VirtioDevice`] directly.

pub mod block;
pub mod console;
pub mod fs;
pub mod interrupt;
pub mod net;
pub mod ninep;
pub mod pci;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::Interrupt;

/// Descriptors a share (9p or virtio-fs) may hold for its guest whatever the limit.
pub const MIN_DESCRIPTOR_BUDGET: usize = 256;

/// The descriptors a share may hold for its guest (9p fids, virtio-fs open files): a quarter
/// of the process's open-files limit, at least [`MIN_DESCRIPTOR_BUDGET`], so that several
/// shares leave descriptors for the rest of nixvmm. Read once, by the first share made (on
/// the main thread).
pub fn descriptor_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(0, |(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX));
        (soft / 4).max(MIN_DESCRIPTOR_BUDGET)
    })
}

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
    pub const VSOCK: u32 = 19;
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
    #[error("the device is already active")]
    AlreadyActive,
    #[error("the device did not stop after a reset and cannot start again")]
    Lost,
    #[error("cannot start the device's worker: {0}")]
    Worker(std::io::Error),
}

pub type Memory = GuestMemoryMmap;
pub type Chain<'a> = DescriptorChain<&'a Memory>;

/// One queue the driver enabled, as a device gets it at activation.
pub struct ActiveQueue {
    pub index: usize,
    pub queue: Queue,
    /// Written (by KVM's ioeventfd, or the transport) when the guest notifies the queue.
    pub kick: EventFd,
}

/// What a device gets at DRIVER_OK.
pub struct Activation {
    pub mem: Memory,
    /// The features the driver accepted.
    pub features: u64,
    pub interrupt: Interrupt,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActiveQueue>,
}

/// A virtio device as its transport drives it.
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
    /// Starts serving the queues the driver set up.
    fn activate(&mut self, activation: Activation) -> Result<(), Error>;
    /// Stops serving them (the driver reset the device, or the VM ends); the device can be
    /// activated again afterwards.
    fn reset(&mut self);
    /// Stops touching guest memory and queues until [`VirtioDevice::resume`].
    fn pause(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn resume(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// The device configuration as it is now, for a device whose configuration changes while it
/// runs (a NIC's link status).
pub type LiveConfig = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// A device model that answers the guest's requests on its queues, run by
/// [`worker::Hosted`] in the VMM and by `nixvmm device` over vhost-user.
pub trait QueueDevice: Send + 'static {
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits, [`COMMON_FEATURES`] included.
    fn features(&self) -> u64;
    /// The device-specific configuration space (read once, when the device is plugged).
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Where the transport reads the configuration instead, when it changes after the device
    /// is plugged.
    fn live_config(&self) -> Option<LiveConfig> {
        None
    }
    /// The features the driver accepted, before the first [`QueueDevice::process_queue`].
    fn set_acked_features(&mut self, _features: u64) {}
    /// Handles the buffers the guest made available on queue `index`. Returns whether any
    /// were used, so the caller knows to consider an interrupt.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error>;
    /// Forgets driver state (the driver reset the device).
    fn reset(&mut self) {}
    /// Host file descriptors the worker waits on besides the queues (a socket, a tap, a
    /// timerfd); [`QueueDevice::backend_ready`] runs when one is readable.
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Whether the worker should wait on `backend_fds()[n]` now (a NIC with a frame the guest
    /// has no buffers for stops reading its backend until buffers arrive). Asked again after
    /// each event the device handled.
    fn backend_wanted(&self, _n: usize) -> bool {
        true
    }
    /// `backend_fds()[n]` is readable.
    fn backend_ready(
        &mut self,
        _n: usize,
        _queues: &mut [ActiveQueue],
        _mem: &Memory,
        _interrupt: &Interrupt,
    ) -> Result<(), Error> {
        Ok(())
    }
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

/// [`QueueDevice::process_queue`] for a device with one request queue: chains of queue 0
/// go to `handle` as in [`process_chains`]; any other queue is an error.
pub fn process_request_queue<F>(
    index: usize,
    queue: &mut Queue,
    mem: &Memory,
    handle: F,
) -> Result<bool, Error>
where
    F: FnMut(Chain) -> u32,
{
    if index != 0 {
        return Err(Error::NoQueue(index));
    }
    process_chains(queue, mem, handle)
}

/// Whether the guest must be interrupted after buffers were used (honours EVENT_IDX).
pub fn needs_interrupt(queue: &mut Queue, mem: &impl GuestMemory) -> bool {
    queue.needs_notification(mem).unwrap_or(true)
}
