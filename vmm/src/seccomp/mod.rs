//! seccomp filters, one per kind of thread (seccompiler): each thread installs its own
//! filter first thing, and a thread it starts inherits it, so a thread's system calls are
//! those of every filter on its way (the main thread's, then its own).
//!
//! Which thread installs which filter:
//! - the main thread (the control plane, which also builds each VM): [`ThreadKind::Vmm`],
//!   after the front door has read the configuration (`main.rs`);
//! - each vCPU thread: [`ThreadKind::Vcpu`] (`machine::vcpu`);
//! - each device worker ([`virtio::worker::Hosted`], started with its device when the VM is
//!   built, so from the main thread): the filter of its device's kind;
//! - `nixvmm device`: [`ThreadKind::Serve`] on the main thread before the vhost-user daemon
//!   starts its threads.
//!
//! A system call outside a thread's filter: with [`Seccomp::On`] the thread gets SIGSYS, whose
//! handler names the thread and the call on stderr, restores the terminal and ends nixvmm with
//! status 159 (128 + SIGSYS); with [`Seccomp::Log`] the kernel logs it (audit, `dmesg`) and
//! lets it through. glibc starts threads with clone3, whose flags a filter cannot read: the
//! filter of a thread that starts threads or programs comes with a second one answering it
//! ENOSYS, so glibc falls back to clone, whose flags the filters check. Other threads start
//! nothing: clone3 is simply not on their lists.

mod rules;

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub use rules::{DeviceKind, ThreadKind};

use crate::config::net::NetBackend;
use crate::VmConfig;

/// Whether nixvmm confines its threads (`--seccomp`, QEMU's `-sandbox`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// A system call outside the thread's filter ends nixvmm with a message naming both.
    #[default]
    On,
    /// Such a call is let through and logged by the kernel (`dmesg`: audit type=1326).
    Log,
    /// No filters.
    Off,
}

/// What a thread's filter must also allow, beyond its kind, for this VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// A `guestfwd=…-cmd:` or `-tcp:` forward: libslirp starts a process per connection.
    pub processes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: the {kind} filter: {source}")]
    Compile {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error(
        "seccomp: cannot install the {kind} filter: {source} (a kernel without seccomp? \
         --seccomp off runs without filters)"
    )]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

/// What `config`'s threads need beyond their kinds.
pub fn needs(config: &VmConfig) -> Needs {
    let processes = config.nics.iter().any(|nic| match &nic.backend {
        NetBackend::User(user) => !user.guestfwd.is_empty(),
        _ => false,
    });
    Needs { processes }
}

/// Installs `kind`'s filter on the calling thread (nothing with [`Seccomp::Off`]).
///
/// The processes libslirp starts for guestfwd run whatever program they are, under the
/// filters of the thread that started them (the NIC's worker, below the main thread): with
/// such forwards, those two filters log what they do not allow instead of stopping nixvmm.
pub fn confine(kind: ThreadKind, needs: Needs, mode: Seccomp) -> Result<(), SeccompError> {
    let mismatch = match mode {
        Seccomp::Off => return Ok(()),
        Seccomp::On if rules::runs_programs(kind, needs) => SeccompAction::Log,
        Seccomp::On => SeccompAction::Trap,
        Seccomp::Log => SeccompAction::Log,
    };
    if mode == Seccomp::On {
        install_sigsys_handler();
    }
    install(kind, needs, mismatch)
}

/// `kind`'s filter with `mismatch` for the calls it does not allow.
fn install(kind: ThreadKind, needs: Needs, mismatch: SeccompAction) -> Result<(), SeccompError> {
    let mut programs = Vec::new();
    if rules::starts_tasks(kind, needs) {
        let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        let no_clone3 = SeccompAction::Errno(libc::ENOSYS as u32);
        programs.push(compile(clone3, SeccompAction::Allow, no_clone3, kind)?);
    }
    // The allow-list last: installing a filter is a prctl it need not allow.
    let allowed = rules::allowed(kind, needs);
    programs.push(compile(allowed, mismatch, SeccompAction::Allow, kind)?);
    remember_thread(kind);
    for program in &programs {
        seccompiler::apply_filter(program)
            .map_err(|source| SeccompError::Install { kind, source })?;
    }
    Ok(())
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    kind: ThreadKind,
) -> Result<BpfProgram, SeccompError> {
    SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|source| SeccompError::Compile { kind, source })
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS handler (which may make no system call
    /// its thread's filter forbids, so it cannot ask the kernel for the thread's name).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// The first kind confined in this process: the filter of threads that installed none of
/// their own but inherited it (the vhost-user daemon's threads under `nixvmm device`).
static FIRST_KIND: std::sync::OnceLock<ThreadKind> = std::sync::OnceLock::new();

fn remember_thread(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
    let _ = FIRST_KIND.set(kind);
}

/// The kind whose filter the calling thread runs under, as far as this process knows.
fn kind_of_this_thread() -> Option<ThreadKind> {
    KIND.with(Cell::get).or_else(|| FIRST_KIND.get().copied())
}

fn install_sigsys_handler() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid empty action we then fill.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as extern "C" fn(_, _, _) as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: the handler only makes async-signal-safe calls (write, tcsetattr, _exit).
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
            log::warn!(
                "seccomp: no SIGSYS handler ({}): a forbidden system call will end nixvmm \
                 without naming it",
                std::io::Error::last_os_error()
            );
        }
    });
}

/// The system call a SIGSYS from seccomp reports: `si_syscall`, an int 24 bytes into
/// siginfo_t on x86-64 (after si_signo, si_errno, si_code, padding and si_call_addr).
fn syscall_of(info: &libc::siginfo_t) -> i64 {
    let base = (info as *const libc::siginfo_t).cast::<u8>();
    // SAFETY: siginfo_t is 128 bytes; bytes 24..28 hold si_syscall for SIGSYS (asm-generic
    // siginfo.h, _sigsys), read unaligned-safe.
    i64::from(unsafe { base.add(24).cast::<i32>().read_unaligned() })
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let number = unsafe { info.as_ref() }.map_or(-1, syscall_of);
    let mut line = Line::default();
    line.push("nixvmm: seccomp: the ");
    line.push(kind_of_this_thread().map_or("unknown", ThreadKind::name));
    line.push(" thread made a system call its filter forbids: ");
    let name = u32::try_from(number)
        .ok()
        .and_then(|n| syscalls::Sysno::new(n as usize))
        .map_or("unknown", |s| s.name());
    line.push(name);
    line.push(" (");
    line.push_number(number);
    line.push("). nixvmm stops. This is a bug in nixvmm; --seccomp log runs on and logs it.\n");
    // First, so that the line is not written in raw mode.
    crate::host::console::restore_terminal();
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid for its length.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.bytes.as_ptr().cast(), line.len);
    }
    // SAFETY: ends the process at once, as the signal's default action would.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// A message built without allocating (inside a signal handler).
struct Line {
    bytes: [u8; 256],
    len: usize,
}

impl Default for Line {
    fn default() -> Line {
        Line {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, text: &str) {
        self.push_bytes(text.as_bytes());
    }

    /// As much of `bytes` as fits.
    fn push_bytes(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push("-");
        }
        // u64::MAX has 20 digits.
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = n.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push_bytes(&digits[at..]);
    }
}

#[cfg(test)]
mod tests;
