//! `nixvmm-bench net`: TCP through the user-mode network, as a guest sees it. The same Linux
//! guest (the Linux kit's kernel, `virtio_net`, busybox) gets its address by DHCP, then sends
//! N MiB to the host (10.0.2.2), receives N MiB from it, and opens and closes connections for
//! a while, timed by the guest's clock; once under nixvmm `--net user` and once under QEMU
//! `-netdev user` (the same libslirp), in the same place: an L1 guest where this host's KVM
//! cannot run a stock kernel (tier 4), each run in a network namespace with only loopback.

use std::path::Path;
use std::time::Duration;

use nixvmm_tests::linux_kit::{tier4_kernel, BootLog, KernelKit};
use nixvmm_tests::tier4::{self, shell_quote, shell_words};

/// The host's side, on 127.0.0.1 (the guest's 10.0.2.2): port 9000 sends N MiB, 9001
/// receives N MiB, 9002 accepts and closes, each until the job ends.
fn peer(size_mib: u64) -> String {
    format!(
        r#"
import socket, threading
SIZE = {size_mib} << 20
def serve(port, handle):
    s = socket.create_server(("127.0.0.1", port), backlog=64)
    while True:
        c, _ = s.accept()
        handle(c)
        c.close()
def send(c):
    block = bytes(1 << 16)
    left = SIZE
    while left > 0:
        n = min(left, len(block))
        c.sendall(block[:n])
        left -= n
def receive(c):
    left = SIZE
    while left > 0:
        b = c.recv(1 << 16)
        if not b:
            break
        left -= len(b)
for port, handle in [(9000, send), (9001, receive), (9002, lambda c: None)]:
    threading.Thread(target=serve, args=(port, handle), daemon=True).start()
threading.Event().wait()
"#
    )
}

/// The guest's side: DHCP, then the three measurements, printed as KEY=value.
fn script(size_mib: u64, connections: u32) -> String {
    format!(
        "printf '%s\\n' '#!/bin/sh' 'case \"$1\" in bound) ip addr add $ip/$mask dev $interface; ip route add default via $router;; esac' > /dhcp.sh\n\
         chmod +x /dhcp.sh; ip link set lo up; ip link set eth0 up\n\
         udhcpc -i eth0 -n -q -t 10 -T 1 -s /dhcp.sh > /dev/null 2>&1 || echo DHCP=failed\n\
         t() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         rate() {{ awk -v a=$1 -v b=$2 -v n=$3 'BEGIN {{ printf \"%.1f\", n / (b - a + 0.001) }}'; }}\n\
         a=$(t); head -c {bytes} /dev/zero | nc 10.0.2.2 9001; b=$(t)\n\
         echo UP_MIBS=$(rate $a $b {size_mib})\n\
         a=$(t); got=$(nc 10.0.2.2 9000 < /dev/null | wc -c); b=$(t)\n\
         [ \"$got\" = {bytes} ] && echo DOWN_MIBS=$(rate $a $b {size_mib}) || echo DOWN_BYTES=$got\n\
         a=$(t); for i in $(seq {connections}); do nc 10.0.2.2 9002 < /dev/null > /dev/null; done; b=$(t)\n\
         echo CONN_PER_S=$(rate $a $b {connections})",
        bytes = size_mib << 20,
    )
}

/// A job for the tier-4 host: the peer and one VMM in a fresh network namespace.
fn job(vmm_words: &[String], peer: &str) -> String {
    let inner = format!(
        "ip link set lo up\n\
         python3 -c {} & peer=$!\n\
         sleep 0.5\n\
         {}\n\
         rc=$?\n\
         kill $peer\n\
         exit $rc",
        shell_quote(peer),
        shell_words(vmm_words)
    );
    format!("exec unshare -n bash -c {}", shell_quote(&inner))
}

const KEYS: [(&str, &str); 3] = [
    ("UP_MIBS", "guest → host MiB/s"),
    ("DOWN_MIBS", "host → guest MiB/s"),
    ("CONN_PER_S", "connections/s"),
];

pub fn run(
    nixvmm: &Path,
    size_mib: u64,
    connections: u32,
    timeout: Duration,
) -> Result<String, String> {
    let host = tier4::host()?;
    let kit = KernelKit::obtain()?;
    let kernel = tier4_kernel().unwrap_or_else(|_| kit.vmlinuz.clone());
    let initrd = kit.initrd(
        &["virtio_pci", "virtio_net"],
        &script(size_mib, connections),
    )?;
    let cmdline = "console=ttyS0 panic=-1 quiet";
    let path = |p: &Path| p.display().to_string();
    let ours: Vec<String> = [
        &path(nixvmm),
        "run",
        "--no-reboot",
        "--memory",
        "512M",
        "--kernel",
        &path(&kernel),
        "--initrd",
        &path(&initrd),
        "--cmdline",
        cmdline,
        "--net",
        "user",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let qemu: Vec<String> = [
        "qemu-system-x86_64",
        "-M",
        "pc",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "512M",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-kernel",
        &path(&kernel),
        "-initrd",
        &path(&initrd),
        "-append",
        cmdline,
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let peer = peer(size_mib);
    let runs: Vec<(&str, BootLog)> = vec![
        ("nixvmm --net user", host.run(&job(&ours, &peer), timeout)?),
        (
            "qemu -M pc -netdev user (kvm, -cpu host)",
            host.run(&job(&qemu, &peer), timeout)?,
        ),
    ];
    let value = |log: &BootLog, key: &str| -> Option<f64> { log.value_of(key)?.parse().ok() };
    let mut out = String::from("| VMM |");
    for (_, title) in KEYS {
        out.push_str(&format!(" {title} |"));
    }
    out.push_str("\n|---|---|---|---|\n");
    for (name, log) in &runs {
        out.push_str(&format!("| {name} |"));
        for (key, _) in KEYS {
            let cell = match (value(log, key), log.timed_out) {
                (Some(v), _) => format!("{v:.1}"),
                (None, true) => "timed out".into(),
                (None, false) => "failed".into(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push_str("| **nixvmm / qemu** |");
    for (key, _) in KEYS {
        let cell = match (value(&runs[0].1, key), value(&runs[1].1, key)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        out.push_str(&format!(" {cell} |"));
    }
    out.push_str(&format!(
        "\n\nGuest: {}, busybox nc over DHCP-configured virtio-net; {size_mib} MiB each way, \
         {connections} connections; rates timed by the guest. Setting: {}.",
        kernel.display(),
        host.setting()
    ));
    for (name, log) in &runs {
        if KEYS.iter().any(|(key, _)| value(log, key).is_none()) {
            out.push_str(&format!("\n\n{name} output:\n{}", log.tail()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_measures_three_things_and_the_peer_serves_three_ports() {
        let s = script(64, 100);
        for key in [
            "UP_MIBS=",
            "DOWN_MIBS=",
            "CONN_PER_S=",
            "seq 100",
            "head -c 67108864",
        ] {
            assert!(s.contains(key), "{key}");
        }
        let p = peer(64);
        assert!(p.contains("SIZE = 64 << 20") && p.contains("9002"));
    }
}
