//! The binary's contract for bad input: one line on stderr naming the problem and the fix,
//! status 1, never a panic.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::process::Command;

fn nixvmm(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nixvmm"))
        .args(args)
        .output()
        .expect("nixvmm runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn assert_clear_error(args: &[&str], expected: &str) {
    let (code, stderr) = nixvmm(args);
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

#[test]
fn bad_input_gets_one_clear_line_and_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_kernel = dir.path().join("notes.txt");
    std::fs::write(&not_a_kernel, "just text").unwrap();
    let not_a_kernel = not_a_kernel.to_str().unwrap();
    assert_clear_error(
        &["run", "--kernel", "/no/such/bzImage"],
        "kernel /no/such/bzImage",
    );
    assert_clear_error(
        &["run", "--kernel", not_a_kernel],
        "neither a Linux bzImage nor",
    );
    assert_clear_error(&["run", "--memory", "12X"], "--memory 12X");
    assert_clear_error(&["run", "--memory", "1M"], "at least 16 MiB");
    assert_clear_error(&["run", "--cpus", "0"], "--cpus");
    assert_clear_error(
        &["run", "--serial", "tty"],
        "--serial tty: write stdio, null or file:PATH",
    );
    assert_clear_error(
        &["run", "--serial", "file:/no/such/dir/log"],
        "serial file:/no/such/dir/log",
    );
    assert_clear_error(
        &["run", "--vsock", "cid=1,uds=/tmp/v"],
        "give a guest CID from 3",
    );
    assert_clear_error(&["run", "--frobnicate"], "--frobnicate");
    assert_clear_error(
        &["run", "--system", dir.path().to_str().unwrap()],
        "kernel is missing",
    );
    assert_clear_error(
        &["run", "--kernel", not_a_kernel, "--initrd", "/no/initrd"],
        "initrd /no/initrd",
    );
    let no_swtpm = &["run", "--tpm", "socket=/no/such/socket"];
    assert_clear_error(no_swtpm, "--tpm socket=/no/such/socket: cannot connect");
    assert_clear_error(no_swtpm, "start swtpm first");
}

#[test]
fn help_and_version_succeed() {
    assert_eq!(nixvmm(&["--help"]).0, Some(0));
    assert_eq!(nixvmm(&["--version"]).0, Some(0));
}

/// A host without KVM, made with a mount namespace whose /dev is empty (needs root, as the
/// development and CI machines are).
#[test]
fn missing_dev_kvm_is_explained() {
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run",
        env!("CARGO_BIN_EXE_nixvmm")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("util-linux's unshare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
    assert!(stderr.contains("enable KVM"), "{stderr}");
}
