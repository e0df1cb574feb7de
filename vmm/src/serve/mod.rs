//! `nixvmm device …`: serves one of nixvmm's device models over vhost-user, so any vhost-user
//! frontend (QEMU's `vhost-user-*-pci`, the qemu-vm.nix runner) drives the same code the VMM
//! runs in-process.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use devices::bus::lock;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio::QueueDevice;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Hosts a [`QueueDevice`] as a vhost-user backend: the frontend hands over guest memory and
/// the vrings; a kick on queue N runs the model's `process_queue(N)`.
pub struct VhostUserDevice {
    /// In a mutex only so the backend is `Sync`, as the daemon requires; one thread uses it.
    model: Mutex<Box<dyn QueueDevice>>,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    /// Tells the vring worker thread to exit when the frontend disconnects; without it the
    /// daemon's teardown waits for the worker forever.
    exit: (EventConsumer, EventNotifier),
}

impl VhostUserDevice {
    pub fn new(model: Box<dyn QueueDevice>) -> std::io::Result<VhostUserDevice> {
        Ok(VhostUserDevice {
            model: Mutex::new(model),
            memory: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            event_idx: false,
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }
}

fn io_error(message: String) -> std::io::Error {
    std::io::Error::other(message)
}

impl VhostUserBackendMut for VhostUserDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        lock(&self.model).queue_max_sizes().len()
    }

    fn max_queue_size(&self) -> usize {
        lock(&self.model)
            .queue_max_sizes()
            .iter()
            .copied()
            .max()
            .map_or(0, usize::from)
    }

    fn features(&self) -> u64 {
        lock(&self.model).features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        lock(&self.model).set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        if lock(&self.model).config().is_empty() {
            VhostUserProtocolFeatures::MQ
        } else {
            VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
        }
    }

    fn reset_device(&mut self) {
        lock(&self.model).reset();
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = lock(&self.model).config();
        (offset..offset.saturating_add(size))
            .map(|i| config.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn update_memory(&mut self, memory: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.memory = memory;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(io_error(format!("unexpected event set {evset:?}")));
        }
        let index = usize::from(device_event);
        let vring = vrings
            .get(index)
            .ok_or_else(|| io_error(format!("no queue {index}")))?;
        let memory = self.memory.memory();
        let notify = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            queue.set_event_idx(self.event_idx);
            let used = lock(&self.model)
                .process_queue(index, queue, &memory)
                .map_err(|e| io_error(e.to_string()))?;
            used && virtio::needs_interrupt(queue, &*memory)
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("vhost-user device {name}: {reason}")]
    Daemon { name: String, reason: String },
}

/// Serves `model` on the Unix socket `socket` until the frontend disconnects.
pub fn serve(name: &str, model: Box<dyn QueueDevice>, socket: &Path) -> Result<(), ServeError> {
    let err = |reason: String| ServeError::Daemon {
        name: name.to_string(),
        reason,
    };
    let device = VhostUserDevice::new(model).map_err(|e| err(e.to_string()))?;
    let backend = Arc::new(RwLock::new(device));
    let mut daemon = VhostUserDaemon::new(
        name.to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| err(e.to_string()))?;
    daemon
        .serve(socket)
        .map_err(|e| err(format!("{} ({e})", socket.display())))
}
