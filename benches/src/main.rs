//! `nixvmm-bench boot`: boots the same guest under nixvmm and QEMU, N times each, and prints
//! medians of process start → first console output → marker → exit, and peak RSS, with
//! nixvmm/QEMU ratios, as a markdown table.

mod block;
mod fs;
mod guest;
mod guest_disk;
mod measure;
mod report;

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
    for _ in 0..args.runs {
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
        GuestKind::Linux => Guest {
            kernel: args.kernel.clone().ok_or("--guest linux needs --kernel")?,
            initrd: args.initrd.clone(),
            cmdline: format!("console=ttyS0 panic=-1 {}", args.cmdline),
            marker: args.marker.clone(),
        },
    };
    let mut rows = vec![measure(args, "nixvmm".into(), "kvm", &guest.marker, || {
        nixvmm_command(&nixvmm, &guest, args.memory_mib)
    })];
    let mut notes = vec![format!(
        "Guest: {}. Medians of {} runs; a run that timed out ({} s) has no numbers. \
         Peak RSS is the whole process (ru_maxrss){}.",
        match args.guest {
            GuestKind::Tiny => "nixvmm's tiny benchmark guest (same ELF for both VMMs)",
            GuestKind::Linux => "the given Linux kernel and initrd",
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
