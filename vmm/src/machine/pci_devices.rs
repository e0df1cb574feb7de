//! Hosting virtio devices in the VMM: each behind the virtio-pci transport on bus 0, its
//! queue notifications bound to ioeventfds and its MSI-X vectors to KVM irqfds. Devices serve
//! their queues themselves once the driver activates them (a worker thread each, or a
//! vhost-user backend), so a vCPU touching a device's registers never waits for its I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use devices::bus::{lock, Bus};
use devices::pci::{Bar, BarRelocation, PciRoot};
use firmware::layout::{PCI_MMIO_END, PCI_MMIO_START};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio::pci::{VirtioPciDevice, BAR_SIZE};
use virtio::{Memory, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::machine::msi::MsiRouter;
use crate::machine::VmError;

/// The virtio devices of a VM.
pub struct VirtioDevices {
    devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
}

impl VirtioDevices {
    /// Plugs each device into `pci` and `mmio` with its BAR in the 32-bit PCI window, binding
    /// its queue notifications to ioeventfds and its MSI-X vectors to routed irqfds. A BAR the
    /// guest moves takes its range and ioeventfds along.
    pub fn attach(
        models: Vec<Box<dyn VirtioDevice>>,
        vm_fd: &Arc<VmFd>,
        memory: &Memory,
        pci: &mut PciRoot,
        mmio: &Arc<Bus>,
    ) -> Result<VirtioDevices, VmError> {
        let router = MsiRouter::new(vm_fd.clone());
        let mut devices = Vec::new();
        let mut by_slot = HashMap::new();
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
            let slot = pci.add(device.clone())?;
            mmio.insert(bar, BAR_SIZE, device.clone())?;
            by_slot.insert(slot, device.clone());
            devices.push(device);
        }
        pci.set_relocation(Arc::new(BarMover {
            vm_fd: vm_fd.clone(),
            mmio: Arc::downgrade(mmio),
            devices: by_slot,
        }));
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

/// Moves a virtio device's BAR 0 where the guest put it: its range on the MMIO bus and the
/// ioeventfds of its queue notifications. (The bus is held weakly: it owns the PCI root,
/// which owns this.)
struct BarMover {
    vm_fd: Arc<VmFd>,
    mmio: Weak<Bus>,
    devices: HashMap<u8, Arc<Mutex<VirtioPciDevice>>>,
}

impl BarRelocation for BarMover {
    fn relocate(&self, slot: u8, bar: &Bar, to: u64) -> Result<(), String> {
        let device = self.devices.get(&slot).ok_or("not a virtio device")?;
        if bar.index != 0 || to.checked_add(BAR_SIZE).is_none() {
            return Err(format!("BAR {} cannot go to {to:#x}", bar.index));
        }
        let mmio = self.mmio.upgrade().ok_or("the VM is going away")?;
        mmio.relocate(bar.addr, to).map_err(|e| e.to_string())?;
        let device = lock(device);
        let events = device.queue_events();
        for (n, (offset, event)) in events.iter().enumerate() {
            if let Err(e) = self.move_notification(event, bar.addr + offset, to + offset) {
                // Put back what already moved: the BAR keeps decoding where it was.
                for (offset, event) in &events[..n] {
                    let _ = self.move_notification(event, to + offset, bar.addr + offset);
                }
                let _ = mmio.relocate(to, bar.addr);
                return Err(format!("moving a queue notification: {e}"));
            }
        }
        Ok(())
    }
}

impl BarMover {
    /// Moves one ioeventfd; on failure it stays bound where it was.
    fn move_notification(
        &self,
        event: &EventFd,
        from: u64,
        to: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let (from, to) = (IoEventAddress::Mmio(from), IoEventAddress::Mmio(to));
        self.vm_fd.unregister_ioevent(event, &from, NoDatamatch)?;
        self.vm_fd
            .register_ioevent(event, &to, NoDatamatch)
            .inspect_err(|_| {
                let _ = self.vm_fd.register_ioevent(event, &from, NoDatamatch);
            })
    }
}
