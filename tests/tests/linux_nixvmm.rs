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
