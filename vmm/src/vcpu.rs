//! The vCPU thread: run the vCPU, route its port and MMIO exits to the buses, and turn every
//! other exit into a [`VmExit`] for the main loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::bus::Bus;
use devices::{ExitSender, VmExit};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// The buses a vCPU's exits are routed to, shared by all vCPUs.
pub struct Buses {
    pub io: Bus,
    pub mmio: Bus,
}

/// Runs `vcpu` until the VM stops: until `stop` is set (the main loop then kicks the thread
/// with a signal) or this vCPU itself ends the VM, whose reason goes to `exit`.
pub fn run(mut vcpu: VcpuFd, id: u8, buses: Arc<Buses>, stop: Arc<AtomicBool>, exit: ExitSender) {
    while !stop.load(Ordering::Acquire) {
        let ended = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                buses.io.read(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.io.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                None
            }
            // A triple fault: a PC resets.
            Ok(VcpuExit::Shutdown) => Some(VmExit::Reset),
            // Only without an in-kernel local APIC; nothing will wake this CPU.
            Ok(VcpuExit::Hlt) => Some(VmExit::Shutdown),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::Failed(format!("vCPU {id}: guest crashed")),
                other => VmExit::Failed(format!("vCPU {id}: unknown system event {other}")),
            }),
            Ok(VcpuExit::InternalError) => Some(VmExit::Failed(format!(
                "vCPU {id}: KVM internal error (often an instruction KVM cannot emulate)"
            ))),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Failed(format!(
                "vCPU {id}: KVM could not enter the guest (reason {reason:#x}, cpu {cpu})"
            ))),
            Ok(other) => Some(VmExit::Failed(format!(
                "vCPU {id}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Failed(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        };
        if let Some(reason) = ended {
            // The receiver is gone only when the VM is already stopping.
            let _ = exit.send(reason);
            return;
        }
    }
}
