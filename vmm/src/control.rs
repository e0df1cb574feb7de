//! [`Control`]: how other threads and the front doors reach the running VM (stop, pause,
//! console input), across guest reboots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::serial::SerialConsole;
use devices::{ExitSender, VmExit};

use crate::machine::{self, Vm};

/// The running VM as other threads reach it: where to send its exit, its console UART.
struct Attached {
    exit: ExitSender,
    serial: Arc<Mutex<SerialConsole>>,
    runtime: Arc<machine::Runtime>,
}

/// Reaches the running VM from other threads: console input and stopping. Stays valid across
/// guest reboots, following each new VM.
#[derive(Clone, Default)]
pub struct Control {
    current: Arc<Mutex<Option<Attached>>>,
    stopped: Arc<AtomicBool>,
}

impl Control {
    /// Stops the VM; `run` returns [`Outcome::Stopped`].
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(vm) = &*lock(&self.current) {
            vm.exit.send(VmExit::Stopped);
        }
    }

    /// Pauses the running VM: its vCPUs and its devices' queue processing (QMP `stop`).
    pub fn pause(&self) -> Result<(), virtio::Error> {
        match self.runtime() {
            Some(runtime) => runtime.pause(),
            None => Ok(()),
        }
    }

    /// Resumes a paused VM (QMP `cont`).
    pub fn resume(&self) -> Result<(), virtio::Error> {
        match self.runtime() {
            Some(runtime) => runtime.resume(),
            None => Ok(()),
        }
    }

    /// Where each vCPU of the running VM is.
    pub fn vcpu_states(&self) -> Vec<machine::vcpu::VcpuState> {
        self.runtime().map_or_else(Vec::new, |r| r.vcpu_states())
    }

    fn runtime(&self) -> Option<Arc<machine::Runtime>> {
        lock(&self.current).as_ref().map(|vm| vm.runtime.clone())
    }

    /// Queues console input for the guest; returns how many bytes it took.
    pub fn send_input(&self, bytes: &[u8]) -> usize {
        match &*lock(&self.current) {
            Some(vm) => lock(&vm.serial).enqueue_input(bytes),
            None => 0,
        }
    }

    pub(crate) fn attach(&self, vm: &Vm) {
        *lock(&self.current) = Some(Attached {
            exit: vm.exit_sender(),
            serial: vm.serial(),
            runtime: vm.runtime(),
        });
        if self.stopped.load(Ordering::Acquire) {
            vm.exit_sender().send(VmExit::Stopped);
        }
    }
}
