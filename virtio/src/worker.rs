//! [`Hosted`]: a [`QueueDevice`] served inside the VMM by a worker thread of its own. At
//! activation the model, its queues and its interrupt move into the worker, which waits on
//! the queues' kick eventfds, the model's backend fds and a control eventfd; a reset or the
//! end of the VM stops it and takes the model back. A worker that does not stop within
//! [`STOP_DEADLINE`] (a backend call that never returns) is left behind, so nixvmm still
//! exits; its device cannot start again.

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

/// The running worker, seen from the transport.
struct Worker {
    commands: Sender<Command>,
    wake: EventFd,
    /// The model comes back here when the worker stops.
    stopped: Receiver<Model>,
    paused: Receiver<()>,
    thread: Option<JoinHandle<()>>,
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
}

impl Hosted {
    /// `name` names the worker thread and the device in messages.
    pub fn new(name: &str, model: Model) -> Hosted {
        Hosted {
            name: name.to_string(),
            device_type: model.device_type(),
            queue_max_sizes: model.queue_max_sizes().to_vec(),
            features: model.features(),
            config: model.config(),
            live_config: model.live_config(),
            state: State::Idle(model),
        }
    }

    fn stop(&mut self) {
        self.state = match std::mem::replace(&mut self.state, State::Lost) {
            State::Running(mut worker) => {
                let _ = worker.commands.send(Command::Stop);
                let _ = worker.wake.write(1);
                match worker.stopped.recv_timeout(STOP_DEADLINE) {
                    Ok(mut model) => {
                        if let Some(thread) = worker.thread.take() {
                            let _ = thread.join();
                        }
                        model.reset();
                        State::Idle(model)
                    }
                    Err(_) => {
                        log::error!(
                            "{}: the device did not stop within {STOP_DEADLINE:?} (a host call \
                             that does not return?); leaving it behind",
                            self.name
                        );
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
        let State::Idle(mut model) = std::mem::replace(&mut self.state, State::Lost) else {
            return Err(Error::Lost);
        };
        model.set_acked_features(activation.features);
        let (commands, command_rx) = mpsc::channel();
        let (stopped_tx, stopped) = mpsc::channel();
        let (paused_tx, paused) = mpsc::channel();
        // The model goes to the thread once it runs: if it cannot start, the model stays.
        let (start_tx, start_rx) = mpsc::channel::<Model>();
        let name = self.name.clone();
        let spawned = std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                let Ok(model) = start_rx.recv() else { return };
                let mut worker = WorkerLoop {
                    name,
                    model,
                    activation,
                    wake: thread_wake,
                    commands: command_rx,
                    paused: paused_tx,
                };
                worker.run(&epoll);
                let _ = stopped_tx.send(worker.model);
            });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                self.state = State::Idle(model);
                return Err(Error::Worker(e));
            }
        };
        if let Err(mpsc::SendError(model)) = start_tx.send(model) {
            self.state = State::Idle(model);
            return Err(Error::Worker(std::io::Error::other("worker thread died")));
        }
        self.state = State::Running(Worker {
            commands,
            wake,
            stopped,
            paused,
            thread: Some(thread),
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
