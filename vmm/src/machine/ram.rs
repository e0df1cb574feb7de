//! Guest RAM: its host mappings, placed so that KVM can map it with 2 MiB pages.
//!
//! KVM maps a guest page with a 2 MiB page only where the host backs it with one (a
//! transparent huge page) *and* the guest address and the host address have the same offset
//! into their 2 MiB pages; its API documentation recommends that the lower 21 bits of
//! `guest_phys_addr` and `userspace_addr` be identical. Every RAM range starts on a 2 MiB
//! guest address, so each host mapping must start on a 2 MiB boundary too. mmap gives only
//! 4 KiB alignment (kernels before 6.7 do not align large anonymous mappings), so a guest on
//! a misaligned mapping gets 4 KiB pages throughout: one nested page fault per 4 KiB the
//! guest touches, each a VM exit (20 000 of them in a 512 MiB Linux boot, against ~600 at
//! 2 MiB). QEMU aligns its RAM the same way.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use super::{kvm_err, VmError};

/// The size of an x86 huge page, the alignment guest RAM's host mappings get.
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `size` bytes of guest RAM (a shared memfd when other processes map it too), each
/// range 2 MiB-aligned on the host and backed by huge pages where the host allows, and
/// registers it with KVM.
pub fn guest_memory(vm_fd: &VmFd, size: u64, shared: bool) -> Result<GuestMemoryMmap, VmError> {
    let memory = map_guest_memory(size, shared).map_err(|reason| VmError::Memory {
        mib: size >> 20,
        reason,
    })?;
    for (slot, region) in memory.iter().enumerate() {
        let host = region.as_ptr();
        ask_for_huge_pages(host, region.len());
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the returned `Vm`
        // keeps until after the VM file descriptor is closed (field order).
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(kvm_err("registering guest memory"))?;
    }
    Ok(memory)
}

/// The host mappings of guest RAM, one per range of the guest's memory map.
fn map_guest_memory(size: u64, shared: bool) -> Result<GuestMemoryMmap, String> {
    let file = match shared {
        true => Some(Arc::new(
            shared_memory_file(size).map_err(|e| e.to_string())?,
        )),
        false => None,
    };
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in firmware::layout::ram_ranges(size) {
        let file_offset = file
            .as_ref()
            .map(|f| FileOffset::from_arc(f.clone(), offset));
        offset += len as u64;
        regions.push(aligned_region(addr, len, file_offset)?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
}

/// One range of guest RAM, mapped by vm-memory (which owns and unmaps it) into a 2 MiB-aligned
/// hole made for it: mmap places a mapping at the top of the highest free gap that fits, so a
/// gap of exactly `len` bytes at an aligned address, fenced on both sides, is where it lands.
/// Another thread's mapping can take the hole first, or a free gap higher up may fit `len`
/// but not the reservation: then it is tried again with the misplaced mapping still held
/// (so the next one cannot land there), and after `ATTEMPTS` the last is kept misaligned
/// (said at debug level): slower, never wrong.
fn aligned_region(
    addr: GuestAddress,
    len: usize,
    file: Option<FileOffset>,
) -> Result<GuestRegionMmap, String> {
    const ATTEMPTS: usize = 4;
    let mut misplaced = Vec::new();
    loop {
        let hole = AlignedHole::make(len);
        let region =
            GuestRegionMmap::from_range(addr, len, file.clone()).map_err(|e| e.to_string())?;
        drop(hole);
        if (region.as_ptr() as usize).is_multiple_of(HUGE_PAGE) {
            return Ok(region);
        }
        if misplaced.len() + 1 == ATTEMPTS {
            log::debug!(
                "guest RAM at {:#x} is not 2 MiB-aligned on the host; it runs on 4 KiB pages",
                addr.0
            );
            return Ok(region);
        }
        misplaced.push(region);
    }
}

/// An inaccessible reservation of `len` + 2 MiB with its 2 MiB-aligned middle `len` bytes
/// unmapped again: the fences on both sides are unmapped when it is dropped.
struct AlignedHole {
    fences: [(usize, usize); 2],
}

impl AlignedHole {
    /// `None` where the address space has no room (the mapping that follows then fails with
    /// the real reason).
    fn make(len: usize) -> Option<AlignedHole> {
        let total = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a new anonymous PROT_NONE mapping at an address the kernel chooses: it
        // overlaps nothing and nothing can access it.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return None;
        }
        let start = start as usize;
        let hole = start.next_multiple_of(HUGE_PAGE);
        let end = start + total;
        unmap(hole, len);
        Some(AlignedHole {
            fences: [(start, hole - start), (hole + len, end - (hole + len))],
        })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        for (start, len) in self.fences {
            unmap(start, len);
        }
    }
}

/// Unmaps part of an [`AlignedHole`]'s reservation.
fn unmap(start: usize, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the range lies within a PROT_NONE reservation this module made, which no one
    // else uses.
    unsafe { libc::munmap(start as *mut libc::c_void, len) };
}

/// A memfd of `size` bytes, for guest RAM that other processes map.
fn shared_memory_file(size: u64) -> std::io::Result<std::fs::File> {
    // SAFETY: the name is a valid C string; the returned descriptor is new and ours.
    let fd = unsafe { libc::memfd_create(c"nixvmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Asks the host kernel to back guest RAM with transparent huge pages, as QEMU and Cloud
/// Hypervisor do: on hosts whose THP mode is `madvise` (and shmem's `advise`, for memfd RAM)
/// guest RAM would otherwise be 4 KiB pages, each TLB miss a longer two-dimensional walk.
/// Advice only: a host that refuses it runs the guest on small pages.
fn ask_for_huge_pages(host: *mut u8, len: u64) {
    // SAFETY: madvise with MADV_HUGEPAGE changes no contents and no protection; the range is
    // one live mapping of guest RAM owned by the caller's `GuestMemoryMmap`.
    let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        log::debug!(
            "guest RAM stays on small pages: madvise(MADV_HUGEPAGE): {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ram_range_starts_on_a_2_mib_host_boundary() {
        // Sizes that are not whole 2 MiB pages, which newer kernels' own alignment of large
        // anonymous mappings leaves alone: one range, and two (below the PCI hole and above
        // 4 GiB).
        for (size, ranges) in [((1 << 30) + (1 << 20), 1), ((5 << 30) + (1 << 20), 2)] {
            for shared in [false, true] {
                let memory = map_guest_memory(size, shared).unwrap();
                assert_eq!(memory.num_regions(), ranges);
                for region in memory.iter() {
                    assert_eq!(
                        region.as_ptr() as usize % HUGE_PAGE,
                        0,
                        "{size} bytes, range at {:#x} (shared: {shared})",
                        region.start_addr().0
                    );
                }
            }
        }
    }
}
