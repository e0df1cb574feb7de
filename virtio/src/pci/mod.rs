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

pub use msix::{MsiMessage, MsixTable};

use crate::interrupt::{MsiVectors, NO_VECTOR};
use crate::{Activation, ActiveQueue, Interrupt, Memory, VirtioDevice};

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
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// One virtqueue as the driver configures it. The device gets a copy at DRIVER_OK.
struct QueueSlot {
    queue: Queue,
    /// Written by KVM when the guest notifies this queue (ioeventfd).
    event: EventFd,
}

/// A virtio device behind the PCI transport. The vCPUs reach it for register accesses only:
/// the device's queues are served elsewhere (its worker, or a vhost-user backend).
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Box<dyn VirtioDevice>,
    queues: Vec<QueueSlot>,
    msix: MsixTable,
    msix_cap: usize,
    interrupt: Interrupt,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    memory: Memory,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("PCI configuration: {0}")]
    Config(#[from] devices::pci::config::ConfigError),
    #[error("queue setup: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("the platform gave {given} MSI-X vectors for {needed}")]
    Vectors { given: usize, needed: usize },
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
    /// The MSI-X vectors a device with `queues` queues gets: one per queue plus one for
    /// configuration changes.
    pub fn vector_count(queues: usize) -> u16 {
        queues as u16 + 1
    }

    /// Wraps `device` with its BAR 0 at `bar_addr`; `vectors` delivers its
    /// [`VirtioPciDevice::vector_count`] MSI-X vectors.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        bar_addr: u64,
        memory: Memory,
        vectors: Arc<dyn MsiVectors>,
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
        let vector_count = Self::vector_count(queue_count);
        if (0..vector_count).any(|v| vectors.irqfd(v).is_none()) {
            return Err(TransportError::Vectors {
                given: (0..vector_count)
                    .filter(|&v| vectors.irqfd(v).is_some())
                    .count(),
                needed: usize::from(vector_count),
            });
        }
        let mut msix = vec![PCI_CAP_MSIX, 0];
        msix.extend_from_slice(&(vector_count - 1).to_le_bytes());
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let msix_cap = config.add_capability(&msix, &[0, 0, 0, 0xc0])?;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&size| {
                Ok(QueueSlot {
                    queue: Queue::new(size)?,
                    event: EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?,
                })
            })
            .collect::<Result<Vec<_>, TransportError>>()?;
        Ok(VirtioPciDevice {
            config,
            device,
            queues,
            msix: MsixTable::new(vector_count),
            msix_cap,
            interrupt: Interrupt::new(vectors, queue_count),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            memory,
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

    /// Hands the enabled queues, guest memory and the interrupt handle to the device.
    fn activate(&mut self) -> Result<(), crate::Error> {
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            queues.push(ActiveQueue {
                index,
                queue: Queue::try_from(slot.queue.state())?,
                kick: slot.event.try_clone().map_err(crate::Error::Worker)?,
            });
        }
        self.device.activate(Activation {
            mem: self.memory.clone(),
            features: self.driver_features,
            interrupt: self.interrupt.clone(),
            queues,
        })
    }

    fn reset(&mut self) {
        self.device.reset();
        for slot in &mut self.queues {
            slot.queue.reset();
            let _ = slot.event.read();
        }
        self.interrupt.reset();
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
    }

    /// Tells the platform where `vector` goes now, after the guest changed its table entry or
    /// the capability's enable and mask bits.
    fn sync_vector(&self, vector: usize) {
        self.interrupt
            .vectors()
            .route(vector as u16, self.msix.effective(vector));
    }

    fn sync_all_vectors(&self) {
        for vector in 0..self.msix.len() {
            self.sync_vector(vector);
        }
    }

    /// A vector number the driver wrote, or NO_VECTOR if this function has no such vector.
    fn valid_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.msix.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn status(&self) -> u8 {
        if self.interrupt.needs_reset() {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
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
            0x10 => u32::from(self.interrupt.config_vector()),
            0x12 => self.queues.len() as u32,
            0x14 => u32::from(self.status()),
            0x15 => u32::from(self.interrupt.config_generation()),
            0x16 => u32::from(self.queue_select),
            0x18 => q.map_or(0, |q| u32::from(q.queue.size())),
            0x1a => q.map_or(u32::from(NO_VECTOR), |_| {
                u32::from(self.interrupt.queue_vector(select))
            }),
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
            0x10 => self
                .interrupt
                .set_config_vector(self.valid_vector(value as u16)),
            0x14 => self.write_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if configurable => {
                if let Some(q) = self.selected() {
                    q.queue.set_size(value as u16);
                }
            }
            0x1a => {
                let select = usize::from(self.queue_select);
                if select < self.queues.len() {
                    let vector = self.valid_vector(value as u16);
                    self.interrupt.set_queue_vector(select, vector);
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
            if let Err(e) = self.activate() {
                log::warn!("virtio device {}: {e}", self.device.device_type());
                self.status = status | STATUS_FAILED;
                return;
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
            ISR_CFG => put(u32::from(self.interrupt.take_isr()), 0, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_SIZE).contains(&o) => {
                let config = self.device.config();
                let start = (o - DEVICE_CFG) as usize;
                for (i, d) in data.iter_mut().enumerate() {
                    *d = config.get(start + i).copied().unwrap_or(0);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.read_table(o - MSIX_TABLE, data),
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => self.read_pba(o - MSIX_PBA, data),
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
                // Reached only when no ioeventfd is bound to this address: kick by hand.
                let index = ((o - NOTIFY_CFG) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(slot) = self.queues.get(index) {
                    let _ = slot.event.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => {
                for vector in self.msix.write_table(o - MSIX_TABLE, data) {
                    self.sync_vector(vector);
                }
            }
            _ => {}
        }
    }
}

impl VirtioPciDevice {
    /// Stops the device's queue processing until [`VirtioPciDevice::resume`].
    pub fn pause(&mut self) -> Result<(), crate::Error> {
        self.device.pause()
    }

    pub fn resume(&mut self) -> Result<(), crate::Error> {
        self.device.resume()
    }

    /// The pending-bit array: a bit per vector raised while masked.
    fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let vectors = self.interrupt.vectors();
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|bit| first + bit < self.msix.len())
                .filter(|bit| vectors.pending((first + bit) as u16))
                .fold(0, |acc, bit| acc | (1 << bit));
        }
    }

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
            self.msix.enabled = high & 0x80 != 0;
            self.msix.function_masked = high & 0x40 != 0;
            self.sync_all_vectors();
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
