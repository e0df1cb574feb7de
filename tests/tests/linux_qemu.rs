//! Tier 3: Debian's stock kernel boots under QEMU's software CPU (TCG) with the kit's busybox
//! initrd. Later tiers attach nixvmm's device models to this guest over vhost-user.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Duration;

use nixvmm_tests::linux_kit::{boot_qemu_tcg, Boot, KernelKit, INIT_MARKER};

fn kit() -> KernelKit {
    KernelKit::obtain().unwrap_or_else(|e| panic!("Linux guest kit: {e}"))
}

#[test]
fn stock_kernel_boots_to_init_under_tcg() {
    let kit = kit();
    let script = "echo UNAME=$(uname -r)\necho NPROC=$(nproc)\n\
                  echo MEMTOTAL_KB=$(awk '/MemTotal/{print $2}' /proc/meminfo)\n\
                  echo CMDLINE=$(cat /proc/cmdline)";
    let initrd = kit.initrd(&[], script).unwrap();
    let log = boot_qemu_tcg(
        &Boot {
            kernel: &kit.vmlinuz,
            initrd: &initrd,
            cmdline: "nixvmm.test=42",
            memory_mib: 256,
            cpus: 2,
            timeout: Duration::from_secs(120),
        },
        &[],
    )
    .unwrap();
    let tail = log.tail();
    assert!(!log.timed_out, "QEMU did not power off:\n{tail}");
    assert!(log.has(INIT_MARKER), "{tail}");
    assert_eq!(log.value_of("UNAME"), Some(kit.version.as_str()), "{tail}");
    assert_eq!(log.value_of("NPROC"), Some("2"), "{tail}");
    let mem: u64 = log.value_of("MEMTOTAL_KB").unwrap().parse().unwrap();
    assert!(
        (200_000..=262_144).contains(&mem),
        "MemTotal {mem} kB of 256 MiB"
    );
    assert!(
        log.value_of("CMDLINE").unwrap().contains("nixvmm.test=42"),
        "{tail}"
    );
    assert_eq!(log.script_rc(), Some(0), "{tail}");
}

#[test]
fn modules_load_with_their_dependencies() {
    let kit = kit();
    let order: Vec<String> = kit
        .load_order(&["virtio_blk"])
        .unwrap()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let position = |m: &str| order.iter().position(|n| n == m).unwrap();
    assert!(position("virtio") < position("virtio_blk"), "{order:?}");
    assert!(
        position("virtio_ring") < position("virtio_blk"),
        "{order:?}"
    );
    assert!(kit.load_order(&["no_such_module"]).is_err());
    let initrd = kit
        .initrd(
            &["virtio_blk"],
            "test -d /sys/module/virtio_blk && echo LOADED=yes",
        )
        .unwrap();
    let log = boot_qemu_tcg(
        &Boot {
            kernel: &kit.vmlinuz,
            initrd: &initrd,
            cmdline: "quiet",
            memory_mib: 256,
            cpus: 1,
            timeout: Duration::from_secs(120),
        },
        &[],
    )
    .unwrap();
    assert!(!log.has("insmod virtio_blk failed"), "{}", log.tail());
    assert_eq!(log.value_of("LOADED"), Some("yes"), "{}", log.tail());
}
