//! Tier 1: every fuzz target replays its seed corpus (`fuzz/seeds/TARGET`, inputs the
//! fuzzer kept in its long runs, minimized) on stable Rust, so a change that makes a parser
//! crash on a known input fails here and not only under `cargo +nightly fuzz run`. The
//! targets are built by `scripts/test` (`cargo build --manifest-path fuzz/Cargo.toml
//! --target-dir target --bins`), without the fuzzer's instrumentation: libFuzzer runs each
//! input once (`-runs=0`).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGETS: [&str; 9] = [
    "ninep_server",
    "block_requests",
    "virtio_pci_registers",
    "virtiofs_requests",
    "net_queues",
    "tpm_tis_registers",
    "monitor_input",
    "command_line",
    "console_vsock_queues",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target's binary in target/<profile>/, where this test's own executable's folder
/// (deps/) is.
fn binary(target: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile.join(target);
    assert!(
        bin.exists(),
        "{} is missing: build the fuzz targets with `cargo build --manifest-path \
         fuzz/Cargo.toml --target-dir target --bins` (scripts/test does)",
        bin.display()
    );
    bin
}

#[test]
fn every_fuzz_target_replays_its_seed_corpus_without_a_crash() {
    let manifest = std::fs::read_to_string(workspace().join("fuzz/Cargo.toml")).unwrap();
    let listed = manifest.matches("[[bin]]").count();
    assert_eq!(listed, TARGETS.len(), "a fuzz target without a replay here");
    for target in TARGETS {
        let seeds = workspace().join("fuzz/seeds").join(target);
        let count = std::fs::read_dir(&seeds)
            .unwrap_or_else(|e| panic!("{}: {e}", seeds.display()))
            .count();
        assert!(count > 0, "{}: no seeds", seeds.display());
        let out = Command::new(binary(target))
            .arg(&seeds)
            .arg("-runs=0")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{target}:\n{log}");
        let done = format!("Done {} runs", count + 1);
        assert!(log.contains(&done), "{target}: not every seed ran:\n{log}");
    }
}
