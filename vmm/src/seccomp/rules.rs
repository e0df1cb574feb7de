//! The system calls each kind of thread may make, found by running every test tier with
//! `--seccomp log` and reading the kernel's audit lines, and by reading the code of each
//! thread. Arguments are checked where a call's danger lies in them: clone must make a
//! thread (not a process) unless the VM runs guestfwd commands, and a vCPU's ioctls must be
//! KVM's.

use std::collections::{BTreeMap, BTreeSet};

use libc::*;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::Needs;

/// The kind of a device worker thread (and of what `nixvmm device` serves).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Block,
    Rng,
    NineP,
    Fs,
    Net,
    Console,
    Vsock,
    /// The TPM's swtpm connection.
    Tpm,
}

/// A kind of thread, with a filter of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: front door, control plane, VM builder.
    Vmm,
    Vcpu,
    /// A device worker inside `nixvmm run`.
    Device(DeviceKind),
    /// `nixvmm device …` serving a model over vhost-user (or 9p over a socket).
    Serve(DeviceKind),
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        use DeviceKind::*;
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device(Block) => "virtio-blk",
            ThreadKind::Device(Rng) => "virtio-rng",
            ThreadKind::Device(NineP) => "virtio-9p",
            ThreadKind::Device(Fs) => "virtio-fs",
            ThreadKind::Device(Net) => "virtio-net",
            ThreadKind::Device(Console) => "virtio-console",
            ThreadKind::Device(Vsock) => "virtio-vsock",
            ThreadKind::Device(Tpm) => "tpm",
            ThreadKind::Serve(Block) => "device blk",
            ThreadKind::Serve(Rng) => "device rng",
            ThreadKind::Serve(NineP) => "device 9p",
            ThreadKind::Serve(Fs) => "device fs",
            ThreadKind::Serve(_) => "device",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every thread: memory, locks, signals, time, logging on stderr, its own exit.
const EVERY_THREAD: &[c_long] = &[
    SYS_read,
    SYS_write,
    SYS_close,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_madvise,
    SYS_mprotect,
    SYS_brk,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_restart_syscall,
    SYS_exit,
    SYS_exit_group,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_getrandom,
    SYS_sched_yield,
    SYS_gettid,
    SYS_getpid,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_fcntl,
];

/// Threads that start threads (clone with CLONE_THREAD) and what a new thread does before
/// its own filter is on, installing it included (prctl, seccomp). clone3 is answered ENOSYS
/// by a filter installed before this list (see the module's documentation).
const STARTS_THREADS: &[c_long] = &[
    SYS_clone3,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_seccomp,
    SYS_sched_getaffinity,
];

/// Reading and writing files by descriptor (disks, the console's file).
const FILE_IO: &[c_long] = &[
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_readv,
    SYS_writev,
    SYS_lseek,
    SYS_fsync,
    SYS_fdatasync,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
];

/// A share's server: every file operation a guest may ask for, relative to open folders.
const FILESYSTEM: &[c_long] = &[
    SYS_openat,
    SYS_open_by_handle_at,
    SYS_name_to_handle_at,
    SYS_getdents64,
    SYS_fstatfs,
    SYS_statfs,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_renameat2,
    SYS_linkat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_utimensat,
    SYS_fgetxattr,
    SYS_fsetxattr,
    SYS_flistxattr,
    SYS_fremovexattr,
    SYS_getxattr,
    SYS_setxattr,
    SYS_listxattr,
    SYS_removexattr,
    SYS_lgetxattr,
    SYS_lsetxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_flock,
    SYS_copy_file_range,
    SYS_dup,
    SYS_umask,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setfsuid,
    SYS_setfsgid,
    SYS_getuid,
    SYS_getgid,
    SYS_geteuid,
    SYS_getegid,
];

/// Sockets of every family: slirp's connections, chardevs, vsock peers, vhost-user.
const SOCKETS: &[c_long] = &[
    SYS_socket,
    SYS_socketpair,
    SYS_bind,
    SYS_listen,
    SYS_accept,
    SYS_accept4,
    SYS_connect,
    SYS_shutdown,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_poll,
    SYS_ppoll,
    SYS_readv,
    SYS_writev,
];

/// What a vCPU does besides KVM_RUN: MSI routing and BAR moves (KVM ioctls on the VM),
/// activating a device (its eventfds and epoll set), vhost-user messages.
const VCPU: &[c_long] = &[
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_sendto,
    SYS_recvfrom,
    SYS_poll,
    SYS_ppoll,
    SYS_writev,
];

/// The main thread builds VMs (KVM, guest memory, kernels and their cache, disks, shares,
/// backends), runs the control plane (signals, stdin, QMP, HMP, chardevs) and starts every
/// other thread. What it may not do: run programs (unless guestfwd needs them), trace,
/// mount, load modules or kernels, change namespaces, users or the clock.
const VMM: &[c_long] = &[
    SYS_ioctl,
    SYS_openat,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getcwd,
    SYS_getdents64,
    SYS_mkdirat,
    SYS_mkdir,
    SYS_unlinkat,
    SYS_unlink,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_access,
    SYS_fchmod,
    SYS_fchown,
    SYS_flock,
    SYS_fstatfs,
    SYS_statfs,
    SYS_dup,
    SYS_dup3,
    SYS_pipe2,
    SYS_eventfd2,
    SYS_signalfd4,
    SYS_timerfd_create,
    SYS_timerfd_settime,
    SYS_epoll_create1,
    SYS_memfd_create,
    SYS_rt_sigaction,
    SYS_kill,
    SYS_tgkill,
    SYS_wait4,
    SYS_getuid,
    SYS_getgid,
    SYS_geteuid,
    SYS_getegid,
    SYS_getppid,
    SYS_uname,
    SYS_sysinfo,
    SYS_prlimit64,
    SYS_sched_getaffinity,
];

/// A device served by `nixvmm device`: the vhost-user socket, the frontend's memory and
/// eventfds, the daemon's threads.
const SERVE: &[c_long] = &[
    SYS_openat,
    SYS_unlinkat,
    SYS_unlink,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_rt_sigaction,
    SYS_tgkill,
];

/// Starting a process (libslirp's guestfwd commands): what glib does between fork and exec,
/// and what the program does until it runs (the dynamic loader).
const PROCESSES: &[c_long] = &[
    // `nixvmm relay` takes its connection slot.
    SYS_flock,
    SYS_clone3,
    SYS_vfork,
    SYS_execve,
    SYS_dup2,
    SYS_dup3,
    SYS_setsid,
    SYS_wait4,
    SYS_rt_sigaction,
    SYS_close_range,
    SYS_getdents64,
    SYS_openat,
    SYS_arch_prctl,
    SYS_set_tid_address,
    SYS_prlimit64,
    SYS_access,
    SYS_faccessat,
    SYS_pipe2,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_prctl,
    SYS_readlink,
    SYS_getuid,
    SYS_gettimeofday,
    SYS_sched_getaffinity,
];

fn device(kind: DeviceKind) -> Vec<&'static [c_long]> {
    match kind {
        DeviceKind::Block => vec![FILE_IO],
        DeviceKind::Rng => vec![],
        DeviceKind::NineP | DeviceKind::Fs => vec![FILE_IO, FILESYSTEM],
        // libslirp reads /etc/resolv.conf for the DNS it forwards to; its timers are a
        // timerfd. Its ioctls (FIONREAD, a tap's TUNSETOFFLOAD, isatty's TCGETS) are allowed
        // below.
        DeviceKind::Net => vec![
            SOCKETS,
            FILE_IO,
            &[SYS_openat, SYS_timerfd_settime, SYS_timerfd_gettime],
        ],
        // A chardev that reconnects waits on a timerfd between tries.
        DeviceKind::Console => vec![
            SOCKETS,
            FILE_IO,
            &[SYS_timerfd_settime, SYS_timerfd_gettime],
        ],
        // The muxer times handshakes and unanswered requests out with a timerfd.
        DeviceKind::Vsock => vec![SOCKETS, FILE_IO, &[SYS_timerfd_settime]],
        // Requests and replies on swtpm's two sockets, already connected.
        DeviceKind::Tpm => vec![&[SYS_sendto, SYS_recvfrom]],
    }
}

/// `kind`'s filter: each allowed call with the conditions under which it is (none: always).
pub fn allowed(kind: ThreadKind, needs: Needs) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut lists: Vec<&[c_long]> = vec![EVERY_THREAD];
    let starts_threads = starts_threads(kind);
    match kind {
        ThreadKind::Vmm => lists.extend([VMM, FILE_IO, FILESYSTEM, SOCKETS]),
        ThreadKind::Vcpu => lists.push(VCPU),
        ThreadKind::Device(device_kind) => lists.extend(device(device_kind)),
        ThreadKind::Serve(device_kind) => {
            lists.extend(device(device_kind));
            lists.extend([SERVE, SOCKETS, FILE_IO]);
        }
    }
    if starts_threads {
        lists.push(STARTS_THREADS);
    }
    let processes = runs_programs(kind, needs);
    if processes {
        lists.push(PROCESSES);
    }
    let always: BTreeSet<c_long> = lists.concat().into_iter().collect();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        always.iter().map(|&call| (call, Vec::new())).collect();
    // Calls allowed only with these arguments (an empty list would allow any).
    let mut only_with = |call: c_long, rule: SeccompRule| {
        if !always.contains(&call) {
            rules.entry(call).or_default().push(rule);
        }
    };
    // The SIGSYS handler restores the terminal (tcsetattr: TCSETS, or TCSETS2 from glibc
    // 2.42 on).
    for request in [TCSETS, TCSETS2] {
        only_with(SYS_ioctl, ioctl_request(request));
    }
    // A panic ends the process with abort(), which raises SIGABRT on its own thread.
    only_with(SYS_tgkill, signal(SIGABRT));
    // Rust's set_nonblocking on a socket (a vsock or chardev peer, a slirp connection).
    if lists.contains(&SOCKETS) {
        only_with(SYS_ioctl, ioctl_request(FIONBIO));
    }
    if kind == ThreadKind::Device(DeviceKind::Net) {
        // libslirp sizes a UDP datagram before it receives it; a tap is told the offloads
        // the guest's driver acked; glib asks whether stderr is a terminal (isatty: TCGETS,
        // or TCGETS2 from glibc 2.42 on) when libslirp logs.
        for request in [FIONREAD, TUNSETOFFLOAD, TCGETS, TCGETS2] {
            only_with(SYS_ioctl, ioctl_request(request));
        }
    }
    if kind == ThreadKind::Vcpu {
        // KVM's: KVM_RUN, MSI routes, irqfds and ioeventfds; vhost's: the kernel's
        // vhost-vsock started at DRIVER_OK.
        only_with(SYS_ioctl, ioctl_of_type(KVMIO));
        only_with(SYS_ioctl, ioctl_of_type(VHOST_VIRTIO));
    }
    if processes {
        rules.insert(SYS_clone, Vec::new());
    } else if starts_threads {
        only_with(SYS_clone, new_thread());
    }
    rules
}

/// Whether `kind`'s thread starts programs: libslirp runs guestfwd commands from the NIC's
/// worker, which inherits the main thread's filter.
pub fn runs_programs(kind: ThreadKind, needs: Needs) -> bool {
    needs.processes && matches!(kind, ThreadKind::Vmm | ThreadKind::Device(DeviceKind::Net))
}

fn starts_threads(kind: ThreadKind) -> bool {
    matches!(kind, ThreadKind::Vmm | ThreadKind::Serve(_))
}

/// Whether `kind`'s thread starts threads or programs: glibc tries clone3 first there.
pub fn starts_tasks(kind: ThreadKind, needs: Needs) -> bool {
    starts_threads(kind) || runs_programs(kind, needs)
}

/// tgkill sending `number`.
fn signal(number: c_int) -> SeccompRule {
    SeccompRule::new(vec![arg(2, SeccompCmpOp::Eq, number as u64)]).expect("a valid rule")
}

fn arg(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).expect("argument 0 to 5")
}

/// KVM's ioctl type (linux/kvm.h).
const KVMIO: u64 = 0xae;
/// vhost's ioctl type (linux/vhost.h).
const VHOST_VIRTIO: u64 = 0xaf;

/// An ioctl whose request has this type (bits 8 to 15).
fn ioctl_of_type(kind: u64) -> SeccompRule {
    SeccompRule::new(vec![arg(1, SeccompCmpOp::MaskedEq(0xff00), kind << 8)]).expect("a valid rule")
}

/// One ioctl request.
fn ioctl_request(request: u64) -> SeccompRule {
    SeccompRule::new(vec![arg(1, SeccompCmpOp::Eq, request)]).expect("a valid rule")
}

/// clone with CLONE_THREAD: a thread of this process, not a new process.
fn new_thread() -> SeccompRule {
    let thread = CLONE_THREAD as u64;
    SeccompRule::new(vec![arg(0, SeccompCmpOp::MaskedEq(thread), thread)]).expect("a valid rule")
}
