//! virtio-blk (virtio 1.2 §5.2): reads, writes, flush, GET_ID, discard and write-zeroes on a
//! raw or qcow2 image. Every guest request is checked against the disk's size and the chain's
//! shape; I/O errors reach the guest as VIRTIO_BLK_S_IOERR (QEMU's `werror=report`).

pub mod disk;
mod request;

use std::path::PathBuf;

use virtio_queue::Queue;

pub use disk::{DiskError, DiskImage, Format};

use crate::{device_type, process_request_queue, Error, Memory, QueueDevice, COMMON_FEATURES};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZES: &[u16] = &[256];
/// Data segments per request the driver may use (config `seg_max`).
const SEG_MAX: u32 = 126;
/// Sectors one discard or write-zeroes request may cover.
const MAX_DISCARD_SECTORS: u32 = 1 << 20;

pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// What a block device serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub format: Option<Format>,
    pub readonly: bool,
    /// What VIRTIO_BLK_T_GET_ID answers (at most 20 bytes; /dev/disk/by-id/virtio-SERIAL).
    pub serial: Option<String>,
}

pub struct Block {
    disk: DiskImage,
    serial: [u8; 20],
    /// Data on its way between guest memory and the image, reused across requests.
    bounce: Vec<u8>,
}

impl Block {
    pub fn open(config: &BlockConfig) -> Result<Block, DiskError> {
        let disk = DiskImage::open(&config.path, config.format, config.readonly)?;
        let mut serial = [0u8; 20];
        if let Some(id) = &config.serial {
            for (slot, byte) in serial.iter_mut().zip(id.bytes()) {
                *slot = byte;
            }
        }
        Ok(Block {
            disk,
            serial,
            bounce: Vec::new(),
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }
}

impl QueueDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut features =
            COMMON_FEATURES | features::SEG_MAX | features::BLK_SIZE | features::FLUSH;
        if self.disk.readonly {
            features |= features::RO;
        } else {
            features |= features::DISCARD | features::WRITE_ZEROES;
        }
        features
    }

    /// struct virtio_blk_config, up to the write-zeroes fields.
    fn config(&self) -> Vec<u8> {
        let mut c = Vec::with_capacity(64);
        c.extend_from_slice(&self.capacity_sectors().to_le_bytes()); // capacity
        c.extend_from_slice(&0u32.to_le_bytes()); // size_max
        c.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c.extend_from_slice(&[0; 4]); // geometry
        c.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // topology
        c.push(0); // writeback
        c.push(0); // unused0
        c.extend_from_slice(&1u16.to_le_bytes()); // num_queues
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c.extend_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c.extend_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c.extend_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c.extend_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c.push(0); // write_zeroes_may_unmap
        c.extend_from_slice(&[0; 3]);
        c
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        let mut bounce = std::mem::take(&mut self.bounce);
        let used = process_request_queue(index, queue, mem, |chain| {
            request::handle(self, &mut bounce, chain, mem)
        });
        self.bounce = bounce;
        used
    }
}
