//! Handing a boot to the real QEMU: `NIXVMM_QEMU`, else the first `qemu-system-x86_64` on
//! PATH that is not nixvmm itself, `exec`ed with the same arguments and environment.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The environment variable naming the real QEMU.
pub const QEMU_VARIABLE: &str = "NIXVMM_QEMU";

/// Finds the real QEMU, or says how to name it.
pub fn real_qemu(
    variable: Option<OsString>,
    path: Option<OsString>,
    ourselves: &Path,
) -> Result<PathBuf, String> {
    if let Some(qemu) = variable.filter(|v| !v.is_empty()) {
        let qemu = PathBuf::from(qemu);
        return if is_executable(&qemu) {
            Ok(qemu)
        } else {
            Err(format!(
                "{QEMU_VARIABLE}={}: not an executable file; point it at qemu-system-x86_64",
                qemu.display()
            ))
        };
    }
    let ourselves = ourselves.canonicalize().ok();
    path.iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| is_executable(candidate) && candidate.canonicalize().ok() != ourselves)
        .ok_or_else(|| {
            format!(
                "no real qemu-system-x86_64 on PATH besides nixvmm; set {QEMU_VARIABLE} to its \
                 path"
            )
        })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Replaces this process with `qemu` run as `program_name args…`; returns only on failure.
pub fn exec(qemu: &Path, program_name: &OsStr, args: &[OsString]) -> String {
    let error = std::process::Command::new(qemu)
        .arg0(program_name)
        .args(args)
        .exec();
    format!("cannot run {}: {error}", qemu.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_variable_wins_and_nixvmm_itself_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let theirs = dir.path().join("theirs");
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::create_dir_all(&theirs).unwrap();
        let nixvmm = executable(dir.path(), "nixvmm");
        std::os::unix::fs::symlink(&nixvmm, ours.join("qemu-system-x86_64")).unwrap();
        let real = executable(&theirs, "qemu-system-x86_64");
        let path = std::env::join_paths([&ours, &theirs]).unwrap();
        assert_eq!(
            real_qemu(None, Some(path.clone()), &nixvmm),
            Ok(real.clone())
        );
        let named = executable(dir.path(), "my-qemu");
        assert_eq!(
            real_qemu(Some(named.clone().into()), Some(path), &nixvmm),
            Ok(named)
        );
        let err = real_qemu(Some("/no/such/qemu".into()), None, &nixvmm).unwrap_err();
        assert!(err.contains("NIXVMM_QEMU=/no/such/qemu"), "{err}");
        let only_us = std::env::join_paths([&ours]).unwrap();
        let err = real_qemu(None, Some(only_us), &nixvmm).unwrap_err();
        assert!(err.contains("set NIXVMM_QEMU"), "{err}");
    }
}
