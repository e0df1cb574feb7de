//! virtio-console through mock virtqueues, as Linux's virtio_console drives it: the control
//! handshake (DEVICE_READY → PORT_ADD, PORT_READY → CONSOLE_PORT / PORT_NAME / PORT_OPEN),
//! output reaching the host side without loss when it is slow, input waiting for the guest's
//! buffers, connections coming and going, and hostile control messages.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio::console::{
    event, port_queues, Console, PortBackend, PortConfig, CONTROL_RX, CONTROL_TX,
    VIRTIO_CONSOLE_F_MULTIPORT,
};
use virtio::interrupt::{MsiMessage, MsiVectors};
use virtio::{ActiveQueue, Interrupt, Memory, QueueDevice};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const WRITE: u16 = 2;

/// The host side as the test sees it.
#[derive(Default)]
struct Host {
    connected: bool,
    /// Bytes the host sends, not yet read by the device.
    input: Vec<u8>,
    /// What reached the host.
    output: Vec<u8>,
    /// How many more bytes the host takes before it is full.
    room: usize,
    interest: (bool, bool),
}

struct FakeBackend {
    host: Arc<Mutex<Host>>,
    fd: EventFd,
}

impl PortBackend for FakeBackend {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
    fn set_interest(&mut self, input: bool, output: bool) {
        self.host.lock().unwrap().interest = (input, output);
    }
    fn poll(&mut self) {}
    fn connected(&self) -> bool {
        self.host.lock().unwrap().connected
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut host = self.host.lock().unwrap();
        let n = buf.len().min(host.input.len());
        buf[..n].copy_from_slice(&host.input[..n]);
        host.input.drain(..n);
        Ok(n)
    }
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut host = self.host.lock().unwrap();
        let n = buf.len().min(host.room);
        host.room -= n;
        host.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

fn port(console: bool, name: Option<&str>) -> (PortConfig, Arc<Mutex<Host>>) {
    let host = Arc::new(Mutex::new(Host {
        connected: true,
        room: usize::MAX,
        ..Host::default()
    }));
    let backend = FakeBackend {
        host: host.clone(),
        fd: EventFd::new(0).unwrap(),
    };
    let config = PortConfig {
        console,
        name: name.map(String::from),
        backend: Box::new(backend),
    };
    (config, host)
}

struct NoVectors;

impl MsiVectors for NoVectors {
    fn irqfd(&self, _vector: u16) -> Option<&EventFd> {
        None
    }
    fn route(&self, _vector: u16, _message: Option<MsiMessage>) {}
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut m = id.to_le_bytes().to_vec();
    m.extend_from_slice(&event.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

/// A driver with mock queues for the control pair and two ports.
struct Driver<'a> {
    mem: &'a Memory,
    mocks: Vec<(usize, MockSplitQueue<'a, Memory>)>,
    queues: Vec<ActiveQueue>,
    interrupt: Interrupt,
    /// Next free guest buffer address, descriptor slot per queue.
    next_buffer: u64,
    next_desc: Vec<u16>,
    /// Used entries already looked at per queue.
    seen: Vec<u16>,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a Memory, indexes: &[usize]) -> Driver<'a> {
        let mut mocks = Vec::new();
        let mut queues = Vec::new();
        for (n, &index) in indexes.iter().enumerate() {
            let mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000 * n as u64), 64);
            queues.push(ActiveQueue {
                index,
                queue: mock.create_queue().unwrap(),
                kick: EventFd::new(0).unwrap(),
            });
            mocks.push((index, mock));
        }
        Driver {
            mem,
            mocks,
            queues,
            interrupt: Interrupt::new(Arc::new(NoVectors), 12),
            next_buffer: 0x10_0000,
            next_desc: vec![0; indexes.len()],
            seen: vec![0; indexes.len()],
        }
    }

    fn position(&self, index: usize) -> usize {
        self.mocks.iter().position(|(i, _)| *i == index).unwrap()
    }

    /// Makes a buffer available on queue `index`: `data` to read, or `len` bytes to fill.
    fn give(&mut self, index: usize, data: &[u8], len: u32) {
        let at = self.next_buffer;
        self.next_buffer += 0x1000;
        let n = self.position(index);
        let flags = if data.is_empty() { WRITE } else { 0 };
        let len = if data.is_empty() {
            len
        } else {
            data.len() as u32
        };
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        let slot = self.next_desc[n];
        self.next_desc[n] += 1;
        self.mocks[n]
            .1
            .add_desc_chains(&[desc(at, len, flags)], slot)
            .unwrap();
    }

    /// What the device put in queue `index`'s buffers since the last look.
    fn used(&mut self, index: usize) -> Vec<Vec<u8>> {
        let n = self.position(index);
        let mock = &self.mocks[n].1;
        let mut out = Vec::new();
        while self.seen[n] < mock.used().idx().load() {
            let elem = mock
                .used()
                .ring()
                .ref_at(self.seen[n] as usize)
                .unwrap()
                .load();
            let raw = mock.desc_table().load(elem.id() as u16).unwrap();
            let addr = SplitDescriptor::from(raw).addr().0;
            let mut bytes = vec![0u8; elem.len() as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            out.push(bytes);
            self.seen[n] += 1;
        }
        out
    }

    fn kick(&mut self, console: &mut Console, index: usize) {
        let n = self.position(index);
        console
            .process_queue(index, &mut self.queues[n].queue, self.mem)
            .unwrap();
    }

    fn backend(&mut self, console: &mut Console, n: usize) {
        console
            .backend_ready(n, &mut self.queues, self.mem, &self.interrupt)
            .unwrap();
    }

    /// Sends a control message and lets the device answer; returns the answers.
    fn say(&mut self, console: &mut Console, message: &[u8]) -> Vec<Vec<u8>> {
        self.give(CONTROL_TX, message, 0);
        self.kick(console, CONTROL_TX);
        self.backend(console, 0);
        self.used(CONTROL_RX)
    }
}

fn all_queues() -> Vec<usize> {
    let (rx1, tx1) = port_queues(1);
    vec![0, 1, CONTROL_RX, CONTROL_TX, rx1, tx1]
}

/// A console on port 0 and a named port 1 whose host side is not connected yet.
fn two_ports() -> (Console, Arc<Mutex<Host>>, Arc<Mutex<Host>>) {
    let (console_port, console_host) = port(true, None);
    let (named_port, named_host) = port(false, Some("org.nixos.test"));
    named_host.lock().unwrap().connected = false;
    let mut console = Console::new(vec![Some(console_port), Some(named_port)]).unwrap();
    console.set_acked_features(VIRTIO_CONSOLE_F_MULTIPORT);
    (console, console_host, named_host)
}

fn handshake<'a>(mem: &'a Memory, console: &mut Console) -> Driver<'a> {
    let mut driver = Driver::new(mem, &all_queues());
    for _ in 0..16 {
        driver.give(CONTROL_RX, &[], 64);
    }
    let added = driver.say(console, &control(0, event::DEVICE_READY, 1));
    assert_eq!(
        added,
        [
            control(0, event::PORT_ADD, 0),
            control(1, event::PORT_ADD, 0)
        ]
    );
    let ready0 = driver.say(console, &control(0, event::PORT_READY, 1));
    assert_eq!(
        ready0,
        [
            control(0, event::CONSOLE_PORT, 1),
            control(0, event::PORT_OPEN, 1)
        ],
        "a console port with its host side connected"
    );
    let ready1 = driver.say(console, &control(1, event::PORT_READY, 1));
    let mut name = control(1, event::PORT_NAME, 1);
    name.extend_from_slice(b"org.nixos.test\0");
    assert_eq!(ready1, [name, control(1, event::PORT_OPEN, 0)]);
    driver
}

#[test]
fn offers_multiport_with_the_ports_and_their_queues() {
    let (console, _, _) = two_ports();
    assert_ne!(console.features() & VIRTIO_CONSOLE_F_MULTIPORT, 0);
    assert_eq!(console.queue_max_sizes().len(), 6);
    assert_eq!(&console.config()[4..8], &2u32.to_le_bytes(), "max_nr_ports");
    assert_eq!(port_queues(0), (0, 1));
    assert_eq!(port_queues(3), (8, 9));
}

#[test]
fn the_handshake_adds_names_and_opens_ports_and_says_when_a_peer_comes() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let (mut console, _, named_host) = two_ports();
    let mut driver = handshake(&mem, &mut console);
    named_host.lock().unwrap().connected = true;
    driver.backend(&mut console, 2);
    assert_eq!(
        driver.used(CONTROL_RX),
        [control(1, event::PORT_OPEN, 1)],
        "the peer connected"
    );
    driver.backend(&mut console, 2);
    assert!(driver.used(CONTROL_RX).is_empty(), "said once");
    named_host.lock().unwrap().connected = false;
    driver.backend(&mut console, 2);
    assert_eq!(driver.used(CONTROL_RX), [control(1, event::PORT_OPEN, 0)]);
}

#[test]
fn output_reaches_a_slow_host_whole_and_in_order() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let (mut console, host, _) = two_ports();
    let mut driver = handshake(&mem, &mut console);
    host.lock().unwrap().room = 5;
    driver.give(1, b"first line\n", 0);
    driver.give(1, b"second line\n", 0);
    driver.kick(&mut console, 1);
    assert_eq!(host.lock().unwrap().output, b"first");
    assert_eq!(
        driver.used(1).len(),
        1,
        "the second buffer waits in the guest"
    );
    assert!(host.lock().unwrap().interest.1, "waiting for room");
    host.lock().unwrap().room = usize::MAX;
    driver.backend(&mut console, 1);
    assert_eq!(host.lock().unwrap().output, b"first line\nsecond line\n");
    assert_eq!(driver.used(1).len(), 1);
    assert!(!host.lock().unwrap().interest.1);
}

#[test]
fn input_waits_for_the_guests_buffers_and_the_host_is_not_read_meanwhile() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let (mut console, host, _) = two_ports();
    let mut driver = handshake(&mem, &mut console);
    host.lock().unwrap().input = b"echo hello\n".to_vec();
    driver.backend(&mut console, 1);
    assert!(
        !host.lock().unwrap().interest.0,
        "no guest buffer: stop reading"
    );
    driver.give(0, &[], 4);
    driver.give(0, &[], 64);
    driver.kick(&mut console, 0);
    assert_eq!(driver.used(0), [b"echo".to_vec(), b" hello\n".to_vec()]);
    assert!(host.lock().unwrap().interest.0, "room again: read on");
}

#[test]
fn output_to_a_port_with_no_peer_is_dropped_and_the_guest_goes_on() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let (mut console, _, named_host) = two_ports();
    let mut driver = handshake(&mem, &mut console);
    let (_, tx1) = port_queues(1);
    driver.give(tx1, b"nobody listens", 0);
    driver.kick(&mut console, tx1);
    assert_eq!(driver.used(tx1).len(), 1);
    assert!(named_host.lock().unwrap().output.is_empty());
}

#[test]
fn hostile_control_messages_and_queues_do_no_harm() {
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let (mut console, _, _) = two_ports();
    let mut driver = handshake(&mem, &mut console);
    for message in [
        vec![1, 2, 3],
        control(99, event::PORT_READY, 1),
        control(u32::MAX, event::PORT_OPEN, 1),
        control(0, 0xffff, 7),
        control(1, event::PORT_READY, 0),
    ] {
        assert!(driver.say(&mut console, &message).is_empty(), "{message:?}");
    }
    let n = driver.position(CONTROL_TX);
    // A transmit buffer outside guest memory.
    driver.mocks[n]
        .1
        .add_desc_chains(&[desc(0x4000_0000, 64, 0)], 20)
        .unwrap();
    driver.kick(&mut console, CONTROL_TX);
    let mut queue = driver.mocks[0].1.create_queue().unwrap();
    assert!(console.process_queue(40, &mut queue, &mem).is_err());
}
