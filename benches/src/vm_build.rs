//! `nixvmm-bench vm-build`: the round trip of a `vmTools.runInLinuxVM` build, as nixpkgs'
//! `vm-run` does it: start a virtiofsd per share (store and xchg) and the VMM at once, boot,
//! mount both shares, run the builder, write its status to xchg, power off, read the status.
//! Wall time of the whole `vm-run`, with nixvmm as its `qemu-kvm` (served by `nixvmm device
//! fs`, and by virtiofsd) and with QEMU (`-accel kvm`) and virtiofsd; same kernel, initrd and
//! KVM (the tier-4 L1 guest where this host's KVM cannot run a stock kernel).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixvmm_tests::linux_kit::{tier4_kernel, BootLog, KernelKit};
use nixvmm_tests::nixpkgs_scripts::{IN_VM_STAGE_1, VM_RUN};
use nixvmm_tests::tier4::{self, shell_quote};

use crate::report::median;

/// One way of running `vm-run`: what `qemu-kvm` is and what serves the shares.
struct Setup {
    name: &'static str,
    /// Shell lines that make `$bin/qemu-kvm`.
    qemu_kvm: String,
    virtiofsd: String,
}

/// An L1 job: `vm-run` once in a fresh folder, its wall time in ms as WALL_MS.
fn job(setup: &Setup, store: &Path, kernel: &Path, initrd: &Path) -> String {
    format!(
        "bin=$(mktemp -d)\n\
         {qemu_kvm}\n\
         export PATH=$bin:$PATH STORE={store} KERNEL={kernel} INITRD={initrd} VIRTIOFSD={virtiofsd}\n\
         export QEMU_OPTS='-m 512 -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem'\n\
         cd $(mktemp -d)\n\
         start=$(date +%s%N)\n\
         bash -c {vm_run} > vm-run.log 2>&1; rc=$?\n\
         end=$(date +%s%N)\n\
         tail -n 30 vm-run.log\n\
         [ $rc = 0 ] && echo WALL_MS=$(( (end - start) / 1000000 ))\n\
         exit $rc",
        qemu_kvm = setup.qemu_kvm,
        store = store.display(),
        kernel = kernel.display(),
        initrd = initrd.display(),
        virtiofsd = shell_quote(&setup.virtiofsd),
        vm_run = shell_quote(VM_RUN),
    )
}

fn wall_ms(log: &BootLog) -> Option<f64> {
    if log.value_of("IN_VM_EXIT") != Some("0") || log.value_of("RESULT") != Some("built") {
        return None;
    }
    log.value_of("WALL_MS")?.parse().ok()
}

/// virtiofsd as scripts/setup installs it, else from PATH.
pub fn default_virtiofsd() -> PathBuf {
    let installed = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/virtiofsd"))
        .filter(|p| p.is_file());
    installed.unwrap_or_else(|| PathBuf::from("virtiofsd"))
}

pub fn run(
    nixvmm: &Path,
    virtiofsd: &Path,
    runs: usize,
    timeout: Duration,
) -> Result<String, String> {
    let host = tier4::host()?;
    let kit = KernelKit::obtain()?;
    let kernel = tier4_kernel().unwrap_or_else(|_| kit.vmlinuz.clone());
    let initrd = kit.initrd(&["virtio_pci", "virtiofs"], IN_VM_STAGE_1)?;
    let dir = host.tempdir().map_err(|e| e.to_string())?;
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).map_err(|e| e.to_string())?;
    std::fs::write(
        store.join("builder"),
        "echo built > /fs/tmp/xchg/result\nexit 0\n",
    )
    .map_err(|e| e.to_string())?;
    let link_nixvmm = format!("ln -s {} $bin/qemu-kvm", nixvmm.display());
    let setups = [
        Setup {
            name: "nixvmm as qemu-kvm, nixvmm device fs",
            qemu_kvm: link_nixvmm.clone(),
            virtiofsd: format!("{} device fs", nixvmm.display()),
        },
        Setup {
            name: "nixvmm as qemu-kvm, virtiofsd",
            qemu_kvm: link_nixvmm,
            virtiofsd: virtiofsd.display().to_string(),
        },
        Setup {
            name: "nixvmm as qemu-kvm, nixvmm device fs, the guest decompresses its kernel",
            qemu_kvm: format!(
                "printf '#!/bin/sh\\nNIXVMM_DECOMPRESS_KERNEL=guest exec {} qemu \"$@\"\\n' > $bin/qemu-kvm && chmod +x $bin/qemu-kvm",
                nixvmm.display()
            ),
            virtiofsd: format!("{} device fs", nixvmm.display()),
        },
        Setup {
            name: "qemu-system-x86_64 -accel kvm, virtiofsd",
            qemu_kvm: "printf '#!/bin/sh\\nexec qemu-system-x86_64 -accel kvm \"$@\"\\n' > $bin/qemu-kvm && chmod +x $bin/qemu-kvm".into(),
            virtiofsd: virtiofsd.display().to_string(),
        },
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut uptimes: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut failures: Vec<Option<String>> = vec![None; setups.len()];
    // One run first, not counted: nixvmm's kernel cache (on the tier-4 work share) then holds
    // the vmlinux, as it does from a user's second build on.
    host.run(&job(&setups[0], &store, &kernel, &initrd), timeout)?;
    // Round-robin, so that a slow phase of the emulated L1 falls on every setup alike.
    for _ in 0..runs {
        for (i, setup) in setups.iter().enumerate() {
            if failures[i].is_some() {
                continue;
            }
            let log = host.run(&job(setup, &store, &kernel, &initrd), timeout)?;
            match wall_ms(&log) {
                Some(ms) => {
                    times[i].push(ms);
                    let uptime = log
                        .value_of("UPTIME_AT_POWEROFF")
                        .and_then(|u| u.parse().ok());
                    uptimes[i].extend(uptime.map(|s: f64| s * 1000.0));
                }
                None => failures[i] = Some(log.tail()),
            }
        }
    }
    let medians: Vec<Option<f64>> = times.iter().map(|t| median(t.clone())).collect();
    let cell = |v: Option<f64>| v.map_or("–".into(), |m| format!("{m:.0}"));
    let mut out = String::from(
        "| vm-run with | runs ok | wall time (ms) | guest uptime at poweroff (ms) |\n\
         |---|---|---|---|\n",
    );
    for (i, setup) in setups.iter().enumerate() {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            setup.name,
            times[i].len(),
            cell(medians[i]),
            cell(median(uptimes[i].clone()))
        ));
    }
    let qemu = medians[setups.len() - 1];
    for (i, setup) in setups.iter().enumerate().take(setups.len() - 1) {
        let ratio = match (medians[i], qemu) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        out.push_str(&format!("| **{} / qemu** | | {ratio} | |\n", setup.name));
    }
    out.push_str(&format!(
        "\nvmTools.runInLinuxVM's vm-run (nixpkgs' shell logic): two virtiofsd-style servers and \
         the VMM started at once, 512 MiB of memfd RAM, the store and xchg over virtio-fs, a \
         builder whose status comes back through xchg. Medians of {runs} runs, round-robin. \
         Guest: {}. Setting: {}; with nested KVM only the ratios mean anything.",
        kernel.display(),
        host.setting()
    ));
    for (setup, failure) in setups.iter().zip(&failures) {
        if let Some(tail) = failure {
            out.push_str(&format!("\n\n{} failed:\n{tail}", setup.name));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_runs_vm_run_with_the_setups_qemu_and_virtiofsd() {
        let setup = Setup {
            name: "x",
            qemu_kvm: "ln -s /n $bin/qemu-kvm".into(),
            virtiofsd: "/n device fs".into(),
        };
        let j = job(&setup, Path::new("/s"), Path::new("/k"), Path::new("/i"));
        for part in [
            "ln -s /n $bin/qemu-kvm",
            "VIRTIOFSD='/n device fs'",
            "STORE=/s KERNEL=/k INITRD=/i",
            "WALL_MS=",
            "in-vm-exit",
        ] {
            assert!(j.contains(part), "{part}: {j}");
        }
    }
}
