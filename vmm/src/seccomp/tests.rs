//! Each filter installed on a thread of its own, with EPERM for what it forbids (so the test
//! process lives on): the thread tries a call its kind must not make and one it must.
//! The SIGSYS path of `--seccomp on` runs in a child process (this test binary again).

use std::os::fd::AsRawFd;

use super::*;

/// Runs `body` on a new thread confined as `kind`, forbidden calls failing with EPERM.
fn confined<T: Send + 'static>(
    kind: ThreadKind,
    needs: Needs,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        install(kind, needs, SeccompAction::Errno(libc::EPERM as u32)).expect("filter installs");
        body()
    })
    .join()
    .expect("the confined thread ends")
}

fn errno_of(rc: libc::c_long) -> i32 {
    if rc < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn open_tmp() -> libc::c_long {
    // SAFETY: a NUL-terminated path; the descriptor, if any, is closed by the caller.
    unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/tmp".as_ptr(),
            libc::O_RDONLY,
        )
    }
}

fn new_socket() -> libc::c_long {
    // SAFETY: creates a socket or fails; no memory is passed.
    unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) }
}

fn close(fd: libc::c_long) {
    if fd >= 0 {
        // SAFETY: closes a descriptor this test opened.
        unsafe { libc::close(fd as i32) };
    }
}

#[test]
fn a_vcpu_may_make_kvm_ioctls_but_not_open_files_or_other_ioctls() {
    let (pipe_r, _pipe_w) = std::io::pipe().expect("a pipe");
    let pipe = pipe_r.as_raw_fd();
    let (open, other_ioctl, kvm_ioctl, clone3) =
        confined(ThreadKind::Vcpu, Needs::default(), move || {
            let open = open_tmp();
            let open_errno = errno_of(open);
            close(open);
            let mut waiting: libc::c_int = 0;
            // SAFETY: FIONREAD writes an int through the pointer, which is valid.
            let other = errno_of(unsafe { libc::ioctl(pipe, libc::FIONREAD, &mut waiting) }.into());
            // KVM_GET_API_VERSION (_IO(0xAE, 0)) on a pipe: the filter lets it through and
            // the pipe refuses it (ENOTTY), so no /dev/kvm is needed to see the rule work.
            // SAFETY: the request takes no argument.
            let kvm = errno_of(unsafe { libc::ioctl(pipe, 0xAE00, 0) }.into());
            // SAFETY: clone3 with no arguments fails before reading any.
            let clone3 = errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) });
            (open_errno, other, kvm, clone3)
        });
    assert_eq!(open, libc::EPERM, "openat from a vCPU thread");
    assert_eq!(other_ioctl, libc::EPERM, "FIONREAD from a vCPU thread");
    assert_eq!(kvm_ioctl, libc::ENOTTY, "a KVM ioctl from a vCPU thread");
    assert_eq!(
        clone3,
        libc::EPERM,
        "clone3 from a vCPU thread (it starts nothing)"
    );
}

#[test]
fn device_workers_make_only_their_own_kind_of_calls() {
    use DeviceKind::*;
    // (kind, may open files, may make sockets)
    let kinds = [
        (Block, false, false),
        (Rng, false, false),
        (NineP, true, false),
        (Fs, true, false),
        (Net, true, true),
        (Console, false, true),
        (Vsock, false, true),
        (Tpm, false, false),
    ];
    for (kind, opens, sockets) in kinds {
        let (peer, _other) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        let peer = peer.as_raw_fd();
        let timer = vmm_sys_util::timerfd::TimerFd::new().expect("a timerfd");
        let timer_fd = timer.as_raw_fd();
        let (open, socket, nonblocking, rearm) =
            confined(ThreadKind::Device(kind), Needs::default(), move || {
                let (open, socket) = (open_tmp(), new_socket());
                let on: libc::c_int = 1;
                // SAFETY: FIONBIO reads an int through the pointer, which is valid.
                let nonblocking = unsafe { libc::ioctl(peer, libc::FIONBIO, &on) };
                // SAFETY: a zeroed itimerspec disarms the timer; the pointers are valid.
                let rearm = unsafe {
                    let off: libc::itimerspec = std::mem::zeroed();
                    libc::timerfd_settime(timer_fd, 0, &off, std::ptr::null_mut())
                };
                let errnos = (
                    errno_of(open),
                    errno_of(socket),
                    errno_of(nonblocking.into()),
                    errno_of(rearm.into()),
                );
                close(open);
                close(socket);
                errnos
            });
        let expect = |allowed: bool| if allowed { 0 } else { libc::EPERM };
        assert_eq!(open, expect(opens), "openat from a {kind:?} worker");
        assert_eq!(socket, expect(sockets), "socket from a {kind:?} worker");
        assert_eq!(
            nonblocking,
            expect(sockets),
            "FIONBIO from a {kind:?} worker"
        );
        // Slirp's timers, and a reconnecting chardev's wait between tries.
        let timers = matches!(kind, Net | Console | Vsock);
        assert_eq!(
            rearm,
            expect(timers),
            "timerfd_settime from a {kind:?} worker"
        );
    }
}

/// The ioctls the NIC's worker makes: libslirp's FIONREAD on a socket, a tap's TUNSETOFFLOAD
/// (the offloads the guest acked), glib's isatty (TCGETS, TCGETS2) when libslirp logs, Rust's
/// FIONBIO;
/// no other (a tap's TUNSETIFF is the main thread's).
#[test]
fn the_net_worker_makes_only_the_ioctls_it_needs() {
    let (peer, _other) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
    let peer = peer.as_raw_fd();
    let (fionread, offload, tcgets, other) = confined(
        ThreadKind::Device(DeviceKind::Net),
        Needs::default(),
        move || {
            // Each errno is read right after its call.
            let mut waiting: libc::c_int = 0;
            // SAFETY: FIONREAD writes an int through the pointer, which is valid.
            let fionread =
                errno_of(unsafe { libc::ioctl(peer, libc::FIONREAD, &mut waiting) }.into());
            // SAFETY: TUNSETOFFLOAD takes its flags by value; a socket refuses it (ENOTTY).
            let offload = errno_of(unsafe { libc::ioctl(peer, libc::TUNSETOFFLOAD, 0) }.into());
            // isatty, as glibc makes it before 2.42 and from then on.
            // SAFETY: a termios is integers only; all zero is a valid value.
            let mut termios: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: TCGETS writes a termios through the pointer, which is valid.
            let tcgets = errno_of(unsafe { libc::ioctl(peer, libc::TCGETS, &mut termios) }.into());
            // SAFETY: a termios2 is integers only; all zero is a valid value.
            let mut termios2: libc::termios2 = unsafe { std::mem::zeroed() };
            // SAFETY: TCGETS2 writes a termios2 through the pointer, which is valid.
            let tcgets2 =
                errno_of(unsafe { libc::ioctl(peer, libc::TCGETS2, &mut termios2) }.into());
            let mut size: libc::winsize = libc::winsize {
                ws_row: 0,
                ws_col: 0,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCGWINSZ writes a winsize through the pointer, which is valid.
            let other = errno_of(unsafe { libc::ioctl(peer, libc::TIOCGWINSZ, &mut size) }.into());
            (fionread, offload, (tcgets, tcgets2), other)
        },
    );
    assert_eq!(fionread, 0, "FIONREAD");
    assert_eq!(offload, libc::ENOTTY, "TUNSETOFFLOAD reaches the kernel");
    assert_eq!(
        tcgets,
        (libc::ENOTTY, libc::ENOTTY),
        "isatty reaches the kernel"
    );
    assert_eq!(other, libc::EPERM, "another ioctl");
}

#[test]
fn a_block_worker_reads_and_writes_its_disk() {
    let disk = tempfile::tempfile().expect("a file");
    let fd = disk.as_raw_fd();
    let read_back = confined(
        ThreadKind::Device(DeviceKind::Block),
        Needs::default(),
        move || {
            let data = *b"sector";
            let mut back = [0u8; 6];
            // SAFETY: both buffers are valid for their lengths.
            unsafe {
                libc::pwrite(fd, data.as_ptr().cast(), data.len(), 512);
                libc::fdatasync(fd);
                libc::pread(fd, back.as_mut_ptr().cast(), back.len(), 512);
            }
            back
        },
    );
    assert_eq!(&read_back, b"sector");
}

/// clone(SIGCHLD): a new process, as fork makes one.
fn fork_by_clone() -> libc::c_long {
    // SAFETY: with a filter this fails before anything happens; without one the child
    // exits at once (it is reaped below).
    let rc = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
    if rc == 0 {
        // SAFETY: the child ends at once, running nothing of the parent's.
        unsafe { libc::_exit(0) };
    }
    if rc > 0 {
        // SAFETY: reaps the child just made.
        unsafe { libc::waitpid(rc as i32, std::ptr::null_mut(), 0) };
    }
    rc
}

#[test]
fn the_main_thread_starts_threads_but_no_processes_or_programs() {
    let (thread_ran, fork, exec, clone3) = confined(ThreadKind::Vmm, Needs::default(), || {
        // glibc tries clone3 first, gets ENOSYS and falls back to clone(CLONE_THREAD).
        let thread_ran = std::thread::spawn(|| 7).join().ok();
        let fork = errno_of(fork_by_clone());
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        // SAFETY: a NUL-terminated path and argv; on success this would replace the test.
        let exec = errno_of(unsafe {
            libc::syscall(
                libc::SYS_execve,
                argv[0],
                argv.as_ptr(),
                std::ptr::null::<u8>(),
            )
        });
        // SAFETY: clone3 with no arguments fails before reading any.
        let clone3 = errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) });
        (thread_ran, fork, exec, clone3)
    });
    assert_eq!(
        thread_ran,
        Some(7),
        "a thread started under the main thread's filter"
    );
    assert_eq!(fork, libc::EPERM, "clone without CLONE_THREAD");
    assert_eq!(exec, libc::EPERM, "execve");
    assert_eq!(clone3, libc::ENOSYS, "clone3 (glibc falls back to clone)");
}

#[test]
fn guestfwd_commands_let_the_net_worker_start_processes() {
    let needs = Needs { processes: true };
    let fork = confined(ThreadKind::Device(DeviceKind::Net), needs, || {
        errno_of(fork_by_clone())
    });
    assert_eq!(
        fork, 0,
        "clone(SIGCHLD) in a NIC worker with guestfwd commands"
    );
    let fork = confined(
        ThreadKind::Device(DeviceKind::Net),
        Needs::default(),
        || errno_of(fork_by_clone()),
    );
    assert_eq!(
        fork,
        libc::EPERM,
        "clone(SIGCHLD) in a NIC worker without them"
    );
}

#[test]
fn a_thread_without_a_filter_runs_free_and_off_installs_nothing() {
    confine(ThreadKind::Vcpu, Needs::default(), Seccomp::Off).expect("off installs nothing");
    let open = open_tmp();
    assert!(open >= 0, "openat without a filter");
    close(open);
}

const CHILD: &str = "NIXVMM_SECCOMP_TEST_CHILD";

/// In a child process (this test run again): a vCPU thread under `--seccomp on` opens a
/// file. Stderr must name the thread and the call, and the status must be 128 + SIGSYS.
#[test]
fn a_forbidden_call_under_on_ends_nixvmm_naming_the_thread_and_the_call() {
    if std::env::var_os(CHILD).is_some() {
        confine(ThreadKind::Vcpu, Needs::default(), Seccomp::On).expect("filter installs");
        open_tmp();
        unreachable!("openat went through a vCPU's filter");
    }
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "seccomp::tests::a_forbidden_call_under_on_ends_nixvmm_naming_the_thread_and_the_call",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .expect("the child runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{stderr}");
    assert!(
        stderr.contains(
            "nixvmm: seccomp: the vcpu thread made a system call its filter forbids: openat (257)"
        ),
        "{stderr}"
    );
}

#[test]
fn with_guestfwd_the_nic_and_main_filters_log_what_they_do_not_allow() {
    let dir = tempfile::tempdir().expect("a folder");
    let path =
        std::ffi::CString::new(dir.path().join("made").to_str().expect("UTF-8")).expect("no NUL");
    let needs = Needs { processes: true };
    let made = std::thread::spawn(move || {
        confine(ThreadKind::Device(DeviceKind::Net), needs, Seccomp::On).expect("installs");
        // SAFETY: a NUL-terminated path; mkdirat is not on a NIC's list.
        errno_of(unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), 0o755) })
    })
    .join()
    .expect("the NIC thread lives on");
    assert_eq!(made, 0, "logged and let through, not trapped");
    assert!(dir.path().join("made").is_dir());
}

#[test]
fn guestfwd_forwards_are_what_needs_processes() {
    let mut config = crate::VmConfig::default();
    assert_eq!(needs(&config), Needs { processes: false });
    let nic = crate::config::net::parse_net("user,guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:8080")
        .expect("a NIC");
    config.nics.push(nic);
    assert_eq!(needs(&config), Needs { processes: true });
}

/// A panic ends nixvmm with abort(), which raises SIGABRT on the panicking thread: every
/// filter lets that tgkill through (and no other signal). Both signals are blocked here, so
/// the one sent waits on the thread and goes with it.
#[test]
fn every_thread_may_abort_and_signal_nothing_else() {
    let (abort, usr1) = confined(
        ThreadKind::Device(DeviceKind::Rng),
        Needs::default(),
        || {
            // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; only this
            // thread's mask changes.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGABRT);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            // SAFETY: signals to this very thread, blocked above.
            let send = |signal: libc::c_int| unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), signal)
            };
            (errno_of(send(libc::SIGABRT)), errno_of(send(libc::SIGUSR1)))
        },
    );
    assert_eq!(abort, 0, "tgkill SIGABRT");
    assert_eq!(usr1, libc::EPERM, "tgkill SIGUSR1");
}
