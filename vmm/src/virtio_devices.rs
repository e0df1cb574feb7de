//! Hosting virtio devices in the VMM: each behind the virtio-pci transport on bus 0, its
//! queue notifications bound to ioeventfds and its MSI-X vectors to KVM irqfds. Devices serve
//! their queues themselves once the driver activates them (a worker thread each, or a
//! vhost-user backend), so a vCPU touching a device's registers never waits for its I/O.

use std::sync::{Arc, Mutex};

use devices::bus::{lock, Bus};
use devices::pci::PciRoot;
use firmware::layout::{PCI_MMIO_END, PCI_MMIO_START};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio::pci::{VirtioPciDevice, BAR_SIZE};
use virtio::{Memory, VirtioDevice};

use crate::msi::MsiRouter;
use crate::vm::VmError;

/// The virtio devices of a VM.
pub struct VirtioDevices {
    devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
}

impl VirtioDevices {
    /// Plugs each device into `pci` and `mmio` with its BAR in the 32-bit PCI window, binding
    /// its queue notifications to ioeventfds and its MSI-X vectors to routed irqfds.
    pub fn attach(
        models: Vec<Box<dyn VirtioDevice>>,
        vm_fd: &Arc<VmFd>,
        memory: &Memory,
        pci: &mut PciRoot,
        mmio: &mut Bus,
    ) -> Result<VirtioDevices, VmError> {
        let router = MsiRouter::new(vm_fd.clone());
        let mut devices = Vec::new();
        for (n, model) in models.into_iter().enumerate() {
            let bar = PCI_MMIO_START + n as u64 * BAR_SIZE;
            if bar + BAR_SIZE > PCI_MMIO_END {
                return Err(VmError::TooManyDevices);
            }
            let count = VirtioPciDevice::vector_count(model.queue_max_sizes().len());
            let vectors = Arc::new(router.vectors(count)?);
            let device = VirtioPciDevice::new(model, bar, memory.clone(), vectors)?;
            for (offset, event) in device.queue_events() {
                vm_fd
                    .register_ioevent(event, &IoEventAddress::Mmio(bar + offset), NoDatamatch)
                    .map_err(|source| VmError::Kvm {
                        what: "binding a virtqueue notification (ioeventfd)",
                        source,
                    })?;
            }
            let device = Arc::new(Mutex::new(device));
            pci.add(device.clone())?;
            mmio.insert(bar, BAR_SIZE, device.clone())?;
            devices.push(device);
        }
        Ok(VirtioDevices { devices })
    }

    /// Stops every device's queue processing (for a paused VM).
    pub fn pause_all(&self) -> Result<(), virtio::Error> {
        self.devices.iter().try_for_each(|d| lock(d).pause())
    }

    pub fn resume_all(&self) -> Result<(), virtio::Error> {
        self.devices.iter().try_for_each(|d| lock(d).resume())
    }
}
