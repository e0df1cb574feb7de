//! nixvmm: a KVM virtual-machine monitor that boots NixOS systems directly.
//!
//! The data path, one module per stage:
//! - [`front`]: the doors (the native CLI) that turn arguments into a [`VmConfig`];
//! - [`config`]: `VmConfig`, its option syntax and validation, NixOS system folders;
//! - [`machine`]: the VM built from a config (memory, boot state, devices, vCPUs);
//! - [`host`]: what the VM uses on the host and keeps across guest reboots (the terminal,
//!   vhost-user backends);
//! - [`event`]: the control plane on the main thread (VM exits, signals, console input);
//! - [`serve`]: `nixvmm device`, nixvmm's models served to other VMMs over vhost-user;
//! - [`models`]: the one builder of nixvmm's own device models, for `machine` and `serve`;
//! - [`seccomp`]: the system-call filter of each kind of thread.
//!
//! [`run`] builds a [`machine::Vm`], runs it, and builds a fresh one when the guest reboots.

pub mod config;
pub mod control;
pub mod event;
pub mod front;
pub mod host;
pub mod machine;
pub mod models;
pub mod seccomp;
pub mod serve;

pub use config::{Kernel, VmConfig};
pub use control::Control;
use devices::VmExit;
use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

use crate::event::ControlPlane;
use crate::host::console::ConsoleOutput;
use crate::machine::{Vm, VmError};

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
    Failed(#[from] devices::VmFailure),
    #[error(transparent)]
    ControlPlane(#[from] event::ControlPlaneError),
    #[error(transparent)]
    Backend(#[from] host::HostError),
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
    let input_room = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    run_with(
        config,
        output,
        control,
        &mut ControlPlane::new()?,
        &input_room,
    )
}

/// [`run`] with the front door's subscribers (signals, stdin) already in `plane`.
/// `input_room` is signalled by every VM's UART when the guest has read all console input
/// (what `event::stdin::StdinWatch` waits for when the UART's FIFO is full).
pub fn run_with(
    config: &VmConfig,
    output: &ConsoleOutput,
    control: &Control,
    plane: &mut ControlPlane,
    input_room: &EventFd,
) -> Result<Outcome, RunError> {
    config.validate()?;
    let kvm = open_kvm()?;
    // Connections to external backends outlive each VM: a reboot reuses them.
    let backends = std::sync::Arc::new(host::HostResources::connect(config)?);
    control.attach_host(&backends, config.no_reboot);
    let outcome = loop {
        let (mut vm, exits) = Vm::build(&kvm, config, output, &backends, input_room)?;
        control.attach(&vm);
        vm.start()?;
        let exit = plane.run_until_exit(exits);
        vm.stop();
        let exit = exit?;
        control.announce_exit(&exit, config.no_reboot);
        match exit {
            VmExit::Shutdown => break Ok(Outcome::PoweredOff),
            VmExit::Stopped => break Ok(Outcome::Stopped),
            VmExit::Reset if config.no_reboot => break Ok(Outcome::Rebooted),
            VmExit::Reset => log::info!("guest reboot: starting again"),
            VmExit::Failed(reason) => break Err(RunError::Failed(reason)),
        }
    };
    backends.shut_down_tpm();
    outcome
}
