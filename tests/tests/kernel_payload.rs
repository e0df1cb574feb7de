//! Tier 1: nixvmm's host-side decompression of a real bzImage (Debian's, from the Linux kit)
//! gives the same vmlinux as xz(1), and that vmlinux is what nixvmm enters.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::Read;

use firmware::boot::KernelFormat;
use nixvmm_tests::linux_kit::KernelKit;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::host::kernel_unpack;

#[test]
fn debians_bzimage_unpacks_to_what_xz_gives_and_is_entered_at_16_mib() {
    let kit = KernelKit::obtain().unwrap();
    let by_xz = std::fs::read(kit.vmlinux().unwrap()).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (_, mut file) = kernel_unpack::unpacked_vmlinux(&kit.vmlinuz, Some(cache.path()))
        .unwrap()
        .expect("Debian's kernel has an xz payload nixvmm decompresses");
    let mut by_nixvmm = Vec::new();
    file.read_to_end(&mut by_nixvmm).unwrap();
    assert!(by_nixvmm == by_xz, "nixvmm's vmlinux differs from xz's");

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let kernel = kernel_unpack::load_kernel(&mem, &kit.vmlinuz).unwrap();
    assert_eq!(kernel.format, KernelFormat::UnpackedBzImage);
    assert_eq!(kernel.entry, GuestAddress(0x100_0000));
    assert!(
        kernel.cmdline_limit() >= 2047,
        "the bzImage's own header is kept"
    );
}
