//! virtio-console with several ports (`VIRTIO_CONSOLE_F_MULTIPORT`), as QEMU's virtio-serial
//! with `virtconsole` and `virtserialport`: a console port is the guest's /dev/hvcN, a named
//! port its /dev/virtio-ports/NAME. Each port's host side is a [`PortBackend`] (a chardev).
//!
//! Queues: port 0 receive and transmit (0, 1), the control receive and transmit queues (2,
//! 3), then two per further port (port p at 2p + 2 and 2p + 3). The driver says
//! DEVICE_READY on the control queue; the device adds each port (PORT_ADD), and when the
//! driver says PORT_READY, marks consoles (CONSOLE_PORT), names named ports (PORT_NAME) and
//! says whether the host side is open (PORT_OPEN), again whenever that changes.
//!
//! Output is never lost to a slow host side: a transmit buffer is taken from the guest only
//! when the previous one has reached the backend, so the guest waits. Input waits in a small
//! buffer for the guest's receive buffers, and the backend is not read meanwhile. A port
//! whose host side is not connected drops its output, as QEMU does.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    device_type, needs_interrupt, process_chains, ActiveQueue, Error, Interrupt, Memory,
    QueueDevice, COMMON_FEATURES,
};

pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
pub const CONTROL_RX: usize = 2;
pub const CONTROL_TX: usize = 3;
const QUEUE_SIZE: u16 = 128;
/// Most bytes read from a backend at once, held until the guest takes them.
const INPUT_CHUNK: usize = 4096;
/// Most bytes taken from one transmit buffer; the rest of a longer one is dropped (Linux's
/// are at most a page).
const OUTPUT_LIMIT: usize = 64 << 10;
/// Control messages waiting for control receive buffers, at most.
const CONTROL_BACKLOG: usize = 1024;

/// Control events (virtio 1.2, 5.3.6.2).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const PORT_ADD: u16 = 1;
    pub const PORT_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// The receive and transmit queue of port `id`.
pub fn port_queues(id: usize) -> (usize, usize) {
    if id == 0 {
        (0, 1)
    } else {
        (2 * id + 2, 2 * id + 3)
    }
}

/// The host side of a port: a byte stream that may come and go (a socket's peer).
pub trait PortBackend: Send {
    /// Readable when [`PortBackend::poll`] has something to do: input or room for output
    /// (as asked with [`PortBackend::set_interest`]), a connection, a hang-up.
    fn fd(&self) -> RawFd;
    /// What the port waits for: input (the guest has room for it), room for output.
    fn set_interest(&mut self, input: bool, output: bool);
    /// Takes what made [`PortBackend::fd`] readable (accepts a connection, notices a hang-up).
    fn poll(&mut self);
    /// Whether a peer is there to read from and write to.
    fn connected(&self) -> bool;
    /// Input now: `Ok(0)` when none is waiting (or the peer left: see `connected`).
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Output: how much was taken, `Ok(0)` when there is no room now.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize>;
}

/// One port as configured.
pub struct PortConfig {
    /// A console port (`virtconsole`): the guest's /dev/hvcN.
    pub console: bool,
    /// The name the guest sees in /dev/virtio-ports/.
    pub name: Option<String>,
    pub backend: Box<dyn PortBackend>,
}

struct Port {
    config: PortConfig,
    /// The driver said PORT_READY.
    ready: bool,
    /// The guest opened the port (PORT_OPEN from the driver).
    guest_open: bool,
    /// What the driver was last told about the host side.
    told_connected: Option<bool>,
    /// Host input the guest has no buffer for yet.
    input: Vec<u8>,
    /// Guest output the backend has not taken yet (and where it stands).
    output: Vec<u8>,
    output_at: usize,
}

impl Port {
    fn new(config: PortConfig) -> Port {
        Port {
            config,
            ready: false,
            guest_open: false,
            told_connected: None,
            input: Vec::new(),
            output: Vec::new(),
            output_at: 0,
        }
    }

    fn output_pending(&self) -> bool {
        self.output_at < self.output.len()
    }

    /// Hands pending output to the backend; false while some is left.
    fn flush(&mut self, name: &str) -> bool {
        while self.output_pending() {
            if !self.config.backend.connected() {
                self.output.clear();
                self.output_at = 0;
                return true;
            }
            match self.config.backend.write(&self.output[self.output_at..]) {
                Ok(0) => return false,
                Ok(n) => self.output_at += n,
                Err(e) => {
                    log::debug!("{name}: output dropped: {e}");
                    self.output_at = self.output.len();
                }
            }
        }
        self.output.clear();
        self.output_at = 0;
        true
    }

    fn update_interest(&mut self) {
        let input = self.input.is_empty();
        let output = self.output_pending();
        self.config.backend.set_interest(input, output);
    }
}

/// virtio-console with `ports` (an entry of `None` is an id with no port, as QEMU leaves
/// port 0 to a `virtconsole`).
pub struct Console {
    ports: Vec<Option<Port>>,
    queue_sizes: Vec<u16>,
    multiport: bool,
    /// Control messages for the driver, waiting for control receive buffers.
    control: VecDeque<Vec<u8>>,
    /// Written when `control` has messages, so that the worker delivers them.
    control_waiting: EventFd,
}

impl Console {
    pub fn new(ports: Vec<Option<PortConfig>>) -> std::io::Result<Console> {
        let count = ports.len().max(1);
        Ok(Console {
            ports: ports.into_iter().map(|p| p.map(Port::new)).collect(),
            queue_sizes: vec![QUEUE_SIZE; 2 * count + 2],
            multiport: true,
            control: VecDeque::new(),
            control_waiting: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn name(id: usize) -> String {
        format!("virtio-console port {id}")
    }

    fn port_of_queue(&self, index: usize) -> Option<(usize, bool)> {
        let (id, transmit) = match index {
            0 | 1 => (0, index == 1),
            CONTROL_RX | CONTROL_TX => return None,
            _ => ((index - 2) / 2, index % 2 == 1),
        };
        self.ports.get(id)?.as_ref()?;
        Some((id, transmit))
    }

    fn send_control(&mut self, id: usize, event: u16, value: u16, extra: &[u8]) {
        if self.control.len() >= CONTROL_BACKLOG {
            log::warn!("virtio-console: the driver takes no control messages; dropping some");
            return;
        }
        let mut message = Vec::with_capacity(8 + extra.len());
        message.extend_from_slice(&(id as u32).to_le_bytes());
        message.extend_from_slice(&event.to_le_bytes());
        message.extend_from_slice(&value.to_le_bytes());
        message.extend_from_slice(extra);
        self.control.push_back(message);
        let _ = self.control_waiting.write(1);
    }

    /// Tells the driver when a ready port's host side opened or closed.
    fn tell_connection(&mut self, id: usize) {
        let Some(Some(port)) = self.ports.get_mut(id) else {
            return;
        };
        let connected = port.config.backend.connected();
        if port.ready && port.told_connected != Some(connected) {
            port.told_connected = Some(connected);
            self.send_control(id, event::PORT_OPEN, u16::from(connected), &[]);
        }
    }

    fn handle_control(&mut self, message: &[u8]) {
        let Some(header) = message.get(..8) else {
            log::debug!(
                "virtio-console: a control message of {} bytes",
                message.len()
            );
            return;
        };
        let id = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let event = u16::from_le_bytes([header[4], header[5]]);
        let value = u16::from_le_bytes([header[6], header[7]]);
        match event {
            event::DEVICE_READY if value == 1 => {
                let ids: Vec<usize> = (0..self.ports.len())
                    .filter(|&id| self.ports[id].is_some())
                    .collect();
                for id in ids {
                    self.send_control(id, event::PORT_ADD, 0, &[]);
                }
            }
            event::DEVICE_READY => log::warn!("virtio-console: the driver failed to start"),
            event::PORT_READY => {
                let Some(Some(port)) = self.ports.get_mut(id) else {
                    log::debug!("virtio-console: PORT_READY for port {id}, which is not there");
                    return;
                };
                if value != 1 {
                    log::warn!("virtio-console: the driver could not add port {id}");
                    return;
                }
                port.ready = true;
                let (console, name) = (port.config.console, port.config.name.clone());
                if console {
                    self.send_control(id, event::CONSOLE_PORT, 1, &[]);
                }
                if let Some(name) = name {
                    let mut bytes = name.into_bytes();
                    bytes.push(0);
                    self.send_control(id, event::PORT_NAME, 1, &bytes);
                }
                self.tell_connection(id);
            }
            event::PORT_OPEN => match self.ports.get_mut(id) {
                Some(Some(port)) => port.guest_open = value == 1,
                _ => log::debug!("virtio-console: PORT_OPEN for port {id}, which is not there"),
            },
            other => log::debug!("virtio-console: control event {other} ignored"),
        }
    }

    /// Delivers waiting control messages into the control receive queue.
    fn deliver_control(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, Error> {
        let mut used_any = false;
        while !self.control.is_empty() {
            let Some(chain) = next_chain(queue, mem)? else {
                break;
            };
            let head = chain.head_index();
            let written = match (chain.writer(mem), self.control.pop_front()) {
                (Ok(mut writer), Some(message)) => match writer.write_all(&message) {
                    Ok(()) => message.len() as u32,
                    Err(e) => {
                        log::debug!("virtio-console: control buffer too small: {e}");
                        0
                    }
                },
                (Err(e), _) => {
                    log::debug!("virtio-console: bad control buffer: {e}");
                    0
                }
                (_, None) => 0,
            };
            queue.add_used(mem, head, written)?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Moves host input of port `id` into the guest's receive buffers.
    fn deliver_input(&mut self, id: usize, queue: &mut Queue, mem: &Memory) -> Result<bool, Error> {
        let Some(Some(port)) = self.ports.get_mut(id) else {
            return Ok(false);
        };
        let mut used_any = false;
        loop {
            if port.input.is_empty() {
                if !port.config.backend.connected() {
                    break;
                }
                let mut buf = vec![0u8; INPUT_CHUNK];
                match port.config.backend.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.truncate(n);
                        port.input = buf;
                    }
                    Err(e) => {
                        log::debug!("{}: input: {e}", Console::name(id));
                        break;
                    }
                }
            }
            let Some(chain) = next_chain(queue, mem)? else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(port.input.len());
                    match writer.write_all(&port.input[..n]) {
                        Ok(()) => {
                            port.input.drain(..n);
                            n as u32
                        }
                        Err(e) => {
                            log::debug!("{}: bad receive buffer: {e}", Console::name(id));
                            0
                        }
                    }
                }
                Err(e) => {
                    log::debug!("{}: bad receive buffer: {e}", Console::name(id));
                    0
                }
            };
            queue.add_used(mem, head, written)?;
            used_any = true;
        }
        port.update_interest();
        Ok(used_any)
    }

    /// Takes the guest's output on port `id` while the backend keeps up.
    fn take_output(&mut self, id: usize, queue: &mut Queue, mem: &Memory) -> Result<bool, Error> {
        let Some(Some(port)) = self.ports.get_mut(id) else {
            return Ok(false);
        };
        let name = Console::name(id);
        let mut used_any = false;
        while port.flush(&name) {
            let Some(chain) = next_chain(queue, mem)? else {
                break;
            };
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => {
                    let n = reader.available_bytes().min(OUTPUT_LIMIT);
                    let mut bytes = vec![0u8; n];
                    match reader.read_exact(&mut bytes) {
                        Ok(()) => port.output = bytes,
                        Err(e) => log::debug!("{name}: bad transmit buffer: {e}"),
                    }
                }
                Err(e) => log::debug!("{name}: bad transmit buffer: {e}"),
            }
            port.output_at = 0;
            queue.add_used(mem, head, 0)?;
            used_any = true;
        }
        port.update_interest();
        Ok(used_any)
    }

    /// Runs `serve` on the active queue `index`, then interrupts the guest if it must be.
    fn with_queue(
        &mut self,
        index: usize,
        queues: &mut [ActiveQueue],
        mem: &Memory,
        interrupt: &Interrupt,
        serve: impl FnOnce(&mut Console, &mut Queue, &Memory) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let Some(active) = queues.iter_mut().find(|q| q.index == index) else {
            return Ok(());
        };
        if serve(self, &mut active.queue, mem)? && needs_interrupt(&mut active.queue, mem) {
            interrupt.signal_used(index);
        }
        Ok(())
    }
}

impl QueueDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES | VIRTIO_CONSOLE_F_MULTIPORT
    }

    /// cols, rows (unused), max_nr_ports, emerg_wr.
    fn config(&self) -> Vec<u8> {
        let mut config = vec![0u8; 12];
        config[4..8].copy_from_slice(&(self.ports.len().max(1) as u32).to_le_bytes());
        config
    }

    fn set_acked_features(&mut self, features: u64) {
        self.multiport = features & VIRTIO_CONSOLE_F_MULTIPORT != 0;
        if !self.multiport {
            // Without the control queues port 0 is a plain console, ready from the start.
            if let Some(Some(port)) = self.ports.first_mut() {
                port.ready = true;
            }
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        match index {
            CONTROL_RX => self.deliver_control(queue, mem),
            CONTROL_TX => {
                let mut messages = Vec::new();
                let used = process_chains(queue, mem, |chain| {
                    if let Ok(mut reader) = chain.reader(mem) {
                        let n = reader.available_bytes().min(4096);
                        let mut message = vec![0u8; n];
                        if reader.read_exact(&mut message).is_ok() {
                            messages.push(message);
                        }
                    }
                    0
                })?;
                for message in messages {
                    self.handle_control(&message);
                }
                Ok(used)
            }
            _ => match self.port_of_queue(index) {
                Some((id, true)) => self.take_output(id, queue, mem),
                Some((id, false)) => self.deliver_input(id, queue, mem),
                None => Err(Error::NoQueue(index)),
            },
        }
    }

    fn reset(&mut self) {
        self.control.clear();
        let _ = self.control_waiting.read();
        for port in self.ports.iter_mut().flatten() {
            port.ready = false;
            port.guest_open = false;
            port.told_connected = None;
            port.output.clear();
            port.output_at = 0;
        }
    }

    /// The control eventfd first, then each port's backend (ports without one are skipped
    /// in the numbering: see `backend_port`).
    fn backend_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.control_waiting.as_raw_fd()];
        fds.extend(self.ports.iter().flatten().map(|p| p.config.backend.fd()));
        fds
    }

    fn backend_ready(
        &mut self,
        n: usize,
        queues: &mut [ActiveQueue],
        mem: &Memory,
        interrupt: &Interrupt,
    ) -> Result<(), Error> {
        if n == 0 {
            let _ = self.control_waiting.read();
            return self.with_queue(CONTROL_RX, queues, mem, interrupt, Console::deliver_control);
        }
        let Some(id) = self.backend_port(n - 1) else {
            return Ok(());
        };
        if let Some(Some(port)) = self.ports.get_mut(id) {
            port.config.backend.poll();
        }
        self.tell_connection(id);
        if !self.control.is_empty() {
            self.with_queue(CONTROL_RX, queues, mem, interrupt, Console::deliver_control)?;
        }
        let (rx, tx) = port_queues(id);
        self.with_queue(tx, queues, mem, interrupt, |c, q, m| {
            c.take_output(id, q, m)
        })?;
        self.with_queue(rx, queues, mem, interrupt, |c, q, m| {
            c.deliver_input(id, q, m)
        })
    }
}

/// The next chain the guest made available; when there is none, notifications are re-armed
/// (EVENT_IDX) so that the guest's next buffer kicks the queue.
fn next_chain<'a>(queue: &mut Queue, mem: &'a Memory) -> Result<Option<crate::Chain<'a>>, Error> {
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Ok(Some(chain));
    }
    if queue.enable_notification(mem)? {
        return Ok(queue.pop_descriptor_chain(mem));
    }
    Ok(None)
}

impl Console {
    /// The port id of the `k`-th port that exists.
    fn backend_port(&self, k: usize) -> Option<usize> {
        (0..self.ports.len())
            .filter(|&id| self.ports[id].is_some())
            .nth(k)
    }
}
