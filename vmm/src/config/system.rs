//! Reading a NixOS system ("toplevel") the way qemu-vm.nix's runner does.

use std::path::{Path, PathBuf};

/// Kernel, initrd and command line of a NixOS toplevel.
#[derive(Debug, PartialEq, Eq)]
pub struct NixosBoot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("--system {0}: not a directory; give a NixOS system (e.g. ./result/system)")]
    NotADirectory(String),
    #[error("--system {dir}: {file} is missing; is this a NixOS system's toplevel?")]
    MissingFile { dir: String, file: String },
    #[error("--system {dir}: cannot read {file}: {source}")]
    Unreadable {
        dir: String,
        file: String,
        source: std::io::Error,
    },
}

/// Reads `DIR/kernel`, `DIR/initrd`, `DIR/kernel-params` and builds the command line
/// `$(cat kernel-params) init=DIR/init [regInfo=REG] console=ttyS0 [extra]`.
///
/// `DIR` is resolved through symlinks (`./result` → `/nix/store/…`) because the guest sees
/// only store paths.
pub fn read_system(
    dir: &Path,
    reg_info: Option<&str>,
    extra: &str,
) -> Result<NixosBoot, SystemError> {
    let shown = dir.display().to_string();
    let toplevel = dir
        .canonicalize()
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| SystemError::NotADirectory(shown.clone()))?;
    let require = |name: &str| {
        let path = toplevel.join(name);
        if path.exists() {
            Ok(path)
        } else {
            Err(SystemError::MissingFile {
                dir: shown.clone(),
                file: name.to_string(),
            })
        }
    };
    let kernel = require("kernel")?;
    let initrd = require("initrd")?;
    let params_file = require("kernel-params")?;
    require("init")?;
    let params =
        std::fs::read_to_string(&params_file).map_err(|source| SystemError::Unreadable {
            dir: shown.clone(),
            file: "kernel-params".into(),
            source,
        })?;
    let mut words = vec![
        params.trim().to_string(),
        format!("init={}", toplevel.join("init").display()),
    ];
    if let Some(reg) = reg_info {
        words.push(format!("regInfo={reg}"));
    }
    words.push("console=ttyS0".into());
    words.push(extra.trim().to_string());
    let cmdline = words
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok(NixosBoot {
        kernel,
        initrd,
        cmdline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NixOS-like toplevel: the files qemu-vm.nix reads, reached through a `result` link.
    fn fixture() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("nix/store/abc-nixos-system-test-24.11");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::write(store.join("kernel"), b"bzImage").unwrap();
        std::fs::write(store.join("initrd"), b"initrd").unwrap();
        std::fs::write(store.join("init"), b"#!/bin/sh").unwrap();
        std::fs::write(
            store.join("kernel-params"),
            "loglevel=4 net.ifnames=0 lsm=landlock,yama,bpf\n",
        )
        .unwrap();
        let result = tmp.path().join("result");
        std::os::unix::fs::symlink(&store, &result).unwrap();
        (tmp, result)
    }

    #[test]
    fn builds_the_qemu_vm_nix_command_line() {
        let (_tmp, result) = fixture();
        let store = result.canonicalize().unwrap();
        let boot = read_system(
            &result,
            Some("/nix/store/xyz-closure-info/registration"),
            "boot.shell_on_fail",
        )
        .unwrap();
        assert_eq!(boot.kernel, store.join("kernel"));
        assert_eq!(boot.initrd, store.join("initrd"));
        assert_eq!(
            boot.cmdline,
            format!(
                "loglevel=4 net.ifnames=0 lsm=landlock,yama,bpf init={}/init \
                 regInfo=/nix/store/xyz-closure-info/registration console=ttyS0 boot.shell_on_fail",
                store.display()
            )
        );
    }

    #[test]
    fn missing_file_names_itself() {
        let (_tmp, result) = fixture();
        std::fs::remove_file(result.join("initrd")).unwrap();
        let err = read_system(&result, None, "").unwrap_err().to_string();
        assert!(err.contains("initrd is missing"), "{err}");
        let err = read_system(Path::new("/nonexistent"), None, "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory"), "{err}");
    }
}
