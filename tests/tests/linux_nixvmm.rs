//! Tier 4: nixvmm boots Debian's stock kernel and the guest's own drivers use nixvmm's devices.
//! Commands run where KVM runs stock kernels: on this host with VMX/SVM (or
//! `NIXVMM_TEST_KERNEL`), otherwise nested inside an L1 guest (see `nixvmm_tests::tier4`).
//! A host where neither works fails these tests with the reason.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nixvmm_tests::linux_kit::{BootLog, KernelKit, INIT_MARKER};
use nixvmm_tests::nixpkgs_scripts::{IN_VM_STAGE_1, RUN_NIXOS_VM, VM_RUN};
use nixvmm_tests::nixvmm_bin;
use nixvmm_tests::tier4::{self, reset_before_init_in, shell_quote, shell_words, Tier4Host};

const BOOT_LIMIT: Duration = Duration::from_secs(180);

fn host() -> &'static Tier4Host {
    tier4::host().unwrap_or_else(|e| panic!("tier 4 cannot run on this host: {e}"))
}

fn kit() -> &'static KernelKit {
    static KIT: std::sync::OnceLock<KernelKit> = std::sync::OnceLock::new();
    KIT.get_or_init(|| KernelKit::obtain().unwrap())
}

/// One nixvmm run of the kit's kernel with an initrd that loads `modules` and runs `script`.
struct Guest<'a> {
    modules: &'a [&'a str],
    script: &'a str,
    memory: &'a str,
    cpus: u32,
    /// Appended to `console=ttyS0 panic=-1`.
    cmdline: &'a str,
    /// Further nixvmm arguments.
    args: Vec<String>,
    kernel: Option<PathBuf>,
    no_reboot: bool,
    /// Further files in the initrd: path, mode, contents.
    files: &'a [(&'a str, u32, &'a [u8])],
}

impl Default for Guest<'_> {
    fn default() -> Self {
        Guest {
            modules: &[],
            script: "",
            memory: "512M",
            cpus: 1,
            cmdline: "",
            args: Vec::new(),
            kernel: None,
            no_reboot: true,
            files: &[],
        }
    }
}

impl Guest<'_> {
    /// The nixvmm command line, quoted for the shell.
    fn command(&self) -> String {
        let initrd = kit()
            .initrd_with_files(self.modules, self.script, self.files)
            .unwrap();
        let kernel = self
            .kernel
            .clone()
            .unwrap_or_else(|| host().kernel().to_path_buf());
        let mut words = vec![
            nixvmm_bin().display().to_string(),
            "run".into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--initrd".into(),
            initrd.display().to_string(),
            "--cmdline".into(),
            format!("console=ttyS0 panic=-1 {}", self.cmdline),
            "--memory".into(),
            self.memory.into(),
            "--cpus".into(),
            self.cpus.to_string(),
        ];
        if self.no_reboot {
            words.push("--no-reboot".into());
        }
        words.extend(self.args.iter().cloned());
        shell_words(&words)
    }

    fn boot(&self) -> BootLog {
        host()
            .run(&format!("exec {}", self.command()), BOOT_LIMIT)
            .unwrap()
    }
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn check(program: &str, words: &[&str]) {
    let ok = std::process::Command::new(program)
        .args(words)
        .status()
        .unwrap()
        .success();
    assert!(ok, "{program} {words:?}");
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn boots_and_powers_off(log: &BootLog) {
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert!(log.has(INIT_MARKER), "{tail}");
    assert_eq!(log.script_rc(), Some(0), "{tail}");
    assert!(log.exit_ok, "poweroff ends nixvmm with status 0:\n{tail}");
}

const CPU_AND_MEMORY: &str = "echo NPROC=$(nproc)\n\
    echo CPUINFO=$(grep -c ^processor /proc/cpuinfo)\n\
    echo MEMTOTAL_KB=$(awk '/MemTotal/{print $2}' /proc/meminfo)\n\
    echo CMDLINE=$(cat /proc/cmdline)";

fn memtotal_kb(log: &BootLog) -> u64 {
    log.value_of("MEMTOTAL_KB").unwrap().parse().unwrap()
}

/// Where the kernel's code lies in physical memory, and the boot params' `loadflags` (0x211)
/// as the kernel got them: the bzImage's decompressor sets KASLR_FLAG (bit 1) when it ran with
/// KASLR on, as Debian's kernel has it by default.
const KERNEL_PLACEMENT: &str =
    "echo KERNEL_CODE=$(grep 'Kernel code' /proc/iomem | cut -d- -f1 | tr -d ' ')\n\
    echo LOADFLAGS=$(od -An -tu1 -j 529 -N1 /sys/kernel/boot_params/data | tr -d ' ')";
const KASLR_FLAG: u8 = 1 << 1;

fn loadflags(log: &BootLog) -> u8 {
    log.value_of("LOADFLAGS").unwrap().parse().unwrap()
}

#[test]
fn tier4_bzimage_boots_with_two_cpus_and_powers_off() {
    let log = Guest {
        script: &format!("{CPU_AND_MEMORY}\n{KERNEL_PLACEMENT}"),
        memory: "1G",
        cpus: 2,
        cmdline: "nixvmm.test=tier4",
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    let tail = log.tail();
    // nixvmm decompressed the payload (by default): the guest entered its vmlinux at the
    // link address (16 MiB) and its decompressor never ran.
    assert_eq!(log.value_of("KERNEL_CODE"), Some("01000000"), "{tail}");
    assert_eq!(loadflags(&log) & KASLR_FLAG, 0, "{tail}");
    assert_eq!(log.value_of("NPROC"), Some("2"), "{tail}");
    assert_eq!(log.value_of("CPUINFO"), Some("2"), "{tail}");
    assert!((900_000..=1_048_576).contains(&memtotal_kb(&log)), "{tail}");
    assert!(
        log.value_of("CMDLINE")
            .unwrap()
            .contains("nixvmm.test=tier4"),
        "{tail}"
    );
}

#[test]
fn tier4_bzimage_decompressed_by_the_guest_boots() {
    let log = Guest {
        script: KERNEL_PLACEMENT,
        args: args(&["--decompress-kernel", "guest"]),
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(loadflags(&log) & KASLR_FLAG, KASLR_FLAG, "{tail}");
    assert!(log.value_of("KERNEL_CODE").is_some(), "{tail}");
}

#[test]
fn tier4_elf_vmlinux_boots_with_one_cpu_in_256_mib() {
    let log = Guest {
        script: CPU_AND_MEMORY,
        memory: "256M",
        kernel: Some(kit().vmlinux().unwrap()),
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    assert_eq!(log.value_of("NPROC"), Some("1"), "{}", log.tail());
    let mem = memtotal_kb(&log);
    assert!(
        (180_000..=262_144).contains(&mem),
        "MemTotal {mem} kB of 256 MiB"
    );
}

#[test]
fn tier4_four_cpus_in_3_gib() {
    let log = Guest {
        script: CPU_AND_MEMORY,
        memory: "3G",
        cpus: 4,
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    assert_eq!(log.value_of("NPROC"), Some("4"), "{}", log.tail());
    assert_eq!(log.value_of("CPUINFO"), Some("4"), "{}", log.tail());
    let mem = memtotal_kb(&log);
    assert!(
        (2_900_000..=3 << 20).contains(&mem),
        "MemTotal {mem} kB of 3 GiB"
    );
}

#[test]
fn tier4_ram_above_4_gib_is_used() {
    // Linux allocates user pages from ZONE_NORMAL first: RAM above 4 GiB.
    let script = "normal_free() { awk '/^Node 0, zone/{z=$4} z==\"Normal\" && $1==\"nr_free_pages\"{print $2}' /proc/zoneinfo; }\n\
                  echo MEMTOTAL_KB=$(awk '/MemTotal/{print $2}' /proc/meminfo)\n\
                  echo HIGH_RAM=$(grep -c '^100000000-.*System RAM' /proc/iomem)\n\
                  before=$(normal_free)\n\
                  mount -t tmpfs -o size=300m tmpfs /mnt && dd if=/dev/zero of=/mnt/fill bs=1M count=256 2>/dev/null\n\
                  echo NORMAL_PAGES_TAKEN=$((before - $(normal_free)))";
    let log = Guest {
        script,
        memory: "5G",
        cpus: 2,
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    let tail = log.tail();
    let mem = memtotal_kb(&log);
    assert!(mem > 4_900_000, "MemTotal {mem} kB of 5 GiB:\n{tail}");
    assert_eq!(log.value_of("HIGH_RAM"), Some("1"), "{tail}");
    let taken: i64 = log.value_of("NORMAL_PAGES_TAKEN").unwrap().parse().unwrap();
    assert!(
        taken > 50_000,
        "only {taken} pages above 4 GiB used:\n{tail}"
    );
}

#[test]
fn tier4_nixos_system_with_reg_info() {
    let dir = host().tempdir().unwrap();
    let store = dir.path().join("nix/store/abc-nixos-system-tier4");
    std::fs::create_dir_all(&store).unwrap();
    let initrd = kit()
        .initrd(&[], "echo CMDLINE=$(cat /proc/cmdline)")
        .unwrap();
    std::os::unix::fs::symlink(host().kernel(), store.join("kernel")).unwrap();
    std::os::unix::fs::symlink(&initrd, store.join("initrd")).unwrap();
    std::fs::write(store.join("init"), "#!/bin/sh\n").unwrap();
    std::fs::write(store.join("kernel-params"), "loglevel=4 nixos.tier4=yes\n").unwrap();
    let result = dir.path().join("result");
    std::os::unix::fs::symlink(&store, &result).unwrap();
    let reg = "/nix/store/xyz-closure-info/registration";
    let command = shell_words(&[
        path(&nixvmm_bin()),
        "run",
        "--system",
        path(&result),
        "--reg-info",
        reg,
        "--memory",
        "512M",
        "--cmdline",
        "panic=-1",
    ]);
    let log = host().run(&format!("exec {command}"), BOOT_LIMIT).unwrap();
    boots_and_powers_off(&log);
    let cmdline = log.value_of("CMDLINE").unwrap();
    for word in [
        "loglevel=4".to_string(),
        "nixos.tier4=yes".into(),
        format!("init={}/init", store.display()),
        format!("regInfo={reg}"),
        "console=ttyS0".into(),
        "panic=-1".into(),
    ] {
        assert!(
            cmdline.split(' ').any(|w| w == word),
            "{word} missing in {cmdline}"
        );
    }
}

/// A guest that counts its boots in a 9p share and reboots by each method Linux has, in turn;
/// the last boot powers off.
#[test]
fn tier4_reboots_by_every_method_and_boots_again() {
    let dir = host().tempdir().unwrap();
    let script = "mount -t 9p -o trans=virtio,version=9p2000.L state /mnt || exit 1\n\
                  n=$(cat /mnt/boots 2>/dev/null || echo 0)\n\
                  echo $((n + 1)) > /mnt/boots; sync\n\
                  echo BOOT=$n TYPE=$(cat /sys/kernel/reboot/type)\n\
                  case $n in\n\
                  0) ;;\n\
                  1) echo kbd > /sys/kernel/reboot/type ;;\n\
                  2) echo acpi > /sys/kernel/reboot/type ;;\n\
                  3) echo triple > /sys/kernel/reboot/type ;;\n\
                  *) umount /mnt; exit 0 ;;\n\
                  esac\n\
                  umount /mnt\n\
                  reboot -f";
    let share = format!("tag=state,path={}", dir.path().display());
    let guest = Guest {
        modules: &["virtio_pci", "9pnet_virtio", "9p"],
        script,
        memory: "256M",
        args: args(&["--share", &share]),
        no_reboot: false,
        ..Guest::default()
    };
    // Five boots in one run.
    let log = host()
        .run(&format!("exec {}", guest.command()), BOOT_LIMIT * 3)
        .unwrap();
    let tail = log.tail();
    assert!(!log.timed_out, "a reboot hung:\n{tail}");
    for n in 0..5 {
        assert!(log.has(&format!("BOOT={n} ")), "boot {n} missing:\n{tail}");
    }
    // The default on hardware-reduced ACPI without EFI: EFI, which falls back to the BIOS.
    assert!(log.has("BOOT=0 TYPE=efi"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("boots"))
            .unwrap()
            .trim(),
        "5"
    );
    assert!(log.exit_ok, "{tail}");
}

#[test]
fn tier4_no_reboot_ends_nixvmm_on_reboot_and_on_panic() {
    for (what, script, cmdline) in [
        ("reboot", "reboot -f", ""),
        (
            "triple fault",
            "echo triple > /sys/kernel/reboot/type; reboot -f",
            "",
        ),
        ("panic", "echo c > /proc/sysrq-trigger", ""),
    ] {
        let log = Guest {
            script,
            cmdline,
            ..Guest::default()
        }
        .boot();
        let tail = log.tail();
        assert!(!log.timed_out, "{what} hung:\n{tail}");
        assert!(log.has(INIT_MARKER), "{tail}");
        assert_eq!(log.script_rc(), None, "{what} did not happen:\n{tail}");
        assert_eq!(log.console.matches("Linux version").count(), 1, "{tail}");
        assert!(log.exit_ok, "{what} with --no-reboot ends with 0:\n{tail}");
    }
}

#[test]
fn tier4_console_input_reaches_a_shell_on_ttys0() {
    // ttyS0 is open before the guest says it waits, so no byte typed after that is lost.
    let script =
        "exec 4< /dev/ttyS0\necho WAITING-FOR-A-LINE\nread -t 120 line <&4 && eval \"$line\"";
    let command = Guest {
        script,
        ..Guest::default()
    }
    .command();
    // Typed once the guest waits for it, as a user would.
    let job = format!(
        "cd \"$(mktemp -d)\" && mkfifo input && exec 3<>input\n\
         trap 'cat out; exit 124' TERM\n\
         {command} <&3 > out 2>&1 &\n\
         pid=$!\n\
         for i in $(seq 1200); do grep -q '^WAITING-FOR-A-LINE' out && break; sleep 0.1; done\n\
         echo 'echo ANSWER=$((6 * 7))' >&3\n\
         wait $pid\n\
         rc=$?\n\
         cat out\n\
         exit $rc"
    );
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    boots_and_powers_off(&log);
    assert_eq!(log.value_of("ANSWER"), Some("42"), "{}", log.tail());
}

#[test]
fn tier4_sigterm_and_sigint_end_nixvmm_with_the_terminal_restored() {
    let command = Guest {
        script: "sleep 600",
        ..Guest::default()
    }
    .command();
    for signal in ["TERM", "INT"] {
        // Under a pseudo-terminal (util-linux `script`), as a user runs it.
        let inner = format!(
            "stty -g > before\n\
             {command} < /dev/tty > out 2>&1 &\n\
             pid=$!\n\
             for i in $(seq 600); do grep -q '{INIT_MARKER}' out && break; sleep 0.2; done\n\
             kill -{signal} $pid\n\
             wait $pid\n\
             echo \"RC=$?\"\n\
             stty -g > after\n\
             cmp -s before after && echo TERMINAL=restored || echo TERMINAL=changed"
        );
        let job = format!(
            "cd \"$(mktemp -d)\" && script -qec {} /dev/null",
            shell_quote(&inner)
        );
        let log = host().run(&job, BOOT_LIMIT).unwrap();
        let tail = log.tail();
        assert_eq!(log.value_of("RC"), Some("0"), "SIG{signal}:\n{tail}");
        assert_eq!(log.value_of("TERMINAL"), Some("restored"), "{tail}");
    }
}

#[test]
fn tier4_disks_keep_their_data_across_runs() {
    let dir = host().tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let root = dir.path().join("root.qcow2");
    let data = dir.path().join("data.raw");
    let store = dir.path().join("store.raw");
    check("truncate", &["-s", "64M", path(&base)]);
    check("mkfs.ext4", &["-q", "-L", "nixos", path(&base)]);
    check(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            path(&base),
            path(&root),
        ],
    );
    check("truncate", &["-s", "32M", path(&data)]);
    check("truncate", &["-s", "16M", path(&store)]);
    let base_before = std::fs::read(&base).unwrap();
    let disks = args(&[
        "--disk",
        &format!("path={},serial=root", root.display()),
        "--disk",
        &format!("path={},format=raw", data.display()),
        "--disk",
        &format!("path={},format=raw,readonly=on", store.display()),
    ]);
    let modules = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];
    let write = "echo SERIAL=$(cat /sys/block/vda/serial)\n\
                 echo VDC_RO=$(cat /sys/block/vdc/ro)\n\
                 mount -t ext4 /dev/vda /mnt && echo kept > /mnt/f && umount /mnt || exit 1\n\
                 echo raw-data | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null || exit 2\n\
                 if dd if=/dev/zero of=/dev/vdc bs=512 count=1 conv=fsync 2>/dev/null; then echo VDC_WRITE=allowed; else echo VDC_WRITE=refused; fi";
    let read = "mount -t ext4 -o ro /dev/vda /mnt && echo ROOT_FILE=$(cat /mnt/f)\n\
                echo DATA=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 8)";
    let first = Guest {
        modules,
        script: write,
        args: disks.clone(),
        ..Guest::default()
    };
    let second = Guest {
        modules,
        script: read,
        args: disks,
        ..Guest::default()
    };
    let job = format!("{} && {}", first.command(), second.command());
    let log = host().run(&job, BOOT_LIMIT * 2).unwrap();
    let tail = log.tail();
    assert_eq!(log.value_of("SERIAL"), Some("root"), "{tail}");
    assert_eq!(log.value_of("VDC_RO"), Some("1"), "{tail}");
    assert_eq!(log.value_of("VDC_WRITE"), Some("refused"), "{tail}");
    assert_eq!(log.value_of("ROOT_FILE"), Some("kept"), "{tail}");
    assert_eq!(log.value_of("DATA"), Some("raw-data"), "{tail}");
    assert!(log.exit_ok, "{tail}");
    check("qemu-img", &["check", "-q", path(&root)]);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file changed"
    );
    assert!(std::fs::read(&store).unwrap().iter().all(|b| *b == 0));
}

#[test]
fn tier4_devices_on_pci_with_msix_interrupts() {
    let dir = host().tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    check("truncate", &["-s", "8M", path(&disk)]);
    std::fs::write(dir.path().join("greeting"), "hello\n").unwrap();
    let script = "for d in /sys/bus/pci/devices/*; do echo PCI=$(cat $d/vendor):$(cat $d/device); done\n\
                  echo RNG_CURRENT=$(cat /sys/class/misc/hw_random/rng_current)\n\
                  echo RNG_BYTES=$(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')\n\
                  dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null\n\
                  mount -t virtiofs data /mnt && cat /mnt/greeting > /dev/null && umount /mnt\n\
                  grep PCI-MSI /proc/interrupts | awk '{n=0; for (i=2;i<=NF;i++) if ($i ~ /^[0-9]+$/) n+=$i; else break; print \"MSIX=\" $NF \":\" n}'";
    let share = format!("tag=data,path={},fs=virtiofs", dir.path().display());
    let log = Guest {
        modules: &["virtio_pci", "virtio_rng", "virtio_blk", "virtiofs"],
        script,
        cpus: 2,
        args: args(&[
            "--rng",
            "--disk",
            &format!("path={}", disk.display()),
            "--share",
            &share,
        ]),
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    let tail = log.tail();
    let pci: Vec<&str> = log
        .console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("PCI="))
        .collect();
    // Modern virtio device ids: 0x1040 + device type (blk 2, rng 4, fs 26).
    for id in ["0x1af4:0x1042", "0x1af4:0x1044", "0x1af4:0x105a"] {
        assert!(pci.contains(&id), "{id} not in {pci:?}");
    }
    assert!(
        log.value_of("RNG_CURRENT")
            .is_some_and(|c| c.starts_with("virtio_rng")),
        "{tail}"
    );
    assert_eq!(log.value_of("RNG_BYTES").map(str::len), Some(64), "{tail}");
    let msix: Vec<(&str, u64)> = log
        .console
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("MSIX="))
        .filter_map(|v| {
            let (name, n) = v.rsplit_once(':')?;
            Some((name, n.parse().ok()?))
        })
        .collect();
    for device in ["virtio0", "virtio1", "virtio2"] {
        let count: u64 = msix
            .iter()
            .filter(|(name, _)| name.starts_with(device))
            .map(|(_, n)| n)
            .sum();
        assert!(
            count > 0,
            "no MSI-X interrupts for {device}: {msix:?}\n{tail}"
        );
    }
}

#[test]
fn tier4_9p_shares_in_every_security_model() {
    let dir = host().tempdir().unwrap();
    let models = ["none", "passthrough", "mapped-xattr", "mapped-file"];
    let mut shares = Vec::new();
    for model in models {
        let share = dir.path().join(model);
        std::fs::create_dir_all(&share).unwrap();
        shares.push("--share".to_string());
        shares.push(format!(
            "tag={model},path={},security-model={model}",
            share.display()
        ));
    }
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(store.join("greeting"), "hello\n").unwrap();
    shares.push("--share".into());
    shares.push(format!(
        "tag=nix-store,path={},readonly=on",
        store.display()
    ));
    let script = "for m in none passthrough mapped-xattr mapped-file; do\n\
                    mkdir -p /$m && mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384 $m /$m || exit 1\n\
                    echo hi > /$m/f && chown 1234:5678 /$m/f && chmod 640 /$m/f\n\
                    mknod /$m/null c 1 3 2>/dev/null; echo \"$m=$(stat -c '%u:%g:%a' /$m/f) $(stat -c %F /$m/null 2>/dev/null)\"\n\
                  done\n\
                  mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384,cache=loose nix-store /mnt\n\
                  echo GREETING=$(cat /mnt/greeting)\n\
                  if echo x > /mnt/new 2>/dev/null; then echo CREATE=allowed; else echo CREATE=refused; fi";
    let log = Guest {
        modules: &["virtio_pci", "9pnet_virtio", "9p"],
        script,
        args: shares,
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    let tail = log.tail();
    let host_stat = |model: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir.path().join(model).join("f")).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    // Every model shows the guest what it set.
    for model in models {
        let seen = log
            .value_of(model)
            .unwrap_or_else(|| panic!("{model}:\n{tail}"));
        assert!(seen.starts_with("1234:5678:640"), "{model}: {seen}");
    }
    // none and passthrough change the host file itself (nixvmm runs as root here).
    assert_eq!(host_stat("none"), (1234, 5678, 0o640));
    assert_eq!(host_stat("passthrough"), (1234, 5678, 0o640));
    // The mapped models keep the host file private and the guest's view beside it.
    assert_eq!(host_stat("mapped-xattr"), (0, 0, 0o600));
    assert_eq!(host_stat("mapped-file"), (0, 0, 0o600));
    assert!(dir.path().join("mapped-file/.virtfs_metadata/f").exists());
    for model in ["mapped-xattr", "mapped-file"] {
        let seen = log.value_of(model).unwrap();
        assert!(seen.ends_with("character special file"), "{model}: {seen}");
        let on_host = std::fs::metadata(dir.path().join(model).join("null")).unwrap();
        assert!(
            on_host.is_file(),
            "{model}: the device node is a plain file on the host"
        );
    }
    assert_eq!(log.value_of("GREETING"), Some("hello"), "{tail}");
    assert_eq!(log.value_of("CREATE"), Some("refused"), "{tail}");
}

#[test]
fn tier4_virtiofs_share_in_vmm() {
    let dir = host().tempdir().unwrap();
    std::fs::write(dir.path().join("greeting"), "hello\n").unwrap();
    let share = format!("tag=data,path={},fs=virtiofs", dir.path().display());
    let ro = host().tempdir().unwrap();
    let ro_share = format!(
        "tag=ro,path={},fs=virtiofs,readonly=on",
        ro.path().display()
    );
    let script = "mount -t virtiofs data /mnt && echo GREETING=$(cat /mnt/greeting)\n\
                  echo from-guest > /mnt/back && sync && umount /mnt && echo WROTE=yes\n\
                  mount -t virtiofs ro /mnt\n\
                  if echo x > /mnt/new 2>/dev/null; then echo RO_CREATE=allowed; else echo RO_CREATE=refused; fi";
    let log = Guest {
        modules: &["virtio_pci", "virtiofs"],
        script,
        args: args(&["--share", &share, "--share", &ro_share]),
        ..Guest::default()
    }
    .boot();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(log.value_of("GREETING"), Some("hello"), "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    assert_eq!(log.value_of("RO_CREATE"), Some("refused"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("back")).unwrap(),
        "from-guest\n"
    );
    assert!(!ro.path().join("new").exists());
}

/// A virtio-fs share served over vhost-user by `backend` (given the socket path and the
/// shared folder): the guest reads a host file and writes one back, and the backend exits
/// with status 0 once nixvmm disconnects.
fn vhost_user_fs_share_works(backend: impl Fn(&str, &str) -> String) {
    let dir = host().tempdir().unwrap();
    std::fs::write(dir.path().join("greeting"), "hello\n").unwrap();
    let script = "mount -t virtiofs data /mnt && echo GREETING=$(cat /mnt/greeting)\n\
                  echo from-guest > /mnt/back && umount /mnt && echo WROTE=yes";
    // Unix sockets live on a local tmpfs (they cannot be bound on L1's 9p work folder).
    let socket = format!("/tmp/nixvmm-tier4-fs-{}.sock", std::process::id());
    let guest = Guest {
        modules: &["virtio_pci", "virtiofs"],
        script,
        args: args(&[
            "--share",
            &format!("tag=data,socket={socket},fs=vhost-user"),
        ]),
        ..Guest::default()
    };
    let log = with_vhost_user_backend(&backend(&socket, path(dir.path())), &socket, &guest, 1);
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(log.value_of("GREETING"), Some("hello"), "{tail}");
    assert_eq!(log.value_of("WROTE"), Some("yes"), "{tail}");
    assert_eq!(log.value_of("BACKEND_ENDED"), Some("0"), "{tail}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("back")).unwrap(),
        "from-guest\n"
    );
}

/// Runs `guest` (for up to `boots` boots) against a vhost-user backend started by `backend`
/// on `socket`; `BACKEND_ENDED=` says how the backend ended once nixvmm had.
fn with_vhost_user_backend(backend: &str, socket: &str, guest: &Guest, boots: u32) -> BootLog {
    let job = format!(
        "rm -f {socket}\n\
         {backend} &\n\
         backend=$!\n\
         for i in $(seq 100); do [ -S {socket} ] && break; sleep 0.1; done\n\
         {}\n\
         rc=$?\n\
         wait $backend\n\
         echo BACKEND_ENDED=$?\n\
         exit $rc",
        guest.command(),
    );
    host().run(&job, BOOT_LIMIT * boots).unwrap()
}

/// A guest that reboots with a vhost-user-fs share still mounted starts a new FUSE session
/// (FUSE_INIT again), which nothing else tells the backend of: what the old session held is
/// let go, so boot after boot the guest has the whole descriptor budget. Here `nixvmm device
/// fs` runs with 300 open files (a budget of 256) and each boot looks up 200 other files.
#[test]
fn tier4_a_guest_rebooting_with_a_vhost_user_fs_share_mounted_keeps_its_budget() {
    let dir = host().tempdir().unwrap();
    for boot in 0..3 {
        let folder = dir.path().join(format!("files{boot}"));
        std::fs::create_dir(&folder).unwrap();
        for i in 0..200 {
            std::fs::write(folder.join(format!("f{i}")), "x").unwrap();
        }
    }
    let script = "mount -t virtiofs data /mnt || exit 1\n\
                  n=$(cat /mnt/boots 2>/dev/null || echo 0)\n\
                  echo $((n + 1)) > /mnt/boots; sync\n\
                  echo BOOT$n=$(ls -l /mnt/files$n | grep -c ' f[0-9]')\n\
                  [ $n -lt 2 ] && reboot -f\n\
                  umount /mnt";
    let socket = format!("/tmp/nixvmm-tier4-fs-reboot-{}.sock", std::process::id());
    let guest = Guest {
        modules: &["virtio_pci", "virtiofs"],
        script,
        memory: "256M",
        args: args(&[
            "--share",
            &format!("tag=data,socket={socket},fs=vhost-user"),
        ]),
        no_reboot: false,
        ..Guest::default()
    };
    let backend = format!(
        "prlimit --nofile=300:300 {}",
        shell_words(&[
            path(&nixvmm_bin()),
            "device",
            "fs",
            "--socket-path",
            &socket,
            "--shared-dir",
            path(dir.path()),
        ])
    );
    let log = with_vhost_user_backend(&backend, &socket, &guest, 3);
    let tail = log.tail();
    for n in 0..3 {
        assert_eq!(log.value_of(&format!("BOOT{n}")), Some("200"), "{tail}");
    }
    assert!(log.exit_ok, "{tail}");
    assert_eq!(log.value_of("BACKEND_ENDED"), Some("0"), "{tail}");
}

#[test]
fn tier4_vhost_user_fs_share_served_by_nixvmm_device_fs() {
    vhost_user_fs_share_works(|socket, dir| {
        shell_words(&[
            path(&nixvmm_bin()),
            "device",
            "fs",
            "--socket-path",
            socket,
            "--shared-dir",
            dir,
        ])
    });
}

/// virtiofsd as qemu-vm.nix starts it, installed by scripts/setup.
fn virtiofsd() -> PathBuf {
    let installed = PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo/bin/virtiofsd");
    if installed.is_file() {
        return installed;
    }
    let found = std::process::Command::new("sh")
        .args(["-c", "command -v virtiofsd"])
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&found.stdout).trim().to_string();
    assert!(
        !found.is_empty(),
        "virtiofsd not found: scripts/setup installs it"
    );
    PathBuf::from(found)
}

#[test]
fn tier4_vhost_user_fs_share_served_by_virtiofsd() {
    let virtiofsd = virtiofsd();
    vhost_user_fs_share_works(|socket, dir| {
        shell_words(&[
            path(&virtiofsd),
            "--socket-path",
            socket,
            "--shared-dir",
            dir,
            "--sandbox",
            "none",
        ])
    });
}

/// vhost-device-vsock as newer NixOS test drivers start it, installed by scripts/setup.
fn vhost_device_vsock() -> PathBuf {
    let installed =
        PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo/bin/vhost-device-vsock");
    assert!(
        installed.is_file(),
        "{} not found: scripts/setup installs it",
        installed.display()
    );
    installed
}

/// The host side of the vsock tests, in Python. Through Unix sockets (nixvmm's muxer and
/// vhost-device-vsock): `connect UDS PORT TEXT` asks for the guest's PORT as Firecracker's
/// protocol does (`CONNECT PORT` → `OK N`) and prints the guest's answer to TEXT; `serve
/// UDS_PORT` answers one guest connection's line with "host: LINE". Through AF_VSOCK (the
/// kernel's vhost-vsock): `vsock-connect CID PORT TEXT` and `vsock-serve PORT` do the same.
const HOST_VSOCK_PEER: &str = r#"
import socket, sys
mode = sys.argv[1]
if mode in ("connect", "vsock-connect"):
    if mode == "connect":
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[2])
        s.sendall(b"CONNECT " + sys.argv[3].encode() + b"\n")
        f = s.makefile("rb")
        print("HOST_HANDSHAKE=" + f.readline().decode().strip().split(" ")[0])
    else:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.connect((int(sys.argv[2]), int(sys.argv[3])))
        f = s.makefile("rb")
    s.sendall(sys.argv[4].encode() + b"\n")
    print("HOST_GOT=" + f.readline().decode().strip())
else:
    if mode == "serve":
        l = socket.socket(socket.AF_UNIX)
        l.bind(sys.argv[2])
    else:
        l = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        l.bind((socket.VMADDR_CID_ANY, int(sys.argv[2])))
    l.listen(1)
    c, _ = l.accept()
    line = c.makefile("rb").readline()
    c.sendall(b"host: " + line)
    c.close()
"#;

/// The guest's side of the vsock tests: its CID, a listener on port 1234 that the host calls,
/// then a call to the host's port 5000.
const GUEST_VSOCK: &str = "echo GUEST_CID=$(vsock-peer cid | cut -d' ' -f2)\n\
    vsock-peer listen 1234\n\
    answer=$(vsock-peer connect 2 5000 from-guest)\n\
    echo \"GUEST_GOT=${answer#VSOCK-ANSWER }\"";

/// How the host side reaches the guest's vsock.
enum HostSide {
    /// Unix sockets at /tmp/vm.vsock (nixvmm's muxer, vhost-device-vsock).
    Uds,
    /// AF_VSOCK (the kernel's vhost-vsock).
    AfVsock,
}

/// How the VM gets its vsock.
enum VsockOption<'a> {
    /// `nixvmm run --vsock …`.
    Native(&'a str),
    /// The QEMU door's options (`nixvmm qemu …`), as NixOS test drivers write them.
    Door(&'a str),
}

/// A guest with [`GUEST_VSOCK`] and its vsock, the job around it starting `backend` (shell
/// lines) first; host → guest and guest → host.
fn vsock_works_both_ways(vsock: VsockOption, backend: &str, host_side: HostSide) {
    let peer = nixvmm_tests::linux_kit::guest_program("vsock_peer").unwrap();
    let files = [("bin/vsock-peer", 0o755, peer.as_slice())];
    let dir = host().tempdir().unwrap();
    let py = dir.path().join("peer.py");
    std::fs::write(&py, HOST_VSOCK_PEER).unwrap();
    let modules = ["virtio_pci", "vmw_vsock_virtio_transport"];
    let vm = match vsock {
        VsockOption::Native(option) => Guest {
            modules: &modules,
            script: GUEST_VSOCK,
            args: args(&["--vsock", option]),
            files: &files,
            ..Guest::default()
        }
        .command(),
        VsockOption::Door(options) => {
            let initrd = kit()
                .initrd_with_files(&modules, GUEST_VSOCK, &files)
                .unwrap();
            format!(
                "{nixvmm} qemu -m 512 -nographic -no-reboot -kernel {kernel} -initrd {initrd} \
                 -append 'console=ttyS0 panic=-1' {options}",
                nixvmm = path(&nixvmm_bin()),
                kernel = path(host().kernel()),
                initrd = path(&initrd),
            )
        }
    };
    let job = format!(
        "rm -f /tmp/vsock.sock /tmp/vm.vsock*\n\
         {backend}\n\
         python3 {py} {serve} &\n\
         {vm} > /tmp/console 2>&1 &\n\
         vm=$!\n\
         for i in $(seq 1200); do grep -q 'VSOCK-LISTENING 1234' /tmp/console && break; sleep 0.1; done\n\
         python3 {py} {connect} 1234 from-host\n\
         wait $vm\n\
         rc=$?\n\
         cat /tmp/console\n\
         echo '--- backend:'; tail -5 /tmp/backend.log 2>/dev/null\n\
         exit $rc",
        py = path(&py),
        serve = match host_side {
            HostSide::Uds => "serve /tmp/vm.vsock_5000",
            HostSide::AfVsock => "vsock-serve 5000",
        },
        connect = match host_side {
            HostSide::Uds => "connect /tmp/vm.vsock",
            HostSide::AfVsock => "vsock-connect 7",
        },
    );
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(
        log.value_of("GUEST_CID"),
        Some("7"),
        "the configured CID:\n{tail}"
    );
    if let HostSide::Uds = host_side {
        assert_eq!(log.value_of("HOST_HANDSHAKE"), Some("OK"), "{tail}");
    }
    assert_eq!(log.value_of("HOST_GOT"), Some("echo: from-host"), "{tail}");
    assert_eq!(
        log.value_of("GUEST_GOT"),
        Some("host: from-guest"),
        "{tail}"
    );
}

/// Through vhost-device-vsock, given as `--vsock vhost-user=` and as the 2025+ test driver
/// writes it for QEMU.
#[test]
fn tier4_vsock_through_vhost_device_vsock_both_ways() {
    let backend = format!(
        "{} --vm guest-cid=7,socket=/tmp/vsock.sock,uds-path=/tmp/vm.vsock > /tmp/backend.log 2>&1 &\n\
         for i in $(seq 100); do [ -S /tmp/vsock.sock ] && break; sleep 0.1; done",
        path(&vhost_device_vsock())
    );
    for vsock in [
        VsockOption::Native("vhost-user=/tmp/vsock.sock"),
        VsockOption::Door(
            "-chardev socket,id=vsock_ssh,reconnect=0,path=/tmp/vsock.sock \
             -device vhost-user-vsock-pci,chardev=vsock_ssh",
        ),
    ] {
        vsock_works_both_ways(vsock, &backend, HostSide::Uds);
    }
}

#[test]
fn tier4_vsock_through_nixvmms_own_device_both_ways() {
    let vsock = VsockOption::Native("cid=7,uds=/tmp/vm.vsock");
    vsock_works_both_ways(vsock, "", HostSide::Uds);
}

/// Through the kernel's vhost-vsock, given as `--vsock …,backend=kernel` and as older test
/// drivers write it for QEMU.
#[test]
fn tier4_vsock_through_the_kernels_vhost_vsock_both_ways() {
    for vsock in [
        VsockOption::Native("cid=7,backend=kernel"),
        VsockOption::Door("-device vhost-vsock-pci,guest-cid=7"),
    ] {
        vsock_works_both_ways(vsock, "", HostSide::AfVsock);
    }
}

/// Shell functions for the affinity test. `move IRQ` asks Linux to move an IRQ to the CPU it
/// is not on (as irqbalance or a user does); Linux re-programs the device's MSI-X vector
/// (masked, new message, unmasked) when the IRQ next fires. `effective IRQ` is where it is.
const IRQ_TOOLS: &str = r#"
irq_of() { awk -v name="$1" '$NF ~ name { sub(":", "", $1); print $1; exit }' /proc/interrupts; }
effective() { cat /proc/irq/$1/effective_affinity_list; }
move() { to=$((1 - $(effective $1))); echo $to > /proc/irq/$1/smp_affinity_list && echo $to; }
counts() { awk -v irq="$1:" '$1 == irq { print $2 "," $3 }' /proc/interrupts; }
"#;

#[test]
fn tier4_irq_affinity_moves_keep_shares_and_disks_working() {
    let dir = host().tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let pattern: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &pattern).unwrap();
    let blob = &pattern[..4 << 20];
    for name in ["in-vmm", "vhost-user"] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        std::fs::write(dir.path().join(name).join("blob"), blob).unwrap();
    }
    let (disk_sum, blob_sum) = (sha256(&pattern), sha256(blob));
    // virtio-fs IRQs are ordinary ones, moved by smp_affinity. virtio-blk's request IRQ is
    // "managed" (spread by the kernel, and smp_affinity refuses it with EIO), so the disk is
    // read between the moves of the others. Linux moves a managed IRQ only when its CPU goes
    // offline, and CPU hotplug of L2 under TCG's emulated SVM hangs or resets the guest about
    // once in three tries: the tier-2 tiny guest rewrites a virtio-pci vector instead.
    let script = format!(
        "{IRQ_TOOLS}\n\
         grep virtio /proc/interrupts\n\
         mkdir -p /a /b\n\
         mount -t virtiofs in-vmm /a && mount -t virtiofs vhost-user /b || echo MOUNT=failed\n\
         fs_irqs=$(awk '$NF ~ /virtio[0-9]+-requests/ {{ sub(\":\", \"\", $1); print $1 }}' /proc/interrupts)\n\
         echo FS_IRQS=$(echo $fs_irqs | tr ' ' ,)\n\
         for round in 1 2 3 4; do\n\
           for irq in $fs_irqs; do to=$(move $irq); echo 3 > /proc/sys/vm/drop_caches\n\
             a=$(timeout 30 cat /a/blob | sha256sum | cut -d' ' -f1)\n\
             [ \"$a\" = \"{blob_sum}\" ] || {{ echo STUCK=in-vmm; grep requests /proc/interrupts; }}\n\
             b=$(timeout 30 cat /b/blob | sha256sum | cut -d' ' -f1)\n\
             [ \"$b\" = \"{blob_sum}\" ] || {{ echo STUCK=vhost-user; grep requests /proc/interrupts; }}\n\
             echo SUM=$a,$b\n\
             echo FS_MOVE=$irq:$to:$(effective $irq)\n\
           done\n\
           echo BLK_SUM=$(dd if=/dev/vda iflag=direct bs=256k 2>/dev/null | sha256sum | cut -d' ' -f1)\n\
         done\n\
         for irq in $fs_irqs; do echo FS_COUNTS=$(counts $irq); done\n\
         umount /a /b"
    );
    let socket = format!("/tmp/nixvmm-tier4-affinity-{}.sock", std::process::id());
    let guest = Guest {
        modules: &["virtio_pci", "virtio_blk", "virtiofs"],
        script: &script,
        cpus: 2,
        args: args(&[
            "--disk",
            &format!("path={},format=raw", disk.display()),
            "--share",
            &format!(
                "tag=in-vmm,path={},fs=virtiofs",
                dir.path().join("in-vmm").display()
            ),
            "--share",
            &format!("tag=vhost-user,socket={socket},fs=vhost-user"),
        ]),
        ..Guest::default()
    };
    let job = format!(
        "rm -f {socket}\n\
         {} device fs --socket-path {socket} --shared-dir {} &\n\
         for i in $(seq 100); do [ -S {socket} ] && break; sleep 0.1; done\n\
         exec {}",
        shell_quote(path(&nixvmm_bin())),
        shell_quote(path(&dir.path().join("vhost-user"))),
        guest.command(),
    );
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    let values = |key: &str| -> Vec<String> {
        let prefix = format!("{key}=");
        log.console
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix(prefix.as_str()))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        values("SUM"),
        vec![format!("{blob_sum},{blob_sum}"); 8],
        "both shares read right after every move:\n{tail}"
    );
    assert_eq!(values("BLK_SUM"), vec![disk_sum; 4], "{tail}");
    let moves = values("FS_MOVE");
    assert_eq!(moves.len(), 8, "{tail}");
    for m in &moves {
        let parts: Vec<&str> = m.split(':').collect();
        assert_eq!(parts.get(1), parts.get(2), "IRQ {m} moved:\n{tail}");
    }
    for counts in values("FS_COUNTS") {
        let counts: Vec<u64> = counts.split(',').filter_map(|c| c.parse().ok()).collect();
        assert!(
            counts.len() == 2 && counts.iter().all(|&c| c > 0),
            "virtio-fs interrupts on both CPUs:\n{tail}"
        );
    }
}

fn sha256(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn epoch_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn tier4_cmos_rtc_gives_the_guest_the_host_time() {
    let script = "echo RTC_EPOCH=$(cat /sys/class/rtc/rtc0/since_epoch)\n\
                  echo GUEST_EPOCH=$(date +%s)\n\
                  hwclock -r -u > /dev/null && echo HWCLOCK=ok\n\
                  dmesg | grep -q 'rtc_cmos.*broken' && echo RTC_ERROR=yes || echo RTC_ERROR=no";
    let before = epoch_now();
    let log = Guest {
        script,
        ..Guest::default()
    }
    .boot();
    let after = epoch_now();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(log.value_of("RTC_ERROR"), Some("no"), "{tail}");
    assert_eq!(log.value_of("HWCLOCK"), Some("ok"), "{tail}");
    for key in ["RTC_EPOCH", "GUEST_EPOCH"] {
        let t: i64 = log.value_of(key).unwrap().parse().unwrap();
        assert!(
            (before - 5..=after + 5).contains(&t),
            "{key} {t} outside {before}..{after}:\n{tail}"
        );
    }
}

/// A DNS server for the user-network tests, run in L1 on 127.0.0.1:53 (the address L1's
/// resolv.conf names, so slirp forwards 10.0.2.3's queries to it): every A query is answered
/// with 192.0.2.7, every other query with no records.
const DNS_SERVER: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
while True:
    q, peer = s.recvfrom(512)
    i = 12
    while i < len(q) and q[i]:
        i += q[i] + 1
    qtype = q[i + 1:i + 3]
    answer = qtype == b"\x00\x01"
    r = q[:2] + b"\x81\x80" + q[4:6] + (b"\x00\x01" if answer else b"\x00\x00") + b"\x00\x00\x00\x00" + q[12:i + 5]
    if answer:
        r += b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 7])
    s.sendto(r, peer)
"#;

/// busybox udhcpc's hook: configure what the lease says and report it.
const DHCP_HOOK: &str = "#!/bin/sh\n\
    case \"$1\" in bound|renew)\n\
      ip addr add $ip/$mask dev $interface\n\
      for r in $router; do ip route add default via $r; break; done\n\
      echo DHCP_IP=$ip; echo DHCP_ROUTER=$router; echo DHCP_DNS=$dns;;\n\
    esac\n";

/// The guest's half of a user-network test: DHCP, then `rest`.
fn user_net_guest_script(rest: &str) -> String {
    format!(
        "printf '%s' '{DHCP_HOOK}' > /dhcp.sh && chmod +x /dhcp.sh\n\
         ip link set lo up && ip link set eth0 up\n\
         echo MAC=$(cat /sys/class/net/eth0/address)\n\
         udhcpc -i eth0 -n -q -t 10 -T 1 -s /dhcp.sh\n\
         fetch() {{ printf 'GET /greeting HTTP/1.0\\r\\n\\r\\n' | timeout 10 nc $1 $2 | tail -n 1; }}\n\
         {rest}"
    )
}

/// L1's side once the guest prints SERVING: connect to the host-forwarded port 8022 (again
/// until the guest listens) and report what came back.
const HOSTFWD_CHECK: &str = "for i in $(seq 40); do r=$(timeout 5 busybox nc 127.0.0.1 8022 < /dev/null); [ -n \"$r\" ] && break; sleep 0.5; done\n\
                             echo HOSTFWD=$r";

/// An L1 job for a user-network test, in a network namespace of its own with only loopback:
/// L1 serves /greeting over HTTP on 127.0.0.1:8080 and DNS on 127.0.0.1:53, starts the
/// guest, and once the guest prints SERVING runs `host_side`.
fn user_net_job(guest: &Guest, host_side: &str) -> String {
    let inner = format!(
        "set -u\n\
         ip link set lo up\n\
         www=$(mktemp -d) && echo hello-from-l1 > $www/greeting\n\
         busybox httpd -f -p 127.0.0.1:8080 -h $www & httpd=$!\n\
         echo 'nameserver 127.0.0.1' > $www/resolv.conf && mount --bind $www/resolv.conf /etc/resolv.conf\n\
         python3 -c {dns} & dns=$!\n\
         log=$www/console\n\
         trap 'cat $log; exit 1' TERM\n\
         {nixvmm} > $log 2>&1 & vmm=$!\n\
         for i in $(seq 600); do grep -q SERVING $log && break; kill -0 $vmm 2>/dev/null || break; sleep 0.2; done\n\
         {host_side}\n\
         wait $vmm; rc=$?\n\
         kill $httpd $dns\n\
         cat $log\n\
         exit $rc",
        dns = shell_quote(DNS_SERVER),
        nixvmm = guest.command(),
    );
    format!("exec unshare -mn bash -c {}", shell_quote(&inner))
}

const NET_MODULES: &[&str] = &["virtio_pci", "virtio_net"];

#[test]
fn tier4_user_network_dhcp_dns_http_and_forwards_both_ways() {
    let script = user_net_guest_script(
        "echo HTTP=$(fetch 10.0.2.2 8080)\n\
         echo GUESTFWD=$(fetch 10.0.2.100 80)\n\
         echo DNS=$(nslookup web.nixvmm.test 10.0.2.3 | awk '/^Address/ {a=$NF} END {print a}')\n\
         for i in $(seq 40); do ip -6 addr show dev eth0 | grep -q 'inet6 fec0:' && break; sleep 0.5; done\n\
         echo IPV6=$(ip -6 addr show dev eth0 | awk '/inet6 fec0:/ {print $2}')\n\
         ping -6 -c 1 -W 5 fec0::2 > /dev/null && echo PING6=ok || echo PING6=failed\n\
         echo SERVING\n\
         echo from-the-guest | timeout 60 nc -l -p 80\n\
         echo SERVED=yes",
    );
    let guest = Guest {
        modules: NET_MODULES,
        script: &script,
        args: args(&[
            "--net",
            "user,hostfwd=tcp:127.0.0.1:8022-:80,guestfwd=tcp:10.0.2.100:80-cmd:busybox nc 127.0.0.1 8080",
        ]),
        ..Guest::default()
    };
    let log = host()
        .run(&user_net_job(&guest, HOSTFWD_CHECK), BOOT_LIMIT)
        .unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(log.value_of("MAC"), Some("52:54:00:12:34:56"), "{tail}");
    assert_eq!(log.value_of("DHCP_IP"), Some("10.0.2.15"), "{tail}");
    assert_eq!(log.value_of("DHCP_ROUTER"), Some("10.0.2.2"), "{tail}");
    assert_eq!(log.value_of("DHCP_DNS"), Some("10.0.2.3"), "{tail}");
    assert_eq!(log.value_of("HTTP"), Some("hello-from-l1"), "{tail}");
    assert_eq!(log.value_of("GUESTFWD"), Some("hello-from-l1"), "{tail}");
    assert_eq!(log.value_of("DNS"), Some("192.0.2.7"), "{tail}");
    // IPv6 by slirp's router advertisements (its timer): an address in fec0::/64.
    let ipv6 = log.value_of("IPV6").unwrap_or_default();
    assert!(
        ipv6.starts_with("fec0::") && ipv6.ends_with("/64"),
        "{ipv6}:\n{tail}"
    );
    assert_eq!(log.value_of("PING6"), Some("ok"), "{tail}");
    assert_eq!(log.value_of("HOSTFWD"), Some("from-the-guest"), "{tail}");
    assert_eq!(log.value_of("SERVED"), Some("yes"), "{tail}");
}

#[test]
fn tier4_restricted_user_network_blocks_the_guest_but_keeps_hostfwd_and_a_tcp_guestfwd() {
    let script = user_net_guest_script(
        "echo HTTP=$(fetch 10.0.2.2 8080 | grep -q hello && echo reached || echo blocked)\n\
         echo GUESTFWD=$(fetch 10.0.2.100 80)\n\
         echo SERVING\n\
         echo from-the-guest | timeout 60 nc -l -p 80\n\
         echo SERVED=yes",
    );
    let guest = Guest {
        modules: NET_MODULES,
        script: &script,
        args: args(&[
            "--net",
            "user,restrict=on,hostfwd=tcp:127.0.0.1:8022-:80,guestfwd=tcp:10.0.2.100:80-tcp:127.0.0.1:8080,mac=52:54:00:12:01:01",
        ]),
        ..Guest::default()
    };
    let log = host()
        .run(&user_net_job(&guest, HOSTFWD_CHECK), BOOT_LIMIT)
        .unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(log.value_of("MAC"), Some("52:54:00:12:01:01"), "{tail}");
    assert_eq!(log.value_of("DHCP_IP"), Some("10.0.2.15"), "{tail}");
    assert_eq!(log.value_of("HTTP"), Some("blocked"), "{tail}");
    assert_eq!(log.value_of("GUESTFWD"), Some("hello-from-l1"), "{tail}");
    assert_eq!(log.value_of("HOSTFWD"), Some("from-the-guest"), "{tail}");
}

/// One machine of the VLAN test: the test driver's address 192.168.1.N and MAC
/// 52:54:00:12:01:0N, pinging its peer until it answers. Then machine 1 waits until machine 2
/// (done pinging too) connects to it, so neither leaves before the other's pings are answered.
fn vlan_machine(n: u8, peer: u8, sock: &str) -> String {
    let handshake = if n == 1 {
        "timeout 120 nc -l -p 7000 > /dev/null".to_string()
    } else {
        format!(
            "for i in $(seq 60); do echo bye | nc 192.168.1.{peer} 7000 && break; sleep 1; done"
        )
    };
    // Machine 2 has a second NIC on a user network: eth1, with QEMU's first default MAC.
    let second_nic = if n == 2 {
        format!(
            "printf '%s' '{DHCP_HOOK}' > /dhcp.sh && chmod +x /dhcp.sh\n\
             ip link set eth1 up && echo ETH1_MAC=$(cat /sys/class/net/eth1/address)\n\
             udhcpc -i eth1 -n -q -t 10 -T 1 -s /dhcp.sh\n"
        )
    } else {
        String::new()
    };
    let script = format!(
        "ip link set lo up && ip link set eth0 up\n\
         {second_nic}\
         ip addr add 192.168.1.{n}/24 dev eth0\n\
         for i in $(seq 120); do ping -c 1 -W 1 192.168.1.{peer} > /dev/null && break; done\n\
         ping -c 3 -W 2 192.168.1.{peer} > /dev/null && echo PING_{n}_TO_{peer}=ok || {{ echo PING_{n}_TO_{peer}=failed; ip neigh; cat /proc/net/dev; }}\n\
         {handshake}"
    );
    let guest = Guest {
        modules: NET_MODULES,
        script: &script,
        memory: "256M",
        args: if n == 2 {
            args(&[
                "--net",
                &format!("vde,sock={sock},mac=52:54:00:12:01:0{n}"),
                "--net",
                "user",
            ])
        } else {
            args(&["--net", &format!("vde,sock={sock},mac=52:54:00:12:01:0{n}")])
        },
        ..Guest::default()
    };
    guest.command()
}

#[test]
fn tier4_two_guests_on_one_vde_switch_ping_each_other_and_a_second_nic_works() {
    let sock = format!("/tmp/nixvmm-tier4-vde-{}", std::process::id());
    // Machine 2 starts once machine 1 is in /init: two Linux boots at once in one L1 are
    // where TCG's emulated SVM resets an L2 guest most often. A machine that triple-faulted
    // before /init (no console output at all; the nested runner re-runs a job only when no guest in it
    // reached /init) boots once
    // more. Each log is printed when its machine ends, so a hang shows how far each got.
    let job = format!(
        "set -u\n\
         rm -rf {sock}\n\
         vde_switch --sock {sock} --dirmode 0700 --hub --daemon --pidfile {sock}.pid\n\
         for i in $(seq 100); do [ -S {sock}/ctl ] && break; sleep 0.1; done\n\
         machine() {{\n\
           n=$1; shift\n\
           for try in 1 2; do\n\
             timeout -k 5 150 \"$@\" > {sock}.$n.log 2>&1; rc=$?\n\
             {reset} || break\n\
             echo \"machine $n triple-faulted before /init (nested SVM); it boots once more\"\n\
           done\n\
           cat {sock}.$n.log\n\
           return $rc\n\
         }}\n\
         machine 1 {one} & one=$!\n\
         for i in $(seq 600); do grep -qs '{INIT_MARKER}' {sock}.1.log && break; sleep 0.1; done\n\
         machine 2 {two} & two=$!\n\
         wait $one; rc1=$?; wait $two; rc2=$?\n\
         kill $(cat {sock}.pid)\n\
         echo RC1=$rc1 RC2=$rc2\n\
         [ $rc1 = 0 ] && [ $rc2 = 0 ]",
        one = vlan_machine(1, 2, &sock),
        two = vlan_machine(2, 1, &sock),
        reset = reset_before_init_in(&format!("{sock}.$n.log")),
    );
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert_eq!(log.value_of("PING_1_TO_2"), Some("ok"), "{tail}");
    assert_eq!(log.value_of("PING_2_TO_1"), Some("ok"), "{tail}");
    assert_eq!(
        log.value_of("ETH1_MAC"),
        Some("52:54:00:12:34:56"),
        "{tail}"
    );
    assert_eq!(log.value_of("DHCP_IP"), Some("10.0.2.15"), "{tail}");
    assert!(log.exit_ok, "both guests power off with status 0:\n{tail}");
}

/// L1's side of the tap test: 4 MB to the guest on port 9000, 2 MB from it on port 9001.
const TAP_PEER: &str = r#"
import hashlib, os, socket
data = os.urandom(4_000_000)
print("SENT_MD5=" + hashlib.md5(data).hexdigest(), flush=True)
down = socket.create_server(("192.168.100.1", 9000))
up = socket.create_server(("192.168.100.1", 9001))
c, _ = down.accept(); c.sendall(data); c.close()
c, _ = up.accept()
got = b""
while len(got) < 2_000_000:
    b = c.recv(65536)
    if not b:
        break
    got += b
print("RECEIVED_MD5=" + hashlib.md5(got).hexdigest(), flush=True)
c.close()
"#;

#[test]
fn tier4_a_tap_nic_on_a_bridge_reaches_l1_with_offloads() {
    let script = "ip link set lo up && ip link set eth0 up\n\
                  ip addr add 192.168.100.2/24 dev eth0\n\
                  echo FEATURES=$(cat /sys/class/net/eth0/device/features)\n\
                  for i in $(seq 30); do ping -c 1 -W 1 192.168.100.1 > /dev/null && break; done\n\
                  ping -c 2 -W 2 192.168.100.1 > /dev/null && echo PING=ok || echo PING=failed\n\
                  echo GOT_MD5=$(timeout 60 nc 192.168.100.1 9000 | md5sum | cut -d' ' -f1)\n\
                  head -c 2000000 /dev/urandom > /up\n\
                  echo UP_MD5=$(md5sum /up | cut -d' ' -f1)\n\
                  timeout 60 nc 192.168.100.1 9001 < /up";
    let guest = Guest {
        modules: NET_MODULES,
        script,
        args: args(&["--net", "tap,ifname=tap0,script=no,downscript=no"]),
        ..Guest::default()
    };
    let inner = format!(
        "set -u\n\
         ip link set lo up\n\
         ip link add br0 type bridge && ip link set br0 up\n\
         ip tuntap add dev tap0 mode tap vnet_hdr\n\
         ip link set tap0 master br0 && ip link set tap0 up\n\
         ip addr add 192.168.100.1/24 dev br0\n\
         python3 -c {peer} & peer=$!\n\
         sleep 1\n\
         {nixvmm}\n\
         rc=$?\n\
         wait $peer\n\
         exit $rc",
        peer = shell_quote(TAP_PEER),
        nixvmm = guest.command(),
    );
    let log = host()
        .run(
            &format!("exec unshare -n bash -c {}", shell_quote(&inner)),
            BOOT_LIMIT,
        )
        .unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    let features = log
        .value_of("FEATURES")
        .unwrap_or_default()
        .as_bytes()
        .to_vec();
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
    ] {
        assert_eq!(features.get(bit), Some(&b'1'), "{name} negotiated:\n{tail}");
    }
    assert_eq!(log.value_of("PING"), Some("ok"), "{tail}");
    assert_eq!(log.value_of("GOT_MD5"), log.value_of("SENT_MD5"), "{tail}");
    assert_eq!(
        log.value_of("RECEIVED_MD5"),
        log.value_of("UP_MD5"),
        "{tail}"
    );
    assert!(log.value_of("UP_MD5").is_some(), "{tail}");
}

/// L1's side of the flood test: a forwarded connection reset by the host (SO_LINGER 0), then
/// a normal one.
const RESET_THEN_CONNECT: &str = r#"
import socket, struct, time
for i in range(100):
    try:
        c = socket.create_connection(("127.0.0.1", 8022), timeout=5)
        break
    except OSError:
        time.sleep(0.2)
c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
time.sleep(1)
c.close()
print("RESET=sent", flush=True)
"#;

#[test]
fn tier4_a_flooding_guest_and_a_reset_forward_leave_devices_and_network_working() {
    let disk = host().tempdir().unwrap();
    let image = disk.path().join("disk.raw");
    std::fs::write(&image, vec![0x5a; 8 << 20]).unwrap();
    let script = user_net_guest_script(
        "( dd if=/dev/zero bs=1400 count=100000 2>/dev/null | nc -u 10.0.2.2 9999 ) & flood=$!\n\
         dd if=/dev/hwrng of=/dev/null bs=1k count=32 2>/dev/null && echo RNG=ok\n\
         echo DISK=$(dd if=/dev/vda bs=1M count=8 2>/dev/null | tr -d Z | wc -c)/$(dd if=/dev/vda bs=1M count=8 2>/dev/null | wc -c)\n\
         kill $flood 2>/dev/null; wait $flood 2>/dev/null\n\
         echo HTTP=$(fetch 10.0.2.2 8080)\n\
         (echo first | timeout 60 nc -l -p 80; echo FIRST_ENDED=yes) & first=$!\n\
         sleep 1; echo SERVING; wait $first\n\
         echo from-the-guest | timeout 60 nc -l -p 80\n\
         echo SERVED=yes",
    );
    let guest = Guest {
        modules: &["virtio_pci", "virtio_net", "virtio_rng", "virtio_blk"],
        script: &script,
        args: args(&[
            "--net",
            "user,hostfwd=tcp:127.0.0.1:8022-:80",
            "--rng",
            "--disk",
            &format!("path={},format=raw", path(&image)),
        ]),
        ..Guest::default()
    };
    let host_side = format!(
        "python3 -c {}\n{HOSTFWD_CHECK}",
        shell_quote(RESET_THEN_CONNECT)
    );
    let log = host()
        .run(&user_net_job(&guest, &host_side), BOOT_LIMIT)
        .unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(log.value_of("RNG"), Some("ok"), "{tail}");
    // 8 MiB read back, all of it the image's 0x5a ('Z') bytes.
    assert_eq!(log.value_of("DISK"), Some("0/8388608"), "{tail}");
    assert_eq!(
        log.value_of("HTTP"),
        Some("hello-from-l1"),
        "after the flood:\n{tail}"
    );
    assert_eq!(log.value_of("RESET"), Some("sent"), "{tail}");
    assert_eq!(log.value_of("FIRST_ENDED"), Some("yes"), "{tail}");
    assert_eq!(
        log.value_of("HOSTFWD"),
        Some("from-the-guest"),
        "after the reset:\n{tail}"
    );
}

/// The guest's side: NixOS stage 1's mounts (9p or virtio-fs), the root disk by its id as
/// udev names it (its ext4 label read from the superblock: s_volume_name at byte 1024 + 120;
/// busybox has no blkid), a file into xchg and shared, and a server on the forwarded port.
fn nixos_like_guest(fs: &str) -> String {
    let mount = if fs == "9p" {
        "mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384"
    } else {
        "mount -t virtiofs"
    };
    let loose = if fs == "9p" { ",cache=loose" } else { "" };
    user_net_guest_script(&format!(
        "mkdir -p /nix/store /xchg /shared /dev/disk/by-id\n\
         {mount} -o ro{loose} nix-store /nix/store && echo STORE=$(cat /nix/store/greeting)\n\
         {mount} xchg /xchg && {mount} shared /shared\n\
         for b in /sys/block/vd*; do ln -s /dev/${{b##*/}} /dev/disk/by-id/virtio-$(cat $b/serial); done\n\
         echo ROOT_LABEL=$(dd if=/dev/disk/by-id/virtio-root bs=1 skip=1144 count=16 2>/dev/null | tr -d '\\0')\n\
         echo NPROC=$(nproc)\n\
         echo TPM_VERSION=$(cat /sys/class/tpm/tpm0/tpm_version_major)\n\
         echo PARAMS=$(grep -o 'nixvmm.door=[a-z]*' /proc/cmdline)\n\
         echo from-the-guest > /xchg/result && echo shared-from-the-guest > /shared/result\n\
         umount /xchg /shared\n\
         echo SERVING\n\
         echo from-the-guest | timeout 60 nc -l -p 80\n\
         echo SERVED=yes"
    ))
}

/// qemu-vm.nix's run script runs unchanged with nixvmm as its QEMU (`qemu-kvm` on PATH is
/// nixvmm), the environment set as the test driver sets it.
fn run_nixos_vm_with_nixvmm(fs: &str) {
    let dir = host().tempdir().unwrap();
    let store = dir.path().join("store");
    let toplevel = store.join("toplevel");
    let shared = dir.path().join("shared");
    for d in [&toplevel, &shared] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(store.join("greeting"), "hello-from-the-store\n").unwrap();
    let mut modules = NET_MODULES.to_vec();
    modules.extend(["virtio_blk", "9pnet_virtio", "9p", "virtiofs"]);
    let initrd = kit().initrd(&modules, &nixos_like_guest(fs)).unwrap();
    std::os::unix::fs::symlink(host().kernel(), toplevel.join("kernel")).unwrap();
    std::os::unix::fs::symlink(&initrd, toplevel.join("initrd")).unwrap();
    std::fs::write(toplevel.join("kernel-params"), "panic=-1 loglevel=4").unwrap();
    std::fs::write(dir.path().join("run-nixos-vm"), RUN_NIXOS_VM).unwrap();
    let virtiofsd = format!("{} device fs", path(&nixvmm_bin()));
    let job = format!(
        "set -u\n\
         bin=$(mktemp -d) && ln -s {nixvmm} $bin/qemu-kvm\n\
         state=$(mktemp -d) && cd $state\n\
         export PATH=$bin:$PATH:/usr/sbin:/sbin STORE={store} TOPLEVEL={toplevel} SHARES={fs} VIRTIOFSD={virtiofsd}\n\
         export TMPDIR=$(mktemp -d) USE_TMPDIR=1 SHARED_DIR={shared}\n\
         tpm=$(mktemp -d)\n\
         swtpm socket --tpmstate dir=$tpm --ctrl type=unixio,path=$tpm/socket --tpm2 --daemon\n\
         for i in $(seq 100); do [ -S $tpm/socket ] && break; sleep 0.1; done\n\
         # virtualisation.tpm.enable's options, on the socket of the swtpm it started.\n\
         export QEMU_OPTS=\"-nographic -smp 2 -chardev socket,id=chrtpm,path=$tpm/socket \
           -tpmdev emulator,id=tpm_dev_0,chardev=chrtpm -device tpm-tis,tpmdev=tpm_dev_0\"\n\
         export QEMU_KERNEL_PARAMS=nixvmm.door=yes\n\
         export QEMU_NET_OPTS=hostfwd=tcp:127.0.0.1:8022-:80\n\
         log=$state/console\n\
         bash {script} -no-reboot > $log 2>&1 & vm=$!\n\
         for i in $(seq 600); do grep -q SERVING $log && break; kill -0 $vm 2>/dev/null || break; sleep 0.2; done\n\
         {HOSTFWD_CHECK}\n\
         wait $vm; rc=$?\n\
         cat $log\n\
         echo XCHG=$(cat $TMPDIR/xchg/result)\n\
         echo DISK=$(qemu-img info --output=json $state/nixos.qcow2 | grep -o '\"format\": \"[a-z0-9]*\"')\n\
         exit $rc",
        nixvmm = path(&nixvmm_bin()),
        store = path(&store),
        toplevel = path(&toplevel),
        shared = path(&shared),
        virtiofsd = shell_quote(&virtiofsd),
        script = path(&dir.path().join("run-nixos-vm")),
    );
    let log = host()
        .run(
            &format!(
                "exec unshare -n bash -c {}",
                shell_quote(&format!("ip link set lo up\n{job}"))
            ),
            BOOT_LIMIT,
        )
        .unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert_eq!(
        log.value_of("STORE"),
        Some("hello-from-the-store"),
        "{tail}"
    );
    assert_eq!(log.value_of("ROOT_LABEL"), Some("nixos"), "{tail}");
    assert_eq!(log.value_of("NPROC"), Some("2"), "QEMU_OPTS:\n{tail}");
    assert_eq!(log.value_of("TPM_VERSION"), Some("2"), "the TPM:\n{tail}");
    assert_eq!(log.value_of("PARAMS"), Some("nixvmm.door=yes"), "{tail}");
    assert_eq!(log.value_of("DHCP_IP"), Some("10.0.2.15"), "{tail}");
    assert_eq!(log.value_of("HOSTFWD"), Some("from-the-guest"), "{tail}");
    assert_eq!(log.value_of("XCHG"), Some("from-the-guest"), "{tail}");
    assert_eq!(
        log.value_of("DISK"),
        Some("\"format\": \"qcow2\""),
        "{tail}"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("result")).unwrap(),
        "shared-from-the-guest\n"
    );
}

#[test]
fn tier4_qemu_vm_nix_run_script_with_nixvmm_as_qemu_over_9p() {
    run_nixos_vm_with_nixvmm("9p");
}

#[test]
fn tier4_qemu_vm_nix_run_script_with_nixvmm_as_qemu_over_virtiofs() {
    run_nixos_vm_with_nixvmm("virtiofs");
}

/// The runInLinuxVM line with nixvmm as its QEMU and `virtiofsd` (a command) serving store
/// and xchg: the builder's output and its status (3) come back through xchg.
fn run_in_linux_vm_with_nixvmm(virtiofsd: &str) {
    let dir = host().tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::write(
        store.join("builder"),
        "echo built-in-the-vm > /fs/tmp/xchg/result\nexit 3\n",
    )
    .unwrap();
    let initrd = kit()
        .initrd(&["virtio_pci", "virtiofs"], IN_VM_STAGE_1)
        .unwrap();
    let job = format!(
        "bin=$(mktemp -d) && ln -s {nixvmm} $bin/qemu-kvm\n\
         export PATH=$bin:$PATH STORE={store} KERNEL={kernel} INITRD={initrd} VIRTIOFSD={virtiofsd}\n\
         export QEMU_OPTS='-m 512 -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem'\n\
         cd $(mktemp -d)\n\
         {VM_RUN}",
        nixvmm = path(&nixvmm_bin()),
        store = path(&store),
        kernel = path(host().kernel()),
        initrd = path(&initrd),
        virtiofsd = shell_quote(virtiofsd),
    );
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert_eq!(
        log.value_of("COMMAND"),
        Some("/nix/store/builder"),
        "{tail}"
    );
    assert_eq!(log.value_of("IN_VM_EXIT"), Some("3"), "{tail}");
    assert_eq!(log.value_of("RESULT"), Some("built-in-the-vm"), "{tail}");
    assert!(log.exit_ok, "vm-run ends with status 0:\n{tail}");
}

#[test]
fn tier4_run_in_linux_vm_line_with_nixvmm_as_qemu_and_nixvmm_device_fs() {
    run_in_linux_vm_with_nixvmm(&format!("{} device fs", path(&nixvmm_bin())));
}

#[test]
fn tier4_run_in_linux_vm_line_with_nixvmm_as_qemu_and_virtiofsd() {
    run_in_linux_vm_with_nixvmm(path(&virtiofsd()));
}

/// The NixOS test driver's side of a machine, in short: it listens on STATE/monitor and
/// STATE/shell before the VMM starts (the VMM connects to both as a client), reads HMP
/// answers up to the `(qemu) ` prompt, waits for the backdoor's greeting on the shell, runs commands the way the driver frames them (output in base64 on one line,
/// then the status), and reads the console log on the VMM's stdout. Prints KEY=value lines.
const TEST_DRIVER: &str = r#"
import base64, json, os, shlex, socket, subprocess, sys, time
state, command = sys.argv[1], sys.argv[2:]
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(state, "shell"))
listener.listen(1)
monitor_listener = socket.socket(socket.AF_UNIX)
monitor_listener.bind(os.path.join(state, "monitor"))
monitor_listener.listen(1)
vm = subprocess.Popen(command, stdin=subprocess.DEVNULL)
def fail(why):
    vm.kill()
    raise SystemExit(why)
def drive():
    listener.settimeout(120)
    monitor_listener.settimeout(120)
    try:
        monitor, _ = monitor_listener.accept()
        shell, _ = listener.accept()
    except OSError as e:
        fail("nixvmm never connected to the monitor and shell sockets: %s" % e)
    shell.settimeout(120)
    monitor.settimeout(120)
    def hmp(command=None):
        if command is not None:
            monitor.sendall((command + "\n").encode())
        reply = b""
        while not reply.endswith(b"(qemu) "):
            chunk = monitor.recv(4096)
            if not chunk:
                fail("the monitor connection closed")
            reply += chunk
        return reply.decode()[: -len("(qemu) ")].strip()
    print("BANNER=%s" % hmp().split(" - ")[0].replace(" ", "_"), flush=True)
    # As the driver does: QMP right after both accepts, no retry.
    qmp = socket.socket(socket.AF_UNIX)
    qmp.connect(os.path.join(state, "qmp"))
    qmp.settimeout(120)
    qmp_file = qmp.makefile("rb")
    def qmp_read():
        text = qmp_file.readline()
        if not text:
            fail("the QMP connection closed")
        return json.loads(text)
    print("QMP_GREETING=%s" % ("QMP" in qmp_read()), flush=True)
    qmp.sendall(b'{"execute": "qmp_capabilities"}\n')
    print("QMP_CAPABILITIES=%s" % qmp_read(), flush=True)
    buffer = b""
    def line():
        nonlocal buffer
        while b"\n" not in buffer:
            chunk = shell.recv(65536)
            if not chunk:
                fail("the shell connection closed")
            buffer += chunk
        text, buffer = buffer.split(b"\n", 1)
        return text.decode()
    while "Spawning backdoor root shell..." not in line():
        pass
    # As the driver's Machine.execute(): bash under timeout, output as one base64 line,
    # then the status from bash's PIPESTATUS.
    def succeed(cmd, timeout=900):
        command = "set -euo pipefail; %s" % cmd
        shell.sendall(("timeout %d bash -c %s | (base64 -w 0; echo)\n" % (timeout, shlex.quote(command))).encode())
        reply = line()
        try:
            out = base64.b64decode(reply).decode()
        except ValueError:
            fail("not base64 from the shell: %r" % reply)
        shell.sendall(b"echo ${PIPESTATUS[0]}\n")
        return out, int(line())
    out, rc = succeed("echo $((6 * 7))")
    print("ANSWER=%s RC=%d" % (out.strip(), rc), flush=True)
    out, rc = succeed("echo to the console > /dev/ttyS0; exit 3")
    print("FAILING_RC=%d" % rc, flush=True)
    out, rc = succeed("seq 1 40000")
    lines = out.split()
    print("BIG_LINES=%d LAST=%s" % (len(lines), lines[-1]), flush=True)
    print("HMP_RUNNING=%s" % hmp("info status").replace(" ", "_"), flush=True)
    hmp("stop")
    print("HMP_STOPPED=%s" % hmp("info status").replace(" ", "_"), flush=True)
    hmp("cont")
    print("QMP_EVENTS=%s,%s" % (qmp_read()["event"], qmp_read()["event"]), flush=True)
    out, rc = succeed("echo alive")
    print("AFTER_CONT=%s" % out.strip(), flush=True)
    # forward_port(): a guest server reached through a forward added over HMP.
    succeed("echo through-the-forward | nc -l -p 80 > /dev/null &")
    print("HOSTFWD_ADD=[%s]" % hmp("hostfwd_add tcp:127.0.0.1:8022-:80"), flush=True)
    got = b""
    for attempt in range(50):
        try:
            peer = socket.create_connection(("127.0.0.1", 8022), timeout=10)
            got = peer.recv(100)
            peer.close()
        except OSError:
            got = b""
        if got:
            break
        time.sleep(0.2)
    print("FORWARDED=%s" % got.decode().strip(), flush=True)
    # block(): the link goes down, as the guest sees it.
    # The guest takes the change from a config interrupt and a work item, a moment after
    # HMP answers; a NixOS test waits for it (wait_until_succeeds), and so does this one.
    def carrier_becomes(want):
        for attempt in range(100):
            out, rc = succeed("cat /sys/class/net/eth0/carrier")
            if out.strip() == want:
                break
            time.sleep(0.1)
        return out.strip()
    hmp("set_link virtio-net-pci.0 off")
    print("CARRIER_AFTER_BLOCK=%s" % carrier_becomes("0"), flush=True)
    hmp("set_link virtio-net-pci.0 on")
    print("CARRIER_AFTER_UNBLOCK=%s" % carrier_becomes("1"), flush=True)
    print("HMP_UNKNOWN=%s" % hmp("frobnicate").replace(" ", "_"), flush=True)
    # shutdown(): NixOS's poweroff goes through systemd, which ends with what the kit's
    # init-less guest does at once.
    shell.sendall(b"poweroff -f\n")
    shutdown = qmp_read()
    print("QMP_SHUTDOWN=%s/%s/%s" % (shutdown["event"], shutdown["data"]["guest"], shutdown["data"]["reason"]), flush=True)
    print("VM_RC=%d" % vm.wait(timeout=120), flush=True)

try:
    drive()
except Exception as e:
    fail("the driver failed: %r" % e)
"#;

/// The backdoor as NixOS starts it on /dev/hvc0 (`stty raw -echo`, the greeting, bash
/// reading commands from the port, its errors on ttyS0), with the host's bash in the initrd.
/// hvc resets its settings at the last close, so the port stays open throughout, as
/// systemd's StandardInput=tty keeps it.
const BACKDOOR: &str = "for i in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done\n\
    echo BASH=$(bash -c 'echo ${BASH_VERSINFO[0]}')\n\
    (stty raw -echo; echo 'Spawning backdoor root shell...'; PS1= bash --norc /dev/hvc0) \
    < /dev/hvc0 > /dev/hvc0 2> /dev/ttyS0\n\
    echo BACKDOOR_ENDED";

#[test]
fn tier4_a_test_driver_uses_the_backdoor_shell_over_virtconsole_and_the_monitor() {
    let bash = nixvmm_tests::linux_kit::host_programs(&["/bin/bash"]).unwrap();
    let files: Vec<(&str, u32, &[u8])> = bash
        .iter()
        .map(|(path, mode, data)| (path.as_str(), *mode, data.as_slice()))
        .collect();
    let initrd = kit()
        .initrd_with_files(
            &["virtio_pci", "virtio_console", "virtio_net"],
            &user_net_guest_script(BACKDOOR),
            &files,
        )
        .unwrap();
    let job = format!(
        "ip link set lo up\n\
         state=$(mktemp -d) && cd $state\n\
         python3 -c {driver} $state {nixvmm} qemu -m 512 -nographic -no-reboot \
         -netdev user,id=user.0 -net nic,netdev=user.0,model=virtio \
         -kernel {kernel} -initrd {initrd} -append 'console=ttyS0 panic=-1' \
         -qmp unix:$state/qmp,server=on,wait=off -monitor unix:$state/monitor \
         -chardev socket,id=shell,path=$state/shell -device virtio-serial \
         -device virtconsole,chardev=shell -device virtio-rng-pci -serial stdio",
        driver = shell_quote(TEST_DRIVER),
        nixvmm = path(&nixvmm_bin()),
        kernel = path(host().kernel()),
        initrd = path(&initrd),
    );
    let job = format!("exec unshare -n bash -c {}", shell_quote(&job));
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert!(log.has("ANSWER=42 RC=0"), "{tail}");
    assert_eq!(log.value_of("HOSTFWD_ADD"), Some("[]"), "{tail}");
    assert_eq!(
        log.value_of("FORWARDED"),
        Some("through-the-forward"),
        "{tail}"
    );
    assert_eq!(log.value_of("CARRIER_AFTER_BLOCK"), Some("0"), "{tail}");
    assert_eq!(log.value_of("CARRIER_AFTER_UNBLOCK"), Some("1"), "{tail}");
    assert_eq!(log.value_of("FAILING_RC"), Some("3"), "{tail}");
    assert!(
        log.has("to the console"),
        "serial output seen by the driver:\n{tail}"
    );
    assert!(
        log.has("BIG_LINES=40000 LAST=40000"),
        "no output lost:\n{tail}"
    );
    assert_eq!(
        log.value_of("BANNER"),
        Some("QEMU_9.2.0_monitor_(nixvmm)"),
        "{tail}"
    );
    assert_eq!(log.value_of("QMP_GREETING"), Some("True"), "{tail}");
    assert_eq!(
        log.value_of("QMP_CAPABILITIES"),
        Some("{'return': {}}"),
        "{tail}"
    );
    assert_eq!(log.value_of("QMP_EVENTS"), Some("STOP,RESUME"), "{tail}");
    assert_eq!(
        log.value_of("QMP_SHUTDOWN"),
        Some("SHUTDOWN/True/guest-shutdown"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("HMP_RUNNING"),
        Some("VM_status:_running"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("HMP_STOPPED"),
        Some("VM_status:_paused"),
        "{tail}"
    );
    assert_eq!(log.value_of("AFTER_CONT"), Some("alive"), "{tail}");
    assert_eq!(
        log.value_of("HMP_UNKNOWN"),
        Some("unknown_command:_'frobnicate'"),
        "{tail}"
    );
    assert!(
        !log.has("BACKDOOR_ENDED"),
        "poweroff ended the guest: {tail}"
    );
    assert_eq!(
        log.value_of("BASH"),
        Some("5"),
        "the backdoor is bash: {tail}"
    );
    assert_eq!(log.value_of("VM_RC"), Some("0"), "{tail}");
}

/// A monitor client that sends one HMP command (its first argument after the state folder)
/// once the guest prints a line starting with WAITING-FOR, as the driver's `reboot()` sends
/// `sendkey ctrl-alt-delete`.
const HMP_ONCE_READY: &str = r#"
import os, socket, subprocess, sys
state, hmp_command, command = sys.argv[1], sys.argv[2], sys.argv[3:]
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(state, "monitor"))
listener.listen(1)
vm = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
listener.settimeout(120)
monitor, _ = listener.accept()
for line in vm.stdout:
    text = line.decode(errors="replace").rstrip()
    print(text, flush=True)
    if text.startswith("WAITING-FOR"):
        monitor.sendall(hmp_command.encode() + b"\n")
print("VM_RC=%d" % vm.wait(timeout=120), flush=True)
"#;

/// Boots `guest` with a monitor socket that [`HMP_ONCE_READY`] listens on and sends
/// `hmp_command` to once the guest prints WAITING-FOR….
fn boot_sending_hmp_when_ready(mut guest: Guest, hmp_command: &str) -> BootLog {
    guest.args.extend(args(&["--monitor", "MONITOR"]));
    let command = guest.command().replace("MONITOR", "$state/monitor");
    let job = format!(
        "state=$(mktemp -d)\npython3 -c {} $state {} {command}",
        shell_quote(HMP_ONCE_READY),
        shell_quote(hmp_command)
    );
    host().run(&job, BOOT_LIMIT).unwrap()
}

#[test]
fn tier4_sendkey_ctrl_alt_delete_reaches_the_guests_ps2_keyboard_and_reboots_it() {
    let script = "dmesg | grep -i -E 'i8042|serio|input|8042|keyboard'\n\
                  echo KEYBOARD=$(grep -c 'AT Translated Set 2 keyboard' /proc/bus/input/devices)\n\
                  echo WAITING-FOR-CTRL-ALT-DELETE\n\
                  sleep 120\n\
                  echo NO_REBOOT_CAME";
    let guest = Guest {
        script,
        ..Guest::default()
    };
    let log = boot_sending_hmp_when_ready(guest, "sendkey ctrl-alt-delete");
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert_eq!(log.value_of("KEYBOARD"), Some("1"), "{tail}");
    assert!(log.has("reboot: Restarting system"), "{tail}");
    assert!(!log.has("NO_REBOOT_CAME"), "{tail}");
    assert_eq!(
        log.value_of("VM_RC"),
        Some("0"),
        "--no-reboot ends nixvmm: {tail}"
    );
}

#[test]
fn tier4_system_powerdown_presses_the_acpi_power_button_the_guest_sees() {
    // The reader is there before the guest says it waits: evdev gives events only to readers.
    let script = "dev=$(awk '/Name=\"Power Button\"/{p=1} p && /Handlers/{for (i = 1; i <= NF; i++) if ($i ~ /^event/) print $i; exit}' /proc/bus/input/devices)\n\
                  echo POWER_BUTTON=$dev\n\
                  timeout 60 dd if=/dev/input/$dev of=/tmp/event bs=24 count=1 2>/dev/null & reader=$!\n\
                  sleep 1\n\
                  echo WAITING-FOR-THE-POWER-BUTTON\n\
                  wait $reader\n\
                  echo GED_INTERRUPTS=$(awk '/ACPI:Ged/{print $2}' /proc/interrupts)\n\
                  echo KEY_CODE=$(od -An -tu2 -j18 -N2 /tmp/event | tr -d ' ')\n\
                  echo KEY_VALUE=$(od -An -tu4 -j20 -N4 /tmp/event | tr -d ' ')";
    let guest = Guest {
        modules: &["button", "evdev"],
        script,
        ..Guest::default()
    };
    let log = boot_sending_hmp_when_ready(guest, "system_powerdown");
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert!(
        log.value_of("POWER_BUTTON")
            .is_some_and(|d| d.starts_with("event")),
        "{tail}"
    );
    assert_eq!(log.value_of("GED_INTERRUPTS"), Some("1"), "{tail}");
    assert_eq!(log.value_of("KEY_CODE"), Some("116"), "KEY_POWER: {tail}");
    assert_eq!(log.value_of("KEY_VALUE"), Some("1"), "pressed: {tail}");
}

/// Console ports on QEMU's pipe and pty chardevs, with Linux's virtio_console: hvc0 on the
/// FIFOs PATH.in/PATH.out, a named port on a pty nixvmm names on stderr.
#[test]
fn tier4_console_ports_on_a_pipe_and_a_pty() {
    // No udev here: the named port is found by its name in sysfs (/dev/vportNpM).
    let script = "for i in $(seq 100); do [ -c /dev/hvc0 ] && break; sleep 0.1; done\n\
                  for i in $(seq 100); do\n\
                    for d in /sys/class/virtio-ports/*; do\n\
                      [ \"$(cat $d/name 2>/dev/null)\" = tty0 ] && port=/dev/${d##*/}\n\
                    done\n\
                    [ -c \"$port\" ] && break; sleep 0.1\n\
                  done\n\
                  stty -F /dev/hvc0 raw -echo\n\
                  echo to-host-over-pipe > /dev/hvc0\n\
                  echo to-host-over-pty > $port\n\
                  exec 4< $port # open: Linux drops input to a closed port\n\
                  echo PORTS-READY\n\
                  read line < /dev/hvc0; echo \"GUEST_PIPE_GOT=$line\"\n\
                  read line <&4; echo \"GUEST_PTY_GOT=$line\"";
    let guest = Guest {
        modules: &["virtio_pci", "virtio_console"],
        script,
        args: args(&[
            "--port",
            "console=on,chardev=pipe,path=/tmp/p",
            "--port",
            "name=tty0,chardev=pty",
        ]),
        ..Guest::default()
    };
    let job = format!(
        "rm -f /tmp/p.in /tmp/p.out; mkfifo /tmp/p.in /tmp/p.out\n\
         {vm} > /tmp/console 2> /tmp/err &\n\
         vm=$!\n\
         timeout 60 head -n1 /tmp/p.out > /tmp/from-pipe &\n\
         for i in $(seq 1200); do grep -q PORTS-READY /tmp/console && break; sleep 0.1; done\n\
         pts=$(sed -n 's/^char device redirected to \\([^ ]*\\) .*/\\1/p' /tmp/err)\n\
         echo PTS=$pts\n\
         exec 3<>$pts; timeout 20 head -n1 <&3 > /tmp/from-pty\n\
         echo from-host-over-pipe > /tmp/p.in\n\
         echo from-host-over-pty >&3\n\
         timeout 60 tail --pid=$vm -f /dev/null; kill $vm 2>/dev/null; wait $vm; rc=$?\n\
         cat /tmp/console; cat /tmp/err\n\
         echo HOST_PIPE_GOT=$(cat /tmp/from-pipe)\n\
         echo HOST_PTY_GOT=$(cat /tmp/from-pty)\n\
         exit $rc",
        vm = guest.command(),
    );
    let log = host().run(&job, BOOT_LIMIT).unwrap();
    boots_and_powers_off(&log);
    let tail = log.tail();
    assert!(
        log.value_of("PTS")
            .is_some_and(|p| p.starts_with("/dev/pts/")),
        "{tail}"
    );
    assert_eq!(
        log.value_of("HOST_PIPE_GOT"),
        Some("to-host-over-pipe"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("HOST_PTY_GOT"),
        Some("to-host-over-pty"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("GUEST_PIPE_GOT"),
        Some("from-host-over-pipe"),
        "{tail}"
    );
    assert_eq!(
        log.value_of("GUEST_PTY_GOT"),
        Some("from-host-over-pty"),
        "{tail}"
    );
}

/// The driver's `crash()`: HMP `quit` ends nixvmm at once (status 0) while the guest runs.
#[test]
fn tier4_hmp_quit_ends_a_running_guest_as_the_drivers_crash_does() {
    let script = "echo WAITING-FOR-QUIT\n\
                  sleep 120\n\
                  echo STILL_RUNNING";
    let guest = Guest {
        script,
        ..Guest::default()
    };
    let log = boot_sending_hmp_when_ready(guest, "quit");
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert!(log.has("WAITING-FOR-QUIT"), "{tail}");
    assert!(!log.has("STILL_RUNNING"), "{tail}");
    assert!(
        !log.has("reboot: Power down"),
        "quit is no guest shutdown:\n{tail}"
    );
    // The guest was still sleeping: nixvmm ended without waiting for it.
    assert_eq!(log.value_of("VM_RC"), Some("0"), "{tail}");
}

/// Raw TPM 2.0 commands for the TPM test, as hex for the guest's `tpm-raw`.
mod tpm_commands {
    /// TPM2_GetRandom(8).
    pub const GET_RANDOM: &str = "80010000000c0000017b0008";
    /// TPM2_NV_ReadPublic of index 0x01500001.
    pub const NV_READ_PUBLIC: &str = "80010000000e0000016901500001";
    /// An empty password session (TPM_RS_PW), with its size.
    const PASSWORD_SESSION: &str = "00000009400000090000000000";
    /// The digest extended into PCR 16: 32 bytes of 0xaa.
    pub const DIGEST: [u8; 32] = [0xaa; 32];

    /// TPM2_PCR_Extend of PCR 16 with [`DIGEST`] in the SHA-256 bank.
    pub fn pcr_extend() -> String {
        let digest: String = DIGEST.iter().map(|b| format!("{b:02x}")).collect();
        format!("8002000000410000018200000010{PASSWORD_SESSION}00000001000b{digest}")
    }

    /// TPM2_NV_DefineSpace of 8-byte owner index 0x01500001 (owner/auth read and write).
    pub fn nv_define() -> String {
        format!(
            "80020000002d0000012a40000001{PASSWORD_SESSION}0000000e01500001000b0206000600000008"
        )
    }
}

/// A guest line that runs one raw TPM command and prints `NAME_RC=<response code>`.
fn tpm_line(name: &str, hex: &str) -> String {
    format!("echo {name}_RC=$(tpm-raw /dev/tpmrm0 {hex} | sed -n 's/TPM-RC=//p')\n")
}

#[test]
fn tier4_tpm_through_swtpm_random_pcrs_persistent_state_and_a_dying_swtpm() {
    use tpm_commands::*;
    let tool = nixvmm_tests::linux_kit::guest_program("tpm_raw").unwrap();
    let files = [("bin/tpm-raw", 0o755, tool.as_slice())];
    // Boot 1: Linux's tpm_tis binds through ACPI; random bytes through the TPM's hwrng, a
    // PCR extended and read back through sysfs; an NV index defined.
    let first = format!(
        "echo TPM_VERSION=$(cat /sys/class/tpm/tpm0/tpm_version_major)\n\
         [ -c /dev/tpm0 ] && [ -c /dev/tpmrm0 ] && echo TPM_DEVICES=yes\n\
         echo HWRNG=$(cat /sys/class/misc/hw_random/rng_current)\n\
         echo RANDOM_BYTES=$(head -c 32 /dev/hwrng | wc -c)\n\
         {random}{extend}\
         echo PCR16=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)\n\
         {nv_before}{define}",
        random = tpm_line("RANDOM", GET_RANDOM),
        extend = tpm_line("EXTEND", &pcr_extend()),
        nv_before = tpm_line("NV_BEFORE", NV_READ_PUBLIC),
        define = tpm_line("DEFINE", &nv_define()),
    );
    // Boot 2 (a new swtpm on the same state, in the layout with its own data socket): the
    // index is still there, PCR 16 is reset.
    let second = format!(
        "{nv_after}echo PCR16_AFTER=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)\n",
        nv_after = tpm_line("NV_AFTER", NV_READ_PUBLIC),
    );
    // Boot 3: swtpm is killed while the guest runs; its next command fails, nixvmm goes on,
    // and the guest reboots (a 9p share tells the boots apart): the TPM cannot power on,
    // the guest boots without a working TPM, and nixvmm still says it only once.
    let third = format!(
        "mount -t 9p -o trans=virtio,version=9p2000.L state /mnt || exit 1\n\
         if [ -e /mnt/booted ]; then\n\
           echo REBOOTED_TPM=$([ -c /dev/tpmrm0 ] && echo bound || echo unbound)\n\
           echo REBOOTED=alive; umount /mnt; exit 0\n\
         fi\n\
         touch /mnt/booted; sync\n\
         echo KILL-SWTPM-NOW\n\
         sleep 5\n\
         {dead}echo AFTER_DEATH=alive\n\
         umount /mnt; reboot -f\n",
        dead = tpm_line("DEAD", GET_RANDOM),
    );
    let guest = |script: &str, socket: &str| {
        Guest {
            modules: &[],
            script,
            files: &files,
            args: args(&["--tpm", &format!("socket={socket}")]),
            ..Guest::default()
        }
        .command()
    };
    let d = "/tmp/nixvmm-tier4-tpm";
    let rebooting = Guest {
        modules: &["virtio_pci", "9pnet_virtio", "9p"],
        script: &third,
        files: &files,
        args: args(&[
            "--tpm",
            &format!("socket={d}/socket"),
            "--share",
            &format!("tag=state,path={d}/share"),
        ]),
        no_reboot: false,
        ..Guest::default()
    }
    .command();
    // `boot START VM…` starts swtpm (swtpm ends when nixvmm shuts the TPM down) and the VM;
    // a VM reset by nested SVM before /init (see `tier4::reset_before_init`) boots once more.
    let job = format!(
        "set -u\n\
         rm -rf {d}; mkdir -p {d}/state {d}/share\n\
         wait_for() {{ for i in $(seq 100); do [ -S $1 ] && break; sleep 0.1; done; }}\n\
         control_only() {{\n\
           rm -f {d}/socket\n\
           swtpm socket --tpmstate dir={d}/state --ctrl type=unixio,path={d}/socket --tpm2 & swtpm=$!\n\
           wait_for {d}/socket\n\
         }}\n\
         own_data_socket() {{\n\
           rm -f {d}/data {d}/data.ctrl\n\
           swtpm socket --tpmstate dir={d}/state --server type=unixio,path={d}/data \
             --ctrl type=unixio,path={d}/data.ctrl --flags not-need-init --tpm2 & swtpm=$!\n\
           wait_for {d}/data.ctrl\n\
         }}\n\
         boot() {{\n\
           start=$1; shift\n\
           for try in 1 2; do\n\
             $start\n\
             \"$@\" > {d}/console 2>&1 & vm=$!\n\
             if [ -n \"${{kill_swtpm:-}}\" ]; then\n\
               for i in $(seq 1200); do grep -q KILL-SWTPM-NOW {d}/console && break; \
                 kill -0 $vm 2>/dev/null || break; sleep 0.1; done\n\
               kill -9 $swtpm\n\
             fi\n\
             wait $vm; rc=$?\n\
             kill $swtpm 2>/dev/null; wait $swtpm\n\
             {reset} || break\n\
             echo 'the guest triple-faulted before /init (nested SVM); it boots once more'\n\
           done\n\
           cat {d}/console\n\
           return $rc\n\
         }}\n\
         boot control_only {one}; rc1=$?\n\
         boot own_data_socket {two}; rc2=$?\n\
         kill_swtpm=yes boot control_only {three}; rc3=$?\n\
         echo RCS=$rc1,$rc2,$rc3\n\
         [ $rc1 = 0 ] && [ $rc2 = 0 ] && [ $rc3 = 0 ]",
        one = guest(&first, &format!("{d}/socket")),
        two = guest(&second, &format!("{d}/data.ctrl")),
        three = rebooting,
        reset = reset_before_init_in(&format!("{d}/console")),
    );
    let log = host().run(&job, BOOT_LIMIT * 2).unwrap();
    let tail = log.tail();
    assert!(!log.timed_out, "timed out:\n{tail}");
    assert_eq!(log.value_of("TPM_VERSION"), Some("2"), "{tail}");
    assert_eq!(log.value_of("TPM_DEVICES"), Some("yes"), "{tail}");
    assert_eq!(log.value_of("HWRNG"), Some("tpm-rng-0"), "{tail}");
    assert_eq!(log.value_of("RANDOM_BYTES"), Some("32"), "{tail}");
    assert_eq!(log.value_of("RANDOM_RC"), Some("00000000"), "{tail}");
    assert_eq!(log.value_of("EXTEND_RC"), Some("00000000"), "{tail}");
    let mut extended = vec![0u8; 32];
    extended.extend_from_slice(&DIGEST);
    let expected = sha256(&extended).to_uppercase();
    assert_eq!(log.value_of("PCR16"), Some(expected.as_str()), "{tail}");
    assert_eq!(
        log.value_of("NV_BEFORE_RC"),
        Some("0000018b"),
        "TPM_RC_HANDLE:\n{tail}"
    );
    assert_eq!(log.value_of("DEFINE_RC"), Some("00000000"), "{tail}");
    assert_eq!(log.value_of("NV_AFTER_RC"), Some("00000000"), "{tail}");
    assert_eq!(
        log.value_of("PCR16_AFTER"),
        Some("0".repeat(64).as_str()),
        "{tail}"
    );
    assert_eq!(
        log.value_of("DEAD_RC"),
        Some("00000101"),
        "TPM_RC_FAILURE:\n{tail}"
    );
    assert_eq!(log.value_of("AFTER_DEATH"), Some("alive"), "{tail}");
    assert_eq!(log.value_of("REBOOTED"), Some("alive"), "{tail}");
    // Linux's tpm_tis gives up on a TPM whose self test fails (TPM_RC_FAILURE).
    assert_eq!(log.value_of("REBOOTED_TPM"), Some("unbound"), "{tail}");
    let said = log
        .console
        .matches("the guest's TPM commands fail from now on")
        .count();
    assert_eq!(said, 1, "said once:\n{tail}");
    let tpm_lines = log.console.matches("TPM: --tpm socket=").count();
    assert_eq!(
        tpm_lines, 1,
        "nothing more said, at reboot or exit:\n{tail}"
    );
    assert_eq!(log.value_of("RCS"), Some("0,0,0"), "{tail}");
}

/// A `KEY=name:value,name:value,…` line of a disk test's job: the text and its fields.
fn result_fields<'a>(
    log: &'a BootLog,
    key: &str,
) -> (&'a str, std::collections::HashMap<&'a str, &'a str>) {
    let result = log
        .value_of(key)
        .unwrap_or_else(|| panic!("no {key}:\n{}", log.tail()));
    let fields = result
        .split(',')
        .filter_map(|f| f.split_once(':'))
        .collect();
    (result, fields)
}

/// Crash safety with Linux's own virtio-blk driver: the guest writes a numbered 512-byte
/// record into each 64 KiB slot of /dev/vda, each followed by an fsync (a FLUSH request), and
/// says which it flushed; nixvmm is killed with SIGKILL after a few, several dozen or many
/// flushes, on a qcow2 image alone and over a backing file. `qemu-img check` must accept the
/// image (leaked clusters at most) and every flushed record must read back.
#[test]
fn tier4_sigkill_during_flushed_writes_leaves_a_clean_qcow2_with_every_flushed_write() {
    let guest = Guest {
        modules: &["virtio_pci", "virtio_blk"],
        script: "i=1\n\
                 while [ $i -lt 1000 ]; do\n\
                 printf 'slot-%06d' $i | dd of=/dev/vda bs=512 seek=$((i * 128)) conv=sync,fsync 2>/dev/null || exit 1\n\
                 echo FLUSHED=$i\n\
                 i=$((i + 1))\n\
                 done",
        args: args(&["--disk", "path=disk.qcow2"]),
        ..Guest::default()
    };
    let command = guest.command();
    let reset = reset_before_init_in("out");
    // One kill: the image is made (over base.qcow2 when $2 is 'backed'), nixvmm runs until the
    // guest flushed $1 records (a guest reset before /init by nested SVM boots once more),
    // and is killed; then the image is checked and read back record by record.
    let variant = format!(
        "variant() {{\n\
         rm -f disk.qcow2 disk.raw out\n\
         if [ \"$2\" = backed ]; then qemu-img create -q -f qcow2 -F qcow2 -b base.qcow2 disk.qcow2; \
         else qemu-img create -q -f qcow2 disk.qcow2 64M; fi\n\
         for attempt in 1 2; do\n\
         {command} > out 2>&1 &\n\
         pid=$!\n\
         for t in $(seq 1800); do\n\
         [ \"$(grep -ao 'FLUSHED=[0-9]*' out | wc -l)\" -ge \"$1\" ] && break\n\
         kill -0 $pid 2>/dev/null || break\n\
         sleep 0.1\n\
         done\n\
         kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null\n\
         {reset} || break\n\
         done\n\
         last=$(grep -ao 'FLUSHED=[0-9]*' out | tail -n 1 | cut -d= -f2)\n\
         qemu-img check -q disk.qcow2; rc=$?\n\
         qemu-img convert -O raw disk.qcow2 disk.raw\n\
         bad=0\n\
         for i in $(seq 1 ${{last:-0}}); do\n\
         got=$(dd if=disk.raw bs=512 skip=$((i * 128)) count=1 2>/dev/null | head -c 11)\n\
         [ \"$got\" = \"$(printf 'slot-%06d' $i)\" ] || bad=$((bad + 1))\n\
         done\n\
         base=$(dd if=disk.raw bs=512 skip=$((1020 * 128)) count=1 2>/dev/null | head -c 4)\n\
         echo \"RESULT_$1_$2=last:${{last:-none}},check:$rc,bad:$bad,unwritten:$base\"\n\
         [ -n \"$last\" ] || tail -n 20 out\n\
         }}\n"
    );
    // On L1's tmpfs: an fsync through the 9p work share would cost seconds.
    let job = format!(
        "cd \"$(mktemp -d)\"\n\
         qemu-img create -q -f qcow2 base.qcow2 64M\n\
         qemu-io -f qcow2 -c 'write -P 0x62 0 64M' base.qcow2 > /dev/null\n\
         {variant}\
         variant 3 alone\n\
         variant 40 alone\n\
         variant 100 alone\n\
         variant 40 backed\n"
    );
    let log = host().run(&job, BOOT_LIMIT * 6).unwrap();
    let tail = log.tail();
    for (flushes, image) in [(3, "alone"), (40, "alone"), (100, "alone"), (40, "backed")] {
        let key = format!("RESULT_{flushes}_{image}");
        let (result, fields) = result_fields(&log, &key);
        let last: u32 = fields["last"]
            .parse()
            .unwrap_or_else(|_| panic!("{key}: the guest flushed nothing: {result}\n{tail}"));
        assert!(last >= flushes, "{key}: killed after {last}: {result}");
        // 0: clean; 3: leaked clusters only.
        assert!(
            ["0", "3"].contains(&fields["check"]),
            "{key}: qemu-img check: {result}\n{tail}"
        );
        assert_eq!(
            fields["bad"], "0",
            "{key}: flushed records lost: {result}\n{tail}"
        );
        let unwritten = if image == "backed" { "bbbb" } else { "" };
        assert_eq!(
            fields["unwritten"], unwritten,
            "{key}: a slot never written: {result}"
        );
        println!("{key}={result}");
    }
}

/// A full host disk under the guest's writes (a 4 MiB tmpfs in L1 holding a 256 MiB qcow2
/// or sparse raw image): the guest's writes fail with I/O errors, as QEMU's `werror=report`
/// gives them, nixvmm goes on and ends with status 0 at the guest's poweroff, and the image
/// is undamaged: `qemu-img check` accepts the qcow2, and every write the guest flushed reads
/// back.
#[test]
fn tier4_a_full_host_disk_gives_the_guest_io_errors_and_no_damage() {
    let script = "i=1\n\
                  while [ $i -lt 1000 ]; do\n\
                  if printf 'slot-%06d' $i | dd of=/dev/vda bs=64k seek=$i conv=sync,fsync 2>/dev/null; \
                  then echo FLUSHED=$i; else echo FAILED_AT=$i; break; fi\n\
                  i=$((i + 1))\n\
                  done\n\
                  echo READ_BACK=$(dd if=/dev/vda bs=64k skip=1 count=1 2>/dev/null | head -c 11)";
    let command = |disk: &str| {
        Guest {
            modules: &["virtio_pci", "virtio_blk"],
            script,
            args: args(&["--disk", disk]),
            ..Guest::default()
        }
        .command()
    };
    let variant = format!(
        "vm_qcow2() {{ {qcow2}; }}\n\
         vm_raw() {{ {raw}; }}\n\
         variant() {{\n\
         rm -f full/disk.* out\n\
         if [ $1 = qcow2 ]; then qemu-img create -q -f qcow2 full/disk.qcow2 256M; \
           else truncate -s 256M full/disk.raw; fi\n\
         vm_$1 > out 2>&1; rc=$?\n\
         last=$(grep -ao 'FLUSHED=[0-9]*' out | tail -n 1 | cut -d= -f2)\n\
         failed=$(grep -ao 'FAILED_AT=[0-9]*' out | cut -d= -f2)\n\
         ioerrors=$(grep -c 'I/O error' out)\n\
         check=none\n\
         if [ $1 = qcow2 ]; then qemu-img check -q full/disk.qcow2; check=$?; \
           qemu-img convert -O raw full/disk.qcow2 copy.raw; else cp --sparse=always full/disk.raw copy.raw; fi\n\
         bad=0\n\
         for i in $(seq 1 ${{last:-0}}); do\n\
         got=$(dd if=copy.raw bs=64k skip=$i count=1 2>/dev/null | head -c 11)\n\
         [ \"$got\" = \"$(printf 'slot-%06d' $i)\" ] || bad=$((bad + 1))\n\
         done\n\
         rm -f copy.raw\n\
         echo \"RESULT_$1=last:${{last:-none}},failed:${{failed:-none}},ioerrors:$ioerrors,rc:$rc,check:$check,bad:$bad,read:$(grep -ao 'READ_BACK=[a-z0-9-]*' out | cut -d= -f2)\"\n\
         [ $rc = 0 ] || tail -n 30 out\n\
         }}\n",
        qcow2 = command("path=full/disk.qcow2"),
        raw = command("path=full/disk.raw,format=raw"),
    );
    let job = format!(
        "cd \"$(mktemp -d)\" && mkdir full && mount -t tmpfs -o size=4M none full || exit 1\n\
         {variant}\
         variant qcow2\n\
         variant raw\n\
         umount full"
    );
    let log = host().run(&job, BOOT_LIMIT * 3).unwrap();
    let tail = log.tail();
    for image in ["qcow2", "raw"] {
        let key = format!("RESULT_{image}");
        let (result, fields) = result_fields(&log, &key);
        println!("{key}={result}");
        let last: u32 = fields["last"]
            .parse()
            .unwrap_or_else(|_| panic!("{key}: nothing flushed: {result}\n{tail}"));
        let failed: u32 = fields["failed"]
            .parse()
            .unwrap_or_else(|_| panic!("{key}: no write failed: {result}\n{tail}"));
        // 4 MiB hold about 60 slots of 64 KiB, less the image's metadata.
        assert!((25..75).contains(&last), "{key}: {result}");
        assert_eq!(failed, last + 1, "{key}: {result}");
        assert_ne!(
            fields["ioerrors"], "0",
            "the guest saw I/O errors: {result}\n{tail}"
        );
        assert_eq!(
            fields["rc"], "0",
            "{key}: nixvmm's status: {result}\n{tail}"
        );
        assert_eq!(fields["read"], "slot-000001", "{key}: {result}");
        if image == "qcow2" {
            // 0: clean; 3: leaked clusters only.
            assert!(
                ["0", "3"].contains(&fields["check"]),
                "{key}: {result}\n{tail}"
            );
        }
        assert_eq!(
            fields["bad"], "0",
            "{key}: flushed records lost: {result}\n{tail}"
        );
    }
}
