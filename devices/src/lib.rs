//! Platform devices that Linux expects on a PC, minus everything a directly booted guest does
//! not need: the bus that routes port and MMIO accesses, the COM1 UART, the i8042 (for its
//! reset line), the CMOS real-time clock (the host's time, without interrupts) and the ACPI
//! sleep/reset register.
//!
//! Devices never call KVM: they get an [`EventFd`](vmm_sys_util::eventfd::EventFd) to raise
//! their interrupt and a [`std::sync::mpsc::Sender`] of [`VmExit`] to end the VM.

pub mod acpi_power;
pub mod bus;
pub mod cmos_rtc;
pub mod i8042;
pub mod pci;
pub mod serial;

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
    Failed(String),
}

pub type ExitSender = std::sync::mpsc::Sender<VmExit>;
