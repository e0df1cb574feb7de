//! [`Control`]: how other threads and the front doors reach the running VM (stop, pause,
//! console input), across guest reboots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::serial::SerialConsole;
use devices::{ExitSender, VmExit};

use crate::config::net::parse_hostfwd;
use crate::host::HostResources;
use crate::machine::{self, Vm};

/// The running VM as other threads reach it: where to send its exit, its console UART.
struct Attached {
    exit: ExitSender,
    serial: Arc<Mutex<SerialConsole>>,
    keyboard: Arc<Mutex<devices::i8042::I8042>>,
    power_button: Arc<vmm_sys_util::eventfd::EventFd>,
    runtime: Arc<machine::Runtime>,
}

/// What happened to the VM, as QMP reports it (SHUTDOWN, RESET, STOP, RESUME, POWERDOWN): `guest`
/// says whether the guest asked for it, `reason` is QEMU's word for why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Shutdown { guest: bool, reason: &'static str },
    Reset { guest: bool, reason: &'static str },
    Stop,
    Resume,
    Powerdown,
}

/// Told of every [`VmEvent`], on the thread where it happened.
pub type EventObserver = Arc<dyn Fn(VmEvent) + Send + Sync>;

/// Reaches the running VM from other threads: console input and stopping. Stays valid across
/// guest reboots, following each new VM.
#[derive(Clone, Default)]
pub struct Control {
    current: Arc<Mutex<Option<Attached>>>,
    stopped: Arc<AtomicBool>,
    host: Arc<Mutex<Option<Arc<HostResources>>>>,
    observers: Arc<Mutex<Vec<EventObserver>>>,
    /// Whether the last reset was asked from the host (and so announced already).
    host_reset: Arc<AtomicBool>,
    /// The run ends at a reset (`--no-reboot`).
    no_reboot: Arc<AtomicBool>,
}

/// A control request that cannot be carried out, worded for the monitor user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("no NIC {0} (the VM has {1})")]
    NoNic(usize, usize),
    #[error("NIC {0} is not on a user-mode network (--net user)")]
    NotUserNetwork(usize),
    #[error("no NIC is on a user-mode network (--net user)")]
    NoUserNetwork,
    #[error("unknown key '{0}'")]
    UnknownKey(String),
    #[error("{0}")]
    Forward(String),
}

impl Control {
    /// Stops the VM; `run` returns [`Outcome::Stopped`].
    pub fn stop(&self) {
        self.stop_for("host-signal");
    }

    /// [`Control::stop`], saying why (QMP's SHUTDOWN reason: `host-qmp-quit`, `host-ui`, …).
    /// SHUTDOWN is announced now, once, as QEMU sends it before it answers `quit`.
    pub fn stop_for(&self, reason: &'static str) {
        let first = !self.stopped.swap(true, Ordering::AcqRel);
        if let Some(vm) = &*lock(&self.current) {
            vm.exit.send(VmExit::Stopped);
        }
        if first {
            self.announce(VmEvent::Shutdown {
                guest: false,
                reason,
            });
        }
    }

    /// Resets the machine as a reset button would (QMP `system_reset`); with `--no-reboot`
    /// that ends the run, as QEMU's `-no-reboot` does. The event (RESET, or SHUTDOWN) is
    /// announced now: QEMU sends it before it answers the command.
    pub fn reset(&self) {
        match &*lock(&self.current) {
            Some(vm) => {
                self.host_reset.store(true, Ordering::Release);
                vm.exit.send(VmExit::Reset);
            }
            None => return,
        }
        let (guest, reason) = (false, "host-qmp-system-reset");
        self.announce(if self.no_reboot.load(Ordering::Acquire) {
            VmEvent::Shutdown { guest, reason }
        } else {
            VmEvent::Reset { guest, reason }
        });
    }

    /// Pauses the running VM: its vCPUs and its devices' queue processing (QMP `stop`).
    pub fn pause(&self) -> Result<(), virtio::Error> {
        if let Some(runtime) = self.runtime() {
            runtime.pause()?;
        }
        self.announce(VmEvent::Stop);
        Ok(())
    }

    /// Resumes a paused VM (QMP `cont`).
    pub fn resume(&self) -> Result<(), virtio::Error> {
        if let Some(runtime) = self.runtime() {
            runtime.resume()?;
        }
        self.announce(VmEvent::Resume);
        Ok(())
    }

    /// `observer` is told of every [`VmEvent`] from now on.
    pub fn watch_events(&self, observer: EventObserver) {
        lock(&self.observers).push(observer);
    }

    fn announce(&self, event: VmEvent) {
        let observers = lock(&self.observers).clone();
        for observer in observers {
            observer(event);
        }
    }

    /// Reports how a VM ended: `exit` as the run loop saw it.
    pub(crate) fn announce_exit(&self, exit: &VmExit, no_reboot: bool) {
        let event = match exit {
            VmExit::Shutdown => VmEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown",
            },
            VmExit::Stopped => return, // announced by `stop_for`
            VmExit::Reset => {
                if self.host_reset.swap(false, Ordering::AcqRel) {
                    return; // announced by `reset`
                }
                let (guest, reason) = (true, "guest-reset");
                if no_reboot {
                    VmEvent::Shutdown { guest, reason }
                } else {
                    VmEvent::Reset { guest, reason }
                }
            }
            VmExit::Failed(_) => VmEvent::Shutdown {
                guest: true,
                reason: "guest-panic",
            },
        };
        self.announce(event);
    }

    /// Whether the running VM is paused (QMP `query-status`, HMP `info status`).
    pub fn paused(&self) -> bool {
        self.runtime().is_some_and(|r| r.paused())
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

    /// Presses the ACPI power button (QMP `system_powerdown`): the guest decides what
    /// follows (NixOS's logind powers off).
    pub fn press_power_button(&self) {
        if let Some(vm) = &*lock(&self.current) {
            let _ = vm.power_button.write(1);
        }
        self.announce(VmEvent::Powerdown);
    }

    /// Presses a chord of keys on the guest's PS/2 keyboard (HMP `sendkey`), written as
    /// QEMU writes it: key names joined by `-`, such as `ctrl-alt-delete` or `shift-a`.
    pub fn send_keys(&self, chord: &str) -> Result<(), ControlError> {
        let keys = chord
            .split('-')
            .map(|name| {
                devices::i8042::Key::named(name)
                    .ok_or_else(|| ControlError::UnknownKey(name.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(vm) = &*lock(&self.current) {
            lock(&vm.keyboard).press_keys(&keys);
        }
        Ok(())
    }

    /// Switches NIC `nic`'s link (HMP's `set_link`); the guest sees a link change.
    pub fn set_link(&self, nic: usize, up: bool) -> Result<(), ControlError> {
        self.with_nic(nic, |n| {
            n.link.set(up);
            Ok(())
        })
    }

    /// Adds a host forward to NIC `nic`'s user network (HMP's `hostfwd_add`), written
    /// `[tcp|udp]:[haddr]:hport-[gaddr]:gport`.
    pub fn add_hostfwd(&self, nic: usize, forward: &str) -> Result<(), ControlError> {
        let forward = parse_hostfwd(forward).map_err(ControlError::Forward)?;
        self.with_user_network(nic, |user| user.add_hostfwd(&forward))
    }

    /// Removes a host forward (HMP's `hostfwd_remove`).
    pub fn remove_hostfwd(&self, nic: usize, forward: &str) -> Result<(), ControlError> {
        let forward = parse_hostfwd(forward).map_err(ControlError::Forward)?;
        self.with_user_network(nic, |user| user.remove_hostfwd(&forward))
    }

    /// [`Control::add_hostfwd`] on the first NIC with a user-mode network (HMP's
    /// `hostfwd_add` without a netdev names the first).
    pub fn add_hostfwd_anywhere(&self, forward: &str) -> Result<(), ControlError> {
        self.add_hostfwd(self.first_user_network()?, forward)
    }

    pub fn remove_hostfwd_anywhere(&self, forward: &str) -> Result<(), ControlError> {
        self.remove_hostfwd(self.first_user_network()?, forward)
    }

    fn first_user_network(&self) -> Result<usize, ControlError> {
        let host = lock(&self.host).clone();
        let nics = host.as_ref().map_or(&[][..], |h| h.nics());
        nics.iter()
            .position(|n| n.user_network().is_some())
            .ok_or(ControlError::NoUserNetwork)
    }

    fn with_nic<T>(
        &self,
        nic: usize,
        f: impl FnOnce(&crate::host::Nic) -> Result<T, ControlError>,
    ) -> Result<T, ControlError> {
        let host = lock(&self.host).clone();
        let nics = host.as_ref().map_or(&[][..], |h| h.nics());
        let count = nics.len();
        f(nics.get(nic).ok_or(ControlError::NoNic(nic, count))?)
    }

    fn with_user_network(
        &self,
        nic: usize,
        f: impl FnOnce(&crate::host::slirp::UserNetwork) -> Result<(), crate::host::slirp::SlirpError>,
    ) -> Result<(), ControlError> {
        self.with_nic(nic, |n| {
            let user = n.user_network().ok_or(ControlError::NotUserNetwork(nic))?;
            f(user).map_err(|e| ControlError::Forward(e.to_string()))
        })
    }

    pub(crate) fn attach_host(&self, host: &Arc<HostResources>, no_reboot: bool) {
        *lock(&self.host) = Some(host.clone());
        self.no_reboot.store(no_reboot, Ordering::Release);
    }

    pub(crate) fn attach(&self, vm: &Vm) {
        *lock(&self.current) = Some(Attached {
            exit: vm.exit_sender(),
            serial: vm.serial(),
            keyboard: vm.keyboard(),
            power_button: vm.power_button(),
            runtime: vm.runtime(),
        });
        if self.stopped.load(Ordering::Acquire) {
            vm.exit_sender().send(VmExit::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::net::parse_net;
    use crate::config::VmConfig;

    #[test]
    fn nic_requests_reach_the_link_and_the_user_network() {
        let config = VmConfig {
            nics: vec![parse_net("user").unwrap()],
            ..VmConfig::default()
        };
        let host = Arc::new(HostResources::connect(&config).unwrap());
        let control = Control::default();
        assert_eq!(control.set_link(0, false), Err(ControlError::NoNic(0, 0)));
        control.attach_host(&host, config.no_reboot);
        control.set_link(0, false).unwrap();
        assert!(!host.nics()[0].link.is_up());
        control.set_link(0, true).unwrap();
        assert!(host.nics()[0].link.is_up());
        assert_eq!(control.set_link(1, true), Err(ControlError::NoNic(1, 1)));

        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let forward = format!("tcp:127.0.0.1:{port}-:22");
        control.add_hostfwd(0, &forward).unwrap();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        control.remove_hostfwd(0, &forward).unwrap();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        let bad = control.add_hostfwd(0, "tcp:22").unwrap_err().to_string();
        assert!(bad.contains("hostport-"), "{bad}");
    }
}
