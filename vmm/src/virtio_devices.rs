//! Hosting virtio device models in the VMM: each behind the virtio-pci transport on bus 0, its
//! queue notifications bound to ioeventfds, its MSI-X messages delivered through KVM, and an
//! event-loop thread per device that processes its queues when the guest notifies them.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::bus::{lock, Bus};
use devices::pci::PciRoot;
use firmware::layout::{PCI_MMIO_END, PCI_MMIO_START};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio::pci::{MsiSink, VirtioPciDevice, BAR_SIZE};
use virtio::{Memory, VirtioDevice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::msi::KvmMsiRoutes;
use crate::vm::VmError;

/// One queue of one device, as the event loop sees it.
struct QueueWatch {
    device: Arc<Mutex<VirtioPciDevice>>,
    queue: usize,
}

/// The virtio devices of a VM and the thread serving their queues.
pub struct VirtioDevices {
    watches: Vec<QueueWatch>,
    stop: EventFd,
}

impl VirtioDevices {
    /// Plugs each model into `pci` and `mmio` with its BAR in the 32-bit PCI window, binding its
    /// queue notifications to ioeventfds.
    pub fn attach(
        models: Vec<Box<dyn VirtioDevice>>,
        vm_fd: &Arc<VmFd>,
        memory: &Memory,
        pci: &mut PciRoot,
        mmio: &mut Bus,
    ) -> Result<VirtioDevices, VmError> {
        let interrupts: Arc<dyn MsiSink> = Arc::new(KvmMsiRoutes::new(vm_fd.clone()));
        let mut watches = Vec::new();
        for (n, model) in models.into_iter().enumerate() {
            let bar = PCI_MMIO_START + n as u64 * BAR_SIZE;
            if bar + BAR_SIZE > PCI_MMIO_END {
                return Err(VmError::TooManyDevices);
            }
            let device = VirtioPciDevice::new(model, bar, memory.clone(), interrupts.clone())
                .map_err(|e| VmError::Device(e.to_string()))?;
            for (offset, event) in device.queue_events() {
                vm_fd
                    .register_ioevent(event, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
                    .map_err(|source| VmError::Kvm {
                        what: "binding a virtqueue notification (ioeventfd)",
                        source,
                    })?;
            }
            // A device served elsewhere reads its notifications itself.
            let queues = if device.is_external() {
                0
            } else {
                device.queue_events().len()
            };
            let device = Arc::new(Mutex::new(device));
            pci.add(device.clone())
                .map_err(|e| VmError::Device(e.to_string()))?;
            mmio.insert(bar, BAR_SIZE, device.clone())?;
            watches.extend((0..queues).map(|queue| QueueWatch {
                device: device.clone(),
                queue,
            }));
        }
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        Ok(VirtioDevices { watches, stop })
    }

    /// Starts the event loop; it runs until [`EventLoop::stop`].
    pub fn start(self) -> Result<EventLoop, VmError> {
        // One thread per device: a slow disk or filesystem call holds up only its own device.
        let mut groups: Vec<Vec<QueueWatch>> = Vec::new();
        for watch in self.watches {
            match groups.last_mut() {
                Some(group) if Arc::ptr_eq(&group[0].device, &watch.device) => group.push(watch),
                _ => groups.push(vec![watch]),
            }
        }
        let mut threads = Vec::new();
        for (n, watches) in groups.into_iter().enumerate() {
            let epoll = Epoll::new().map_err(VmError::EventFd)?;
            let stop_token = watches.len() as u64;
            epoll
                .ctl(
                    ControlOperation::Add,
                    self.stop.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, stop_token),
                )
                .map_err(VmError::EventFd)?;
            for (token, watch) in watches.iter().enumerate() {
                let device = lock(&watch.device);
                let fd = device.queue_events()[watch.queue].1.as_raw_fd();
                epoll
                    .ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, token as u64),
                    )
                    .map_err(VmError::EventFd)?;
            }
            let thread = std::thread::Builder::new()
                .name(format!("virtio{n}"))
                .spawn(move || serve(&epoll, &watches, stop_token))
                .map_err(VmError::Thread)?;
            threads.push(thread);
        }
        Ok(EventLoop {
            stop: self.stop,
            threads,
        })
    }
}

fn serve(epoll: &Epoll, watches: &[QueueWatch], stop_token: u64) {
    let mut events = vec![EpollEvent::default(); watches.len() + 1];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio event loop: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            let token = event.data();
            if token == stop_token {
                return;
            }
            if let Some(watch) = watches.get(token as usize) {
                lock(&watch.device).process_queue(watch.queue);
            }
        }
    }
}

/// The running event loops, one per device; stopping them joins their threads. The stop
/// eventfd is never read, so every thread's epoll sees it.
pub struct EventLoop {
    stop: EventFd,
    threads: Vec<JoinHandle<()>>,
}

impl EventLoop {
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a virtio event loop panicked");
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
