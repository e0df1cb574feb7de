//! Tier 1: virtio-fs answered through a mock virtqueue with real FUSE messages: the INIT
//! handshake, lookups and reads, confinement at the root, read-only shares, malformed requests.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use virtio::fs::{FsConfig, VirtioFs};
use virtio::{Memory, QueueDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const REQUEST: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;
const REPLY_ROOM: u32 = 0x2_0000;
const ROOT: u64 = 1;

const INIT: u32 = 26;
const LOOKUP: u32 = 1;
const OPEN: u32 = 14;
const READ: u32 = 15;
const MKDIR: u32 = 9;
const CREATE: u32 = 35;

struct Guest {
    fs: VirtioFs,
    mem: Memory,
    unique: u64,
}

/// A FUSE reply: the error (0 or -errno) and the body after the 16-byte header.
struct Reply {
    error: i32,
    body: Vec<u8>,
}

impl Guest {
    fn new(dir: &Path, readonly: bool) -> Guest {
        Guest::with_descriptor_cap(dir, readonly, virtio::descriptor_budget())
    }

    fn with_descriptor_cap(dir: &Path, readonly: bool, cap: usize) -> Guest {
        let config = FsConfig {
            shared_dir: dir.to_path_buf(),
            tag: Some("t".into()),
            readonly,
            xattr: false,
        };
        let fs = VirtioFs::with_descriptor_cap(&config, cap).unwrap();
        let mut guest = Guest {
            fs,
            mem: Memory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap(),
            unique: 0,
        };
        guest.init();
        guest
    }

    /// The FUSE_INIT handshake a driver starts with.
    fn init(&mut self) {
        let mut init = Vec::new();
        for v in [7u32, 31, 0x2_0000, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        let reply = self.call(INIT, ROOT, &init);
        assert_eq!(reply.error, 0);
        assert_eq!(
            u32::from_le_bytes(reply.body[..4].try_into().unwrap()),
            7,
            "FUSE major"
        );
    }

    /// Sends raw request bytes on the request queue; returns the used length.
    fn send_raw(&mut self, request: &[u8]) -> u32 {
        self.mem
            .write_slice(request, GuestAddress(REQUEST))
            .unwrap();
        let mock = MockSplitQueue::new(&self.mem, 16);
        mock.build_desc_chain(&[
            RawDescriptor::from(Descriptor::new(REQUEST, request.len() as u32, 0, 0)),
            RawDescriptor::from(Descriptor::new(REPLY, REPLY_ROOM, 2, 0)),
        ])
        .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        assert!(self.fs.process_queue(1, &mut queue, &self.mem).unwrap());
        mock.used().ring().ref_at(0).unwrap().load().len()
    }

    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.unique += 1;
        let mut request = Vec::new();
        request.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        request.extend_from_slice(&opcode.to_le_bytes());
        request.extend_from_slice(&self.unique.to_le_bytes());
        request.extend_from_slice(&nodeid.to_le_bytes());
        request.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen, padding
        request.extend_from_slice(body);
        let used = self.send_raw(&request);
        let mut reply = vec![0u8; used as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(REPLY))
            .unwrap();
        assert!(reply.len() >= 16, "reply header");
        assert_eq!(
            u64::from_le_bytes(reply[8..16].try_into().unwrap()),
            self.unique
        );
        Reply {
            error: i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            body: reply[16..].to_vec(),
        }
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        self.call(LOOKUP, parent, &body)
    }
}

fn nodeid(entry: &Reply) -> u64 {
    u64::from_le_bytes(entry.body[..8].try_into().unwrap())
}

fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greeting"), "hello over FUSE\n").unwrap();
    dir
}

#[test]
fn lookup_open_read() {
    let dir = share();
    let mut g = Guest::new(dir.path(), false);
    let entry = g.lookup(ROOT, "greeting");
    assert_eq!(entry.error, 0);
    let node = nodeid(&entry);
    let opened = g.call(OPEN, node, &[0u8; 8]); // O_RDONLY
    assert_eq!(opened.error, 0);
    let fh = u64::from_le_bytes(opened.body[..8].try_into().unwrap());
    let mut read = Vec::new();
    read.extend_from_slice(&fh.to_le_bytes());
    read.extend_from_slice(&0u64.to_le_bytes());
    read.extend_from_slice(&4096u32.to_le_bytes());
    read.extend_from_slice(&[0u8; 20]);
    let data = g.call(READ, node, &read);
    assert_eq!(data.error, 0);
    assert_eq!(data.body, b"hello over FUSE\n");
    assert_eq!(g.lookup(ROOT, "missing").error, -libc::ENOENT);
}

#[test]
fn dotdot_at_the_root_stays_at_the_root() {
    let dir = share();
    let mut g = Guest::new(dir.path(), false);
    let up = g.lookup(ROOT, "..");
    assert_eq!(up.error, 0);
    assert_eq!(nodeid(&up), ROOT);
    assert_eq!(
        g.lookup(ROOT, "a/b").error,
        -libc::EINVAL,
        "names with a slash"
    );
}

#[test]
fn read_only_share_refuses_changes() {
    let dir = share();
    let mut g = Guest::new(dir.path(), true);
    let mut mkdir = Vec::new();
    mkdir.extend_from_slice(&0o755u32.to_le_bytes());
    mkdir.extend_from_slice(&0u32.to_le_bytes());
    mkdir.extend_from_slice(b"newdir\0");
    assert_eq!(g.call(MKDIR, ROOT, &mkdir).error, -libc::EROFS);
    let mut create = Vec::new();
    for v in [libc::O_WRONLY as u32 | libc::O_CREAT as u32, 0o644, 0, 0] {
        create.extend_from_slice(&v.to_le_bytes());
    }
    create.extend_from_slice(b"newfile\0");
    assert_eq!(g.call(CREATE, ROOT, &create).error, -libc::EROFS);
    let node = nodeid(&g.lookup(ROOT, "greeting"));
    let write_open = (libc::O_WRONLY as u32).to_le_bytes();
    assert_eq!(
        g.call(OPEN, node, &[&write_open[..], &[0; 4]].concat())
            .error,
        -libc::EROFS
    );
    assert_eq!(g.call(OPEN, node, &[0u8; 8]).error, 0, "reading is allowed");
    assert!(!dir.path().join("newdir").exists() && !dir.path().join("newfile").exists());

    let mut rw = Guest::new(dir.path(), false);
    assert_eq!(rw.call(MKDIR, ROOT, &mkdir).error, 0);
    assert!(
        dir.path().join("newdir").is_dir(),
        "a writable share does change"
    );
}

#[test]
fn malformed_requests_do_not_panic() {
    let dir = share();
    let mut g = Guest::new(dir.path(), true);
    assert_eq!(g.send_raw(&[1, 2, 3]), 0, "header too short: no reply");
    // A header whose length field claims more than was sent, and a lookup without a name.
    let mut lying = Vec::new();
    lying.extend_from_slice(&4096u32.to_le_bytes());
    lying.extend_from_slice(&LOOKUP.to_le_bytes());
    lying.extend_from_slice(&[0u8; 32]);
    g.send_raw(&lying);
    assert_eq!(
        g.call(LOOKUP, ROOT, &[]).error,
        -libc::EINVAL,
        "answered, not dropped"
    );
    assert_eq!(g.lookup(ROOT, "greeting").error, 0, "still serving");
}

/// Sizes no kernel asks for are answered with an error before the passthrough filesystem
/// allocates them (the `virtiofs_requests` fuzz target found a GETXATTR of 4 GiB that made
/// it allocate 4 GiB); sizes a kernel asks for still reach it.
#[test]
fn sizes_past_what_a_kernel_asks_are_refused_before_any_allocation() {
    const GETXATTR: u32 = 22;
    const LISTXATTR: u32 = 23;
    const OPENDIR: u32 = 27;
    const READDIR: u32 = 28;
    let dir = share();
    let mut g = Guest::new(dir.path(), false);
    let file = nodeid(&g.lookup(ROOT, "greeting"));
    let xattr = |size: u32| {
        let mut body = size.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 4]);
        body.extend_from_slice(b"user.x\0");
        body
    };
    assert_eq!(
        g.call(GETXATTR, file, &xattr(0xffff_ff00)).error,
        -libc::E2BIG
    );
    assert_eq!(
        g.call(LISTXATTR, file, &xattr(u32::MAX)).error,
        -libc::E2BIG
    );
    // Within the limit: the filesystem answers (xattrs are off in this share).
    assert_ne!(g.call(GETXATTR, file, &xattr(64)).error, -libc::E2BIG);
    let opened = g.call(OPENDIR, ROOT, &[0u8; 8]);
    assert_eq!(opened.error, 0);
    let fh = &opened.body[..8];
    let readdir = |size: u32| {
        let mut body = fh.to_vec();
        body.extend_from_slice(&0u64.to_le_bytes()); // offset
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&[0u8; 20]); // read flags, lock owner, flags, padding
        body
    };
    assert_eq!(
        g.call(READDIR, ROOT, &readdir(u32::MAX)).error,
        -libc::ENOMEM
    );
    let listing = g.call(READDIR, ROOT, &readdir(4096));
    assert_eq!(listing.error, 0);
    assert!(
        listing.body.windows(8).any(|w| w == b"greeting"),
        "a listing within the limit"
    );
}

const RELEASE: u32 = 18;

fn release(g: &mut Guest, node: u64, fh: u64) -> Reply {
    let mut body = fh.to_le_bytes().to_vec();
    body.extend_from_slice(&[0u8; 16]); // flags, release_flags, lock_owner
    g.call(RELEASE, node, &body)
}

/// A guest that opens without releasing: past the share's cap, opens fail with ENFILE
/// (each handle is a descriptor of nixvmm's); a release makes room, a release of a handle
/// that is not open makes none.
#[test]
fn open_handles_stop_at_the_cap_and_releases_make_room() {
    let dir = share();
    // A small cap: the test does not depend on this host's open-files limit.
    let cap = 64;
    let mut g = Guest::with_descriptor_cap(dir.path(), false, cap);
    let node = nodeid(&g.lookup(ROOT, "greeting"));
    let mut handles = Vec::new();
    // The file looked up holds one descriptor of the budget too.
    for _ in 0..cap - 1 {
        let opened = g.call(OPEN, node, &[0u8; 8]);
        assert_eq!(opened.error, 0);
        handles.push(u64::from_le_bytes(opened.body[..8].try_into().unwrap()));
    }
    assert_eq!(g.call(OPEN, node, &[0u8; 8]).error, -libc::ENFILE);
    assert_ne!(release(&mut g, node, u64::MAX).error, 0, "no such handle");
    assert_eq!(g.call(OPEN, node, &[0u8; 8]).error, -libc::ENFILE);
    let fh = handles.pop().unwrap();
    assert_eq!(release(&mut g, node, fh).error, 0);
    assert_eq!(g.call(OPEN, node, &[0u8; 8]).error, 0, "room again");
}

const FORGET: u32 = 2;
const OPENDIR: u32 = 27;
const READDIRPLUS: u32 = 44;

/// FORGET has no reply.
fn forget(g: &mut Guest, node: u64, lookups: u64) {
    g.unique += 1;
    let mut request = Vec::new();
    request.extend_from_slice(&48u32.to_le_bytes());
    request.extend_from_slice(&FORGET.to_le_bytes());
    request.extend_from_slice(&g.unique.to_le_bytes());
    request.extend_from_slice(&node.to_le_bytes());
    request.extend_from_slice(&[0u8; 16]);
    request.extend_from_slice(&lookups.to_le_bytes());
    assert_eq!(g.send_raw(&request), 0, "no reply to FORGET");
}

fn opendir(g: &mut Guest, dir: u64) -> u64 {
    let opened = g.call(OPENDIR, dir, &[0u8; 8]);
    assert_eq!(opened.error, 0);
    u64::from_le_bytes(opened.body[..8].try_into().unwrap())
}

/// A listing with attributes from the start of the folder `dir` open as `fh`.
fn readdirplus(g: &mut Guest, dir: u64, fh: u64) -> Reply {
    let mut body = fh.to_le_bytes().to_vec();
    body.extend_from_slice(&0u64.to_le_bytes()); // offset
    body.extend_from_slice(&0x1_0000u32.to_le_bytes()); // size
    body.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
    g.call(READDIRPLUS, dir, &body)
}

/// The entries in a READDIRPLUS reply, by name with their node IDs: each a fuse_entry_out
/// (128 bytes, the node ID first), then a fuse_dirent (ino, off, namelen, type, the name
/// padded to 8 bytes).
fn entries(listing: &Reply) -> Vec<(String, u64)> {
    let (body, mut at, mut entries) = (&listing.body, 0, Vec::new());
    while at + 128 + 24 <= body.len() {
        let node = u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
        let dirent = at + 128;
        let len = u32::from_le_bytes(body[dirent + 16..dirent + 20].try_into().unwrap()) as usize;
        let name = String::from_utf8_lossy(&body[dirent + 24..dirent + 24 + len]).into();
        entries.push((name, node));
        at = dirent + (24 + len).next_multiple_of(8);
    }
    entries
}

/// A guest that looks up without forgetting: past the share's cap (open files and looked-up
/// ones together), lookups of files it does not hold yet fail with ENFILE (fuse-backend-rs
/// keeps a descriptor per inode) and listings give them by name only; lookups of files it
/// holds go on, a forget makes room, and a new driver session (FUSE_INIT) lets all go.
#[test]
fn looked_up_files_stop_at_the_cap_and_forgets_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 64;
    for i in 0..cap - 2 {
        std::fs::write(dir.path().join(format!("held{i}")), "x").unwrap();
    }
    for i in 0..100 {
        std::fs::write(dir.path().join(format!("new{i}")), "x").unwrap();
    }
    // Descriptors into this share only: other tests of this process open theirs meanwhile.
    let share = dir.path().canonicalize().unwrap();
    let open_fds = || {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.starts_with(&share))
            .count()
    };
    let mut g = Guest::with_descriptor_cap(dir.path(), false, cap);
    let before = open_fds();
    let fh = opendir(&mut g, ROOT);
    let mut nodes: Vec<u64> = (0..cap - 2)
        .map(|i| {
            let entry = g.lookup(ROOT, &format!("held{i}"));
            assert_eq!(entry.error, 0, "held{i}");
            nodeid(&entry)
        })
        .collect();
    let last = g.lookup(ROOT, "new0");
    assert_eq!(last.error, 0, "the last one within the cap");
    nodes.push(nodeid(&last));
    for i in 1..100 {
        assert_eq!(
            g.lookup(ROOT, &format!("new{i}")).error,
            -libc::ENFILE,
            "new{i}"
        );
    }
    let grown = open_fds() - before;
    assert!(
        (cap - 4..=cap + 4).contains(&grown),
        "{grown} descriptors for {cap} held"
    );
    assert_eq!(g.lookup(ROOT, "held0").error, 0, "a file the guest holds");
    // A listing at the cap is whole; what the guest does not hold comes by name only.
    let listing = readdirplus(&mut g, ROOT, fh);
    assert_eq!(listing.error, 0);
    let listed = entries(&listing);
    assert_eq!(listed.len(), cap - 2 + 100, "every file listed");
    for (name, node) in &listed {
        let held = name.starts_with("held") || name == "new0";
        assert_eq!(
            *node != 0,
            held,
            "{name}: attributes only for what the guest holds"
        );
    }

    // held0 was looked up twice and listed once: forgetting two leaves it held, the third
    // makes room.
    forget(&mut g, nodes[0], 2);
    assert_eq!(g.lookup(ROOT, "new1").error, -libc::ENFILE);
    forget(&mut g, nodes[0], 1);
    // Room for one: a creation, a handle and a new file, does not fit; a lookup does.
    let mut create = Vec::new();
    for v in [libc::O_WRONLY as u32 | libc::O_CREAT as u32, 0o644, 0, 0] {
        create.extend_from_slice(&v.to_le_bytes());
    }
    create.extend_from_slice(b"made\0");
    assert_eq!(g.call(CREATE, ROOT, &create).error, -libc::ENFILE);
    assert_eq!(g.lookup(ROOT, "new1").error, 0, "room again");

    // A new driver session (a reboot without unmounting: FUSE_INIT again) lets the old
    // one's handles and lookups go.
    g.init();
    assert!(open_fds() <= before + 4, "descriptors given back");
    for i in 2..cap + 2 {
        assert_eq!(
            g.lookup(ROOT, &format!("new{i}")).error,
            0,
            "new{i} in the new session"
        );
    }
}

/// A listing with attributes is a lookup of every entry sent with them: past the cap the
/// entries come by name only, so the listing stays whole and hands out no more.
#[test]
fn listings_with_attributes_count_toward_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 16;
    for i in 0..cap * 2 {
        std::fs::write(dir.path().join(format!("f{i}")), "x").unwrap();
    }
    let mut g = Guest::with_descriptor_cap(dir.path(), false, cap);
    let fh = opendir(&mut g, ROOT);
    let listing = readdirplus(&mut g, ROOT, fh);
    assert_eq!(listing.error, 0);
    let listed = entries(&listing);
    assert_eq!(listed.len(), cap * 2, "every file listed");
    assert_eq!(
        listed.iter().filter(|(_, node)| *node != 0).count(),
        cap - 1,
        "attributes (a lookup each) up to the cap; the open folder holds one"
    );
    std::fs::write(dir.path().join("late"), "x").unwrap();
    assert_eq!(g.lookup(ROOT, "late").error, -libc::ENFILE);
}
