//! The control plane: one event loop on the main thread (event-manager) that waits for what
//! the VMM must react to: a VM's end, termination signals, console input, the human monitor
//! (`hmp`) and QMP (`qmp`). Subscribers that outlive one VM (signals, stdin) stay registered
//! across guest reboots; each VM adds the watch on its own exit channel and removes it when
//! it ends. Other threads reach the loop through the [`ExitSender`](devices::ExitSender) of
//! the running VM (what [`Control`](crate::Control) uses).

pub mod hmp;
pub mod qmp;
pub mod signals;
pub mod stdin;

use std::cell::RefCell;
use std::rc::Rc;

use devices::{ExitReceiver, VmExit};
use event_manager::SubscriberOps;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId};

pub type Subscriber = Box<dyn MutEventSubscriber>;

/// How long a monitor or QMP peer may leave an answer unread before nixvmm drops it (the
/// control plane must not wait on a peer that never reads).
const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes a whole monitor or QMP answer to a non-blocking socket; an error once the peer
/// has left it unread for [`ANSWER_DEADLINE`].
pub(crate) fn send_answer(stream: &mut impl std::io::Write, bytes: &[u8]) -> std::io::Result<()> {
    send_answer_until(stream, bytes, std::time::Instant::now() + ANSWER_DEADLINE)
}

/// [`send_answer`] with a deadline of the caller's (one for several peers).
pub(crate) fn send_answer_until(
    stream: &mut impl std::io::Write,
    mut bytes: &[u8],
    deadline: std::time::Instant,
) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(crate) use devices::warn_once;

#[derive(Debug, thiserror::Error)]
#[error("the control plane's event loop: {0}")]
pub struct ControlPlaneError(event_manager::Error);

/// The event loop and its subscribers.
pub struct ControlPlane {
    manager: EventManager<Subscriber>,
}

impl ControlPlane {
    pub fn new() -> Result<ControlPlane, ControlPlaneError> {
        Ok(ControlPlane {
            manager: EventManager::new().map_err(ControlPlaneError)?,
        })
    }

    pub fn add(&mut self, subscriber: Subscriber) -> SubscriberId {
        self.manager.add_subscriber(subscriber)
    }

    pub fn remove(&mut self, id: SubscriberId) {
        if let Err(e) = self.manager.remove_subscriber(id) {
            log::warn!("control plane: removing a subscriber: {e}");
        }
    }

    /// Dispatches events until the VM that `exits` belongs to ends, and returns why.
    pub fn run_until_exit(&mut self, exits: ExitReceiver) -> Result<VmExit, ControlPlaneError> {
        let ended = Rc::new(RefCell::new(None));
        let id = self.add(Box::new(ExitWatch {
            exits,
            ended: ended.clone(),
        }));
        let result = loop {
            if let Some(exit) = ended.borrow_mut().take() {
                break Ok(exit);
            }
            if let Err(e) = self.manager.run() {
                break Err(ControlPlaneError(e));
            }
        };
        self.remove(id);
        result
    }
}

/// Watches one VM's exit channel.
struct ExitWatch {
    exits: ExitReceiver,
    ended: Rc<RefCell<Option<VmExit>>>,
}

impl MutEventSubscriber for ExitWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exits.event(), EventSet::IN)) {
            log::error!("control plane: cannot watch the VM's exit: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if let Some(exit) = self.exits.try_recv() {
            self.ended.borrow_mut().get_or_insert(exit);
        }
    }
}
