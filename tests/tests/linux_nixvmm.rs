//! Tier 4: full Linux boots under nixvmm. They need a kernel this host's KVM runs at speed:
//! `NIXVMM_TEST_KERNEL`, or Debian's kernel on a CPU with VMX/SVM. They are ignored by default;
//! `scripts/test` runs them (`-- --ignored tier4`) where they can run and says SKIPPED where
//! they cannot.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use nixvmm_tests::linux_kit::{boot_nixvmm, tier4_kernel, Boot, BootLog, KernelKit, INIT_MARKER};
use nixvmm_tests::nixvmm_bin;

fn boot(modules: &[&str], script: &str, memory_mib: u32, cpus: u32, extra: &[&str]) -> BootLog {
    let kernel = tier4_kernel().unwrap_or_else(|e| panic!("{e}"));
    let kit = KernelKit::obtain().unwrap();
    let initrd = kit.initrd(modules, script).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    boot_nixvmm(
        &nixvmm_bin(),
        &Boot {
            kernel: &kernel,
            initrd: &initrd,
            cmdline: "nixvmm.test=tier4",
            memory_mib,
            cpus,
            timeout: Duration::from_secs(120),
        },
        &extra,
    )
    .unwrap()
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_linux_boots_and_powers_off() {
    let script = "echo NPROC=$(nproc)\n\
                  echo MEMTOTAL_KB=$(awk '/MemTotal/{print $2}' /proc/meminfo)\n\
                  echo CMDLINE=$(cat /proc/cmdline)";
    let log = boot(&[], script, 1024, 2, &[]);
    let tail = log.tail();
    assert!(!log.timed_out, "{tail}");
    assert!(log.has(INIT_MARKER), "{tail}");
    assert_eq!(log.value_of("NPROC"), Some("2"), "{tail}");
    let mem: u64 = log.value_of("MEMTOTAL_KB").unwrap().parse().unwrap();
    assert!(
        (900_000..=1_048_576).contains(&mem),
        "MemTotal {mem} kB of 1 GiB"
    );
    assert!(
        log.value_of("CMDLINE")
            .unwrap()
            .contains("nixvmm.test=tier4"),
        "{tail}"
    );
    assert_eq!(log.script_rc(), Some(0), "{tail}");
    assert!(log.exit_ok, "poweroff ends nixvmm with status 0:\n{tail}");
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_memory_above_4_gib() {
    let log = boot(
        &[],
        "echo MEMTOTAL_KB=$(awk '/MemTotal/{print $2}' /proc/meminfo)",
        6144,
        1,
        &[],
    );
    let mem: u64 = log.value_of("MEMTOTAL_KB").unwrap().parse().unwrap();
    assert!(
        mem > 5_500_000,
        "MemTotal {mem} kB of 6 GiB:\n{}",
        log.tail()
    );
    assert!(log.exit_ok, "{}", log.tail());
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_virtio_rng_in_vmm() {
    let script = "echo RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)\n\
                  echo RNG_BYTES=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')";
    let log = boot(&["virtio_pci", "virtio_rng"], script, 512, 1, &["--rng"]);
    let tail = log.tail();
    assert!(
        log.value_of("RNG_CURRENT")
            .is_some_and(|c| c.starts_with("virtio_rng")),
        "{tail}"
    );
    assert_eq!(log.value_of("RNG_BYTES").map(str::len), Some(64), "{tail}");
    assert!(log.exit_ok, "{tail}");
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_disks_in_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let run = |program: &str, args: &[&str]| {
        let ok = std::process::Command::new(program)
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "{program} {args:?}");
    };
    let raw = dir.path().join("root.raw");
    let root = dir.path().join("root.qcow2");
    let store = dir.path().join("store.raw");
    run("truncate", &["-s", "64M", raw.to_str().unwrap()]);
    run("mkfs.ext4", &["-q", "-L", "nixos", raw.to_str().unwrap()]);
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            root.to_str().unwrap(),
        ],
    );
    run("truncate", &["-s", "16M", store.to_str().unwrap()]);
    let disks = [
        "--disk".to_string(),
        format!("path={},serial=root", root.display()),
        "--disk".into(),
        format!("path={},format=raw,readonly=on", store.display()),
    ];
    let disks: Vec<&str> = disks.iter().map(String::as_str).collect();
    let modules = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
    let script = "echo SERIAL=$(cat /sys/block/vda/serial)\n\
                  echo VDB_RO=$(cat /sys/block/vdb/ro)\n\
                  mount -t ext4 /dev/vda /mnt && echo data > /mnt/f && sync && umount /mnt && echo WROTE=yes";
    let log = boot(&modules, script, 512, 1, &disks);
    let tail = log.tail();
    assert_eq!(log.value_of("SERIAL"), Some("root"), "{tail}");
    assert_eq!(log.value_of("VDB_RO"), Some("1"), "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    let check = std::process::Command::new("qemu-img")
        .arg("check")
        .arg(&root)
        .status()
        .unwrap();
    assert!(check.success());
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_virtiofs_share_in_vmm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greeting"), "hello\n").unwrap();
    let share = format!("tag=data,path={},fs=virtiofs", dir.path().display());
    let script = "mount -t virtiofs data /mnt && echo GREETING=$(cat /mnt/greeting)\n\
                  echo from-guest > /mnt/back && sync && umount /mnt && echo WROTE=yes";
    let log = boot(
        &["virtio_pci", "virtiofs"],
        script,
        512,
        1,
        &["--share", &share],
    );
    let tail = log.tail();
    assert_eq!(log.value_of("GREETING"), Some("hello"), "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("back")).unwrap(),
        "from-guest\n"
    );
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_9p_share_in_vmm_as_qemu_vm_nix_mounts_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greeting"), "hello\n").unwrap();
    let share = format!("tag=nix-store,path={},readonly=on", dir.path().display());
    let script = "mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384,cache=loose nix-store /mnt\n\
                  echo GREETING=$(cat /mnt/greeting)\n\
                  if echo x > /mnt/new 2>/dev/null; then echo CREATE=allowed; else echo CREATE=refused; fi";
    let log = boot(
        &["virtio_pci", "9pnet_virtio", "9p"],
        script,
        512,
        1,
        &["--share", &share],
    );
    let tail = log.tail();
    assert_eq!(log.value_of("GREETING"), Some("hello"), "{tail}");
    assert_eq!(log.value_of("CREATE"), Some("refused"), "{tail}");
}

#[test]
#[ignore = "tier 4: needs NIXVMM_TEST_KERNEL or VMX/SVM; run by scripts/test"]
fn tier4_vhost_user_fs_share_served_by_an_external_backend() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("greeting"), "hello\n").unwrap();
    let socket = dir.path().join("fs.sock");
    let mut backend = Command::new(nixvmm_bin())
        .args(["device", "fs", "--socket"])
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&shared)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    while !socket.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let share = format!("tag=data,socket={},fs=vhost-user", socket.display());
    let script = "mount -t virtiofs data /mnt && echo GREETING=$(cat /mnt/greeting)";
    let log = boot(
        &["virtio_pci", "virtiofs"],
        script,
        512,
        1,
        &["--share", &share],
    );
    let _ = backend.kill();
    let _ = backend.wait();
    assert_eq!(log.value_of("GREETING"), Some("hello"), "{}", log.tail());
}
