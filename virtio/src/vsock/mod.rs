//! virtio-vsock, nixvmm's own (`--vsock cid=N,uds=PATH`, QEMU's `-device
//! vhost-vsock-pci,guest-cid=N`): the guest's stream sockets to the host, served by a
//! [`Muxer`] of Unix sockets. Packets are read from and written to the queues with the
//! virtio-vsock crate's `VsockPacket`. The event queue gets no events (there is no
//! migration to announce).

pub mod muxer;

use std::os::fd::RawFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

use crate::{
    device_type, needs_interrupt, process_chains, ActiveQueue, Chain, Error, Interrupt, Memory,
    QueueDevice, COMMON_FEATURES,
};
pub use muxer::{Header, Muxer};

pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;
const QUEUE_SIZES: &[u16] = &[256, 256, 256];
/// The largest payload a transmitted packet may carry (Linux sends at most 64 KiB).
const MAX_PACKET_DATA: u32 = 64 * 1024;
/// CIDs 0 to 2 are the hypervisor, the loopback and the host; `u32::MAX` is VMADDR_CID_ANY.
pub const MIN_GUEST_CID: u64 = 3;

pub struct Vsock {
    cid: u64,
    muxer: Muxer,
}

impl Vsock {
    pub fn new(cid: u64, muxer: Muxer) -> Vsock {
        Vsock { cid, muxer }
    }

    /// Fills receive buffers with the muxer's packets until either runs out.
    fn receive(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, Error> {
        let mut used_any = false;
        while self.muxer.has_packets() {
            let Some(mut chain) = queue.iter(mem)?.next() else {
                // No buffers: ask for a kick when the guest posts some.
                if queue.enable_notification(mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let written = self.fill(&mut chain, mem);
            queue.add_used(mem, head, written)?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Writes the next packet into one receive chain; returns the bytes written (0 for a
    /// chain that cannot hold a header, which the guest gets back empty).
    fn fill(&mut self, chain: &mut Chain, mem: &Memory) -> u32 {
        let mut packet = match VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PACKET_DATA) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("vsock: unusable receive buffer: {e}");
                return 0;
            }
        };
        let room = packet.data_slice().map_or(0, |d| d.len());
        let Some((h, data)) = self.muxer.next_for_guest(room) else {
            return 0;
        };
        packet
            .set_src_cid(h.src_cid)
            .set_dst_cid(h.dst_cid)
            .set_src_port(h.src_port)
            .set_dst_port(h.dst_port)
            .set_len(data.len() as u32)
            .set_type(h.type_)
            .set_op(h.op)
            .set_flags(h.flags)
            .set_buf_alloc(h.buf_alloc)
            .set_fwd_cnt(h.fwd_cnt);
        if let Some(slice) = packet.data_slice() {
            if slice.copy_from_slice_checked(&data).is_err() {
                return 0;
            }
        }
        (PKT_HEADER_SIZE + data.len()) as u32
    }

    /// Hands one transmitted packet to the muxer; a malformed one is dropped.
    fn transmit(&mut self, chain: &mut Chain, mem: &Memory) {
        let packet = match VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PACKET_DATA) {
            Ok(p) => p,
            Err(e) => {
                log::debug!("vsock: malformed packet from the guest: {e}");
                return;
            }
        };
        let mut data = vec![0u8; packet.len() as usize];
        if let Some(slice) = packet.data_slice() {
            if slice.copy_to(&mut data[..]) != data.len() {
                return;
            }
        }
        let header = Header {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            len: packet.len(),
            type_: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        };
        self.muxer.from_guest(&header, &data);
    }
}

/// A slice copy that fails instead of panicking on a length mismatch.
trait CopyChecked {
    fn copy_from_slice_checked(&self, data: &[u8]) -> Result<(), ()>;
}

impl<B: vm_memory::bitmap::BitmapSlice> CopyChecked for vm_memory::VolatileSlice<'_, B> {
    fn copy_from_slice_checked(&self, data: &[u8]) -> Result<(), ()> {
        if data.len() > self.len() {
            return Err(());
        }
        self.copy_from(data);
        Ok(())
    }
}

impl QueueDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn config(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        match index {
            RX => self.receive(queue, mem),
            TX => {
                let used = process_chains(queue, mem, |mut chain| {
                    self.transmit(&mut chain, mem);
                    0
                })?;
                if self.muxer.has_packets() {
                    self.muxer.wake();
                }
                Ok(used)
            }
            // Event buffers stay with the device: there is nothing to announce.
            EVENT => Ok(false),
            other => Err(Error::NoQueue(other)),
        }
    }

    fn reset(&mut self) {
        self.muxer.reset();
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.fd()]
    }

    fn backend_ready(
        &mut self,
        _n: usize,
        queues: &mut [ActiveQueue],
        mem: &Memory,
        interrupt: &Interrupt,
    ) -> Result<(), Error> {
        self.muxer.poll();
        let Some(rx) = queues.iter_mut().find(|q| q.index == RX) else {
            return Ok(());
        };
        if self.receive(&mut rx.queue, mem)? && needs_interrupt(&mut rx.queue, mem) {
            interrupt.signal_used(RX);
        }
        Ok(())
    }
}
