//! Tier 1: the vsock muxer's handshakes, data and credit, with real Unix sockets on the host
//! side and packets as the guest's driver would send them.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use virtio::vsock::muxer::*;

const GUEST: u64 = 7;

fn guest_packet(op: u16, guest_port: u32, host_port: u32, len: usize) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: guest_port,
        dst_port: host_port,
        len: len as u32,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// Polls the muxer until it has a packet for the guest (or 5 s pass).
fn next(muxer: &mut Muxer) -> (Header, Vec<u8>) {
    for _ in 0..500 {
        muxer.poll();
        if let Some(p) = muxer.next_for_guest(4096) {
            return p;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no packet for the guest");
}

fn nothing_for_the_guest(muxer: &mut Muxer) {
    std::thread::sleep(Duration::from_millis(50));
    muxer.poll();
    assert_eq!(muxer.next_for_guest(4096), None);
}

/// Whether the peer closed the stream without sending anything more (EOF, or a reset because
/// it closed with our bytes unread).
fn closed(stream: &mut UnixStream) -> bool {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Whether the muxer's epoll fd (what the device's worker waits on) is readable now.
fn readable(muxer: &Muxer) -> bool {
    let mut fd = libc::pollfd {
        fd: muxer.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd it is given, for at most 50 ms.
    unsafe { libc::poll(&mut fd, 1, 50) > 0 }
}

fn connect(uds: &Path, line: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(line).unwrap();
    s
}

#[test]
fn a_host_program_connects_to_a_guest_port_and_bytes_flow_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let host = connect(&uds, b"CONNECT 1234\n");

    let (request, _) = next(&mut muxer);
    assert_eq!(request.op, OP_REQUEST);
    assert_eq!(
        (request.src_cid, request.dst_cid, request.dst_port),
        (HOST_CID, GUEST, 1234)
    );
    assert_eq!(request.buf_alloc, BUF_ALLOC);
    let host_port = request.src_port;

    muxer.from_guest(&guest_packet(OP_RESPONSE, 1234, host_port, 0), &[]);
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert_eq!(ok, format!("OK {host_port}\n"));

    muxer.from_guest(&guest_packet(OP_RW, 1234, host_port, 6), b"hello\n");
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "hello\n");
    // The guest's 6 bytes reached the host program: its credit comes back.
    let (update, _) = next(&mut muxer);
    assert_eq!((update.op, update.fwd_cnt), (OP_CREDIT_UPDATE, 6));

    (&host).write_all(b"world").unwrap();
    let (rw, data) = next(&mut muxer);
    assert_eq!((rw.op, rw.len, rw.dst_port), (OP_RW, 5, 1234));
    assert_eq!(data, b"world");

    // The host program closes: the guest hears SHUTDOWN, answers RST, and that is the end.
    drop(reader);
    drop(host);
    let (shutdown, _) = next(&mut muxer);
    assert_eq!(shutdown.op, OP_SHUTDOWN);
    assert_eq!(shutdown.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // Until the guest answers, the closed stream does not keep the worker awake.
    assert!(!readable(&muxer), "a closed stream is watched no more");
    muxer.from_guest(&guest_packet(OP_RST, 1234, host_port, 0), &[]);
    nothing_for_the_guest(&mut muxer);
}

#[test]
fn a_guest_refusal_closes_the_host_program_and_a_bad_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let mut host = connect(&uds, b"CONNECT 99\n");
    let (request, _) = next(&mut muxer);
    muxer.from_guest(&guest_packet(OP_RST, 99, request.src_port, 0), &[]);
    assert!(closed(&mut host), "closed without an OK");

    // A host program that leaves before the guest answers: the guest is told (RST).
    let early = connect(&uds, b"CONNECT 98\n");
    let (request, _) = next(&mut muxer);
    assert_eq!(request.dst_port, 98);
    drop(early);
    let (rst, _) = next(&mut muxer);
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, request.src_port, 98)
    );

    for line in [&b"HELLO 1\n"[..], b"CONNECT x\n", &[b'C'; 100]] {
        let mut bad = connect(&uds, line);
        muxer.poll();
        std::thread::sleep(Duration::from_millis(20));
        muxer.poll();
        assert!(closed(&mut bad), "{line:?}: closed");
    }
    nothing_for_the_guest(&mut muxer);
}

/// Polls the muxer as the device's worker does (when its fd is readable) until `done` holds
/// or `limit` passes; false then.
fn poll_until(
    muxer: &mut Muxer,
    limit: Duration,
    mut done: impl FnMut(&mut Muxer) -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if readable(muxer) {
            muxer.poll();
        }
        if done(muxer) {
            return true;
        }
    }
    false
}

/// A host program that never finishes its `CONNECT` line is closed after HANDSHAKE_TIMEOUT,
/// one the guest never answers after REQUEST_TIMEOUT (and the guest gets RST): neither holds
/// a slot for ever.
#[test]
fn a_silent_host_program_and_an_unanswered_request_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let started = std::time::Instant::now();
    let mut silent = connect(&uds, b"CONNECT 12");
    silent.set_nonblocking(true).unwrap();
    let mut waiting = connect(&uds, b"CONNECT 77\n");
    let (request, _) = next(&mut muxer);
    assert_eq!(request.dst_port, 77);

    let mut rst = None;
    let reset = poll_until(&mut muxer, REQUEST_TIMEOUT * 2, |m| {
        rst = m.next_for_guest(4096);
        rst.is_some()
    });
    assert!(reset, "an RST once the request timed out");
    let (rst, _) = rst.unwrap();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, request.src_port, 77)
    );
    assert!(started.elapsed() >= REQUEST_TIMEOUT);
    assert!(closed(&mut waiting), "the waiting program is closed");

    let mut byte = [0u8; 1];
    let gone = poll_until(&mut muxer, HANDSHAKE_TIMEOUT * 2, |_| {
        matches!(silent.read(&mut byte), Ok(0))
    });
    assert!(gone, "the silent program is closed");
    assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
    assert!(!readable(&muxer), "and nothing is left to wake the worker");
}

#[test]
fn a_guest_connects_to_a_host_port_through_uds_port() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let listener = UnixListener::bind(dir.path().join("vm.vsock_5000")).unwrap();

    muxer.from_guest(&guest_packet(OP_REQUEST, 40000, 5000, 0), &[]);
    let (response, _) = next(&mut muxer);
    assert_eq!(response.op, OP_RESPONSE);
    assert_eq!((response.src_port, response.dst_port), (5000, 40000));
    let (mut host, _) = listener.accept().unwrap();
    muxer.from_guest(&guest_packet(OP_RW, 40000, 5000, 3), b"abc");
    let mut got = [0u8; 3];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"abc");
    let (update, _) = next(&mut muxer);
    assert_eq!((update.op, update.fwd_cnt), (OP_CREDIT_UPDATE, 3));

    // Nobody listens on 5001: refused.
    muxer.from_guest(&guest_packet(OP_REQUEST, 40001, 5001, 0), &[]);
    let (refused, _) = next(&mut muxer);
    assert_eq!((refused.op, refused.dst_port), (OP_RST, 40001));
    // The guest closes the first connection: RST back, the host program sees its end.
    let mut shutdown = guest_packet(OP_SHUTDOWN, 40000, 5000, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    muxer.from_guest(&shutdown, &[]);
    let (rst, _) = next(&mut muxer);
    assert_eq!(rst.op, OP_RST);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed(&mut host));
}

#[test]
fn the_guest_gets_no_more_than_its_credit() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let listener = UnixListener::bind(dir.path().join("vm.vsock_6000")).unwrap();
    let mut request = guest_packet(OP_REQUEST, 41000, 6000, 0);
    request.buf_alloc = 4;
    muxer.from_guest(&request, &[]);
    assert_eq!(next(&mut muxer).0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"0123456789").unwrap();
    let (rw, data) = next(&mut muxer);
    assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"0123"[..]));
    nothing_for_the_guest(&mut muxer);
    // The guest consumed those 4 bytes: 4 more.
    let mut update = guest_packet(OP_CREDIT_UPDATE, 41000, 6000, 0);
    update.buf_alloc = 4;
    update.fwd_cnt = 4;
    muxer.from_guest(&update, &[]);
    let (_, data) = next(&mut muxer);
    assert_eq!(data, b"4567");
}

#[test]
fn a_guest_past_its_credit_foreign_packets_and_unknown_connections() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let _listener = UnixListener::bind(dir.path().join("vm.vsock_7000")).unwrap();
    muxer.from_guest(&guest_packet(OP_REQUEST, 42000, 7000, 0), &[]);
    assert_eq!(next(&mut muxer).0.op, OP_RESPONSE);
    // The host program never reads: the socket buffer fills, then the muxer's BUF_ALLOC,
    // and a guest that sends on regardless is reset.
    let chunk = vec![7u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        muxer.from_guest(&guest_packet(OP_RW, 42000, 7000, chunk.len()), &chunk);
        muxer.poll();
        while let Some((h, _)) = muxer.next_for_guest(4096) {
            reset |= h.op == OP_RST;
        }
        if reset {
            break;
        }
    }
    assert!(reset, "a guest past its credit is reset");

    // From another CID, or to another: not answered.
    let mut foreign = guest_packet(OP_REQUEST, 1, 7000, 0);
    foreign.src_cid = 99;
    muxer.from_guest(&foreign, &[]);
    // Data for a connection that does not exist: RST.
    muxer.from_guest(&guest_packet(OP_RW, 43000, 7000, 1), b"x");
    let (rst, _) = next(&mut muxer);
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 43000));
    nothing_for_the_guest(&mut muxer);
}

/// A guest that asks for connections to ports nobody serves, again and again, and never
/// takes the answers: the RSTs waiting for it stop at MAX_CONTROL_BACKLOG, and once it takes
/// them it is answered again.
#[test]
fn answers_a_guest_leaves_untaken_stop_at_the_control_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let mut muxer = Muxer::new(GUEST, &dir.path().join("vm.vsock")).unwrap();
    for n in 0..3 * MAX_CONTROL_BACKLOG as u32 {
        muxer.from_guest(&guest_packet(OP_REQUEST, 50_000 + n, 9, 0), &[]);
    }
    let mut resets = 0;
    while let Some((h, _)) = muxer.next_for_guest(4096) {
        assert_eq!(h.op, OP_RST);
        resets += 1;
    }
    assert_eq!(resets, MAX_CONTROL_BACKLOG);
    muxer.from_guest(&guest_packet(OP_REQUEST, 40_000, 9, 0), &[]);
    let (rst, _) = next(&mut muxer);
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 40_000));
}

/// A guest that asks for credit again and again without taking the answers: one credit
/// update waits for it, the latest.
#[test]
fn one_credit_update_waits_however_often_the_guest_asks() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.vsock");
    let mut muxer = Muxer::new(GUEST, &uds).unwrap();
    let _listener = UnixListener::bind(dir.path().join("vm.vsock_7000")).unwrap();
    muxer.from_guest(&guest_packet(OP_REQUEST, 42000, 7000, 0), &[]);
    for _ in 0..10_000 {
        muxer.from_guest(&guest_packet(OP_CREDIT_REQUEST, 42000, 7000, 0), &[]);
    }
    let mut ops = Vec::new();
    while let Some((h, _)) = muxer.next_for_guest(4096) {
        ops.push(h.op);
    }
    assert_eq!(ops, [OP_RESPONSE, OP_CREDIT_UPDATE]);
}
