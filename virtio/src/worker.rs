//! [`Hosted`]: a [`QueueDevice`] served inside the VMM by a worker thread of its own. The
//! thread starts with the device (so from the thread that builds the VM, never from a vCPU
//! thread, and its seccomp filter is its own: see [`Confine`]) and waits. At activation the
//! model, its queues and its interrupt move into the worker, which waits on the queues' kick
//! eventfds, the model's backend fds and a control eventfd; a reset or the end of the VM stops
//! it and takes the model back. A worker that does not stop within [`STOP_DEADLINE`] (a backend
//! call that never returns) is left behind, so nixvmm still exits; its device cannot start
//! again.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    needs_interrupt, Activation, ActiveQueue, Error, LiveConfig, QueueDevice, VirtioDevice,
};

/// The model a worker serves.
type Model = Box<dyn QueueDevice>;

/// How long a worker may take to stop or pause.
pub const STOP_DEADLINE: Duration = Duration::from_secs(5);

enum Command {
    Pause,
    Resume,
    Stop,
}

/// What the worker thread runs first, before it serves anything: its seccomp filter. An
/// error ends the thread, and [`Hosted::confined`] returns it.
pub type Confine = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// A device's activation, handed to its waiting thread.
struct Start {
    model: Model,
    activation: Activation,
    epoll: Epoll,
    wake: EventFd,
    commands: Receiver<Command>,
    paused: Sender<()>,
    stopped: Sender<Model>,
}

/// The running worker, seen from the transport.
struct Worker {
    commands: Sender<Command>,
    wake: EventFd,
    /// The model comes back here when the worker stops.
    stopped: Receiver<Model>,
    paused: Receiver<()>,
}

enum State {
    Idle(Model),
    Running(Worker),
    /// The worker did not stop in time.
    Lost,
}

/// A [`QueueDevice`] served by its own worker thread.
pub struct Hosted {
    name: String,
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    features: u64,
    config: Vec<u8>,
    live_config: Option<LiveConfig>,
    state: State,
    /// Activations go to the device's thread here; dropped, the thread ends.
    starts: Option<Sender<Start>>,
    thread: Option<JoinHandle<()>>,
}

impl Hosted {
    /// `name` names the worker thread and the device in messages.
    pub fn new(name: &str, model: Model) -> Result<Hosted, Error> {
        Hosted::confined(name, model, Box::new(|| Ok(())))
    }

    /// [`Hosted::new`] whose thread runs `confine` first.
    pub fn confined(name: &str, model: Model, confine: Confine) -> Result<Hosted, Error> {
        let (starts, start_rx) = mpsc::channel::<Start>();
        let (ready_tx, ready) = mpsc::channel();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let confined = confine();
                let go_on = confined.is_ok();
                let _ = ready_tx.send(confined);
                if go_on {
                    serve_activations(&thread_name, start_rx);
                }
            })
            .map_err(Error::Worker)?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                let _ = thread.join();
                return Err(Error::Backend(format!("{name}: {why}")));
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::Worker(std::io::Error::other("worker thread died")));
            }
        }
        Ok(Hosted {
            name: name.to_string(),
            device_type: model.device_type(),
            queue_max_sizes: model.queue_max_sizes().to_vec(),
            features: model.features(),
            config: model.config(),
            live_config: model.live_config(),
            state: State::Idle(model),
            starts: Some(starts),
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Lost) {
            State::Running(worker) => {
                let _ = worker.commands.send(Command::Stop);
                let _ = worker.wake.write(1);
                match worker.stopped.recv_timeout(STOP_DEADLINE) {
                    Ok(mut model) => {
                        model.reset();
                        State::Idle(model)
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        log::error!(
                            "{}: the device did not stop within {STOP_DEADLINE:?} (a host call \
                             that does not return?); leaving it behind",
                            self.name
                        );
                        State::Lost
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        log::error!("{}: the device's thread ended with its model", self.name);
                        State::Lost
                    }
                }
            }
            other => other,
        };
    }
}

impl VirtioDevice for Hosted {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config(&self) -> Vec<u8> {
        match &self.live_config {
            Some(live) => live(),
            None => self.config.clone(),
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), Error> {
        let model = match &self.state {
            State::Idle(model) => model,
            State::Running(_) => return Err(Error::AlreadyActive),
            State::Lost => return Err(Error::Lost),
        };
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Worker)?;
        let thread_wake = wake.try_clone().map_err(Error::Worker)?;
        let epoll = watch(&activation, model.as_ref(), &wake).map_err(Error::Worker)?;
        let State::Idle(model) = std::mem::replace(&mut self.state, State::Lost) else {
            return Err(Error::Lost);
        };
        let (commands, command_rx) = mpsc::channel();
        let (stopped_tx, stopped) = mpsc::channel();
        let (paused_tx, paused) = mpsc::channel();
        let start = Start {
            model,
            activation,
            epoll,
            wake: thread_wake,
            commands: command_rx,
            paused: paused_tx,
            stopped: stopped_tx,
        };
        let sent = match &self.starts {
            Some(starts) => starts.send(start),
            None => Err(mpsc::SendError(start)),
        };
        if let Err(mpsc::SendError(start)) = sent {
            self.state = State::Idle(start.model);
            return Err(Error::Worker(std::io::Error::other("worker thread died")));
        }
        self.state = State::Running(Worker {
            commands,
            wake,
            stopped,
            paused,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn pause(&mut self) -> Result<(), Error> {
        let State::Running(worker) = &self.state else {
            return Ok(());
        };
        let _ = worker.commands.send(Command::Pause);
        let _ = worker.wake.write(1);
        match worker.paused.recv_timeout(STOP_DEADLINE) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(Error::Backend(format!(
                "{}: did not pause within {STOP_DEADLINE:?}",
                self.name
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Lost),
        }
    }

    fn resume(&mut self) -> Result<(), Error> {
        if let State::Running(worker) = &self.state {
            let _ = worker.commands.send(Command::Resume);
            let _ = worker.wake.write(1);
        }
        Ok(())
    }
}

impl Drop for Hosted {
    fn drop(&mut self) {
        self.stop();
        // Without activations to wait for, the thread ends; a lost one is left behind.
        self.starts = None;
        if let (Some(thread), false) = (self.thread.take(), matches!(self.state, State::Lost)) {
            let _ = thread.join();
        }
    }
}

/// The device's thread: serves one activation after another until the device is dropped.
fn serve_activations(name: &str, starts: Receiver<Start>) {
    while let Ok(start) = starts.recv() {
        let Start {
            mut model,
            activation,
            epoll,
            wake,
            commands,
            paused,
            stopped,
        } = start;
        // Here, under this thread's filter: a NIC tells its tap the offloads.
        model.set_acked_features(activation.features);
        let mut worker = WorkerLoop {
            name: name.to_string(),
            model,
            activation,
            wake,
            commands,
            paused,
        };
        worker.run(&epoll);
        // The activation (queues, kick fds, interrupt) ends before the model goes back, as
        // when this thread ended with it: the transport may activate again at once.
        let WorkerLoop {
            model, activation, ..
        } = worker;
        drop((activation, epoll));
        let _ = stopped.send(model);
    }
}

/// Epoll tokens: queues first (by position in the activation), then the wake event, then
/// the model's backend fds.
fn watch(
    activation: &Activation,
    model: &dyn QueueDevice,
    wake: &EventFd,
) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    let add = |fd, token: usize| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token as u64),
        )
    };
    for (token, q) in activation.queues.iter().enumerate() {
        add(q.kick.as_raw_fd(), token)?;
    }
    let wake_token = activation.queues.len();
    add(wake.as_raw_fd(), wake_token)?;
    for (n, fd) in model.backend_fds().into_iter().enumerate() {
        if model.backend_wanted(n) {
            add(fd, wake_token + 1 + n)?;
        }
    }
    Ok(epoll)
}

struct WorkerLoop {
    name: String,
    model: Model,
    activation: Activation,
    wake: EventFd,
    commands: Receiver<Command>,
    paused: Sender<()>,
}

impl WorkerLoop {
    fn run(&mut self, epoll: &Epoll) {
        let wake_token = self.activation.queues.len();
        let backend_fds = self.model.backend_fds();
        let mut events = vec![EpollEvent::default(); wake_token + 1 + backend_fds.len()];
        let mut failed = false;
        // What `watch` registered.
        let mut watching: Vec<bool> = (0..backend_fds.len())
            .map(|n| self.model.backend_wanted(n))
            .collect();
        loop {
            let ready = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("{}: worker: {e}", self.name);
                    return;
                }
            };
            for event in &events[..ready] {
                let token = event.data() as usize;
                if token == wake_token {
                    let _ = self.wake.read();
                    if !self.obey() {
                        return;
                    }
                    continue;
                }
                if failed {
                    // Until the driver resets the device, drain kicks without serving them.
                    if let Some(q) = self.activation.queues.get(token) {
                        let _ = q.kick.read();
                    }
                    continue;
                }
                let result = if token < wake_token {
                    self.serve_queue(token)
                } else {
                    let Activation {
                        mem,
                        interrupt,
                        queues,
                        ..
                    } = &mut self.activation;
                    self.model
                        .backend_ready(token - wake_token - 1, queues, mem, interrupt)
                };
                if let Err(e) = result {
                    log::warn!("{}: {e}; the device needs a reset", self.name);
                    self.activation.interrupt.signal_needs_reset();
                    failed = true;
                }
            }
            self.follow_backend_interest(epoll, &backend_fds, &mut watching, failed);
        }
    }

    /// Adds to or removes from `epoll` each backend fd whose wanted state changed (none is
    /// wanted once the device failed).
    fn follow_backend_interest(
        &self,
        epoll: &Epoll,
        backend_fds: &[std::os::fd::RawFd],
        watching: &mut [bool],
        failed: bool,
    ) {
        let first_token = self.activation.queues.len() + 1;
        for (n, fd) in backend_fds.iter().enumerate() {
            let wanted = !failed && self.model.backend_wanted(n);
            if wanted == watching[n] {
                continue;
            }
            let op = if wanted {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            let event = EpollEvent::new(EventSet::IN, (first_token + n) as u64);
            match epoll.ctl(op, *fd, event) {
                Ok(()) => watching[n] = wanted,
                Err(e) => log::error!("{}: cannot change the watch on fd {fd}: {e}", self.name),
            }
        }
    }

    fn serve_queue(&mut self, position: usize) -> Result<(), Error> {
        let Activation {
            mem,
            interrupt,
            queues,
            ..
        } = &mut self.activation;
        let Some(ActiveQueue { index, queue, kick }) = queues.get_mut(position) else {
            return Ok(());
        };
        let _ = kick.read();
        if self.model.process_queue(*index, queue, mem)? && needs_interrupt(queue, &*mem) {
            interrupt.signal_used(*index);
        }
        Ok(())
    }

    /// Carries out pending commands; returns false when the worker must stop.
    fn obey(&mut self) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Stop => return false,
                Command::Resume => {}
                Command::Pause => {
                    let _ = self.paused.send(());
                    loop {
                        match self.commands.recv() {
                            Ok(Command::Resume) => break,
                            Ok(Command::Pause) => {
                                let _ = self.paused.send(());
                            }
                            Ok(Command::Stop) | Err(_) => return false,
                        }
                    }
                }
            }
        }
        true
    }
}
