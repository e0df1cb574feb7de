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

fn vhost_user_fs(socket: &Path, tag: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id={tag},path={}", socket.display()),
        "-device".into(),
        format!("vhost-user-fs-pci,chardev={tag},tag={tag}"),
    ]
}

/// A store-like share: a file, a relative symlink, a static binary, and a symlink that points
/// out of the share at a host file beside it.
fn store_like_share(dir: &Path) -> PathBuf {
    let share = dir.join("store");
    std::fs::create_dir_all(share.join("abc-hello/bin")).unwrap();
    std::fs::write(
        share.join("abc-hello/greeting"),
        "hello from the host store\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("abc-hello/greeting", share.join("link")).unwrap();
    std::fs::copy("/bin/busybox", share.join("abc-hello/bin/busybox")).unwrap();
    std::fs::write(dir.join("outside-secret"), "host secret\n").unwrap();
    std::os::unix::fs::symlink("../outside-secret", share.join("escape")).unwrap();
    share
}

#[test]
fn linux_mounts_nixvmm_virtiofs_like_a_nix_store() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let share = store_like_share(dir.path());
    let socket = dir.path().join("fs.sock");
    let shared = share.to_str().unwrap();
    let server = DeviceServer::start(
        &[
            "fs",
            "--shared-dir",
            shared,
            "--sandbox",
            "none",
            "--seccomp",
            "none",
            "--xattr",
        ],
        &socket,
    );
    let script = "mount -t virtiofs store /mnt || echo MOUNT=failed\n\
                  echo GREETING=$(cat /mnt/abc-hello/greeting)\n\
                  echo LINK=$(readlink /mnt/link) VIA_LINK=$(cat /mnt/link)\n\
                  echo EXEC=$(/mnt/abc-hello/bin/busybox echo ran-from-share)\n\
                  echo ESCAPE=$(cat /mnt/escape 2>/dev/null || echo blocked)\n\
                  echo PARENT=$(ls /mnt/.. | head -1)\n\
                  echo written-by-guest > /mnt/from-guest && sync && echo WROTE=yes\n\
                  umount /mnt";
    let log = boot(
        &kit,
        &["virtio_pci", "virtiofs"],
        script,
        &vhost_user_fs(&socket, "store"),
    );
    let tail = log.tail();
    assert!(!log.has("MOUNT=failed"), "{tail}");
    assert_eq!(
        log.value_of("GREETING"),
        Some("hello from the host store"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("LINK"),
        Some("abc-hello/greeting VIA_LINK=hello from the host store"),
        "{tail}"
    );
    assert_eq!(log.value_of("EXEC"), Some("ran-from-share"), "{tail}");
    assert_eq!(
        log.value_of("ESCAPE"),
        Some("blocked"),
        "a symlink out of the share: {tail}"
    );
    assert_ne!(log.value_of("PARENT"), Some("outside-secret"), "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(share.join("from-guest")).unwrap(),
        "written-by-guest\n",
        "the host sees the guest's file"
    );
    assert_eq!(server.exit_code(), Some(0));
}

#[test]
fn linux_cannot_write_a_read_only_virtiofs_share() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let share = store_like_share(dir.path());
    let socket = dir.path().join("ro.sock");
    let _server = DeviceServer::start(
        &["fs", "--shared-dir", share.to_str().unwrap(), "--readonly"],
        &socket,
    );
    let script = "mount -t virtiofs store /mnt\n\
                  echo READ=$(cat /mnt/abc-hello/greeting)\n\
                  if echo x > /mnt/new 2>/dev/null; then echo CREATE=allowed; else echo CREATE=refused; fi\n\
                  if echo x >> /mnt/abc-hello/greeting 2>/dev/null; then echo APPEND=allowed; else echo APPEND=refused; fi\n\
                  if rm /mnt/link 2>/dev/null; then echo RM=allowed; else echo RM=refused; fi\n\
                  if mkdir /mnt/d 2>/dev/null; then echo MKDIR=allowed; else echo MKDIR=refused; fi";
    let log = boot(
        &kit,
        &["virtio_pci", "virtiofs"],
        script,
        &vhost_user_fs(&socket, "store"),
    );
    let tail = log.tail();
    assert_eq!(
        log.value_of("READ"),
        Some("hello from the host store"),
        "{tail}"
    );
    for key in ["CREATE", "APPEND", "RM", "MKDIR"] {
        assert_eq!(log.value_of(key), Some("refused"), "{key}: {tail}");
    }
    assert!(!share.join("new").exists() && !share.join("d").exists());
    assert!(share.join("link").symlink_metadata().is_ok());
    assert_eq!(
        std::fs::read_to_string(share.join("abc-hello/greeting")).unwrap(),
        "hello from the host store\n"
    );
}

/// `nixvmm device 9p --listen tcp:127.0.0.1:PORT`, killed when dropped.
fn start_9p_server(share: &Path, readonly: bool) -> (Child, u16) {
    start_9p_server_with(share, readonly, "none")
}

fn start_9p_server_with(share: &Path, readonly: bool, model: &str) -> (Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(nixvmm_bin());
    cmd.args([
        "device",
        "9p",
        "--listen",
        &format!("tcp:127.0.0.1:{port}"),
        "--shared-dir",
    ])
    .arg(share);
    if readonly {
        cmd.arg("--readonly");
    }
    cmd.args(["--security-model", model]);
    let child = cmd.stdin(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nixvmm device 9p did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, port)
}

/// Guest networking through QEMU's user network (the host is 10.0.2.2) and the 9p mount with
/// qemu-vm.nix's options, over TCP.
fn mount_9p_over_tcp(port: u16) -> String {
    format!(
        "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0\n\
         mount -t 9p -o trans=tcp,port={port},version=9p2000.L,msize=16384,cache=loose 10.0.2.2 /mnt || echo MOUNT=failed\n"
    )
}

const NINE_P_OVER_TCP: &[&str] = &["virtio_pci", "virtio_net", "9pnet_fd", "9p"];

fn user_network() -> Vec<String> {
    [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn linux_mounts_nixvmm_9p_over_tcp_like_a_nix_store() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let share = store_like_share(dir.path());
    let (mut server, port) = start_9p_server(&share, false);
    let script = mount_9p_over_tcp(port)
        + "echo GREETING=$(cat /mnt/abc-hello/greeting)\n\
           echo LINK=$(readlink /mnt/link) VIA_LINK=$(cat /mnt/link)\n\
           echo EXEC=$(/mnt/abc-hello/bin/busybox echo ran-from-share)\n\
           echo ESCAPE=$(cat /mnt/escape 2>/dev/null || echo blocked)\n\
           mkdir /mnt/xchg && echo written-by-guest > /mnt/xchg/out && sync && echo WROTE=yes\n\
           umount /mnt";
    let log = boot(&kit, NINE_P_OVER_TCP, &script, &user_network());
    let _ = server.kill();
    let _ = server.wait();
    let tail = log.tail();
    assert!(!log.has("MOUNT=failed"), "{tail}");
    assert_eq!(
        log.value_of("GREETING"),
        Some("hello from the host store"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("LINK"),
        Some("abc-hello/greeting VIA_LINK=hello from the host store"),
        "{tail}"
    );
    assert_eq!(log.value_of("EXEC"), Some("ran-from-share"), "{tail}");
    assert_eq!(log.value_of("ESCAPE"), Some("blocked"), "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(share.join("xchg/out")).unwrap(),
        "written-by-guest\n"
    );
}

#[test]
fn linux_cannot_write_a_read_only_9p_share() {
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let share = store_like_share(dir.path());
    let (mut server, port) = start_9p_server(&share, true);
    let script = mount_9p_over_tcp(port)
        + "echo READ=$(cat /mnt/abc-hello/greeting)\n\
           if echo x > /mnt/new 2>/dev/null; then echo CREATE=allowed; else echo CREATE=refused; fi\n\
           if rm /mnt/link 2>/dev/null; then echo RM=allowed; else echo RM=refused; fi\n\
           if mkdir /mnt/d 2>/dev/null; then echo MKDIR=allowed; else echo MKDIR=refused; fi";
    let log = boot(&kit, NINE_P_OVER_TCP, &script, &user_network());
    let _ = server.kill();
    let _ = server.wait();
    let tail = log.tail();
    assert_eq!(
        log.value_of("READ"),
        Some("hello from the host store"),
        "{tail}"
    );
    for key in ["CREATE", "RM", "MKDIR"] {
        assert_eq!(log.value_of(key), Some("refused"), "{key}: {tail}");
    }
    assert!(!share.join("new").exists() && share.join("link").symlink_metadata().is_ok());
}

#[test]
fn linux_sees_mapped_ownership_the_host_does_not_have() {
    for model in ["mapped-xattr", "mapped-file"] {
        check_mapped_model(model);
    }
}

fn check_mapped_model(model: &str) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let kit = KernelKit::obtain().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let share = store_like_share(dir.path());
    let (mut server, port) = start_9p_server_with(&share, false, model);
    let script = mount_9p_over_tcp(port)
        + "echo data > /mnt/owned && chown 1234:5678 /mnt/owned && chmod 0641 /mnt/owned\n\
           echo OWNER=$(stat -c '%u:%g:%a' /mnt/owned)\n\
           mknod /mnt/null c 1 3 && echo NODE=$(stat -c '%F:%t:%T' /mnt/null)\n\
           umount /mnt";
    let log = boot(&kit, NINE_P_OVER_TCP, &script, &user_network());
    let _ = server.kill();
    let _ = server.wait();
    let tail = log.tail();
    assert_eq!(
        log.value_of("OWNER"),
        Some("1234:5678:641"),
        "{model}: {tail}"
    );
    assert_eq!(
        log.value_of("NODE"),
        Some("character special file:1:3"),
        "{tail}"
    );
    let host = std::fs::metadata(share.join("owned")).unwrap();
    assert_eq!((host.uid(), host.permissions().mode() & 0o777), (0, 0o600));
    assert!(
        std::fs::metadata(share.join("null")).unwrap().is_file(),
        "no device node on the host"
    );
}
