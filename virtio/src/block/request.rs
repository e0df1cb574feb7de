//! One virtio-blk request: the header from the driver-readable part of the chain, data moved
//! between the disk and the chain in bounded chunks, the status in the chain's last writable byte.

use std::io::{Read, Write};

use virtio_queue::{Reader, Writer};

use super::{Block, MAX_DISCARD_SECTORS, SECTOR_SIZE};
use crate::{Chain, Memory};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Data moves through a buffer of at most this size, whatever the guest asks for.
const CHUNK: usize = 1 << 20;

/// Why a request failed, reported to the guest as a status.
#[derive(Debug)]
enum Failure {
    Unsupported,
    Io(String),
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::Unsupported => S_UNSUPP,
            Failure::Io(_) => S_IOERR,
        }
    }
}

fn io(what: impl std::fmt::Display) -> Failure {
    Failure::Io(what.to_string())
}

/// Handles one chain; returns the bytes written into it (data + status).
pub(super) fn handle(block: &Block, bounce: &mut Vec<u8>, chain: Chain, mem: &Memory) -> u32 {
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        _ => {
            log::debug!("virtio-blk: descriptor chain outside guest memory");
            return 0;
        }
    };
    // The status byte is the last writable byte; the rest of the writable part is data.
    let Some(data_room) = writer.available_bytes().checked_sub(1) else {
        log::debug!("virtio-blk: request without room for a status byte");
        return 0;
    };
    let mut status_writer = match writer.split_at(data_room) {
        Ok(status) => status,
        Err(_) => return 0,
    };
    let status = match execute(block, bounce, &mut reader, &mut writer) {
        Ok(()) => S_OK,
        Err(failure) => {
            if let Failure::Io(why) = &failure {
                log::debug!("virtio-blk: I/O error reported to the guest: {why}");
            }
            failure.status()
        }
    };
    if status_writer.write_all(&[status]).is_err() {
        return writer.bytes_written() as u32;
    }
    (writer.bytes_written() + 1) as u32
}

/// Header: type, reserved, sector.
fn read_header(reader: &mut Reader) -> Result<(u32, u64), Failure> {
    let mut header = [0u8; 16];
    reader
        .read_exact(&mut header)
        .map_err(|_| io("request header too short"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok((kind, u64::from_le_bytes(sector)))
}

/// The byte range `sector * 512 .. + len`, if it lies within the disk.
fn disk_range(block: &Block, sector: u64, len: u64) -> Result<u64, Failure> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| io("sector overflows"))?;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io("range overflows"))?;
    if end > block.disk.size() {
        return Err(io(format!(
            "range {offset:#x}..{end:#x} past the end of the disk"
        )));
    }
    Ok(offset)
}

/// `bounce`, at least `len` bytes long (it grows to the largest chunk once, then stays).
fn bounce_buffer(bounce: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if bounce.len() < len {
        bounce.resize(len, 0);
    }
    &mut bounce[..len]
}

fn execute(
    block: &Block,
    bounce: &mut Vec<u8>,
    reader: &mut Reader,
    writer: &mut Writer,
) -> Result<(), Failure> {
    let (kind, sector) = read_header(reader)?;
    let writable = !block.disk.readonly;
    match kind {
        T_IN => {
            let len = writer.available_bytes() as u64;
            let mut offset = disk_range(block, sector, len)?;
            let buf = bounce_buffer(bounce, CHUNK.min(len as usize));
            while writer.available_bytes() > 0 {
                let n = writer.available_bytes().min(CHUNK);
                block.disk.read_at(&mut buf[..n], offset).map_err(io)?;
                writer.write_all(&buf[..n]).map_err(io)?;
                offset += n as u64;
            }
            Ok(())
        }
        T_OUT if writable => {
            let len = reader.available_bytes() as u64;
            let mut offset = disk_range(block, sector, len)?;
            let buf = bounce_buffer(bounce, CHUNK.min(len as usize));
            while reader.available_bytes() > 0 {
                let n = reader.available_bytes().min(CHUNK);
                reader.read_exact(&mut buf[..n]).map_err(io)?;
                block.disk.write_at(&buf[..n], offset).map_err(io)?;
                offset += n as u64;
            }
            Ok(())
        }
        T_FLUSH => block.disk.flush().map_err(io),
        T_GET_ID => {
            let n = writer.available_bytes().min(block.serial.len());
            writer.write_all(&block.serial[..n]).map_err(io)
        }
        T_DISCARD | T_WRITE_ZEROES if writable => {
            let mut segment = [0u8; 16];
            reader
                .read_exact(&mut segment)
                .map_err(|_| io("discard segment too short"))?;
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&segment[..8]);
            let sector = u64::from_le_bytes(sector);
            let count = u32::from_le_bytes([segment[8], segment[9], segment[10], segment[11]]);
            if count > MAX_DISCARD_SECTORS {
                return Err(io("discard larger than max_discard_sectors"));
            }
            let len = u64::from(count) * SECTOR_SIZE;
            let offset = disk_range(block, sector, len)?;
            if kind == T_DISCARD {
                block.disk.discard(offset, len).map_err(io)
            } else {
                block.disk.write_zeroes(offset, len).map_err(io)
            }
        }
        T_OUT | T_DISCARD | T_WRITE_ZEROES => Err(io("the disk is read-only")),
        _ => Err(Failure::Unsupported),
    }
}
