//! A pair of bounded frame queues, each end readable through an eventfd: an in-process
//! network for a NIC (the device tests and the `net_queues` fuzz target plug a NIC into one
//! and play the network at the other end).
//!
//! An end's eventfd is signalled exactly while frames wait for it (both are changed under
//! the queue's lock), so level-triggered polling works and a batch of frames costs one
//! wake-up. A full queue drops the frame, as a network does; TCP then retransmits.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::Backend;

/// Frames one direction holds before it drops (QEMU's net queues hold up to 10000).
pub const CAPACITY: usize = 4096;

struct Direction {
    frames: Mutex<VecDeque<Vec<u8>>>,
    ready: EventFd,
    dropped: AtomicU64,
}

impl Direction {
    fn new() -> std::io::Result<Direction> {
        Ok(Direction {
            frames: Mutex::new(VecDeque::new()),
            ready: EventFd::new(libc::EFD_NONBLOCK)?,
            dropped: AtomicU64::new(0),
        })
    }

    fn push(&self, frame: Vec<u8>) {
        let mut frames = match self.frames.lock() {
            Ok(frames) => frames,
            Err(poisoned) => poisoned.into_inner(),
        };
        if frames.len() >= CAPACITY {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        frames.push_back(frame);
        if frames.len() == 1 {
            let _ = self.ready.write(1);
        }
    }

    fn pop(&self) -> Option<Vec<u8>> {
        let mut frames = match self.frames.lock() {
            Ok(frames) => frames,
            Err(poisoned) => poisoned.into_inner(),
        };
        let frame = frames.pop_front();
        if frame.is_some() && frames.is_empty() {
            let _ = self.ready.read();
        }
        frame
    }
}

/// One end: sends into the other end's queue, receives from its own.
#[derive(Clone)]
pub struct End {
    inbox: Arc<Direction>,
    outbox: Arc<Direction>,
}

/// Two connected ends.
pub fn pair() -> std::io::Result<(End, End)> {
    let a = Arc::new(Direction::new()?);
    let b = Arc::new(Direction::new()?);
    Ok((
        End {
            inbox: a.clone(),
            outbox: b.clone(),
        },
        End {
            inbox: b,
            outbox: a,
        },
    ))
}

impl End {
    pub fn send(&self, frame: Vec<u8>) {
        self.outbox.push(frame);
    }

    pub fn recv(&self) -> Option<Vec<u8>> {
        self.inbox.pop()
    }

    /// Readable while frames wait for this end.
    pub fn ready_fd(&self) -> RawFd {
        self.inbox.ready.as_raw_fd()
    }

    /// Frames this end sent that the other end's full queue dropped.
    pub fn dropped(&self) -> u64 {
        self.outbox.dropped.load(Ordering::Relaxed)
    }
}

impl Backend for End {
    fn fd(&self) -> RawFd {
        self.ready_fd()
    }

    fn recv(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        Ok(End::recv(self))
    }

    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        End::send(self, frame.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::is_signalled;

    #[test]
    fn ready_while_frames_wait_and_full_queues_drop() {
        let (a, b) = pair().unwrap();
        assert!(b.recv().is_none());
        a.send(vec![1]);
        a.send(vec![2]);
        assert!(is_signalled(&b.inbox.ready));
        assert!(!is_signalled(&a.inbox.ready));
        assert_eq!(b.recv(), Some(vec![1]));
        assert!(is_signalled(&b.inbox.ready), "one frame still waits");
        assert_eq!(b.recv(), Some(vec![2]));
        assert!(!is_signalled(&b.inbox.ready));
        for n in 0..CAPACITY + 3 {
            a.send(vec![n as u8]);
        }
        assert_eq!(a.dropped(), 3);
        assert_eq!(b.recv(), Some(vec![0]));
    }
}
