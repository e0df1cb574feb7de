//! MSI delivery through KVM's GSI routing and irqfds: each distinct MSI message a device sends
//! gets a GSI routed to it and an irqfd, so raising the interrupt is one eventfd write (and a
//! vhost-user or in-kernel backend can raise it without nixvmm).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use virtio::pci::{MsiMessage, MsiSink};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
/// Routes nixvmm keeps before it delivers further messages without a route. A guest that keeps
/// reprogramming MSI-X tables cannot grow the routing table without bound.
const MAX_MSI_ROUTES: usize = 1000;

struct Routes {
    by_message: HashMap<(u64, u32), (u32, EventFd)>,
    next_gsi: u32,
}

/// Delivers MSI messages through routed irqfds.
pub struct KvmMsiRoutes {
    vm: Arc<VmFd>,
    routes: Mutex<Routes>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = message.addr as u32;
    entry.u.msi.address_hi = (message.addr >> 32) as u32;
    entry.u.msi.data = message.data;
    entry
}

/// The routes KVM sets up by itself for its in-kernel irqchip, which a routing table must keep:
/// PIC pins 0-15 (2 is the cascade) and IOAPIC pins 0-23.
fn irqchip_entries() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..16 {
        if gsi == 2 {
            continue;
        }
        let (chip, pin) = if gsi < 8 {
            (KVM_IRQCHIP_PIC_MASTER, gsi)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
        };
        entries.push(irqchip_entry(gsi, chip, pin));
    }
    for gsi in 0..FIRST_MSI_GSI {
        entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    entries
}

impl KvmMsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> KvmMsiRoutes {
        KvmMsiRoutes {
            vm,
            routes: Mutex::new(Routes {
                by_message: HashMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        }
    }

    /// Adds a route for `message` and returns its irqfd's GSI.
    fn add_route(&self, routes: &mut Routes, message: MsiMessage) -> std::io::Result<()> {
        let gsi = routes.next_gsi;
        let mut entries = irqchip_entries();
        entries.extend(
            routes
                .by_message
                .iter()
                .map(|(&(addr, data), (gsi, _))| msi_entry(*gsi, MsiMessage { addr, data })),
        );
        entries.push(msi_entry(gsi, message));
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::other("routing table too large"))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(std::io::Error::other)?;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(std::io::Error::other)?;
        routes.next_gsi += 1;
        routes
            .by_message
            .insert((message.addr, message.data), (gsi, irqfd));
        Ok(())
    }

    fn signal_directly(&self, message: MsiMessage) {
        let msi = kvm_msi {
            address_lo: message.addr as u32,
            address_hi: (message.addr >> 32) as u32,
            data: message.data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            log::warn!("cannot deliver an MSI: {e}");
        }
    }
}

impl MsiSink for KvmMsiRoutes {
    fn irqfd(&self, message: MsiMessage) -> Option<EventFd> {
        let mut routes = lock(&self.routes);
        let key = (message.addr, message.data);
        if !routes.by_message.contains_key(&key) {
            if let Err(e) = self.add_route(&mut routes, message) {
                log::warn!("cannot route an MSI for a backend: {e}");
                return None;
            }
        }
        routes.by_message.get(&key)?.1.try_clone().ok()
    }

    fn send(&self, message: MsiMessage) {
        let mut routes = lock(&self.routes);
        let key = (message.addr, message.data);
        if !routes.by_message.contains_key(&key) {
            if routes.by_message.len() >= MAX_MSI_ROUTES {
                drop(routes);
                return self.signal_directly(message);
            }
            if let Err(e) = self.add_route(&mut routes, message) {
                log::warn!("cannot route an MSI ({e}); delivering it directly");
                drop(routes);
                return self.signal_directly(message);
            }
        }
        if let Some((_, irqfd)) = routes.by_message.get(&key) {
            if let Err(e) = irqfd.write(1) {
                log::warn!("cannot raise an MSI: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_pic_and_ioapic() {
        let entries = irqchip_entries();
        assert_eq!(entries.len(), 15 + 24);
        assert!(entries.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        let cascade = entries
            .iter()
            .filter(|e| e.gsi == 2)
            .map(|e| {
                // SAFETY: irqchip entries were built through the irqchip member.
                unsafe { e.u.irqchip.irqchip }
            })
            .collect::<Vec<_>>();
        assert_eq!(cascade, [KVM_IRQCHIP_IOAPIC], "GSI 2 only on the IOAPIC");
    }
}
