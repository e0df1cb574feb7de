//! The virtio 1.x PCI transport (virtio 1.2 §4.1): a PCI function whose BAR 0 holds the common
//! configuration, ISR, device configuration, notification area and MSI-X table, described to
//! the driver by vendor capabilities.

pub mod msix;

use std::sync::Arc;

use devices::bus::BusDevice;
use devices::pci::{PciConfiguration, PciDevice, PciId};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

pub use msix::{MsiMessage, MsiSink, MsixTable};

use crate::{needs_interrupt, Memory, VirtioDevice};

/// BAR 0 layout.
const COMMON_CFG: u64 = 0x0000;
const COMMON_CFG_SIZE: u64 = 0x38;
const ISR_CFG: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
const NOTIFY_CFG: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;
pub const BAR_SIZE: u64 = 0x8000;

/// virtio-pci capability types.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const PCI_CAP_VENDOR: u8 = 0x09;
const PCI_CAP_MSIX: u8 = 0x11;

/// Device status bits.
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FAILED: u8 = 0x80;
const NO_VECTOR: u16 = 0xffff;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// One virtqueue as the driver configures it.
struct QueueSlot {
    queue: Queue,
    vector: u16,
    /// Written by KVM when the guest notifies this queue (ioeventfd).
    event: EventFd,
}

/// A virtio device behind the PCI transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    queues: Vec<QueueSlot>,
    msix: MsixTable,
    msix_cap: usize,
    config_vector: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    isr: u8,
    memory: Memory,
    interrupts: Arc<dyn MsiSink>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("PCI configuration: {0}")]
    Config(#[from] devices::pci::config::ConfigError),
    #[error("queue setup: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A vendor-specific virtio capability (struct virtio_pci_cap), `extra` appended.
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![
        PCI_CAP_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl VirtioPciDevice {
    /// Wraps `device` with its BAR 0 at `bar_addr`. MSI-X gets one vector per queue plus one
    /// for configuration changes.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        memory: Memory,
        interrupts: Arc<dyn MsiSink>,
    ) -> Result<VirtioPciDevice, TransportError> {
        let kind = device.device_type();
        let (class, subclass) = match kind {
            crate::device_type::BLOCK => (0x01, 0x00),
            crate::device_type::NET => (0x02, 0x00),
            _ => (0xff, 0x00),
        };
        let mut config = PciConfiguration::new(PciId {
            vendor: 0x1af4,
            device: 0x1040 + kind as u16,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        });
        config.add_bar64(0, bar_addr, BAR_SIZE)?;
        config.add_capability(
            &virtio_cap(CAP_COMMON, COMMON_CFG, COMMON_CFG_SIZE, &[]),
            &[],
        )?;
        config.add_capability(&virtio_cap(CAP_ISR, ISR_CFG, 4, &[]), &[])?;
        config.add_capability(
            &virtio_cap(CAP_DEVICE, DEVICE_CFG, DEVICE_CFG_SIZE, &[]),
            &[],
        )?;
        let queue_count = device.queue_max_sizes().len();
        let notify_len = (queue_count as u64).max(1) * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(
            &virtio_cap(
                CAP_NOTIFY,
                NOTIFY_CFG,
                notify_len,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        let vectors = queue_count as u16 + 1;
        let mut msix = vec![PCI_CAP_MSIX, 0];
        msix.extend_from_slice(&(vectors - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0])?;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| {
                Ok(QueueSlot {
                    queue: Queue::new(size)?,
                    vector: NO_VECTOR,
                    event: EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?,
                })
            })
            .collect::<Result<Vec<_>, TransportError>>()?;
        Ok(VirtioPciDevice {
            config,
            device,
            queues,
            msix: MsixTable::new(vectors),
            msix_cap,
            config_vector: NO_VECTOR,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            isr: 0,
            memory,
            interrupts,
        })
    }

    /// Each queue's notification address (relative to BAR 0) and the eventfd to bind to it.
    pub fn queue_events(&self) -> Vec<(u64, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                (
                    NOTIFY_CFG + i as u64 * u64::from(NOTIFY_MULTIPLIER),
                    &q.event,
                )
            })
            .collect()
    }

    /// BAR 0's guest address as the guest programmed it.
    pub fn bar_addr(&self) -> u64 {
        self.config.bars().first().map_or(0, |bar| bar.addr)
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    /// Whether the device's queues are served outside the VMM (vhost-user).
    pub fn is_external(&self) -> bool {
        self.device.is_external()
    }

    /// Hands the ready queues, their notification eventfds and irqfds for their MSI-X vectors
    /// to a device served outside the VMM.
    fn activate_external(&mut self) -> Result<(), crate::Error> {
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            let message = self.msix.message(slot.vector).ok_or_else(|| {
                crate::Error::Backend(format!("queue {index} has no MSI-X vector"))
            })?;
            let call = self
                .interrupts
                .irqfd(message)
                .ok_or_else(|| crate::Error::Backend("no irqfd for an MSI".into()))?;
            let kick = slot
                .event
                .try_clone()
                .map_err(|e| crate::Error::Backend(e.to_string()))?;
            let (desc, avail, used) = queue_addresses(&slot.queue);
            queues.push(crate::ExternalQueue {
                index,
                size: slot.queue.size(),
                desc,
                avail,
                used,
                kick,
                call,
            });
        }
        self.device
            .activate_external(&self.memory, self.driver_features, queues)
    }

    /// Processes queue `index` after a notification, and interrupts the guest if needed.
    pub fn process_queue(&mut self, index: usize) {
        if !self.driver_ok() || self.device.is_external() {
            return;
        }
        let Some(slot) = self.queues.get_mut(index) else {
            return;
        };
        if !slot.queue.ready() {
            return;
        }
        let _ = slot.event.read();
        match self
            .device
            .process_queue(index, &mut slot.queue, &self.memory)
        {
            Ok(true) if needs_interrupt(&mut slot.queue, &self.memory) => {
                let vector = slot.vector;
                self.isr |= 1;
                self.msix.trigger(vector, self.interrupts.as_ref());
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!(
                    "virtio device {}: queue {index}: {e}",
                    self.device.device_type()
                );
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.vector = NO_VECTOR;
        }
        self.config_vector = NO_VECTOR;
        self.driver_features = 0;
        self.status = 0;
        self.isr = 0;
        self.queue_select = 0;
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        let select = usize::from(self.queue_select);
        let q = self.queues.get(select);
        match offset {
            0x00 => self.device_feature_select,
            0x04 => match self.device_feature_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x08 => self.driver_feature_select,
            0x0c => match self.driver_feature_select {
                0 => self.driver_features as u32,
                1 => (self.driver_features >> 32) as u32,
                _ => 0,
            },
            0x10 => u32::from(self.config_vector),
            0x12 => self.queues.len() as u32,
            0x14 => u32::from(self.status),
            0x15 => u32::from(self.config_generation),
            0x16 => u32::from(self.queue_select),
            0x18 => q.map_or(0, |q| u32::from(q.queue.size())),
            0x1a => q.map_or(u32::from(NO_VECTOR), |q| u32::from(q.vector)),
            0x1c => q.map_or(0, |q| u32::from(q.queue.ready())),
            0x1e => q.map_or(0, |_| select as u32),
            0x20 => q.map_or(0, |q| q.queue.desc_table() as u32),
            0x24 => q.map_or(0, |q| (q.queue.desc_table() >> 32) as u32),
            0x28 => q.map_or(0, |q| q.queue.avail_ring() as u32),
            0x2c => q.map_or(0, |q| (q.queue.avail_ring() >> 32) as u32),
            0x30 => q.map_or(0, |q| q.queue.used_ring() as u32),
            0x34 => q.map_or(0, |q| (q.queue.used_ring() >> 32) as u32),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, value: u32) {
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x00 => self.device_feature_select = value,
            0x08 => self.driver_feature_select = value,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            0x10 => self.config_vector = value as u16,
            0x14 => self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if configurable => {
                if let Some(q) = self.selected() {
                    q.queue.set_size(value as u16);
                }
            }
            0x1a => {
                if let Some(q) = self.selected() {
                    q.vector = value as u16;
                }
            }
            0x1c if configurable => {
                let memory = self.memory.clone();
                if let Some(q) = self.selected() {
                    q.queue.set_ready(value == 1);
                    if value == 1 && !q.queue.is_valid(&memory) {
                        log::warn!("virtio: driver enabled an invalid queue");
                        q.queue.set_ready(false);
                    }
                }
            }
            0x20..=0x34 if configurable => {
                let (lo, hi) = if offset.is_multiple_of(8) {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                if let Some(q) = self.selected() {
                    match offset & !7 {
                        0x20 => q.queue.set_desc_table_address(lo, hi),
                        0x28 => q.queue.set_avail_ring_address(lo, hi),
                        _ => q.queue.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let newly = status & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device.features() != 0 {
            // The driver accepted features we never offered: refuse FEATURES_OK.
            self.status = status & !STATUS_FEATURES_OK;
            return;
        }
        if newly & STATUS_DRIVER_OK != 0 {
            let event_idx = self.driver_features & crate::VIRTIO_RING_F_EVENT_IDX != 0;
            for slot in &mut self.queues {
                slot.queue.set_event_idx(event_idx);
            }
            self.device.set_acked_features(self.driver_features);
            if self.device.is_external() {
                if let Err(e) = self.activate_external() {
                    log::warn!("virtio device {}: {e}", self.device.device_type());
                    self.status = status | STATUS_FAILED;
                    return;
                }
            }
        }
        self.status = status;
    }

    fn msix_control(&self) -> u16 {
        let mut control = (self.msix.len() as u16).saturating_sub(1);
        if self.msix.enabled {
            control |= MSIX_ENABLE;
        }
        if self.msix.function_masked {
            control |= MSIX_FUNCTION_MASK;
        }
        control
    }
}

fn to_u32(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    for (b, d) in bytes.iter_mut().zip(data) {
        *b = *d;
    }
    u32::from_le_bytes(bytes)
}

fn put(value: u32, offset_in_reg: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(offset_in_reg + i).copied().unwrap_or(0);
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_CFG + COMMON_CFG_SIZE => {
                let reg = o & !3;
                put(
                    self.read_common_sized(o, reg, data.len()),
                    (o - reg) as usize,
                    data,
                )
            }
            ISR_CFG => {
                put(u32::from(self.isr), 0, data);
                self.isr = 0;
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_SIZE).contains(&o) => {
                let config = self.device.config();
                let start = (o - DEVICE_CFG) as usize;
                for (i, d) in data.iter_mut().enumerate() {
                    *d = config.get(start + i).copied().unwrap_or(0);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.read_table(o - MSIX_TABLE, data),
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => self.msix.read_pba(o - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG + COMMON_CFG_SIZE => self.write_common(o, to_u32(data)),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG, data);
            }
            o if (NOTIFY_CFG..MSIX_TABLE).contains(&o) => {
                // Reached only when no ioeventfd is bound to this address.
                self.process_queue(((o - NOTIFY_CFG) / u64::from(NOTIFY_MULTIPLIER)) as usize);
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                self.msix
                    .write_table(o - MSIX_TABLE, data, self.interrupts.as_ref())
            }
            _ => {}
        }
    }
}

impl VirtioPciDevice {
    /// Common-configuration fields narrower than 32 bits live at byte offsets.
    fn read_common_sized(&mut self, offset: u64, reg: u64, len: usize) -> u32 {
        if offset == reg || len == 4 {
            return self.read_common(reg);
        }
        // A 1- or 2-byte field at an unaligned offset: read it by its own offset.
        let value = self.read_common(offset);
        value << ((offset - reg) * 8)
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&self, reg: usize) -> u32 {
        if reg == self.msix_cap / 4 {
            let low = self.config.read_reg(reg) & 0xffff;
            return low | (u32::from(self.msix_control()) << 16);
        }
        self.config.read_reg(reg)
    }

    fn write_config(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let control_reg = self.msix_cap / 4;
        if reg == control_reg && offset + data.len() >= 4 && offset <= 3 {
            // The control word's high byte (enable, function mask) is in byte 3.
            let high = data[3 - offset];
            let was_masked = self.msix.function_masked || !self.msix.enabled;
            self.msix.enabled = high & 0x80 != 0;
            self.msix.function_masked = high & 0x40 != 0;
            if was_masked {
                self.msix.deliver_all_pending(self.interrupts.as_ref());
            }
            return;
        }
        self.config.write_reg(reg, offset, data);
    }
}

/// Where a queue lives in guest memory, for tests and the vhost-user adapter.
pub fn queue_addresses(queue: &Queue) -> (GuestAddress, GuestAddress, GuestAddress) {
    (
        GuestAddress(queue.desc_table()),
        GuestAddress(queue.avail_ring()),
        GuestAddress(queue.used_ring()),
    )
}
