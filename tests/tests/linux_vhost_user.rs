//! Tier 3: Debian's kernel under QEMU TCG drives nixvmm's device models served over vhost-user
//! by `nixvmm device …` — the same device code nixvmm runs in-process.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixvmm_tests::linux_kit::{boot_qemu_tcg, Boot, BootLog, KernelKit, INIT_MARKER};
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

/// Modules for ext4 on a virtio disk (crc32c is a soft dependency of ext4 that modinfo does
/// not list).
const EXT4_ON_VIRTIO_BLK: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

fn vhost_user_blk(socket: &Path) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!(
            "socket,id={0},path={1}",
            socket.file_stem().unwrap().to_str().unwrap(),
            socket.display()
        ),
        "-device".into(),
        format!(
            "vhost-user-blk-pci,chardev={}",
            socket.file_stem().unwrap().to_str().unwrap()
        ),
    ]
}

fn run_tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An empty ext4 image labelled `nixos`, as qemu-vm.nix makes the root disk, as qcow2.
fn nixos_disk(dir: &Path) -> PathBuf {
    let raw = dir.join("root.raw");
    let qcow2 = dir.join("root.qcow2");
    run_tool("truncate", &["-s", "64M", raw.to_str().unwrap()]);
    run_tool("mkfs.ext4", &["-q", "-L", "nixos", raw.to_str().unwrap()]);
    run_tool(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ],
    );
    qcow2
}

#[test]
fn linux_keeps_ext4_data_on_a_qcow2_disk_across_boots() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = nixos_disk(dir.path());
    let modules = EXT4_ON_VIRTIO_BLK;
    let write = "mount -t ext4 /dev/vda /mnt && echo persisted-by-nixvmm > /mnt/hello && sync && umount /mnt && echo WROTE=yes\n\
                 echo SERIAL=$(cat /sys/block/vda/serial)";
    let socket = dir.path().join("root.sock");
    let disk_option = format!("path={},serial=root", disk.display());
    let server = DeviceServer::start(&["blk", "--disk", &disk_option], &socket);
    let log = boot(&kit, modules, write, &vhost_user_blk(&socket));
    let tail = log.tail();
    assert!(log.has(INIT_MARKER) && !log.timed_out, "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    assert_eq!(
        log.value_of("SERIAL"),
        Some("root"),
        "/sys/block/vda/serial: {tail}"
    );
    assert_eq!(server.exit_code(), Some(0));
    run_tool("qemu-img", &["check", disk.to_str().unwrap()]);

    let read = "mount -t ext4 -o ro /dev/vda /mnt && echo CONTENT=$(cat /mnt/hello)";
    let socket = dir.path().join("again.sock");
    let _server = DeviceServer::start(&["blk", "--disk", &disk_option], &socket);
    let log = boot(&kit, modules, read, &vhost_user_blk(&socket));
    assert_eq!(
        log.value_of("CONTENT"),
        Some("persisted-by-nixvmm"),
        "{}",
        log.tail()
    );
}

#[test]
fn linux_cannot_write_a_read_only_disk() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = nixos_disk(dir.path());
    let before = std::fs::read(&disk).unwrap();
    let socket = dir.path().join("store.sock");
    let disk_option = format!("path={},readonly=on", disk.display());
    let _server = DeviceServer::start(&["blk", "--disk", &disk_option], &socket);
    let script = "echo RO=$(cat /sys/block/vda/ro)\n\
                  if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then echo DD=written; else echo DD=refused; fi\n\
                  mount -t ext4 -o ro /dev/vda /mnt && echo MOUNTED_RO=yes";
    let log = boot(&kit, EXT4_ON_VIRTIO_BLK, script, &vhost_user_blk(&socket));
    let tail = log.tail();
    assert_eq!(
        log.value_of("RO"),
        Some("1"),
        "VIRTIO_BLK_F_RO reaches the guest: {tail}"
    );
    assert_eq!(log.value_of("DD"), Some("refused"), "{tail}");
    assert_eq!(log.value_of("MOUNTED_RO"), Some("yes"), "{tail}");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "the image is unchanged"
    );
}
