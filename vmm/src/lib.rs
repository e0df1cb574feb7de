//! nixvmm: a KVM virtual-machine monitor that boots NixOS systems directly.
//!
//! Front doors ([`cli`]) produce a [`VmConfig`]; [`run`] builds a [`vm::Vm`] from it, runs it,
//! and rebuilds it when the guest reboots.

pub mod builtin_guest;
pub mod cli;
pub mod config;
pub mod console;
pub mod control_plane;
pub mod cpu;
pub mod device_server;
pub mod models;
pub mod msi;
pub mod options;
pub mod signals;
pub mod system;
pub mod vcpu;
pub mod vhost_user_fs;
pub mod virtio_devices;
pub mod vm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub use config::{Kernel, VmConfig};
use devices::bus::lock;
use devices::serial::SerialConsole;
use devices::{ExitSender, VmExit};
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleOutput;
use crate::control_plane::ControlPlane;
use crate::vm::{Vm, VmError};

/// How a run ended, when it ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PoweredOff,
    /// The guest rebooted (or panicked into a reboot) and `no_reboot` was set.
    Rebooted,
    /// [`Control::stop`] was called (Ctrl-A x on the console).
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Kvm(String),
    #[error(transparent)]
    Build(#[from] VmError),
    #[error("the VM failed: {0}")]
    Failed(String),
    #[error(transparent)]
    ControlPlane(#[from] control_plane::ControlPlaneError),
}

/// The running VM as other threads reach it: where to send its exit, its console UART.
struct Attached {
    exit: ExitSender,
    serial: Arc<Mutex<SerialConsole>>,
    runtime: Arc<vm::Runtime>,
}

/// Reaches the running VM from other threads: console input and stopping. Stays valid across
/// guest reboots, following each new VM.
#[derive(Clone, Default)]
pub struct Control {
    current: Arc<Mutex<Option<Attached>>>,
    stopped: Arc<AtomicBool>,
    /// Signalled when the guest has read all console input (see `console::StdinWatch`).
    input_room: Arc<Mutex<Option<Arc<EventFd>>>>,
}

impl Control {
    /// The eventfd every VM's UART signals when the guest has emptied its receive FIFO.
    pub fn set_input_room(&self, room: Arc<EventFd>) {
        *lock(&self.input_room) = Some(room);
    }

    fn input_room(&self) -> Option<Arc<EventFd>> {
        lock(&self.input_room).clone()
    }

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
    pub fn vcpu_states(&self) -> Vec<vcpu::VcpuState> {
        self.runtime().map_or_else(Vec::new, |r| r.vcpu_states())
    }

    fn runtime(&self) -> Option<Arc<vm::Runtime>> {
        lock(&self.current).as_ref().map(|vm| vm.runtime.clone())
    }

    /// Queues console input for the guest; returns how many bytes it took.
    pub fn send_input(&self, bytes: &[u8]) -> usize {
        match &*lock(&self.current) {
            Some(vm) => lock(&vm.serial).enqueue_input(bytes),
            None => 0,
        }
    }

    fn attach(&self, vm: &Vm) {
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

/// Opens /dev/kvm, turning the usual failures into advice.
pub fn open_kvm() -> Result<Kvm, RunError> {
    Kvm::new().map_err(|e| {
        RunError::Kvm(match e.errno() {
            libc::ENOENT => "/dev/kvm does not exist: enable KVM on this host (load kvm_intel or \
                             kvm_amd, or turn on virtualization in the firmware)"
                .into(),
            libc::EACCES | libc::EPERM => "no permission to open /dev/kvm: add your user to the \
                                           kvm group (usermod -aG kvm $USER) and log in again"
                .into(),
            _ => format!("cannot open /dev/kvm: {e}"),
        })
    })
}

/// Boots `config` and runs it until the guest powers off, reboots with `no_reboot`, fails or
/// is stopped. A reboot without `no_reboot` builds a fresh VM and boots again.
pub fn run(
    config: &VmConfig,
    output: &ConsoleOutput,
    control: &Control,
) -> Result<Outcome, RunError> {
    run_with(config, output, control, &mut ControlPlane::new()?)
}

/// [`run`] with the front door's subscribers (signals, stdin) already in `plane`.
pub fn run_with(
    config: &VmConfig,
    output: &ConsoleOutput,
    control: &Control,
    plane: &mut ControlPlane,
) -> Result<Outcome, RunError> {
    config.validate()?;
    let kvm = open_kvm()?;
    // Connections to external backends outlive each VM: a reboot reuses them.
    let backends = vm::ExternalBackends::connect(config)?;
    loop {
        let (vm, exits) = Vm::build(&kvm, config, output, &backends, control.input_room())?;
        control.attach(&vm);
        let exit = vm.run(plane, exits)?;
        match exit {
            VmExit::Shutdown => return Ok(Outcome::PoweredOff),
            VmExit::Stopped => return Ok(Outcome::Stopped),
            VmExit::Reset if config.no_reboot => return Ok(Outcome::Rebooted),
            VmExit::Reset => log::info!("guest reboot: starting again"),
            VmExit::Failed(reason) => return Err(RunError::Failed(reason)),
        }
    }
}
