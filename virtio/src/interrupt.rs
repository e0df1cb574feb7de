//! How a device interrupts the guest: [`Interrupt`], the handle a device gets at activation,
//! raises a queue's or the configuration's MSI-X vector; [`MsiVectors`], which the platform
//! implements (KVM irqfds in the VMM, a recorder in tests), delivers each vector to the message
//! and mask the guest last programmed.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// The "no vector" value of `queue_msix_vector` and `config_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// ISR status bits (virtio 1.2 §4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// An MSI message: what the function writes, and where, to interrupt a CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// The MSI-X vectors of one PCI function as the platform delivers them. Each vector has an
/// eventfd for its whole life: writing it raises the vector (in-VMM devices do, vhost-user
/// backends get it as their call fd). While a vector is masked, writes stay pending on the
/// eventfd and are delivered once it is routed again.
pub trait MsiVectors: Send + Sync {
    /// The eventfd that raises `vector`.
    fn irqfd(&self, vector: u16) -> Option<&EventFd>;
    /// Delivers `vector` as `message` from now on, or holds it back while masked (`None`).
    fn route(&self, vector: u16, message: Option<MsiMessage>);
    /// Whether `vector` was raised while masked and not yet delivered (its PBA bit).
    fn pending(&self, vector: u16) -> bool {
        self.irqfd(vector).is_some_and(is_signalled)
    }
}

/// Whether `event` has a count, without consuming it.
pub fn is_signalled(event: &EventFd) -> bool {
    let mut poll = libc::pollfd {
        fd: event.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout; poll only writes `revents`.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & libc::POLLIN != 0
}

struct State {
    vectors: Arc<dyn MsiVectors>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    config_generation: AtomicU8,
    needs_reset: AtomicBool,
}

/// A device's interrupt handle, shared by the transport (which records the vectors the driver
/// assigns) and the device's worker or backend (which raises them). Cloning shares it.
#[derive(Clone)]
pub struct Interrupt(Arc<State>);

impl Interrupt {
    pub fn new(vectors: Arc<dyn MsiVectors>, queues: usize) -> Interrupt {
        Interrupt(Arc::new(State {
            vectors,
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        }))
    }

    /// Buffers of `queue` were used: raise its vector.
    pub fn signal_used(&self, queue: usize) {
        self.0.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        if let Some(vector) = self.0.queue_vectors.get(queue) {
            self.raise(vector.load(Ordering::Acquire));
        }
    }

    /// The device configuration changed: a new generation, and the configuration vector.
    pub fn signal_config_change(&self) {
        self.0.config_generation.fetch_add(1, Ordering::AcqRel);
        self.0.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        self.raise(self.0.config_vector.load(Ordering::Acquire));
    }

    /// The device hit an error it cannot recover from: DEVICE_NEEDS_RESET, told to the driver
    /// with a configuration interrupt.
    pub fn signal_needs_reset(&self) {
        if !self.0.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config_change();
        }
    }

    /// The eventfd that raises `queue`'s vector, for a backend outside the VMM.
    pub fn queue_irqfd(&self, queue: usize) -> Option<EventFd> {
        let vector = self.queue_vector(queue);
        self.0.vectors.irqfd(vector)?.try_clone().ok()
    }

    fn raise(&self, vector: u16) {
        if vector == NO_VECTOR {
            return;
        }
        if let Some(irqfd) = self.0.vectors.irqfd(vector) {
            if let Err(e) = irqfd.write(1) {
                log::warn!("cannot raise MSI-X vector {vector}: {e}");
            }
        }
    }

    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.0
            .queue_vectors
            .get(queue)
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub fn set_queue_vector(&self, queue: usize, vector: u16) {
        if let Some(v) = self.0.queue_vectors.get(queue) {
            v.store(vector, Ordering::Release);
        }
    }

    pub fn config_vector(&self) -> u16 {
        self.0.config_vector.load(Ordering::Acquire)
    }

    pub fn set_config_vector(&self, vector: u16) {
        self.0.config_vector.store(vector, Ordering::Release);
    }

    /// Reads and clears the ISR status (the driver's read of the ISR register).
    pub fn take_isr(&self) -> u8 {
        self.0.isr.swap(0, Ordering::AcqRel)
    }

    pub fn config_generation(&self) -> u8 {
        self.0.config_generation.load(Ordering::Acquire)
    }

    pub fn needs_reset(&self) -> bool {
        self.0.needs_reset.load(Ordering::Acquire)
    }

    pub fn vectors(&self) -> &dyn MsiVectors {
        self.0.vectors.as_ref()
    }

    /// The driver reset the device: no vectors, no status.
    pub fn reset(&self) {
        for v in &self.0.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.0.config_vector.store(NO_VECTOR, Ordering::Release);
        self.0.isr.store(0, Ordering::Release);
        self.0.needs_reset.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signalled_is_seen_without_consuming() {
        let event = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(!is_signalled(&event));
        event.write(1).unwrap();
        assert!(is_signalled(&event));
        assert!(is_signalled(&event), "polling does not consume");
        assert_eq!(event.read().ok(), Some(1));
        assert!(!is_signalled(&event));
    }
}
