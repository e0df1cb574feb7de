//! Per-vCPU architectural state at power-on: CPUID, MSRs, FPU, local APIC, and for the boot
//! CPU the registers of a 64-bit Linux entry. Application processors stay in KVM's
//! wait-for-SIPI state; the guest starts them through its local APIC.

use firmware::layout::{BOOT_PARAMS_START, BOOT_STACK_POINTER, GDT_START};
use firmware::paging::{Segment, GDT_LIMIT};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;

/// CR0, CR4 and EFER bits for long mode.
const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("setting up vCPU {cpu}: {what}: {source}")]
    Kvm {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Shapes the host's supported CPUID for vCPU `id` of `count`: its APIC ID, the topology
/// (one socket, `count` cores, one thread each) and the hypervisor bit.
pub fn cpuid_for(supported: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let core_bits = u32::BITS - u32::from(count.saturating_sub(1)).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= 1 << 31; // running on a hypervisor
                if count > 1 {
                    entry.edx |= 1 << 28; // HTT: the count in EBX[23:16] is valid
                }
            }
            4 => {
                // Cores per package - 1 in EAX[31:26]; every cache private to its core.
                entry.eax = (entry.eax & 0x0000_3fff) | (u32::from(count - 1) << 26);
            }
            0xb | 0x1f => {
                entry.edx = u32::from(id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

/// The MSRs Linux expects a loader to have cleared or set, kept to those the host's KVM lists
/// (PVM, for one, refuses some that hardware KVM accepts).
fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

fn segment(index: usize) -> kvm_segment {
    let s = Segment::from_gdt(index);
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: 0,
        padding: 0,
    }
}

/// Local APIC LVT registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Everything a vCPU needs before its first run.
pub struct CpuSetup<'a> {
    pub id: u8,
    pub count: u8,
    pub supported_cpuid: &'a CpuId,
    pub supported_msrs: &'a [u32],
    /// For the boot CPU: the 64-bit entry point and CR3.
    pub entry: Option<(u64, u64)>,
}

pub fn configure(vcpu: &VcpuFd, setup: &CpuSetup) -> Result<(), CpuError> {
    let cpu = setup.id;
    let kvm = |what: &'static str| move |source| CpuError::Kvm { cpu, what, source };
    vcpu.set_cpuid2(&cpuid_for(setup.supported_cpuid, setup.id, setup.count))
        .map_err(kvm("CPUID"))?;
    let entries = boot_msrs(setup.supported_msrs);
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Kvm {
        cpu,
        what: "MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if let Some(refused) = entries.get(written) {
        // KVM stops at the first MSR it refuses; the rest are optional for Linux.
        log::warn!(
            "vCPU {cpu}: KVM refused MSR {:#x}; continuing",
            refused.index
        );
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))?;
    if let Some((entry, cr3)) = setup.entry {
        set_long_mode_entry(vcpu, entry, cr3).map_err(kvm("registers"))?;
    }
    Ok(())
}

/// The boot CPU's state at a 64-bit Linux entry: long mode with nixvmm's GDT and page
/// tables, RSI pointing at the boot parameters.
fn set_long_mode_entry(vcpu: &VcpuFd, entry: u64, cr3: u64) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs = segment(1);
    let data = segment(2);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment(3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 |= CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)?;
    let regs = kvm_bindings::kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: BOOT_PARAMS_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    fn host_like() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn cpuid_carries_apic_id_and_topology() {
        let cpuid = cpuid_for(&host_like(), 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "APIC ID");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(e[0].ecx & (1 << 31), 0, "hypervisor bit");
        assert_eq!(e[1].edx, 3, "x2APIC ID");
        assert_eq!((e[2].eax, e[2].ebx), (2, 4), "4 cores need 2 ID bits");
    }

    #[test]
    fn msrs_only_from_the_supported_list() {
        let msrs = boot_msrs(&[0x10, 0x174, 0xc000_0082]);
        let indices: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        assert_eq!(indices, [0x174, 0xc000_0082, 0x10]);
    }
}
