//! Everything a BIOS would otherwise provide to a directly booted Linux kernel: the guest
//! physical memory layout, the Linux boot parameters (E820, command line, initrd), the GDT and
//! identity page tables for a 64-bit entry, the ACPI tables, and the code at the reset vector.
//!
//! Nothing here touches KVM: every function writes into guest memory given as a
//! [`vm_memory::GuestMemory`], so all of it is testable with plain memory.

pub mod acpi;
pub mod boot;
pub mod layout;
pub mod paging;
pub mod reset_vector;

pub use vm_memory::GuestMemoryMmap;

/// Errors from building the guest's boot state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kernel {path}: {source}")]
    KernelRead {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is neither a Linux bzImage nor an ELF vmlinux; give --kernel a kernel image \
         (a NixOS system's `kernel` file)"
    )]
    NotAKernel { path: String },
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad { path: String, reason: String },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "initrd ({size} bytes) does not fit below the kernel's limit {limit:#x} in {mem_mib} MiB \
         of guest memory; give more --memory"
    )]
    InitrdTooBig { size: u64, limit: u64, mem_mib: u64 },
    #[error("kernel command line is {len} bytes, the kernel accepts at most {max}; shorten it")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("guest memory too small: {0}")]
    MemoryTooSmall(String),
    #[error("writing {what} to guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
