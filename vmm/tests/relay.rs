//! `nixvmm relay`, what a user network's guestfwd runs per guest connection: it holds one of
//! the network's connection slots while it runs, so a guest opening connection after
//! connection cannot make the host run processes without end.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::host::slirp::MAX_GUESTFWD_CONNECTIONS;

fn relay(slots: &std::path::Path, target: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nixvmm"))
        .arg("relay")
        .arg("--slots")
        .arg(slots)
        .args(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (at most 10 s) and returns its stdout and stderr.
fn ended(mut child: Child) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the relay did not end");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut out, mut err) = (String::new(), String::new());
    // (Unless the caller took it.)
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out).unwrap();
    }
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (out, err)
}

#[test]
fn relays_hold_a_slot_each_and_one_past_the_cap_ends_at_once() {
    let slots = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut relays: Vec<Child> = (0..MAX_GUESTFWD_CONNECTIONS)
        .map(|_| relay(slots.path(), &[&address]))
        .collect();
    let _connections: Vec<_> = (0..MAX_GUESTFWD_CONNECTIONS)
        .map(|_| listener.accept().unwrap().0)
        .collect();
    // Past the cap: no connection, the guest's is closed, said once.
    let (_, said) = ended(relay(slots.path(), &[&address]));
    assert!(said.contains("guest connections at once"), "{said}");
    let (_, again) = ended(relay(slots.path(), &[&address]));
    assert_eq!(again, "", "said once");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "no connection past the cap");
    // One relay ends: its slot is free for the next.
    let mut first = relays.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    relays.push(relay(slots.path(), &[&address]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener.accept().is_err() {
        assert!(
            Instant::now() < deadline,
            "the ended relay's slot was not taken again"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut r in relays {
        let _ = r.kill();
        let _ = r.wait();
    }
}

/// A `cmd:` forward's program runs in the relay's place and keeps its slot while it runs
/// (the lock goes with the descriptor across exec); the slot is free once it ends.
#[test]
fn a_guestfwd_command_runs_with_its_slot() {
    let slots = tempfile::tempdir().unwrap();
    let mut program = relay(slots.path(), &["--exec", "sh", "-c", "echo ran; read line"]);
    let mut out = std::io::BufReader::new(program.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "ran\n");
    let slot = std::fs::File::open(slots.path().join("slot-0")).unwrap();
    assert!(slot.try_lock().is_err(), "the program holds slot 0");
    drop(program.stdin.take()); // its `read` ends, and so does it
    let (_, err) = ended(program);
    assert_eq!(err, "");
    assert!(slot.try_lock().is_ok(), "slot 0 is free again");
}
