//! Port writes KVM keeps in a ring instead of exiting to nixvmm: the PCI configuration
//! address register (0xcf8–0xcfb), as QEMU's PC machines do. A configuration access is a write
//! of the address and an access of the data port (0xcfc–0xcff); only the second then leaves
//! KVM, and the writes kept are applied, in order, before it is handled. Linux scans every
//! PCI bus this way at boot (and twice more for an AGP bridge on AMD family 0Fh CPUs): tens of
//! thousands of exits, each expensive under nested virtualization.
//!
//! The ring is one page per VM that every vCPU's file maps; KVM appends, nixvmm consumes
//! (`first`), under one lock for all vCPUs.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use devices::bus::{lock, Bus};
use firmware::layout::PCI_CONFIG_PORT;
use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};

/// The kept writes of one VM.
pub struct CoalescedWrites {
    ring: Mutex<Ring>,
}

impl CoalescedWrites {
    /// Has KVM keep writes to the PCI configuration address register; `None` where KVM
    /// cannot (no `KVM_CAP_COALESCED_PIO`): every access then exits as before.
    pub fn for_pci_config(kvm: &Kvm, vm_fd: &VmFd, vcpu: &VcpuFd) -> Option<CoalescedWrites> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return None;
        }
        let ring = match Ring::map(vcpu) {
            Ok(ring) => ring,
            Err(e) => {
                log::debug!("no coalesced port writes: mapping KVM's ring: {e}");
                return None;
            }
        };
        if let Err(e) =
            vm_fd.register_coalesced_mmio(IoEventAddress::Pio(PCI_CONFIG_PORT.into()), 4)
        {
            log::debug!("no coalesced port writes: {e}");
            return None;
        }
        log::debug!("writes to the PCI configuration address port are kept by KVM");
        Some(CoalescedWrites {
            ring: Mutex::new(ring),
        })
    }

    /// Applies the writes KVM kept, oldest first, to `io`: called before a vCPU's port
    /// access is handled, so that access sees every write the guest made before it.
    pub fn apply(&self, io: &Bus) {
        let mut ring = lock(&self.ring);
        while let Some(write) = ring.pop() {
            let len = (write.len as usize).min(write.data.len());
            io.write(write.phys_addr, &write.data[..len]);
        }
    }
}

/// KVM's coalesced-write ring page, mapped from a vCPU's file.
struct Ring {
    page: NonNull<kvm_coalesced_mmio_ring>,
    page_size: usize,
}

// SAFETY: the mapping is shared memory owned by this value; it is read and written only by
// `pop`, which takes `&mut self` (behind `CoalescedWrites`'s mutex).
unsafe impl Send for Ring {}

impl Ring {
    fn map(vcpu: &VcpuFd) -> std::io::Result<Ring> {
        // SAFETY: sysconf has no side effects.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            size if size > 0 => size as usize,
            _ => return Err(std::io::Error::last_os_error()),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a new shared mapping of one page of the vCPU file at the offset KVM
        // documents for the ring; it overlaps nothing.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(vcpu),
                offset,
            )
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(page.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Ring { page, page_size })
    }

    /// How many entries the page holds.
    fn capacity(&self) -> u32 {
        let room = self.page_size - std::mem::size_of::<kvm_coalesced_mmio_ring>();
        (room / std::mem::size_of::<kvm_coalesced_mmio>()) as u32
    }

    /// The oldest write KVM kept, taken off the ring.
    fn pop(&mut self) -> Option<kvm_coalesced_mmio> {
        let ring = self.page.as_ptr();
        // SAFETY: `ring` is the live, page-sized mapping, aligned for its u32 indices; KVM
        // moves `last` past an entry once it is written, only this side moves `first`.
        let (first, last) = unsafe {
            (
                AtomicU32::from_ptr(&raw mut (*ring).first),
                AtomicU32::from_ptr(&raw mut (*ring).last),
            )
        };
        let index = first.load(Ordering::Relaxed);
        if index == last.load(Ordering::Acquire) || index >= self.capacity() {
            return None;
        }
        // SAFETY: `index` is below the ring's capacity, so the entry lies within the page;
        // KVM wrote it before it moved `last` (acquired above).
        let write = unsafe {
            let entries = (&raw const (*ring).coalesced_mmio).cast::<kvm_coalesced_mmio>();
            std::ptr::read_volatile(entries.add(index as usize))
        };
        // Hands the entry back to KVM once it is read.
        first.store((index + 1) % self.capacity(), Ordering::Release);
        Some(write)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `Ring::map` and nothing else refers to it.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.page_size) };
    }
}
