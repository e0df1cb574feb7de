//! Loading a Linux kernel and writing the boot parameters it reads on entry (the Linux x86
//! 64-bit boot protocol, `Documentation/arch/x86/boot.rst`).
//!
//! Both kernel formats are entered the same way, in 64-bit mode with the boot parameters'
//! address in RSI: a bzImage at its 64-bit entry (`startup_64`, 0x200 past the protected-mode
//! code), an ELF vmlinux at its ELF entry point (as Firecracker does). A bzImage whose payload
//! the host has already decompressed is entered like a vmlinux, at its link address, with the
//! bzImage's own setup header in the boot params: the guest skips its decompressor (and with it
//! the decompressor's KASLR).

use std::fs::File;
use std::io::{Read, Seek};
use std::ops::Range;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, ReadVolatile};

use crate::layout::{self, BOOT_PARAMS_START, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START};
use crate::{Error, Result};

/// `setup_header` magic values and flags.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of `startup_64` from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Where the setup header starts in a bzImage, and the fields read from it before loading.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const PAYLOAD_OFFSET_FIELD: usize = 0x248;
const PAYLOAD_LENGTH_FIELD: usize = 0x24c;
/// Boot protocol 2.08 added `payload_offset` and `payload_length`.
const PAYLOAD_FIELDS_VERSION: u16 = 0x0208;
/// Limits for kernels that do not state them (ELF vmlinux, old headers).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const DEFAULT_CMDLINE_SIZE: usize = 2048;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Which kind of image the kernel file was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    /// A bzImage whose payload was decompressed on the host, entered as its vmlinux.
    UnpackedBzImage,
    Elf,
    /// Code with no headers, entered at its first byte.
    Raw,
}

/// A kernel placed in guest memory, ready to be entered.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// Guest-physical address of the 64-bit entry point.
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's own setup header, which the boot params carry back to it.
    header: Option<setup_header>,
}

impl LoadedKernel {
    fn initrd_addr_max(&self) -> u64 {
        match &self.header {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        }
    }

    /// Longest command line (without the NUL) this kernel accepts.
    pub fn cmdline_limit(&self) -> usize {
        let stated = match &self.header {
            Some(h) if h.version >= 0x0206 && h.cmdline_size != 0 => h.cmdline_size as usize,
            _ => DEFAULT_CMDLINE_SIZE - 1,
        };
        stated.min(CMDLINE_MAX_SIZE - 1)
    }
}

/// Loads the kernel file at `path` (bzImage or ELF vmlinux) into guest memory.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> Result<LoadedKernel> {
    let shown = path.display().to_string();
    let read_err = |source| Error::KernelRead {
        path: shown.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut head = [0u8; 0x206];
    let got = read_up_to(&mut file, &mut head).map_err(read_err)?;
    let head = &head[..got];
    let load_err = |e: linux_loader::loader::Error| Error::KernelLoad {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    if head.starts_with(b"\x7fELF") {
        let result = Elf::load(mem, None, &mut file, highmem).map_err(load_err)?;
        return Ok(LoadedKernel {
            format: KernelFormat::Elf,
            entry: result.kernel_load,
            end: result.kernel_end,
            header: None,
        });
    }
    if head.len() >= 0x206 && head[0x202..0x206] == HDRS_MAGIC.to_le_bytes() {
        let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_err)?;
        let header = result.setup_header.unwrap_or_default();
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(Error::KernelLoad {
                path: shown,
                reason: "this bzImage has no 64-bit entry point (not an x86-64 kernel)".into(),
            });
        }
        return Ok(LoadedKernel {
            format: KernelFormat::BzImage,
            entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            end: result.kernel_end,
            header: Some(header),
        });
    }
    Err(Error::NotAKernel { path: shown })
}

/// How many bytes from a bzImage's start [`bzimage_payload`] and [`load_unpacked_bzimage`]
/// read: the boot sector and the setup header.
pub const BZIMAGE_HEAD_LEN: usize = 0x400;

/// Where the compressed vmlinux lies in a bzImage file (`payload_offset` and `payload_length`
/// of its setup header, boot protocol 2.08 and later), given the file's first
/// [`BZIMAGE_HEAD_LEN`] bytes; `None` when `head` is no such bzImage.
pub fn bzimage_payload(head: &[u8]) -> Option<Range<u64>> {
    let header = bzimage_header(head)?;
    if header.version < PAYLOAD_FIELDS_VERSION {
        return None;
    }
    let field = |at: usize| -> Option<u64> {
        let bytes = head.get(at..at + 4)?.try_into().ok()?;
        Some(u64::from(u32::from_le_bytes(bytes)))
    };
    let start = protected_mode_start(&header) + field(PAYLOAD_OFFSET_FIELD)?;
    Some(start..start + field(PAYLOAD_LENGTH_FIELD)?)
}

/// Loads `vmlinux`, the decompressed payload of the bzImage whose first bytes are `head`, into
/// guest memory at its link address. The boot params carry the bzImage's setup header, as its
/// decompressor would have passed them on.
pub fn load_unpacked_bzimage<M, F>(mem: &M, head: &[u8], vmlinux: &mut F) -> Result<LoadedKernel>
where
    M: GuestMemory,
    F: Read + ReadVolatile + Seek,
{
    let load_err = |reason: String| Error::KernelLoad {
        path: "the decompressed bzImage payload".into(),
        reason,
    };
    let header = bzimage_header(head).ok_or_else(|| load_err("no bzImage header".into()))?;
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(load_err(
            "this bzImage has no 64-bit entry point (not an x86-64 kernel)".into(),
        ));
    }
    let highmem = Some(GuestAddress(HIGH_MEMORY_START));
    let result = Elf::load(mem, None, vmlinux, highmem).map_err(|e| load_err(e.to_string()))?;
    Ok(LoadedKernel {
        format: KernelFormat::UnpackedBzImage,
        entry: result.kernel_load,
        end: result.kernel_end,
        header: Some(header),
    })
}

/// The setup header in a bzImage's first bytes, if they have one ("HdrS").
fn bzimage_header(head: &[u8]) -> Option<setup_header> {
    let mut header = setup_header::default();
    let size = std::mem::size_of::<setup_header>();
    let bytes = head.get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)?;
    header.as_mut_slice().copy_from_slice(bytes);
    (header.header == HDRS_MAGIC).then_some(header)
}

/// Where a bzImage's protected-mode code starts: after its real-mode setup sectors.
fn protected_mode_start(header: &setup_header) -> u64 {
    let sectors = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    (sectors + 1) * 512
}

/// Reads until `buf` is full or the input ends; returns how much was read.
pub fn read_up_to(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Loads the initrd as high as the kernel allows: below its `initrd_addr_max`, below the MMIO
/// hole and the end of RAM, above the kernel, page aligned.
pub fn load_initrd<M: GuestMemory>(
    mem: &M,
    kernel: &LoadedKernel,
    path: &Path,
    mem_size: u64,
) -> Result<InitrdPlacement> {
    let data = std::fs::read(path).map_err(|source| Error::InitrdRead {
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let limit = (kernel.initrd_addr_max() + 1)
        .min(layout::MMIO_HOLE_START)
        .min(mem_size);
    let too_big = Error::InitrdTooBig {
        size,
        limit,
        mem_mib: mem_size >> 20,
    };
    let addr = limit.checked_sub(size).ok_or(too_big)? & !0xfff;
    if addr < kernel.end {
        return Err(Error::InitrdTooBig {
            size,
            limit,
            mem_mib: mem_size >> 20,
        });
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite {
            what: "initrd",
            source,
        })?;
    Ok(InitrdPlacement {
        addr: GuestAddress(addr),
        size,
    })
}

/// Everything the boot parameters describe besides the kernel itself.
#[derive(Clone, Debug)]
pub struct BootSetup<'a> {
    pub cmdline: &'a str,
    pub initrd: Option<InitrdPlacement>,
    pub mem_size: u64,
    pub rsdp: GuestAddress,
}

/// Writes the command line and the boot parameters ("zero page") for `kernel`.
pub fn write_boot_params<M: GuestMemory>(
    mem: &M,
    kernel: &LoadedKernel,
    setup: &BootSetup,
) -> Result<()> {
    let cmdline = setup.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(Error::CmdlineNul);
    }
    let max = kernel.cmdline_limit();
    if cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut with_nul = cmdline.to_vec();
    with_nul.push(0);
    mem.write_slice(&with_nul, GuestAddress(CMDLINE_START))
        .map_err(|source| Error::GuestWrite {
            what: "kernel command line",
            source,
        })?;

    let mut params = boot_params {
        hdr: kernel.header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG_MAGIC,
            header: HDRS_MAGIC,
            kernel_alignment: KERNEL_ALIGNMENT,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some(initrd) = setup.initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.ext_ramdisk_image = (initrd.addr.0 >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = setup.rsdp.0;
    let map = layout::e820_map(setup.mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(BOOT_PARAMS_START))
        .map_err(|source| Error::GuestWrite {
            what: "boot parameters",
            source,
        })
}

/// Places raw 64-bit code at [`HIGH_MEMORY_START`] and enters it like a vmlinux (used for
/// nixvmm's built-in guest).
pub fn load_raw<M: GuestMemory>(mem: &M, code: &[u8]) -> Result<LoadedKernel> {
    mem.write_slice(code, GuestAddress(HIGH_MEMORY_START))
        .map_err(|source| Error::GuestWrite {
            what: "built-in guest",
            source,
        })?;
    Ok(LoadedKernel {
        format: KernelFormat::Raw,
        entry: GuestAddress(HIGH_MEMORY_START),
        end: HIGH_MEMORY_START + code.len() as u64,
        header: None,
    })
}
