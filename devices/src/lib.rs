//! Platform devices that Linux expects on a PC, minus everything a directly booted guest does
//! not need: the bus that routes port and MMIO accesses, the COM1 UART, the i8042 (for its
//! reset line), the CMOS real-time clock (the host's time, without interrupts) and the ACPI
//! sleep/reset register.
//!
//! Devices never call KVM: they get an [`EventFd`](vmm_sys_util::eventfd::EventFd) to raise
//! their interrupt and an [`ExitSender`] to end the VM.

pub mod acpi_power;
pub mod bus;
pub mod cmos_rtc;
pub mod host_listener;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod tpm;

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped running. Devices and vCPUs send it; the VMM's main loop acts on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    Shutdown,
    /// The guest asked for a reset (i8042, ACPI reset register, triple fault, KVM event).
    Reset,
    /// The user left the console (Ctrl-A x) or the VMM was asked to stop.
    Stopped,
    /// Something failed that ends the VM: a KVM error, an exit nixvmm cannot handle.
    Failed(VmFailure),
}

/// What ended a VM that did not end well.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmFailure {
    #[error("vCPU {vcpu}: the guest crashed")]
    GuestCrashed { vcpu: u8 },
    #[error("vCPU {vcpu}: unknown KVM system event {event}")]
    UnknownSystemEvent { vcpu: u8, event: u32 },
    #[error("vCPU {vcpu}: KVM internal error (often an instruction KVM cannot emulate)")]
    KvmInternalError { vcpu: u8 },
    #[error("vCPU {vcpu}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})")]
    EntryFailed { vcpu: u8, reason: u64, cpu: u32 },
    #[error("vCPU {vcpu}: an exit nixvmm does not handle: {exit}")]
    UnhandledExit { vcpu: u8, exit: String },
    #[error("vCPU {vcpu}: KVM_RUN failed: {}", std::io::Error::from_raw_os_error(*errno))]
    KvmRun { vcpu: u8, errno: i32 },
    #[error("vCPU {vcpu}: {reason}")]
    Seccomp { vcpu: u8, reason: String },
}

/// Ends the VM with a [`VmExit`]; sending also wakes the VMM's event loop. Cloneable.
#[derive(Clone)]
pub struct ExitSender {
    tx: Sender<VmExit>,
    wake: Arc<EventFd>,
}

/// Where a VM's [`VmExit`]s arrive: the VMM's event loop watches [`ExitReceiver::event`].
pub struct ExitReceiver {
    rx: Receiver<VmExit>,
    wake: Arc<EventFd>,
}

/// A VM's exit channel (one per VM, so nothing a finished VM sent reaches the next one).
pub fn exit_channel() -> std::io::Result<(ExitSender, ExitReceiver)> {
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let (tx, rx) = std::sync::mpsc::channel();
    Ok((
        ExitSender {
            tx,
            wake: wake.clone(),
        },
        ExitReceiver { rx, wake },
    ))
}

impl ExitSender {
    /// Sends `exit`; after the VM has ended nobody listens, and that is fine.
    pub fn send(&self, exit: VmExit) {
        if self.tx.send(exit).is_ok() {
            let _ = self.wake.write(1);
        }
    }
}

impl ExitReceiver {
    /// Readable once an exit was sent.
    pub fn event(&self) -> &EventFd {
        &self.wake
    }

    /// The first exit sent, if any has been.
    pub fn try_recv(&self) -> Option<VmExit> {
        let _ = self.wake.read();
        self.rx.try_recv().ok()
    }
}

/// Logs `message` as a warning the first time `said` is found unset: a cap that a guest or
/// peer hits again and again is said once.
pub fn warn_once(said: &std::sync::atomic::AtomicBool, message: std::fmt::Arguments) {
    if !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::warn!("{message}");
    }
}
