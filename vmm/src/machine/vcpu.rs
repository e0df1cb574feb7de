//! vCPU threads: each runs its vCPU, routes port and MMIO exits to the buses, and turns every
//! other exit into a [`VmExit`] for the VM. The VM steers a thread through [`Vcpus`]: run,
//! pause, exit. A request is a state change under a mutex plus a kick: `immediate_exit` set
//! in the vCPU's `kvm_run` page and a signal, so a thread about to enter KVM_RUN returns at
//! once and one inside it is interrupted; no kick is lost and nothing polls.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;

use devices::bus::Bus;
use devices::{ExitSender, VmExit, VmFailure};
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::coalesced::CoalescedWrites;
use crate::seccomp::{self, Needs, Seccomp, ThreadKind};

/// The buses a vCPU's exits are routed to, shared by all vCPUs.
pub struct Buses {
    pub io: Bus,
    /// Shared with whoever moves PCI BARs on it.
    pub mmio: Arc<Bus>,
    /// Port writes KVM kept instead of exiting, applied before every port access.
    pub kept_writes: Option<CoalescedWrites>,
}

impl Buses {
    fn port_read(&self, port: u16, data: &mut [u8]) {
        self.apply_kept_writes();
        self.io.read(u64::from(port), data);
    }

    fn port_write(&self, port: u16, data: &[u8]) {
        self.apply_kept_writes();
        self.io.write(u64::from(port), data);
    }

    fn apply_kept_writes(&self) {
        if let Some(kept) = &self.kept_writes {
            kept.apply(&self.io);
        }
    }
}

/// What the VM asks of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Exit,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    Running,
    Paused,
    Exited,
}

/// The `immediate_exit` byte of a vCPU's `kvm_run` page.
struct ImmediateExit(*const AtomicU8);

// SAFETY: the pointer targets a byte of the vCPU's kvm_run mapping, accessed only atomically;
// it is used only while the vCPU thread holds its VcpuFd (see `Shared::immediate_exit`).
unsafe impl Send for ImmediateExit {}

impl ImmediateExit {
    fn of(vcpu: &mut VcpuFd) -> ImmediateExit {
        let byte: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
        ImmediateExit(byte.cast_const().cast())
    }

    fn set(&self, value: u8) {
        // SAFETY: valid while the VcpuFd lives (the callers guarantee it); AtomicU8 has the
        // size and alignment of u8, and KVM reads the byte only at KVM_RUN entry.
        unsafe { (*self.0).store(value, Ordering::SeqCst) }
    }
}

struct Control {
    request: Request,
    state: VcpuState,
    /// Present while the vCPU thread holds its VcpuFd; cleared before it drops it.
    immediate_exit: Option<ImmediateExit>,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    /// Set with every request, so the vCPU takes the mutex only when there is one (it checks
    /// after every exit).
    requested: AtomicBool,
}

fn lock(shared: &Shared) -> MutexGuard<'_, Control> {
    shared.control.lock().unwrap_or_else(|p| p.into_inner())
}

/// The vCPU threads of a running VM.
pub struct Vcpus {
    threads: Vec<(Arc<Shared>, JoinHandle<()>)>,
}

impl Vcpus {
    /// Starts a thread per vCPU, running.
    pub fn start(
        vcpus: Vec<VcpuFd>,
        buses: &Arc<Buses>,
        exit: &ExitSender,
        seccomp: Seccomp,
    ) -> std::io::Result<Vcpus> {
        install_kick_handler();
        let mut started = Vcpus {
            threads: Vec::new(),
        };
        for (id, mut vcpu) in vcpus.into_iter().enumerate() {
            let shared = Arc::new(Shared {
                control: Mutex::new(Control {
                    request: Request::Run,
                    state: VcpuState::Running,
                    immediate_exit: Some(ImmediateExit::of(&mut vcpu)),
                }),
                changed: Condvar::new(),
                requested: AtomicBool::new(false),
            });
            let (buses, exit, theirs) = (buses.clone(), exit.clone(), shared.clone());
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || run(vcpu, id as u8, &buses, &theirs, &exit, seccomp));
            match thread {
                Ok(thread) => started.threads.push((shared, thread)),
                // The threads started so far exit when `started` drops.
                Err(e) => return Err(e),
            }
        }
        Ok(started)
    }

    fn request(&self, request: Request) {
        for (shared, thread) in &self.threads {
            let mut control = lock(shared);
            if control.state == VcpuState::Exited {
                continue;
            }
            control.request = request;
            shared.requested.store(true, Ordering::SeqCst);
            if let Some(immediate_exit) = &control.immediate_exit {
                immediate_exit.set(1);
            }
            shared.changed.notify_all();
            if let Err(e) = thread.kill(kick_signal()) {
                log::debug!("kicking a vCPU thread: {e}");
            }
        }
    }

    fn wait_for(&self, wanted: VcpuState) {
        for (shared, _) in &self.threads {
            let mut control = lock(shared);
            while control.state != wanted && control.state != VcpuState::Exited {
                control = shared
                    .changed
                    .wait(control)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Stops every vCPU outside KVM_RUN; returns once all are paused (or have exited).
    pub fn pause(&self) {
        self.request(Request::Pause);
        self.wait_for(VcpuState::Paused);
    }

    pub fn resume(&self) {
        self.request(Request::Run);
    }

    /// Where each vCPU is now.
    pub fn states(&self) -> Vec<VcpuState> {
        self.threads.iter().map(|(s, _)| lock(s).state).collect()
    }

    /// Ends every vCPU thread and waits for it.
    pub fn exit(mut self) {
        self.exit_all();
    }

    fn exit_all(&mut self) {
        self.request(Request::Exit);
        for (_, thread) in self.threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.exit_all();
    }
}

/// Waits while the VM asks this vCPU to pause; returns whether it must exit.
fn obey(shared: &Shared) -> bool {
    if !shared.requested.load(Ordering::SeqCst) {
        return false;
    }
    let mut control = lock(shared);
    shared.requested.store(false, Ordering::SeqCst);
    if let Some(immediate_exit) = &control.immediate_exit {
        immediate_exit.set(0);
    }
    loop {
        match control.request {
            Request::Run => {
                if control.state != VcpuState::Running {
                    control.state = VcpuState::Running;
                    shared.changed.notify_all();
                }
                return false;
            }
            Request::Pause => {
                if control.state != VcpuState::Paused {
                    control.state = VcpuState::Paused;
                    shared.changed.notify_all();
                }
                control = shared
                    .changed
                    .wait(control)
                    .unwrap_or_else(|p| p.into_inner());
            }
            Request::Exit => return true,
        }
    }
}

/// After this vCPU ended the VM: wait for the VM to end the thread, answering pauses.
fn park_until_exit(shared: &Shared) {
    let mut control = lock(shared);
    while control.request != Request::Exit {
        let state = match control.request {
            Request::Pause => VcpuState::Paused,
            _ => VcpuState::Running,
        };
        if control.state != state {
            control.state = state;
            shared.changed.notify_all();
        }
        control = shared
            .changed
            .wait(control)
            .unwrap_or_else(|p| p.into_inner());
    }
}

/// The vCPU thread: runs `vcpu` until the VM asks it to exit or this vCPU ends the VM.
fn run(
    mut vcpu: VcpuFd,
    id: u8,
    buses: &Buses,
    shared: &Shared,
    exit: &ExitSender,
    seccomp: Seccomp,
) {
    match seccomp::confine(ThreadKind::Vcpu, Needs::default(), seccomp) {
        Ok(()) => run_until_exit(&mut vcpu, id, buses, shared, exit),
        Err(e) => {
            exit.send(VmExit::Failed(VmFailure::Seccomp {
                vcpu: id,
                reason: e.to_string(),
            }));
            park_until_exit(shared);
        }
    }
    let mut control = lock(shared);
    control.immediate_exit = None;
    control.state = VcpuState::Exited;
    shared.changed.notify_all();
    drop(control);
    drop(vcpu);
}

/// Runs the guest on this vCPU until the VM asks the thread to exit or this vCPU ends the VM.
fn run_until_exit(vcpu: &mut VcpuFd, id: u8, buses: &Buses, shared: &Shared, exit: &ExitSender) {
    loop {
        if obey(shared) {
            break;
        }
        let ended = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                buses.port_read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                buses.port_write(port, data);
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
            // A triple fault: a PC resets. Said on stderr: with --no-reboot it ends the run
            // with status 0, and nothing else would tell a guest crash from a reboot.
            Ok(VcpuExit::Shutdown) => {
                log::warn!("vCPU {id}: triple fault; the machine resets");
                Some(VmExit::Reset)
            }
            // Only without an in-kernel local APIC; nothing will wake this CPU.
            Ok(VcpuExit::Hlt) => Some(VmExit::Shutdown),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                KVM_SYSTEM_EVENT_CRASH => VmExit::Failed(VmFailure::GuestCrashed { vcpu: id }),
                event => VmExit::Failed(VmFailure::UnknownSystemEvent { vcpu: id, event }),
            }),
            Ok(VcpuExit::InternalError) => {
                Some(VmExit::Failed(VmFailure::KvmInternalError { vcpu: id }))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Failed(VmFailure::EntryFailed {
                vcpu: id,
                reason,
                cpu,
            })),
            Ok(other) => Some(VmExit::Failed(VmFailure::UnhandledExit {
                vcpu: id,
                exit: format!("{other:?}"),
            })),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Failed(VmFailure::KvmRun {
                vcpu: id,
                errno: e.errno(),
            })),
        };
        if let Some(reason) = ended {
            exit.send(reason);
            park_until_exit(shared);
            break;
        }
    }
}

/// The signal that interrupts KVM_RUN so a vCPU thread sees a request.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), on_kick) {
            log::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}
