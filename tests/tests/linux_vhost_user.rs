//! Tier 3: Debian's kernel under QEMU TCG drives nixvmm's device models served over vhost-user
//! by `nixvmm device …` — the same device code nixvmm runs in-process.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixvmm_tests::linux_kit::{boot_qemu_tcg, Boot, BootLog, KernelKit};
use nixvmm_tests::nixvmm_bin;

const MEMORY_MIB: u32 = 256;

/// `nixvmm device <args>` listening on `socket`, killed when dropped.
struct DeviceServer(Child);

impl DeviceServer {
    fn start(args: &[&str], socket: &Path) -> DeviceServer {
        let child = Command::new(nixvmm_bin())
            .arg("device")
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "nixvmm device did not listen on {socket:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        DeviceServer(child)
    }

    /// Waits for the server to end by itself (the frontend disconnected).
    fn exit_code(mut self) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU arguments for guest RAM a vhost-user backend can map.
fn shared_memory() -> Vec<String> {
    [
        "-object",
        &format!("memory-backend-memfd,id=mem,size={MEMORY_MIB}M,share=on"),
        "-machine",
        "memory-backend=mem",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn boot(kit: &KernelKit, modules: &[&str], script: &str, devices: &[String]) -> BootLog {
    let initrd = kit.initrd(modules, script).unwrap();
    let mut extra = shared_memory();
    extra.extend_from_slice(devices);
    boot_qemu_tcg(
        &Boot {
            kernel: &kit.vmlinuz,
            initrd: &initrd,
            cmdline: "quiet",
            memory_mib: MEMORY_MIB,
            cpus: 1,
            timeout: Duration::from_secs(120),
        },
        &extra,
    )
    .unwrap()
}

#[test]
fn linux_reads_random_bytes_from_nixvmm_rng() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("rng.sock");
    let server = DeviceServer::start(&["rng"], &socket);
    let script = "echo RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)\n\
                  echo RNG_BYTES=$(timeout 20 dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')";
    let devices = [
        "-chardev".to_string(),
        format!("socket,id=rng,path={}", socket.display()),
        "-device".into(),
        "vhost-user-rng-pci,chardev=rng".into(),
    ];
    let log = boot(&kit, &["virtio_pci", "virtio_rng"], script, &devices);
    let tail = log.tail();
    assert!(!log.timed_out, "guest hung:\n{tail}");
    assert!(
        log.value_of("RNG_CURRENT")
            .is_some_and(|c| c.starts_with("virtio_rng")),
        "the guest's hwrng is virtio:\n{tail}"
    );
    let bytes = log.value_of("RNG_BYTES").unwrap_or_default();
    assert_eq!(bytes.len(), 64, "32 bytes read from /dev/hwrng:\n{tail}");
    assert_ne!(bytes, "0".repeat(64), "{tail}");
    assert_eq!(
        server.exit_code(),
        Some(0),
        "nixvmm device exits 0 after the guest"
    );
}
