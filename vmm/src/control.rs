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
    runtime: Arc<machine::Runtime>,
}

/// Reaches the running VM from other threads: console input and stopping. Stays valid across
/// guest reboots, following each new VM.
#[derive(Clone, Default)]
pub struct Control {
    current: Arc<Mutex<Option<Attached>>>,
    stopped: Arc<AtomicBool>,
    host: Arc<Mutex<Option<Arc<HostResources>>>>,
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
    #[error("{0}")]
    Forward(String),
}

impl Control {
    /// Stops the VM; `run` returns [`Outcome::Stopped`].
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        if let Some(vm) = &*lock(&self.current) {
            vm.exit.send(VmExit::Stopped);
        }
    }

    /// Resets the machine as a reset button would (QMP `system_reset`); with `--no-reboot`
    /// that ends the run, as QEMU's `-no-reboot` does.
    pub fn reset(&self) {
        if let Some(vm) = &*lock(&self.current) {
            vm.exit.send(VmExit::Reset);
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

    pub(crate) fn attach_host(&self, host: &Arc<HostResources>) {
        *lock(&self.host) = Some(host.clone());
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
        control.attach_host(&host);
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
