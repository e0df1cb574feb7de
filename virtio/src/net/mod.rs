//! virtio-net: Ethernet frames between the guest's receive and transmit queues and a host
//! [`Backend`] (the user-mode network, a VDE switch, a tap device).
//!
//! Frames cross the queues behind a 12-byte `virtio_net_hdr_v1` (virtio 1.2, 5.1.6). With a
//! backend that takes no offloads the header carries nothing: transmitted frames arrive with
//! complete checksums and no segmentation, because no offload feature was offered. A backend
//! whose frames carry the same header (a tap with IFF_VNET_HDR) gets it as the guest wrote it,
//! and offers the checksum and segmentation offloads it accepts. Received
//! frames span several buffers when the driver accepted `VIRTIO_NET_F_MRG_RXBUF`. A received
//! frame the guest has no buffers for waits (one at a time) and the backend is not read until
//! the guest posts buffers, so a guest that stops receiving only costs frames the backend
//! itself drops.

pub mod channel;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    device_type, needs_interrupt, process_chains, ActiveQueue, Chain, Error, Interrupt, LiveConfig,
    Memory, QueueDevice, COMMON_FEATURES,
};

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// `struct virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
pub const HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
/// The largest Ethernet frame without segmentation offloads: 1500 bytes of payload, the
/// 14-byte Ethernet header and a VLAN tag.
pub const MAX_FRAME: usize = 1518;
/// The smallest frame worth sending: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// The largest frame with segmentation offloads: a 64 KiB IP packet and its link header.
pub const MAX_GSO_FRAME: usize = 65_550;
const HOST_GSO: u64 = VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_UFO;
const GUEST_GSO: u64 = VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_UFO;

pub const RX: usize = 0;
pub const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// Where a NIC's frames go and come from: whole Ethernet frames, behind a virtio-net header
/// only when [`Backend::vnet_header`] says so.
pub trait Backend: Send {
    /// Readable while [`Backend::recv`] may have a frame.
    fn fd(&self) -> RawFd;
    /// The next frame from the network, or `None` when none is waiting.
    fn recv(&mut self) -> std::io::Result<Option<Vec<u8>>>;
    /// Hands one frame to the network. A backend that cannot take it now drops it, as a
    /// network does; an error means the backend is gone.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Whether frames both ways carry a `virtio_net_hdr_v1` first.
    fn vnet_header(&self) -> bool {
        false
    }
    /// The offload feature bits (`VIRTIO_NET_F_CSUM`, `…_HOST_TSO4`, `…_GUEST_CSUM`, …) the
    /// backend can take; only a backend with a vnet header can take any.
    fn offloads(&self) -> u64 {
        0
    }
    /// The driver accepted `features`: the backend produces only the guest offloads among
    /// them from now on.
    fn set_offloads(&mut self, _features: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// A NIC's link state, shared with whoever switches it (`set_link`): the guest sees it in
/// the status field and gets a configuration-change interrupt when it changes.
#[derive(Clone)]
pub struct Link(Arc<LinkState>);

struct LinkState {
    up: AtomicBool,
    changed: EventFd,
}

impl Link {
    pub fn new() -> std::io::Result<Link> {
        Ok(Link(Arc::new(LinkState {
            up: AtomicBool::new(true),
            changed: EventFd::new(libc::EFD_NONBLOCK)?,
        })))
    }

    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Acquire)
    }

    /// Switches the link; the guest is told when the state actually changes.
    pub fn set(&self, up: bool) {
        if self.0.up.swap(up, Ordering::AcqRel) != up {
            if let Err(e) = self.0.changed.write(1) {
                log::warn!("virtio-net: cannot signal a link change: {e}");
            }
        }
    }
}

/// Frames counted by a NIC, for logs and tests.
#[derive(Default)]
pub struct Counters {
    pub tx_frames: AtomicU64,
    pub rx_frames: AtomicU64,
    /// Transmitted chains dropped because they were malformed, too short or too long.
    pub tx_bad: AtomicU64,
    /// Received frames dropped: too large for the guest's buffers, or the link was down.
    pub rx_dropped: AtomicU64,
}

pub struct Net {
    mac: [u8; 6],
    backend: Box<dyn Backend>,
    link: Link,
    counters: Arc<Counters>,
    /// The features the driver accepted.
    acked: u64,
    /// A received frame waiting for the guest to post buffers.
    pending: Option<Vec<u8>>,
    /// Set once the backend failed; the NIC then behaves as unplugged from the network.
    backend_gone: bool,
}

enum Delivery {
    Delivered,
    /// Not enough buffers (this many were available): the frame waits.
    NoBuffers(u16),
    /// The frame does not fit a buffer of this driver (no mergeable buffers).
    TooLarge,
}

impl Net {
    pub fn new(mac: [u8; 6], backend: Box<dyn Backend>, link: Link) -> Net {
        Net {
            mac,
            backend,
            link,
            counters: Arc::default(),
            acked: 0,
            pending: None,
            backend_gone: false,
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    fn mergeable(&self) -> bool {
        self.acked & VIRTIO_NET_F_MRG_RXBUF != 0
    }

    /// The largest frame (without header) the driver may send or receive: 64 KiB once it
    /// accepted segmentation offloads in that direction (`gso`), a plain frame otherwise.
    fn frame_limit(&self, gso: u64) -> usize {
        if self.acked & gso != 0 {
            MAX_GSO_FRAME
        } else {
            MAX_FRAME
        }
    }

    fn backend_failed(&mut self, what: &str, e: std::io::Error) {
        if !self.backend_gone {
            log::error!(
                "virtio-net {}: {what}: {e}; no more frames",
                mac_text(&self.mac)
            );
            self.backend_gone = true;
        }
    }

    /// Reads one transmitted chain and hands its frame to the backend.
    fn transmit(&mut self, chain: Chain, mem: &Memory) {
        let frame = match read_frame(chain, mem, self.frame_limit(HOST_GSO)) {
            Some(frame) => frame,
            None => {
                self.counters.tx_bad.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if !self.link.is_up() || self.backend_gone {
            return;
        }
        self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
        let skip = if self.backend.vnet_header() {
            0
        } else {
            HEADER_LEN
        };
        if let Err(e) = self.backend.send(&frame[skip..]) {
            self.backend_failed("sending a frame", e);
        }
    }

    /// Moves frames from the backend into the receive queue until either runs out. Returns
    /// whether buffers were used.
    fn receive(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, Error> {
        let mut used_any = false;
        let mut rechecked = false;
        loop {
            let frame = match self.pending.take() {
                Some(frame) => frame,
                None if self.backend_gone => return Ok(used_any),
                None => match self.backend.recv() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => return Ok(used_any),
                    Err(e) => {
                        self.backend_failed("receiving a frame", e);
                        return Ok(used_any);
                    }
                },
            };
            // The backend's own header, or an empty one.
            let split = if self.backend.vnet_header() {
                frame.split_at_checked(HEADER_LEN)
            } else {
                Some((&[0u8; HEADER_LEN][..], &frame[..]))
            };
            let Some((header, payload)) = split.filter(|(_, payload)| {
                self.link.is_up() && payload.len() <= self.frame_limit(GUEST_GSO)
            }) else {
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            match deliver(queue, mem, header, payload, self.mergeable())? {
                Delivery::Delivered => {
                    self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                    used_any = true;
                }
                Delivery::TooLarge => {
                    self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::NoBuffers(seen) => {
                    self.pending = Some(frame);
                    // Ask for a kick when buffers arrive; some may have come meanwhile.
                    // Once, since a guest's kick after this is not missed; more often a
                    // hostile avail index (beyond the queue size) would loop here forever.
                    queue.enable_notification(mem)?;
                    let available = queue.avail_idx(mem, Ordering::Acquire)?
                        - std::num::Wrapping(queue.next_avail());
                    if !rechecked && available.0 > seen {
                        rechecked = true;
                        continue;
                    }
                    return Ok(used_any);
                }
            }
        }
    }

    fn receive_and_interrupt(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Memory,
        interrupt: &Interrupt,
    ) -> Result<(), Error> {
        let Some(rx) = queues.iter_mut().find(|q| q.index == RX) else {
            // The driver did not enable the receive queue: frames have nowhere to go.
            self.discard_received();
            return Ok(());
        };
        if self.receive(&mut rx.queue, mem)? && needs_interrupt(&mut rx.queue, mem) {
            interrupt.signal_used(RX);
        }
        Ok(())
    }

    fn discard_received(&mut self) {
        self.pending = None;
        while let Ok(Some(_)) = self.backend.recv() {
            self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The header and frame of one transmitted chain, or `None` for a chain the device drops: a
/// buffer outside guest memory, a device-writable buffer, no room for a header and an
/// Ethernet header, or more than a frame can be.
fn read_frame(chain: Chain, mem: &Memory, max: usize) -> Option<Vec<u8>> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes();
    if !(HEADER_LEN + MIN_FRAME..=HEADER_LEN + max).contains(&len) {
        log::debug!("virtio-net: dropping a {len}-byte transmit chain");
        return None;
    }
    let mut frame = vec![0u8; len];
    std::io::Read::read_exact(&mut reader, &mut frame).ok()?;
    Some(frame)
}

/// Writes `frame` behind `header` (its num_buffers set here) into as many receive buffers as
/// it needs (one unless `mergeable`), or takes none back when they do not suffice.
fn deliver(
    queue: &mut Queue,
    mem: &Memory,
    header: &[u8],
    frame: &[u8],
    mergeable: bool,
) -> Result<Delivery, Error> {
    let needed = HEADER_LEN + frame.len();
    let mut buffers = Vec::new();
    // Chains the device cannot write into: returned empty once the frame is placed (or
    // re-read later when it is not, so that positions can be rewound).
    let mut bad = Vec::new();
    let mut room = 0;
    while room < needed {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            let popped = buffers.len() + bad.len();
            for _ in 0..popped {
                queue.go_to_previous_position();
            }
            return Ok(Delivery::NoBuffers(popped as u16));
        };
        let head = chain.head_index();
        match chain.writer(mem) {
            Ok(writer) => {
                room += writer.available_bytes();
                buffers.push((head, writer));
            }
            Err(e) => {
                log::debug!("virtio-net: bad receive buffer: {e}");
                bad.push(head);
            }
        }
        if !mergeable && !buffers.is_empty() && room < needed {
            // Keep the one good buffer for a smaller frame; those before it are spent.
            queue.go_to_previous_position();
            return_empty(queue, mem, &bad)?;
            return Ok(Delivery::TooLarge);
        }
    }
    return_empty(queue, mem, &bad)?;
    let mut data = Vec::with_capacity(needed);
    data.extend_from_slice(&header[..NUM_BUFFERS_OFFSET]);
    data.extend_from_slice(&(buffers.len() as u16).to_le_bytes());
    data.extend_from_slice(frame);
    let mut offset = 0;
    for (head, mut writer) in buffers {
        let take = writer.available_bytes().min(needed - offset);
        if let Err(e) = std::io::Write::write_all(&mut writer, &data[offset..offset + take]) {
            log::debug!("virtio-net: cannot write a receive buffer: {e}");
        }
        let written = writer.bytes_written();
        offset += written;
        queue.add_used(mem, head, written as u32)?;
    }
    Ok(Delivery::Delivered)
}

fn return_empty(queue: &mut Queue, mem: &Memory, heads: &[u16]) -> Result<(), Error> {
    for head in heads {
        queue.add_used(mem, *head, 0)?;
    }
    Ok(())
}

pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn config_bytes(mac: &[u8; 6], link: &Link) -> Vec<u8> {
    let status = if link.is_up() {
        VIRTIO_NET_S_LINK_UP
    } else {
        0
    };
    let mut config = mac.to_vec();
    config.extend_from_slice(&status.to_le_bytes());
    // max_virtqueue_pairs (meaningful only with VIRTIO_NET_F_MQ, which is not offered).
    config.extend_from_slice(&1u16.to_le_bytes());
    config
}

impl QueueDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let offloads = if self.backend.vnet_header() {
            self.backend.offloads()
        } else {
            0
        };
        COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF | offloads
    }

    fn config(&self) -> Vec<u8> {
        config_bytes(&self.mac, &self.link)
    }

    fn live_config(&self) -> Option<LiveConfig> {
        let (mac, link) = (self.mac, self.link.clone());
        Some(Arc::new(move || config_bytes(&mac, &link)))
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
        if let Err(e) = self.backend.set_offloads(features) {
            log::warn!(
                "virtio-net {}: cannot set offloads: {e}",
                mac_text(&self.mac)
            );
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        match index {
            RX => self.receive(queue, mem),
            TX => process_chains(queue, mem, |chain| {
                self.transmit(chain, mem);
                0
            }),
            other => Err(Error::NoQueue(other)),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
        self.acked = 0;
    }

    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.backend.fd(), self.link.0.changed.as_raw_fd()]
    }

    fn backend_wanted(&self, n: usize) -> bool {
        n != 0 || (self.pending.is_none() && !self.backend_gone)
    }

    fn backend_ready(
        &mut self,
        n: usize,
        queues: &mut [ActiveQueue],
        mem: &Memory,
        interrupt: &Interrupt,
    ) -> Result<(), Error> {
        match n {
            0 => self.receive_and_interrupt(queues, mem, interrupt),
            _ => {
                let _ = self.link.0.changed.read();
                interrupt.signal_config_change();
                Ok(())
            }
        }
    }
}
