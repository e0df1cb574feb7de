//! virtio-rng: fills each guest buffer with bytes from the host's getrandom(2).

use std::io::Write;

use virtio_queue::Queue;

use crate::{
    device_type, process_request_queue, Chain, Error, Memory, QueueDevice, COMMON_FEATURES,
};

const QUEUE_SIZES: &[u16] = &[256];
/// Most bytes served per request, whatever the guest's buffer size (as Firecracker does), so a
/// hostile guest cannot make the host produce unbounded randomness in one request.
pub const MAX_REQUEST: usize = 64 << 10;

#[derive(Default)]
pub struct Rng;

impl Rng {
    pub fn new() -> Rng {
        Rng
    }

    /// Fills one write-only chain; returns the number of bytes written.
    fn fill(chain: Chain, mem: &Memory) -> u32 {
        let mut writer = match chain.writer(mem) {
            Ok(writer) => writer,
            Err(e) => {
                log::debug!("virtio-rng: bad descriptor chain: {e}");
                return 0;
            }
        };
        let want = writer.available_bytes().min(MAX_REQUEST);
        let mut bytes = vec![0u8; want];
        if let Err(e) = getrandom(&mut bytes) {
            log::warn!("virtio-rng: getrandom failed: {e}");
            return 0;
        }
        match writer.write_all(&bytes) {
            Ok(()) => want as u32,
            Err(e) => {
                log::debug!("virtio-rng: cannot write the guest buffer: {e}");
                writer.bytes_written() as u32
            }
        }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live mutable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

impl QueueDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        process_request_queue(index, queue, mem, |chain| Rng::fill(chain, mem))
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    /// VRING_DESC_F_WRITE: the device writes this buffer.
    const WRITE: u16 = 2;

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn fills_write_only_buffers() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.build_desc_chain(&[desc(0x10_0000, 64, WRITE), desc(0x10_1000, 32, WRITE)])
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let used = Rng::new().process_queue(0, &mut queue, &mem).unwrap();
        assert!(used);
        let used_elem = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used_elem.len(), 96);
        let mut bytes = [0u8; 64];
        mem.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
        assert!(bytes.iter().any(|b| *b != 0), "random bytes arrived");
        assert_eq!(queue.next_used(), 1);
    }

    #[test]
    fn caps_large_requests_and_rejects_bad_chains() {
        let mem = Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.build_desc_chain(&[desc(0x10_0000, 0x80_0000, WRITE)])
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        Rng::new().process_queue(0, &mut queue, &mem).unwrap();
        let used = mock.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len() as usize, MAX_REQUEST);

        // A buffer outside guest memory: the chain is returned with nothing written.
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.build_desc_chain(&[desc(0xffff_0000, 64, WRITE)])
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        assert!(Rng::new().process_queue(0, &mut queue, &mem).unwrap());
        assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 0);
        assert!(Rng::new().process_queue(1, &mut queue, &mem).is_err());
    }
}
