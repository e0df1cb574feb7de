//! The user-mode network without a guest: frames a guest would send go into the NIC's
//! backend, and slirp's answers come out of it (each receive lets slirp take a step).

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use super::*;
use crate::config::net::{parse_net, NetBackend};
use virtio::net::Backend;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn user(text: &str) -> UserNet {
    match parse_net(text).unwrap().backend {
        NetBackend::User(u) => u,
        other => panic!("{other:?}"),
    }
}

fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// The next frame slirp sends to the guest, waiting up to 5 s.
fn next_frame(nic: &mut UserNic) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(frame) = nic.recv().unwrap() {
            return Some(frame);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn is_arp_reply_from(frame: &[u8], ip: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 2]
        && frame[28..32] == ip.octets()
}

#[test]
fn the_virtual_host_answers_arp_and_the_version_is_known() {
    assert!(version().starts_with('4'), "{}", version());
    let network = UserNetwork::start(&user("user")).unwrap();
    let mut nic = network.backend();
    nic.send(&arp_request(
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(10, 0, 2, 2),
    ))
    .unwrap();
    let reply = std::iter::from_fn(|| next_frame(&mut nic))
        .find(|f| is_arp_reply_from(f, Ipv4Addr::new(10, 0, 2, 2)))
        .expect("an ARP reply for 10.0.2.2");
    assert_eq!(&reply[..6], &GUEST_MAC, "addressed to the guest");
}

#[test]
fn a_host_forward_listens_and_calls_the_guest_and_can_be_removed() {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let network =
        UserNetwork::start(&user(&format!("user,hostfwd=tcp:127.0.0.1:{port}-:22"))).unwrap();
    let mut nic = network.backend();
    let _client =
        TcpStream::connect(("127.0.0.1", port)).expect("slirp listens on the forwarded port");
    // slirp now opens the connection to the guest: it first asks where 10.0.2.15 is.
    let frame = next_frame(&mut nic).expect("a frame toward the guest");
    assert_eq!(
        &frame[12..14],
        &[0x08, 0x06],
        "an ARP request: {frame:02x?}"
    );
    assert_eq!(
        &frame[38..42],
        &[10, 0, 2, 15],
        "for the first DHCP address"
    );

    let forward = crate::config::net::parse_hostfwd(&format!("tcp:127.0.0.1:{port}-:22")).unwrap();
    network.remove_hostfwd(&forward).unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after removal"
    );
    let err = network.remove_hostfwd(&forward).unwrap_err();
    assert!(err.to_string().contains("no such forward"), "{err}");
    network.add_hostfwd(&forward).unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "listening again after hostfwd_add"
    );
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = UserNetwork::start(&user(&format!("user,hostfwd=tcp:127.0.0.1:{port}-:22")))
        .err()
        .expect("the port is taken");
    assert!(
        err.to_string()
            .contains(&format!("hostfwd=tcp:127.0.0.1:{port}-:22")),
        "{err}"
    );
}

/// The one's-complement sum of `data` as 16-bit words, folded.
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A guest's IPv4 frame from 10.0.2.15 to 10.0.2.2 carrying `l4` as `protocol`, with its
/// checksums (TCP's and UDP's at `l4_checksum_at`).
fn ipv4_frame(protocol: u8, mut l4: Vec<u8>, l4_checksum_at: Option<usize>) -> Vec<u8> {
    let (src, dst) = ([10, 0, 2, 15], [10, 0, 2, 2]);
    if let Some(at) = l4_checksum_at {
        let mut pseudo = [src, dst].concat();
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        let initial = u32::from(!checksum(&pseudo, 0));
        let sum = checksum(&l4, initial);
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = vec![0x52, 0x55, 10, 0, 2, 2];
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend(ip);
    frame.extend(l4);
    frame
}

fn tcp(source_port: u16, port: u16, flags: u8) -> Vec<u8> {
    let mut tcp = source_port.to_be_bytes().to_vec();
    tcp.extend_from_slice(&port.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    ipv4_frame(6, tcp, Some(16))
}

fn udp(port: u16) -> Vec<u8> {
    let mut udp = 68u16.to_be_bytes().to_vec();
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&[0, 9, 0, 0, b'x']);
    ipv4_frame(17, udp, Some(6))
}

#[test]
fn frames_that_open_flows_are_told_apart() {
    use super::engine::opens_a_flow;
    assert!(opens_a_flow(&tcp(1000, 80, 0x02)), "SYN");
    assert!(!opens_a_flow(&tcp(1000, 80, 0x12)), "SYN-ACK");
    assert!(!opens_a_flow(&tcp(1000, 80, 0x10)), "ACK");
    assert!(opens_a_flow(&udp(53)), "DNS");
    assert!(!opens_a_flow(&udp(67)), "DHCP");
    let echo = ipv4_frame(1, vec![8, 0, 0, 0, 0, 0, 0, 0], None);
    assert!(opens_a_flow(&echo), "ping");
    assert!(!opens_a_flow(&arp_request(
        Ipv4Addr::new(10, 0, 2, 15),
        Ipv4Addr::new(10, 0, 2, 2)
    )));
    let mut fragment = tcp(1000, 80, 0x10);
    fragment[20] |= 0x20; // more fragments: slirp reassembles the rest, which may hold a SYN
    assert!(opens_a_flow(&fragment), "an IPv4 fragment");
    let syn = tcp(1000, 80, 0x02);
    for len in 0..syn.len() {
        let _ = opens_a_flow(&syn[..len]); // no panic on a cut frame
    }
}

/// A guest that opens connections without end: slirp's host sockets stop at MAX_FLOWS, and
/// a host forward then accepts no more connections either.
#[test]
fn the_guests_new_connections_and_forwarded_ones_stop_at_the_cap() {
    use super::engine::MAX_FLOWS;
    crate::host::raise_open_files_limit(); // MAX_FLOWS and more
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let forwarded = probe.local_addr().unwrap();
    drop(probe);
    let network = UserNetwork::start(&user(&format!(
        "user,hostfwd=tcp:127.0.0.1:{}-:22",
        forwarded.port()
    )))
    .unwrap();
    let mut nic = network.backend();
    let before = open_fds();
    for i in 0..MAX_FLOWS + 300 {
        nic.send(&tcp(10000 + i as u16, port, 0x02)).unwrap();
        if i % 64 == 0 {
            while nic.recv().unwrap().is_some() {}
        }
    }
    while nic.recv().unwrap().is_some() {}
    let grown = open_fds().saturating_sub(before);
    assert!(
        (MAX_FLOWS - 64..=MAX_FLOWS + 64).contains(&grown),
        "{grown} descriptors for {} connection requests",
        MAX_FLOWS + 300
    );

    // Host programs connect to the forward; slirp, past the cap, accepts none of them: only
    // the kernel's backlog completes a few handshakes (slirp listens with a backlog of 1),
    // the others time out. (Counted by the clients, not by this process's descriptors, which
    // other tests open meanwhile.)
    let mut clients = Vec::new();
    for _ in 0..150 {
        let timeout = std::time::Duration::from_millis(30);
        if let Ok(client) = TcpStream::connect_timeout(&forwarded, timeout) {
            clients.push(client);
        }
        while nic.recv().unwrap().is_some() {}
    }
    assert!(
        clients.len() <= 8,
        "{} of 150 connections to a forward were taken past the cap",
        clients.len()
    );
}
