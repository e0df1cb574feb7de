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
