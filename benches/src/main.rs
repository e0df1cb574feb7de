//! `nixvmm-bench boot`: boots the same guest under nixvmm and QEMU, N times each, and prints
//! medians of process start → first console output → marker → exit, and peak RSS, with
//! nixvmm/QEMU ratios, as a markdown table.

mod block;
mod fs;
mod guest;
mod guest_disk;
mod measure;
mod net;
mod report;
mod vm_build;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use measure::run_once;
use report::Row;

#[derive(Parser)]
#[command(name = "nixvmm-bench")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Boot time and memory overhead against QEMU.
    Boot(BootArgs),
    /// The block request path (device model on a mock queue) against qemu-io.
    Blk {
        /// Image size in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
    },
    /// A store-like tree read through virtio-fs by a Linux guest under QEMU: nixvmm device fs
    /// against virtiofsd.
    Fs {
        /// Store-like packages in the tree (8 files and a symlink each).
        #[arg(long, default_value_t = 500)]
        packages: usize,
        #[arg(long)]
        virtiofsd: Option<PathBuf>,
        #[arg(long)]
        nixvmm: Option<PathBuf>,
    },
    /// dd inside a Linux guest on a virtio disk, under nixvmm and QEMU (needs a kernel KVM
    /// runs at speed: --kernel, NIXVMM_TEST_KERNEL, or Debian's on a VMX/SVM host).
    BlkGuest {
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Seconds before a boot counts as hung.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long)]
        nixvmm: Option<PathBuf>,
    },
    /// TCP through the user-mode network inside a Linux guest: nixvmm --net user against
    /// QEMU -netdev user, same kernel, in the tier-4 L1 guest where this host needs it.
    Net {
        /// MiB sent each way.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
        /// Connections opened and closed.
        #[arg(long, default_value_t = 200)]
        connections: u32,
        /// Seconds each VMM's run may take.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long)]
        nixvmm: Option<PathBuf>,
    },
    /// A vmTools.runInLinuxVM round trip (nixpkgs' vm-run: virtiofsd per share, boot, run a
    /// builder, status through xchg, poweroff) with nixvmm as its QEMU, against QEMU.
    VmBuild {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds each vm-run may take.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// virtiofsd (default: the one scripts/setup installs, else from PATH).
        #[arg(long)]
        virtiofsd: Option<PathBuf>,
        #[arg(long)]
        nixvmm: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GuestKind {
    /// nixvmm's tiny benchmark guest: what the VMM itself costs.
    Tiny,
    /// A Linux kernel and initrd (--kernel, --initrd).
    Linux,
}

#[derive(clap::Args)]
struct BootArgs {
    #[arg(long, value_enum, default_value = "tiny")]
    guest: GuestKind,
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Seconds before a run counts as hung.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line (after `console=ttyS0 panic=-1`).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// The line the Linux guest prints when it is up.
    #[arg(long, default_value = nixvmm_tests::linux_kit::INIT_MARKER)]
    marker: String,
    #[arg(long, default_value = "512")]
    memory_mib: u32,
    /// nixvmm binary (default: beside this benchmark's binary).
    #[arg(long)]
    nixvmm: Option<PathBuf>,
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Measure in this process even where tier 4 would run nested (how the nested run itself
    /// is started inside L1).
    #[arg(long, hide = true)]
    here: bool,
}

/// What is booted: a kernel file, its initrd and command line, and the marker to wait for.
struct Guest {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    marker: String,
}

fn nixvmm_command(bin: &Path, guest: &Guest, memory_mib: u32) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "run",
        "--no-reboot",
        "--memory",
        &format!("{memory_mib}M"),
        "--kernel",
    ])
    .arg(&guest.kernel)
    .args(["--cmdline", &guest.cmdline]);
    if let Some(initrd) = &guest.initrd {
        cmd.arg("--initrd").arg(initrd);
    }
    cmd
}

fn qemu_command(
    bin: &Path,
    machine: &str,
    accel: &[&str],
    guest: &Guest,
    memory_mib: u32,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "-M",
        machine,
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ])
    .args([
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-m",
        &format!("{memory_mib}M"),
    ])
    .args(accel)
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel"])
    .arg(&guest.kernel)
    .args(["-append", &guest.cmdline]);
    if let Some(initrd) = &guest.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    cmd
}

/// Accelerator choices for QEMU, best first. This host's KVM may be PVM, where QEMU's
/// `-cpu host` fails and firmware runs emulated, so TCG is the fallback.
const QEMU_ACCELS: [(&str, &[&str]); 3] = [
    ("kvm, -cpu host", &["-accel", "kvm", "-cpu", "host"]),
    ("kvm", &["-accel", "kvm"]),
    ("tcg", &["-accel", "tcg"]),
];

/// Runs `command` `args.runs` times, watching for `marker`.
fn measure(
    args: &BootArgs,
    name: String,
    accel: &str,
    marker: &str,
    command: impl Fn() -> Command,
) -> Row {
    let timeout = Duration::from_secs(args.timeout);
    let mut samples = Vec::new();
    let mut failure = None;
    // One run first, not counted: caches warm (the page cache; nixvmm's kernel cache) as they
    // are for a user's second boot, and QEMU's rows are probed the same way.
    if let Err(e) = run_once(&mut command(), marker, timeout) {
        failure = Some(e);
    }
    for _ in 0..args.runs {
        if failure.is_some() {
            break;
        }
        match run_once(&mut command(), marker, timeout) {
            Ok(s) => samples.push(s),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    Row {
        name,
        accel: accel.into(),
        samples,
        failure,
    }
}

/// Measures a QEMU machine type with the first accelerator that boots the guest.
fn qemu_row(args: &BootArgs, machine: &str, guest: &Guest) -> Row {
    let name = format!("qemu -M {machine}");
    let probe_timeout = Duration::from_secs(args.timeout.min(30));
    for (accel_name, accel) in QEMU_ACCELS {
        let command = || qemu_command(&args.qemu, machine, accel, guest, args.memory_mib);
        match run_once(&mut command(), &guest.marker, probe_timeout) {
            Ok(s) if s.marker.is_some() => {
                return measure(args, name, accel_name, &guest.marker, command)
            }
            _ => eprintln!("nixvmm-bench: {name} with {accel_name}: no marker; trying the next"),
        }
    }
    Row {
        name,
        accel: "–".into(),
        samples: Vec::new(),
        failure: Some("did not boot with kvm or tcg".into()),
    }
}

fn default_nixvmm() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("nixvmm");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release -p vmm`, or pass --nixvmm",
            bin.display()
        ))
    }
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Bench::Boot(args) => boot(&args),
        Bench::Blk { size_mib } => block::run(size_mib),
        Bench::Fs {
            packages,
            virtiofsd,
            nixvmm,
        } => nixvmm
            .map_or_else(default_nixvmm, Ok)
            .and_then(|bin| fs::run(&bin, virtiofsd, packages)),
        Bench::BlkGuest {
            kernel,
            size_mib,
            timeout,
            nixvmm,
        } => nixvmm
            .map_or_else(default_nixvmm, Ok)
            .and_then(|bin| guest_disk::run(&bin, kernel, size_mib, Duration::from_secs(timeout))),
        Bench::Net {
            size_mib,
            connections,
            timeout,
            nixvmm,
        } => nixvmm
            .map_or_else(default_nixvmm, Ok)
            .and_then(|bin| net::run(&bin, size_mib, connections, Duration::from_secs(timeout))),
        Bench::VmBuild {
            runs,
            timeout,
            virtiofsd,
            nixvmm,
        } => nixvmm.map_or_else(default_nixvmm, Ok).and_then(|bin| {
            let virtiofsd = virtiofsd.unwrap_or_else(vm_build::default_virtiofsd);
            vm_build::run(&bin, &virtiofsd, runs, Duration::from_secs(timeout))
        }),
    };
    match result {
        Ok(table) => {
            println!("{table}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nixvmm-bench: error: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

fn boot(args: &BootArgs) -> Result<String, String> {
    let nixvmm = match args.nixvmm.clone() {
        Some(bin) => bin,
        None => default_nixvmm()?,
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let guest = match args.guest {
        GuestKind::Tiny => {
            let kernel = dir.path().join("bench-guest.elf");
            std::fs::write(&kernel, guest::pvh_elf()).map_err(|e| e.to_string())?;
            Guest {
                kernel,
                initrd: None,
                cmdline: String::new(),
                marker: guest::MARKER.into(),
            }
        }
        GuestKind::Linux => {
            let (kernel, initrd) = linux_guest_files(args)?;
            if !args.here {
                if let Some(table) = boot_nested(args, &nixvmm, &kernel, &initrd)? {
                    return Ok(table);
                }
            }
            Guest {
                kernel,
                initrd: Some(initrd),
                cmdline: format!("console=ttyS0 panic=-1 {}", args.cmdline),
                marker: args.marker.clone(),
            }
        }
    };
    let mut rows = vec![
        measure(args, "nixvmm".into(), "kvm", &guest.marker, || {
            nixvmm_command(&nixvmm, &guest, args.memory_mib)
        }),
        // What the seccomp filters (on by default) cost a boot.
        measure(
            args,
            "nixvmm --seccomp off".into(),
            "kvm",
            &guest.marker,
            || {
                let mut cmd = nixvmm_command(&nixvmm, &guest, args.memory_mib);
                cmd.args(["--seccomp", "off"]);
                cmd
            },
        ),
    ];
    if args.guest == GuestKind::Linux {
        // The default row above found the vmlinux in nixvmm's kernel cache (its first run,
        // unmeasured, put it there). These show a kernel's first boot and the bzImage's own
        // decompressor.
        let cold = dir.path().join("cold-kernel-cache");
        rows.push(measure(
            args,
            "nixvmm, kernel cache cold".into(),
            "kvm",
            &guest.marker,
            || {
                let _ = std::fs::remove_dir_all(&cold);
                let mut cmd = nixvmm_command(&nixvmm, &guest, args.memory_mib);
                cmd.env("NIXVMM_KERNEL_CACHE", &cold);
                cmd
            },
        ));
        rows.push(measure(
            args,
            "nixvmm --decompress-kernel guest".into(),
            "kvm",
            &guest.marker,
            || {
                let mut cmd = nixvmm_command(&nixvmm, &guest, args.memory_mib);
                cmd.args(["--decompress-kernel", "guest"]);
                cmd
            },
        ));
    }
    let mut notes = vec![format!(
        "Guest: {}. Medians of {} runs; a run that timed out ({} s) has no numbers. \
         Peak RSS is the whole process (ru_maxrss){}.",
        match args.guest {
            GuestKind::Tiny => "nixvmm's tiny benchmark guest (same ELF for both VMMs)",
            GuestKind::Linux => "a Linux kernel and initrd, the same for every VMM",
        },
        args.runs,
        args.timeout,
        if args.guest == GuestKind::Tiny {
            "; the tiny guest touches well under 1 MiB of its RAM, so this is the VMM's own overhead"
        } else {
            ", guest RAM the guest touched included"
        }
    )];
    if Command::new(&args.qemu).arg("--version").output().is_ok() {
        for machine in ["pc", "microvm"] {
            rows.push(qemu_row(args, machine, &guest));
        }
    } else {
        notes.push(format!(
            "{} is not installed (Debian package qemu-system-x86): no QEMU rows.",
            args.qemu.display()
        ));
    }
    Ok(format!("{}\n{}", report::table(&rows), notes.join("\n")))
}

/// `--kernel` and `--initrd`, by default Debian's kernel and the Linux kit's minimal initrd
/// (it prints the kit's init marker and powers off).
fn linux_guest_files(args: &BootArgs) -> Result<(PathBuf, PathBuf), String> {
    if let (Some(kernel), Some(initrd)) = (&args.kernel, &args.initrd) {
        return Ok((kernel.clone(), initrd.clone()));
    }
    let kit = nixvmm_tests::linux_kit::KernelKit::obtain()?;
    let kernel = args.kernel.clone().unwrap_or(kit.vmlinuz.clone());
    let initrd = match &args.initrd {
        Some(initrd) => initrd.clone(),
        None => kit.initrd(&[], "")?,
    };
    Ok((kernel, initrd))
}

/// Where this host's KVM cannot run a stock kernel at speed, runs this same benchmark inside
/// the tier-4 L1 guest (nested KVM) and returns its table; `None` where it runs here.
fn boot_nested(
    args: &BootArgs,
    nixvmm: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<Option<String>, String> {
    use nixvmm_tests::tier4::{self, shell_words, Tier4Host};
    let host = tier4::host()?;
    if let Tier4Host::Direct { .. } = host {
        return Ok(None);
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let words = [
        exe.display().to_string(),
        "boot".into(),
        "--here".into(),
        "--guest=linux".into(),
        format!("--runs={}", args.runs),
        format!("--timeout={}", args.timeout),
        format!("--cmdline={}", args.cmdline),
        format!("--marker={}", args.marker),
        format!("--memory-mib={}", args.memory_mib),
        format!("--qemu={}", args.qemu.display()),
        format!("--nixvmm={}", nixvmm.display()),
        format!("--kernel={}", kernel.display()),
        format!("--initrd={}", initrd.display()),
    ];
    // Five rows, each run once unmeasured (QEMU's once more to probe) and then --runs times.
    let limit = Duration::from_secs(args.timeout * (args.runs as u64 + 2) * 5 + 120);
    let log = host.run(&shell_words(&words), limit)?;
    if !log.exit_ok {
        return Err(format!("the benchmark failed inside L1:\n{}", log.tail()));
    }
    let table: Vec<&str> = log
        .console
        .lines()
        .filter(|l| !l.starts_with("nixvmm-bench:"))
        .collect();
    Ok(Some(format!(
        "{}\nSetting: {} (this host's KVM cannot run a stock kernel at speed): all VMMs ran \
         in the same L1 guest on the same KVM, so absolute times are inflated by emulation; \
         compare the ratios.",
        table.join("\n"),
        host.setting()
    )))
}
