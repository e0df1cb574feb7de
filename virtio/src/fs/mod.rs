//! virtio-fs served in-process: the FUSE protocol answered by fuse-backend-rs's passthrough
//! filesystem over a host directory, so a share needs no virtiofsd (nothing to start, race or
//! clean up). The same model is served over vhost-user by `nixvmm device fs`.
//!
//! Confinement comes from the passthrough filesystem: every operation is relative to a
//! directory file descriptor inside the share, lookups use O_NOFOLLOW, `..` at the root stays at
//! the root, and symlinks are resolved by the guest, never by the host. Read-only shares are
//! enforced here, before a request reaches the filesystem: every request that would change
//! anything is answered with EROFS.

mod bounded;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use bounded::Bounded;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::{device_type, process_chains, Chain, Error, Memory, QueueDevice, COMMON_FEATURES};

/// Queue 0 is the high-priority queue, queue 1 the one request queue.
pub const QUEUE_SIZES: &[u16] = &[1024, 1024];
/// The mount tag's room in the configuration space.
pub const TAG_LEN: usize = 36;

/// Why `tag` cannot be a virtio-fs mount tag, if it cannot.
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(format!("1 to {TAG_LEN} bytes for virtio-fs"));
    }
    Ok(())
}

/// struct virtio_fs_config: tag[36] (NUL-padded), num_request_queues (1).
pub fn config_space(tag: &str) -> Vec<u8> {
    let mut config = vec![0u8; TAG_LEN];
    for (slot, byte) in config.iter_mut().zip(tag.bytes()) {
        *slot = byte;
    }
    config.extend_from_slice(&1u32.to_le_bytes());
    config
}

/// FUSE opcodes that change the filesystem (linux/fuse.h).
const MUTATING_OPCODES: &[u32] = &[
    4,  // SETATTR
    6,  // SYMLINK
    8,  // MKNOD
    9,  // MKDIR
    10, // UNLINK
    11, // RMDIR
    12, // RENAME
    13, // LINK
    16, // WRITE
    21, // SETXATTR
    24, // REMOVEXATTR
    35, // CREATE
    43, // FALLOCATE
    45, // RENAME2
    47, // COPY_FILE_RANGE
    51, // TMPFILE
];
const FUSE_OPEN: u32 = 14;
const FUSE_INIT: u32 = 26;
const FUSE_GETXATTR: u32 = 22;
const FUSE_LISTXATTR: u32 = 23;
const FUSE_READDIR: u32 = 28;
const FUSE_READDIRPLUS: u32 = 44;
const IN_HEADER_LEN: usize = 40;
/// Linux's largest extended attribute value or list (its VFS asks for no more).
const XATTR_SIZE_MAX: u32 = 65536;
/// The largest directory listing one READDIR may ask for (Linux asks for a page).
const READDIR_SIZE_MAX: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("shared directory {path}: {reason}")]
    Share { path: PathBuf, reason: String },
}

/// A shared host directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsConfig {
    pub shared_dir: PathBuf,
    /// The mount tag the guest sees (virtio-fs config space); `None` when the frontend
    /// provides it (QEMU's vhost-user-fs-pci has its own `tag=`).
    pub tag: Option<String>,
    pub readonly: bool,
    /// Pass extended attributes through.
    pub xattr: bool,
}

pub struct VirtioFs {
    server: Server<Arc<Bounded<PassthroughFs>>>,
    /// The filesystem the server serves, to let the guest's state go when a new driver
    /// session starts.
    fs: Arc<Bounded<PassthroughFs>>,
    /// A driver has sent FUSE_INIT since the share was made. (A device reset changes nothing
    /// here: it comes on a vCPU thread, whose filter forbids the filesystem's calls, and the
    /// next driver's FUSE_INIT lets the old session go on the worker.)
    initialized: AtomicBool,
    tag: Option<String>,
    readonly: bool,
}

impl VirtioFs {
    pub fn new(config: &FsConfig) -> Result<VirtioFs, FsError> {
        VirtioFs::with_descriptor_cap(config, crate::descriptor_budget())
    }

    /// A share on which the guest may hold at most `cap` files and folders open or looked up
    /// together (each is a descriptor of nixvmm's).
    pub fn with_descriptor_cap(config: &FsConfig, cap: usize) -> Result<VirtioFs, FsError> {
        let err = |reason: String| FsError::Share {
            path: config.shared_dir.clone(),
            reason,
        };
        if !config.shared_dir.is_dir() {
            return Err(err("not a directory; check the path".into()));
        }
        if let Some(tag) = &config.tag {
            check_tag(tag).map_err(|e| err(format!("tag `{tag}`: {e}")))?;
        }
        let fs = Arc::new(Bounded::new(passthrough(config)?, cap));
        Ok(VirtioFs {
            server: Server::new(fs.clone()),
            fs,
            initialized: AtomicBool::new(false),
            tag: config.tag.clone(),
            readonly: config.readonly,
        })
    }

    /// Handles one FUSE request; returns the bytes written into the chain.
    fn handle(&self, chain: Chain, mem: &Memory) -> u32 {
        // A second FUSE_INIT starts a new driver session: the guest rebooted without
        // unmounting (nothing tells a vhost-user backend of a reboot) or reloaded its driver.
        // What the old session held is let go first, or a backend serving boot after boot
        // (`nixvmm device fs`) would keep it and fill its descriptor budget.
        let head = request_head(&chain, mem);
        if opcode(&head) == Some(FUSE_INIT) && self.initialized.swap(true, Ordering::Relaxed) {
            self.fs.destroy();
        }
        if self.readonly && is_mutating(&head) {
            return reply_error(&chain, mem, libc::EROFS).unwrap_or(0);
        }
        if let Some(errno) = oversized(&head) {
            return reply_error(&chain, mem, errno).unwrap_or(0);
        }
        let chain_copy = chain.clone();
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("virtio-fs: bad request chain: {e}");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain) {
            Ok(w) => Writer::VirtioFs(w),
            Err(e) => {
                log::debug!("virtio-fs: bad reply chain: {e}");
                return 0;
            }
        };
        match self.server.handle_message(reader, writer, None, None) {
            Ok(written) => written as u32,
            Err(e) => {
                // A request the server could not decode still gets an answer, or the guest's
                // caller would wait for it forever.
                log::debug!("virtio-fs: request failed: {e}");
                reply_error(&chain_copy, mem, libc::EINVAL).unwrap_or(0)
            }
        }
    }
}

/// A guest buffer: where and how long.
type Buffer = (GuestAddress, u32);

/// The passthrough filesystem over `config.shared_dir`, as nixvmm configures it (also what a
/// host-side FUSE mount of the share serves, in tests and benchmarks).
pub fn passthrough(config: &FsConfig) -> Result<PassthroughFs, FsError> {
    let err = |reason: String| FsError::Share {
        path: config.shared_dir.clone(),
        reason,
    };
    let root = config
        .shared_dir
        .to_str()
        .ok_or_else(|| err("the path is not UTF-8".into()))?;
    let fs = PassthroughFs::<()>::new(Config {
        root_dir: root.to_string(),
        xattr: config.xattr,
        do_import: true,
        ..Default::default()
    })
    .map_err(|e| err(e.to_string()))?;
    fs.import().map_err(|e| err(e.to_string()))?;
    Ok(fs)
}

/// Where a chain's readable and writable buffers are.
fn buffers(chain: &Chain) -> (Vec<Buffer>, Vec<Buffer>) {
    let readable = chain
        .clone()
        .readable()
        .map(|d| (d.addr(), d.len()))
        .collect();
    let writable = chain
        .clone()
        .writable()
        .map(|d| (d.addr(), d.len()))
        .collect();
    (readable, writable)
}

/// Reads up to `len` bytes from the start of the readable buffers.
fn peek(mem: &Memory, readable: &[Buffer], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for (addr, size) in readable {
        let take = (len - out.len()).min(*size as usize);
        let mut part = vec![0u8; take];
        if mem.read_slice(&mut part, *addr).is_err() {
            break;
        }
        out.extend_from_slice(&part);
        if out.len() == len {
            break;
        }
    }
    out
}

/// The start of the request in `chain`: its header and the first 20 bytes after it, or as
/// much of them as the chain holds (all the checks below look at).
fn request_head(chain: &Chain, mem: &Memory) -> Vec<u8> {
    let (readable, _) = buffers(chain);
    peek(mem, &readable, IN_HEADER_LEN + 20)
}

/// The request's opcode, where its header is there to read.
fn opcode(head: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(head.get(4..8)?.try_into().ok()?))
}

/// Whether the request changes the share: a mutating opcode, or an open for writing.
fn is_mutating(head: &[u8]) -> bool {
    if head.len() < IN_HEADER_LEN {
        return false; // the server rejects malformed headers itself
    }
    let Some(opcode) = opcode(head) else {
        return false;
    };
    let open_for_write = opcode == FUSE_OPEN && head.len() >= IN_HEADER_LEN + 4 && {
        let flags = u32::from_le_bytes([head[40], head[41], head[42], head[43]]) as i32;
        flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
    };
    MUTATING_OPCODES.contains(&opcode) || open_for_write
}

/// The error for a request whose size field asks for more than a kernel ever does: the
/// passthrough filesystem allocates what GETXATTR, LISTXATTR and READDIR ask for before it
/// looks (a guest could make nixvmm allocate gigabytes; found by the `virtiofs_requests`
/// fuzz target).
fn oversized(head: &[u8]) -> Option<i32> {
    // GETXATTR/LISTXATTR: size, padding; READDIR(PLUS): fh, offset, size, …
    let size_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?))
    };
    match opcode(head)? {
        FUSE_GETXATTR | FUSE_LISTXATTR if size_at(IN_HEADER_LEN)? > XATTR_SIZE_MAX => {
            Some(libc::E2BIG)
        }
        FUSE_READDIR | FUSE_READDIRPLUS if size_at(IN_HEADER_LEN + 16)? > READDIR_SIZE_MAX => {
            Some(libc::ENOMEM)
        }
        _ => None,
    }
}

/// Answers the request with just an error header (`-errno`); returns the reply's length, or
/// `None` when the chain has no header to answer or no room for the reply.
fn reply_error(chain: &Chain, mem: &Memory, errno: i32) -> Option<u32> {
    let (readable, writable) = buffers(chain);
    let head = peek(mem, &readable, 16);
    let unique = head.get(8..16)?;
    let mut reply = Vec::with_capacity(16);
    reply.extend_from_slice(&16u32.to_le_bytes());
    reply.extend_from_slice(&(-errno).to_le_bytes());
    reply.extend_from_slice(unique);
    let (addr, len) = writable.first()?;
    if (*len as usize) < reply.len() || mem.write_slice(&reply, *addr).is_err() {
        return None;
    }
    Some(reply.len() as u32)
}

impl QueueDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn config(&self) -> Vec<u8> {
        self.tag.as_deref().map_or_else(Vec::new, config_space)
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, Error> {
        if index >= QUEUE_SIZES.len() {
            return Err(Error::NoQueue(index));
        }
        process_chains(queue, mem, |chain| self.handle(chain, mem))
    }
}
