//! Tier 1: listeners out of file descriptors refuse (close) waiting clients instead of
//! waking their event loops without end: SpareFd itself, a listening chardev, the vsock
//! muxer. The tests lower this process's descriptor limit, and so run one at a time
//! (`alone`): another test's descriptors opened or closed meanwhile would change the room.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use devices::host_listener::SpareFd;
use virtio::vsock::muxer::Muxer;
use vmm::config::console::ChardevSpec;
use vmm::host::chardev::Chardev;

fn alone() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` with no room for one more descriptor (the limit is on descriptor numbers, and a
/// new descriptor takes the lowest free one), then gives room back.
fn without_room<T>(f: impl FnOnce() -> T) -> T {
    /// Gives the limit back however `f` ends (a panic included).
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            set_soft_limit(self.0);
        }
    }
    let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd() as u64;
    let _restore = Restore(set_soft_limit(lowest_free));
    f()
}

/// Sets this process's soft limit of open files; returns the one it had.
fn set_soft_limit(limit: u64) -> u64 {
    let mut rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlimit), 0);
        let previous = rlimit.rlim_cur;
        rlimit.rlim_cur = limit;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit), 0);
        previous
    }
}

/// Whether `fd` (an event loop's epoll) would wake its loop now.
fn readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd it is given, for at most 50 ms.
    unsafe { libc::poll(&mut poll, 1, 50) > 0 }
}

fn clients(path: &Path) -> Vec<UnixStream> {
    (0..3).map(|_| UnixStream::connect(path).unwrap()).collect()
}

fn all_closed(clients: Vec<UnixStream>) {
    for mut client in clients {
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "a refused client is closed");
    }
}

#[test]
fn a_spare_descriptor_hands_clients_over_and_out_of_descriptors_refuses_them() {
    let _alone = alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut spare = SpareFd::default();
    let said = AtomicBool::new(false);
    let _first = UnixStream::connect(&path).unwrap();
    assert!(matches!(
        spare.accept(&listener, &said, &"test"),
        Ok(Some(_))
    ));
    assert!(!said.load(Ordering::Relaxed));

    let waiting = clients(&path);
    let results: Vec<_> = without_room(|| {
        (0..4)
            .map(|_| spare.accept(&listener, &said, &"test"))
            .collect()
    });
    for result in &results[..3] {
        assert!(matches!(result, Ok(None)), "refused: {result:?}");
    }
    let last = results[3].as_ref().unwrap_err();
    assert_eq!(
        last.kind(),
        std::io::ErrorKind::WouldBlock,
        "none left waiting: {last}"
    );
    assert!(said.load(Ordering::Relaxed));
    all_closed(waiting);
    // The spare is back: the next client is handed over.
    let _next = UnixStream::connect(&path).unwrap();
    assert!(matches!(
        spare.accept(&listener, &said, &"test"),
        Ok(Some(_))
    ));
}

#[test]
fn out_of_descriptors_a_listening_chardev_refuses_clients_and_is_quiet() {
    let _alone = alone();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("port");
    let spec = ChardevSpec::SocketServer {
        path: path.clone(),
        wait: false,
    };
    let mut port = Chardev::open(&spec).unwrap().backend();
    let waiting = clients(&path);
    let woken = without_room(|| {
        // One client per wake, as the console's worker polls.
        for _ in 0..3 {
            port.poll();
        }
        readable(port.fd())
    });
    assert!(!woken, "nothing left to wake the console's worker");
    assert!(!port.connected());
    all_closed(waiting);
}

#[test]
fn out_of_descriptors_the_vsock_muxer_refuses_host_programs_and_is_quiet() {
    let _alone = alone();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(7, &uds).unwrap();
    let waiting = clients(&uds);
    let woken = without_room(|| {
        muxer.poll();
        readable(muxer.fd())
    });
    assert!(!woken, "nothing left to wake the device's worker");
    all_closed(waiting);
}
