//! Test kits shared by nixvmm's integration tests and benchmarks:
//! - [`tiny`]: tiny guests assembled in the tests, booted through nixvmm's real boot path;
//! - [`linux_kit`]: Debian's stock kernel and a busybox initrd, booted under QEMU (tier 3) or
//!   nixvmm (tier 4);
//! - [`nixpkgs_scripts`]: the run-nixos-vm and vm-run shell logic of nixpkgs;
//! - [`tier4`]: where tier-4 commands run (this host, or nested KVM inside an L1 guest).

pub mod cpio;
pub mod fuse_mount;
pub mod linux_kit;
pub mod nixpkgs_scripts;
pub mod tier4;
pub mod tiny;
pub mod tiny_run;

use std::path::PathBuf;

/// The `nixvmm` binary built with this workspace: `$NIXVMM_BIN`, else the one beside the test
/// executable's `deps/` folder (cargo builds it for `cargo test --workspace`).
pub fn nixvmm_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NIXVMM_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join("nixvmm");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p vmm` (or `cargo test --workspace`) first, or set NIXVMM_BIN",
        bin.display()
    );
    bin
}
