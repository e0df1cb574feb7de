//! MSI-X delivery through KVM: every vector of every device gets a GSI of its own, routed to
//! the message the guest programs, and an irqfd, so raising it is one eventfd write (from a
//! device worker, or from a vhost-user backend that got the irqfd). A masked vector's irqfd
//! is detached from KVM, so its writes stay pending in the eventfd until the vector is
//! unmasked; a rewritten message re-programs the route.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use virtio::interrupt::{is_signalled, MsiMessage, MsiVectors};
use vmm_sys_util::eventfd::EventFd;

/// GSIs below this are the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

/// The VM's GSI routing table: the irqchip pins and one MSI route per allocated vector.
pub struct MsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<RouteTable>,
}

struct RouteTable {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    #[error("too many MSI-X vectors for KVM's routing table")]
    TooManyVectors,
    #[error("cannot create an irqfd: {0}")]
    EventFd(std::io::Error),
}

impl MsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Arc<MsiRouter> {
        Arc::new(MsiRouter {
            vm,
            table: Mutex::new(RouteTable {
                msi: BTreeMap::new(),
                next_gsi: FIRST_MSI_GSI,
            }),
        })
    }

    /// `count` vectors for one device, each with its own GSI and irqfd, all masked.
    pub fn vectors(self: &Arc<Self>, count: u16) -> Result<KvmMsiVectors, MsiError> {
        let mut table = lock(&self.table);
        let first = table.next_gsi;
        let end = first + u32::from(count);
        if end as usize - FIRST_MSI_GSI as usize + irqchip_entries().len() > MAX_ROUTES {
            return Err(MsiError::TooManyVectors);
        }
        table.next_gsi = end;
        let vectors = (first..end)
            .map(|gsi| {
                Ok(Vector {
                    gsi,
                    irqfd: EventFd::new(libc::EFD_NONBLOCK).map_err(MsiError::EventFd)?,
                    attached: Mutex::new(false),
                })
            })
            .collect::<Result<_, MsiError>>()?;
        Ok(KvmMsiVectors {
            router: self.clone(),
            vectors,
        })
    }

    /// Points `gsi` at `message` (no ioctl when it already is).
    fn set_route(&self, gsi: u32, message: MsiMessage) -> std::io::Result<()> {
        let mut table = lock(&self.table);
        if table.msi.get(&gsi) == Some(&message) {
            return Ok(());
        }
        let previous = table.msi.insert(gsi, message);
        let mut entries = irqchip_entries();
        entries.extend(table.msi.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::other("routing table too large"))
            .and_then(|routing| {
                self.vm
                    .set_gsi_routing(&routing)
                    .map_err(std::io::Error::other)
            });
        if result.is_err() {
            match previous {
                Some(m) => table.msi.insert(gsi, m),
                None => table.msi.remove(&gsi),
            };
        }
        result
    }
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
    /// Whether the irqfd is registered with KVM (the vector is unmasked).
    attached: Mutex<bool>,
}

/// One device's MSI-X vectors, delivered by KVM.
pub struct KvmMsiVectors {
    router: Arc<MsiRouter>,
    vectors: Vec<Vector>,
}

impl KvmMsiVectors {
    fn unmask(&self, vector: &Vector, message: MsiMessage) -> std::io::Result<()> {
        self.router.set_route(vector.gsi, message)?;
        let mut attached = lock(&vector.attached);
        if *attached {
            return Ok(());
        }
        // What was raised while masked is delivered once the irqfd is attached again.
        let pending = is_signalled(&vector.irqfd) && vector.irqfd.read().is_ok();
        self.router
            .vm
            .register_irqfd(&vector.irqfd, vector.gsi)
            .map_err(std::io::Error::other)?;
        *attached = true;
        if pending {
            vector.irqfd.write(1)?;
        }
        Ok(())
    }

    fn mask(&self, vector: &Vector) -> std::io::Result<()> {
        let mut attached = lock(&vector.attached);
        if *attached {
            self.router
                .vm
                .unregister_irqfd(&vector.irqfd, vector.gsi)
                .map_err(std::io::Error::other)?;
            *attached = false;
        }
        Ok(())
    }
}

impl MsiVectors for KvmMsiVectors {
    fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irqfd)
    }

    fn route(&self, vector: u16, message: Option<MsiMessage>) {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        let result = match message {
            Some(message) => self.unmask(v, message),
            None => self.mask(v),
        };
        if let Err(e) = result {
            log::warn!("MSI-X vector {vector} (GSI {}): {e}", v.gsi);
        }
    }

    fn pending(&self, vector: u16) -> bool {
        self.vectors
            .get(usize::from(vector))
            .is_some_and(|v| !*lock(&v.attached) && is_signalled(&v.irqfd))
    }
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
