//! Tier 1: nixvmm's Nix packaging (flake.nix, default.nix, nix/), checked with Debian's
//! nix-bin, which has no nixpkgs: every file parses; tests/nix/packaging.nix calls each one
//! with the few nixpkgs functions it uses and checks what it builds; and the QEMU package's
//! build script, run with makeWrapper's meaning, gives a qemu-kvm and a qemu-system-x86_64
//! that are nixvmm and hand boots on to the real QEMU.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nixvmm_tests::nixvmm_bin;

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn nix_instantiate(args: &[&str]) -> String {
    let out = Command::new("nix-instantiate")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("nix-instantiate (Debian's nix-bin; scripts/setup installs it): {e}")
        });
    assert!(
        out.status.success(),
        "nix-instantiate {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn evaluate(attribute: &str, nixvmm: &str, qemu: &str) -> String {
    let file = repository().join("tests/nix/packaging.nix");
    nix_instantiate(&[
        "--eval",
        "--strict",
        "--json",
        "--store",
        "dummy://",
        file.to_str().unwrap(),
        "-A",
        attribute,
        "--argstr",
        "nixvmm",
        nixvmm,
        "--argstr",
        "fakeQemu",
        qemu,
    ])
}

#[test]
fn every_nix_file_parses() {
    let repo = repository();
    let mut files = vec![repo.join("flake.nix"), repo.join("default.nix")];
    for entry in std::fs::read_dir(repo.join("nix")).unwrap() {
        files.push(entry.unwrap().path());
    }
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        nix_instantiate(&["--parse", file.to_str().unwrap()]);
    }
}

#[test]
fn module_package_and_qemu_package_build_what_they_say() {
    let failures = evaluate("failures", "/nix/store/00-nixvmm", "/nix/store/00-qemu");
    assert_eq!(failures.trim(), "[]", "failed checks: {failures}");
}

/// The text of a JSON string as nix-instantiate prints it (the escapes it writes).
fn json_string(json: &str) -> String {
    let inner = json
        .trim()
        .strip_prefix('"')
        .and_then(|j| j.strip_suffix('"'));
    let mut text = String::new();
    let mut chars = inner
        .unwrap_or_else(|| panic!("not a JSON string: {json}"))
        .chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            text.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => text.push('\n'),
            Some('t') => text.push('\t'),
            Some(c @ ('\\' | '"' | '/' | '$')) => text.push(c),
            other => panic!("escape {other:?} in {json}"),
        }
    }
    text
}

fn executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// makeWrapper as nixpkgs defines it, for the two flags nix/qemu.nix uses: the wrapper sets
/// the variable unless it is set and runs the program under the given argv[0].
const MAKE_WRAPPER: &str = r#"makeWrapper() {
  local program=$1 wrapper=$2; shift 2
  local argv0=$program sets=""
  while [ $# -gt 0 ]; do
    case $1 in
      --argv0) argv0=$2; shift 2;;
      --set-default) sets="$sets export $2=\${$2-$3};"; shift 3;;
      *) echo "makeWrapper: $1 is not modelled here" >&2; return 1;;
    esac
  done
  printf '#!/usr/bin/env bash\n%s\nexec -a "%s" "%s" "$@"\n' "$sets" "$argv0" "$program" > "$wrapper"
  chmod +x "$wrapper"
}
"#;

#[test]
fn the_qemu_package_runs_nixvmm_under_qemus_names_and_falls_back_to_its_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let nixvmm = dir.path().join("nixvmm");
    let qemu = dir.path().join("qemu");
    let out = dir.path().join("out");
    for d in [nixvmm.join("bin"), qemu.join("bin"), out.join("bin")] {
        std::fs::create_dir_all(d).unwrap();
    }
    symlink(nixvmm_bin(), nixvmm.join("bin/nixvmm")).unwrap();
    for name in ["qemu-system-x86_64", "qemu-kvm", "qemu-img"] {
        executable(
            &qemu.join("bin").join(name),
            &format!("#!/bin/sh\necho \"real {name} $*\"\n"),
        );
        // symlinkJoin's tree: links into the QEMU package.
        symlink(qemu.join("bin").join(name), out.join("bin").join(name)).unwrap();
    }
    let post_build = json_string(&evaluate(
        "postBuild",
        nixvmm.to_str().unwrap(),
        qemu.to_str().unwrap(),
    ));
    let status = Command::new("bash")
        .args(["-euc", &format!("{MAKE_WRAPPER}\n{post_build}")])
        .env("out", &out)
        .status()
        .unwrap();
    assert!(status.success(), "{post_build}");
    let run = |name: &str, args: &[&str]| {
        let o = Command::new(out.join("bin").join(name))
            .args(args)
            .env_remove("NIXVMM_QEMU")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for name in ["qemu-kvm", "qemu-system-x86_64"] {
        let version = run(name, &["-version"]);
        assert!(version.contains("(nixvmm"), "{name} -version: {version}");
        assert_eq!(
            run(name, &["-bios", "/OVMF.fd", "-kernel", "/k"]),
            "real qemu-system-x86_64 -bios /OVMF.fd -kernel /k\n",
            "{name} hands an EFI boot to the package's QEMU"
        );
    }
    assert_eq!(run("qemu-img", &["info", "x"]), "real qemu-img info x\n");
}
