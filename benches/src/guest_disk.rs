//! `nixvmm-bench blk-guest`: a Linux guest's own view of disk speed — dd with O_DIRECT on
//! /dev/vda — under nixvmm (`--disk`) and QEMU (`-drive if=virtio`), same kernel, same image
//! size. It needs a kernel this host's KVM runs at speed (tier 4); elsewhere the nixvmm row
//! reports the timeout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nixvmm_tests::linux_kit::{run_with_timeout, tier4_kernel, KernelKit};

/// The guest's script: write then read the whole disk, printing MiB/s.
fn script(size_mib: u64) -> String {
    format!(
        "t() {{ cut -d' ' -f1 /proc/uptime; }}\n\
         a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count={size_mib} oflag=direct 2>/dev/null; b=$(t)\n\
         echo WRITE_MIBS=$(awk -v a=$a -v b=$b 'BEGIN {{ printf \"%.1f\", {size_mib} / (b - a + 0.01) }}')\n\
         a=$(t); dd if=/dev/vda of=/dev/null bs=1M count={size_mib} iflag=direct 2>/dev/null; b=$(t)\n\
         echo READ_MIBS=$(awk -v a=$a -v b=$b 'BEGIN {{ printf \"%.1f\", {size_mib} / (b - a + 0.01) }}')"
    )
}

fn fresh_image(dir: &Path, name: &str, size_mib: u64) -> Result<PathBuf, String> {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    file.set_len(size_mib << 20).map_err(|e| e.to_string())?;
    Ok(path)
}

/// Runs the dd script under nixvmm and QEMU and returns the table.
pub fn run(
    nixvmm: &Path,
    kernel: Option<PathBuf>,
    size_mib: u64,
    timeout: Duration,
) -> Result<String, String> {
    let kit = KernelKit::obtain()?;
    let kernel = match kernel {
        Some(k) => k,
        None => tier4_kernel().unwrap_or_else(|_| kit.vmlinuz.clone()),
    };
    let initrd = kit.initrd(&["virtio_pci", "virtio_blk"], &script(size_mib))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cmdline = "console=ttyS0 panic=-1 quiet";
    let mut rows = Vec::new();

    let image = fresh_image(dir.path(), "nixvmm.raw", size_mib)?;
    let mut cmd = Command::new(nixvmm);
    cmd.args(["run", "--no-reboot", "--memory", "512M", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", cmdline, "--disk"])
        .arg(format!("path={},format=raw", image.display()));
    rows.push((
        "nixvmm",
        "kvm".to_string(),
        run_with_timeout(&mut cmd, timeout)?,
    ));

    let image = fresh_image(dir.path(), "qemu.raw", size_mib)?;
    let qemu = |accel: &str| {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-M",
            "pc",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-monitor", "none", "-m", "512M", "-accel", accel, "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", cmdline, "-drive"])
        .arg(format!(
            "file={},format=raw,if=virtio,cache=writeback",
            image.display()
        ));
        cmd
    };
    let kvm = run_with_timeout(&mut qemu("kvm"), timeout)?;
    if kvm.value_of("READ_MIBS").is_some() {
        rows.push(("qemu -M pc", "kvm".into(), kvm));
    } else {
        rows.push((
            "qemu -M pc",
            "tcg".into(),
            run_with_timeout(&mut qemu("tcg"), timeout)?,
        ));
    }

    let mut out =
        String::from("| VMM | accel | dd write MiB/s | dd read MiB/s |\n|---|---|---|---|\n");
    let value = |log: &nixvmm_tests::linux_kit::BootLog, key: &str| -> Option<f64> {
        log.value_of(key).and_then(|v| v.parse().ok())
    };
    for (name, accel, log) in &rows {
        let show = |v: Option<f64>| match (v, log.timed_out) {
            (Some(v), _) => format!("{v:.1}"),
            (None, true) => "timed out".into(),
            (None, false) => "failed".into(),
        };
        out.push_str(&format!(
            "| {name} | {accel} | {} | {} |\n",
            show(value(log, "WRITE_MIBS")),
            show(value(log, "READ_MIBS"))
        ));
    }
    if let [(_, _, ours), (_, _, theirs)] = &rows[..] {
        let ratio = |key| match (value(ours, key), value(theirs, key)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| **nixvmm / qemu** | | {} | {} |\n",
            ratio("WRITE_MIBS"),
            ratio("READ_MIBS")
        ));
    }
    out.push_str(&format!(
        "\nKernel {}; {size_mib} MiB raw image per VMM; dd bs=1M with O_DIRECT inside the guest.",
        kernel.display()
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_prints_both_rates() {
        let s = script(64);
        assert!(s.contains("count=64 oflag=direct") && s.contains("count=64 iflag=direct"));
        assert!(s.contains("WRITE_MIBS=") && s.contains("READ_MIBS="));
    }
}
