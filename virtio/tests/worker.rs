//! Tier 1: a device's worker thread (virtio::worker::Hosted): pause and resume, reset and
//! reactivation, and a backend call that never returns.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio::interrupt::{MsiMessage, MsiVectors};
use virtio::worker::{Hosted, STOP_DEADLINE};
use virtio::{Activation, ActiveQueue, Interrupt, Memory, QueueDevice, VirtioDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

struct Vectors(Vec<EventFd>);

impl MsiVectors for Vectors {
    fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.0.get(usize::from(vector))
    }
    fn route(&self, _: u16, _: Option<MsiMessage>) {}
}

/// Counts requests; blocks in a request while `block` holds a receiver with nothing sent.
struct Counter {
    served: Arc<Mutex<u32>>,
    block: Option<mpsc::Receiver<()>>,
}

impl QueueDevice for Counter {
    fn device_type(&self) -> u32 {
        virtio::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        virtio::COMMON_FEATURES
    }
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, virtio::Error> {
        if let Some(block) = &self.block {
            let _ = block.recv(); // never answered: a stuck host call
        }
        virtio::process_request_queue(index, queue, mem, |_| {
            *self.served.lock().unwrap() += 1;
            0
        })
    }
}

struct Setup {
    mem: Memory,
    mock: MockSplitQueue<'static, Memory>,
    kick: EventFd,
    interrupt: Interrupt,
}

fn setup() -> Setup {
    let mem: &'static Memory = Box::leak(Box::new(
        Memory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap(),
    ));
    let mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
    let vectors = Vectors(vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()]);
    let interrupt = Interrupt::new(Arc::new(vectors), 1);
    interrupt.set_queue_vector(0, 0);
    Setup {
        mem: mem.clone(),
        mock,
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        interrupt,
    }
}

impl Setup {
    fn activation(&self) -> Activation {
        let mut queue: Queue = self.mock.create_queue().unwrap();
        queue.set_ready(true);
        Activation {
            mem: self.mem.clone(),
            features: virtio::COMMON_FEATURES,
            interrupt: self.interrupt.clone(),
            queues: vec![ActiveQueue {
                index: 0,
                queue,
                kick: self.kick.try_clone().unwrap(),
            }],
        }
    }

    fn request(&self) {
        let desc = RawDescriptor::from(Descriptor::new(0x10_0000, 16, 2, 0));
        let index = self.mock.avail().idx().load();
        self.mock.add_desc_chains(&[desc], index).unwrap();
        self.kick.write(1).unwrap();
    }
}

/// A hosted [`Counter`].
fn counting_device(
    name: &str,
    served: Arc<Mutex<u32>>,
    block: Option<mpsc::Receiver<()>>,
) -> Hosted {
    Hosted::new(name, Box::new(Counter { served, block })).expect("a worker thread")
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_paused_worker_serves_nothing_until_resumed() {
    let s = setup();
    let served = Arc::new(Mutex::new(0));
    let mut device = counting_device("test-pause", served.clone(), None);
    device.activate(s.activation()).unwrap();
    s.request();
    eventually("the first request", || *served.lock().unwrap() == 1);
    device.pause().unwrap();
    s.request();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(*served.lock().unwrap(), 1, "served while paused");
    device.resume().unwrap();
    eventually("the request after resume", || *served.lock().unwrap() == 2);
}

#[test]
fn reset_stops_the_worker_and_a_new_activation_serves_again() {
    let s = setup();
    let served = Arc::new(Mutex::new(0));
    let mut device = counting_device("test-reset", served.clone(), None);
    device.activate(s.activation()).unwrap();
    assert!(
        matches!(
            device.activate(s.activation()),
            Err(virtio::Error::AlreadyActive)
        ),
        "a second activation without a reset is refused"
    );
    device.reset();
    s.request();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(*served.lock().unwrap(), 0, "served after the reset");
    let s = setup();
    device.activate(s.activation()).unwrap();
    s.request();
    eventually("served after reactivation", || *served.lock().unwrap() == 1);
}

#[test]
fn a_stuck_backend_is_left_behind_after_the_deadline() {
    let s = setup();
    let (_never, block) = mpsc::channel();
    let mut device = counting_device("test-stuck", Arc::new(Mutex::new(0)), Some(block));
    device.activate(s.activation()).unwrap();
    s.request();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    device.reset();
    let took = started.elapsed();
    assert!(took >= STOP_DEADLINE, "waited {took:?}");
    assert!(took < STOP_DEADLINE * 2, "waited {took:?}");
    assert!(
        matches!(device.activate(s.activation()), Err(virtio::Error::Lost)),
        "a device left behind cannot start again"
    );
    drop(device); // does not wait again
}
