//! Tier 1: the 9P2000.L server answering real T-messages against a temp folder: the
//! operations a root-like filesystem needs, escape attempts, read-only shares, bad messages.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use virtio::ninep::{SecurityModel, Server, ShareConfig};

struct Client {
    server: Server,
    tag: u16,
}

/// A reply: its type and body.
struct R {
    kind: u8,
    body: Vec<u8>,
}

impl R {
    fn errno(&self) -> Option<i32> {
        (self.kind == 7).then(|| i32::from_le_bytes(self.body[..4].try_into().unwrap()))
    }
    fn ok(self) -> R {
        assert_ne!(self.kind, 7, "Rlerror {:?}", self.errno());
        self
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.body[at..at + 4].try_into().unwrap())
    }
}

#[derive(Default)]
struct T(Vec<u8>);

impl T {
    fn u16(mut self, v: u16) -> T {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> T {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> T {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn s(self, v: &str) -> T {
        let mut t = self.u16(v.len() as u16);
        t.0.extend_from_slice(v.as_bytes());
        t
    }
    fn bytes(mut self, v: &[u8]) -> T {
        self.0.extend_from_slice(v);
        self
    }
}

impl Client {
    fn new(root: &Path, readonly: bool) -> Client {
        Client::with(root, readonly, SecurityModel::None, 0)
    }

    /// A client attached as guest user `uid` to a share with `model`.
    fn with(root: &Path, readonly: bool, model: SecurityModel, uid: u32) -> Client {
        let server = Server::new(ShareConfig {
            root: root.to_path_buf(),
            readonly,
            security_model: model,
        })
        .unwrap();
        Client::attached(server, uid)
    }

    /// A client of `server`, attached as guest user `uid`.
    fn attached(server: Server, uid: u32) -> Client {
        let mut c = Client { server, tag: 0 };
        let r = c.call(100, T::default().u32(1 << 20).s("9P2000.L")).ok();
        assert_eq!(r.kind, 101);
        assert_eq!(
            r.u32_at(0),
            1 << 20,
            "the client's msize, within the server's limit"
        );
        c.call(104, T::default().u32(0).u32(!0).s("user").s("").u32(uid))
            .ok();
        c
    }

    /// Guest view of a file: (mode, uid, gid, rdev).
    fn attrs(&mut self, fid: u32) -> (u32, u32, u32, u64) {
        let a = self.call(24, T::default().u32(fid).u64(0x7ff)).ok();
        let at = 8 + 13;
        let u32_at = |o: usize| u32::from_le_bytes(a.body[o..o + 4].try_into().unwrap());
        let rdev = u64::from_le_bytes(a.body[at + 20..at + 28].try_into().unwrap());
        (u32_at(at), u32_at(at + 4), u32_at(at + 8), rdev)
    }

    /// Reads a whole xattr (or, with "", the name list) through Txattrwalk + Tread.
    fn get_xattr(&mut self, fid: u32, name: &str) -> Result<Vec<u8>, i32> {
        let walk = self.call(30, T::default().u32(fid).u32(500).s(name));
        if let Some(e) = walk.errno() {
            return Err(e);
        }
        let data = self.read(500);
        self.call(120, T::default().u32(500)).ok();
        Ok(data)
    }

    fn set_xattr(&mut self, fid: u32, name: &str, value: &[u8], flags: u32) -> Option<i32> {
        self.walk(fid, 501, &[]).ok();
        let create = T::default()
            .u32(501)
            .s(name)
            .u64(value.len() as u64)
            .u32(flags);
        if let Some(e) = self.call(32, create).errno() {
            return Some(e);
        }
        if !value.is_empty() {
            let w = T::default()
                .u32(501)
                .u64(0)
                .u32(value.len() as u32)
                .bytes(value);
            self.call(118, w).ok();
        }
        self.call(120, T::default().u32(501)).errno()
    }

    fn call(&mut self, kind: u8, body: T) -> R {
        self.tag = self.tag.wrapping_add(1);
        let mut msg = ((7 + body.0.len()) as u32).to_le_bytes().to_vec();
        msg.push(kind);
        msg.extend_from_slice(&self.tag.to_le_bytes());
        msg.extend_from_slice(&body.0);
        let reply = self.server.handle(&msg);
        assert_eq!(
            u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
            reply.len()
        );
        R {
            kind: reply[4],
            body: reply[7..].to_vec(),
        }
    }

    fn walk(&mut self, fid: u32, new: u32, names: &[&str]) -> R {
        let mut t = T::default().u32(fid).u32(new).u16(names.len() as u16);
        for n in names {
            t = t.s(n);
        }
        self.call(110, t)
    }

    fn open(&mut self, fid: u32, flags: u32) -> R {
        self.call(12, T::default().u32(fid).u32(flags))
    }

    fn read(&mut self, fid: u32) -> Vec<u8> {
        let r = self.call(116, T::default().u32(fid).u64(0).u32(4096)).ok();
        let n = r.u32_at(0) as usize;
        r.body[4..4 + n].to_vec()
    }
}

fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("share");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("greeting"), "hello over 9p\n").unwrap();
    std::fs::write(dir.path().join("outside"), "host secret\n").unwrap();
    std::os::unix::fs::symlink("../outside", root.join("escape")).unwrap();
    std::os::unix::fs::symlink("/", root.join("slash")).unwrap();
    dir
}

#[test]
fn walk_open_read_getattr_readdir() {
    let dir = share();
    let mut c = Client::new(&dir.path().join("share"), false);
    let w = c.walk(0, 1, &["greeting"]).ok();
    assert_eq!(u16::from_le_bytes([w.body[0], w.body[1]]), 1);
    c.open(1, libc::O_RDONLY as u32).ok();
    assert_eq!(c.read(1), b"hello over 9p\n");
    let attr = c.call(24, T::default().u32(1).u64(0x7ff)).ok();
    let size = u64::from_le_bytes(
        attr.body[8 + 13 + 12 + 16..8 + 13 + 12 + 24]
            .try_into()
            .unwrap(),
    );
    assert_eq!(size, 14);
    c.walk(0, 2, &[]).ok();
    c.open(2, libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32)
        .ok();
    let listing = c.call(40, T::default().u32(2).u64(0).u32(8192)).ok();
    let text = String::from_utf8_lossy(&listing.body);
    for name in ["greeting", "sub", "escape", "slash"] {
        assert!(text.contains(name), "{name} listed");
    }
    c.call(120, T::default().u32(2)).ok();
    assert_eq!(c.call(120, T::default().u32(2)).errno(), Some(libc::EBADF));
}

/// The entries of one Rreaddir body: (offset, name).
fn dir_entries(body: &[u8]) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut at = 4; // count
    while at < body.len() {
        let offset = u64::from_le_bytes(body[at + 13..at + 21].try_into().unwrap());
        let len = usize::from(u16::from_le_bytes([body[at + 22], body[at + 23]]));
        let name = String::from_utf8(body[at + 24..at + 24 + len].to_vec()).unwrap();
        out.push((offset, name));
        at += 24 + len;
    }
    out
}

/// A large directory read in small replies, each from the offset of the last entry the
/// previous one gave (as Linux's client reads): every entry once, and again from offset 0.
#[test]
fn readdir_in_small_replies_lists_a_large_directory_once() {
    let dir = share();
    let root = dir.path().join("share");
    let big = root.join("big");
    std::fs::create_dir(&big).unwrap();
    let mut want: Vec<String> = (0..3000)
        .map(|i| format!("{i:04}-{}", "x".repeat(i % 200)))
        .collect();
    for name in &want {
        std::fs::write(big.join(name), "").unwrap();
    }
    want.extend([".".to_string(), "..".to_string()]);
    want.sort();
    let mut c = Client::new(&root, false);
    c.walk(0, 1, &["big"]).ok();
    c.open(1, libc::O_RDONLY as u32 | libc::O_DIRECTORY as u32)
        .ok();
    for _pass in 0..2 {
        let mut got = Vec::new();
        let mut offset = 0;
        loop {
            let reply = c.call(40, T::default().u32(1).u64(offset).u32(512)).ok();
            let entries = dir_entries(&reply.body);
            let Some(&(last, _)) = entries.last() else {
                break;
            };
            assert!(
                reply.body.len() <= 4 + 512,
                "the reply fits the count asked"
            );
            got.extend(entries.into_iter().map(|(_, name)| name));
            offset = last;
        }
        got.sort();
        assert_eq!(got, want);
    }
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Held by the tests that count this process's descriptors or open many at once, so that
/// one's count is not another's doing.
fn counting_descriptors() -> std::sync::MutexGuard<'static, ()> {
    static COUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    COUNTING.lock().unwrap_or_else(|e| e.into_inner())
}

/// The inode number in a getattr reply's qid.
fn qid_path(attr: &R) -> u64 {
    u64::from_le_bytes(attr.body[8 + 5..8 + 13].try_into().unwrap())
}

/// A guest that keeps fids without end: the share's descriptors stay within its budget (idle
/// fids give theirs up and find their file again by its place, also after a rename through
/// the share), clones share their source's, and past MAX_FIDS fids are refused (ENFILE).
#[test]
fn fids_hold_descriptors_within_the_budget_and_find_their_files_again() {
    use std::os::unix::fs::MetadataExt;
    let _counting = counting_descriptors();
    let dir = share();
    let root = dir.path().join("share");
    let many = root.join("many");
    std::fs::create_dir_all(many.join("d")).unwrap();
    std::fs::write(many.join("0"), "").unwrap();
    std::fs::write(many.join("d/f"), "").unwrap();
    // A small budget: the test does not depend on this host's open-files limit.
    let budget = 256;
    let config = ShareConfig {
        root: root.clone(),
        readonly: false,
        security_model: SecurityModel::None,
    };
    let mut c = Client::attached(Server::with_budget(config, budget).unwrap(), 0);
    c.walk(0, 1, &["many"]).ok();
    let before = open_descriptors();
    for i in 0..200 {
        c.walk(1, 2 + i, &[]).ok();
    }
    assert!(
        open_descriptors() < before + 32,
        "200 clones took {} descriptors",
        open_descriptors() - before
    );
    c.walk(1, 1002, &["d", "f"]).ok();
    let first = 1003;
    let last = first + budget as u32 + 1000;
    for i in first..last {
        c.walk(1, i, &["0"]).ok();
    }
    assert!(
        open_descriptors() <= before + budget + 64,
        "{} descriptors for {} fids (budget {budget})",
        open_descriptors() - before,
        last
    );
    // Fids that gave their descriptor up still stand for their files.
    let zero = std::fs::metadata(many.join("0")).unwrap().ino();
    assert_eq!(
        qid_path(&c.call(24, T::default().u32(first).u64(0x7ff)).ok()),
        zero
    );
    let rename = T::default().u32(1).s("d").u32(1).s("e");
    c.call(74, rename).ok();
    let moved = std::fs::metadata(many.join("e/f")).unwrap().ino();
    let attr = c.call(24, T::default().u32(1002).u64(0x7ff)).ok();
    assert_eq!(
        qid_path(&attr),
        moved,
        "a fid under a renamed folder follows it"
    );
    // Past MAX_FIDS, ENFILE; one clunked makes room. Fids so far: the root, "many", its 200
    // clones, d/f and the walks to "0".
    let so_far = 2 + 200 + 1 + (last - first);
    let fill = 100_000;
    for i in 0..virtio::ninep::MAX_FIDS as u32 - so_far {
        c.walk(1, fill + i, &[]).ok();
    }
    let over = 1_000_000;
    assert_eq!(c.walk(1, over, &[]).errno(), Some(libc::ENFILE));
    c.call(120, T::default().u32(5)).ok();
    c.walk(1, over, &[]).ok();
}

/// Folders made deeper than Linux's PATH_MAX through the share: a fid's place stays within
/// it (ENAMETOOLONG), so a guest cannot make fids hold places without end.
#[test]
fn places_past_path_max_are_refused() {
    let dir = share();
    let mut c = Client::new(&dir.path().join("share"), false);
    let name = "n".repeat(255);
    let mut fid = 0;
    for depth in 1..=16 {
        let mkdir = T::default().u32(fid).s(&name).u32(0o755).u32(0);
        c.call(72, mkdir).ok();
        c.walk(fid, 100 + depth, &[&name]).ok();
        fid = 100 + depth;
    }
    let mkdir = T::default().u32(fid).s(&name).u32(0o755).u32(0);
    c.call(72, mkdir).ok();
    assert_eq!(
        c.walk(fid, 200, &[&name]).errno(),
        Some(libc::ENAMETOOLONG),
        "17 levels of 255-byte names"
    );
    c.walk(fid, 200, &[".."]).ok();
}

#[test]
fn the_guest_cannot_leave_the_share() {
    let dir = share();
    let mut c = Client::new(&dir.path().join("share"), false);
    // ".." at the root is the root.
    let root_qid = c.walk(0, 1, &[".."]).ok().body[2..15].to_vec();
    let again = c.walk(0, 2, &["."]).ok().body[2..15].to_vec();
    assert_eq!(root_qid, again);
    let deep = c.walk(0, 3, &["..", "..", "..", "sub", "..", ".."]).ok();
    assert_eq!(&deep.body[2 + 5 * 13..2 + 6 * 13], &root_qid[..]);
    // Symlinks are not followed by the server: opening one fails, walking through it fails.
    c.walk(0, 4, &["escape"]).ok();
    assert_eq!(c.open(4, libc::O_RDONLY as u32).errno(), Some(libc::ELOOP));
    c.walk(0, 5, &["slash"]).ok();
    assert_eq!(c.walk(5, 6, &["etc"]).errno(), Some(libc::ENOTDIR));
    // Names are single components.
    assert_eq!(
        c.walk(0, 7, &["sub/../../outside"]).errno(),
        Some(libc::EINVAL)
    );
    // Renames and links can only name entries inside the share.
    let rename = T::default().u32(0).s("greeting").u32(0).s("../stolen");
    assert_eq!(c.call(74, rename).errno(), Some(libc::EINVAL));
    c.walk(0, 8, &["greeting"]).ok();
    assert_eq!(
        c.call(70, T::default().u32(0).u32(8).s("../x")).errno(),
        Some(libc::EINVAL)
    );
    assert!(!dir.path().join("stolen").exists() && !dir.path().join("x").exists());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("outside")).unwrap(),
        "host secret\n"
    );
}

#[test]
fn create_write_rename_remove() {
    let dir = share();
    let root = dir.path().join("share");
    let mut c = Client::new(&root, false);
    c.walk(0, 1, &[]).ok();
    let create = T::default()
        .u32(1)
        .s("new")
        .u32(libc::O_RDWR as u32)
        .u32(0o644)
        .u32(0);
    c.call(14, create).ok();
    let data = b"written over 9p";
    let w = c
        .call(
            118,
            T::default()
                .u32(1)
                .u64(0)
                .u32(data.len() as u32)
                .bytes(data),
        )
        .ok();
    assert_eq!(w.u32_at(0) as usize, data.len());
    c.call(50, T::default().u32(1).u32(0)).ok();
    assert_eq!(std::fs::read(root.join("new")).unwrap(), data);
    c.call(72, T::default().u32(0).s("dir").u32(0o755).u32(0))
        .ok();
    c.walk(0, 2, &["dir"]).ok();
    c.call(74, T::default().u32(0).s("new").u32(2).s("moved"))
        .ok();
    assert!(root.join("dir/moved").exists());
    c.call(16, T::default().u32(0).s("link").s("dir/moved").u32(0))
        .ok();
    c.walk(0, 3, &["link"]).ok();
    let target = c.call(22, T::default().u32(3)).ok();
    assert_eq!(&target.body[2..], b"dir/moved");
    c.call(76, T::default().u32(2).s("moved").u32(0)).ok();
    c.call(
        76,
        T::default().u32(0).s("dir").u32(libc::AT_REMOVEDIR as u32),
    )
    .ok();
    assert!(!root.join("dir").exists());
    // setattr: truncate and chmod.
    c.walk(0, 4, &["greeting"]).ok();
    let setattr = T::default()
        .u32(4)
        .u32(1 | 8)
        .u32(0o600)
        .u32(0)
        .u32(0)
        .u64(5);
    c.call(26, setattr.u64(0).u64(0).u64(0).u64(0)).ok();
    assert_eq!(std::fs::read(root.join("greeting")).unwrap(), b"hello");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(root.join("greeting"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn read_only_share_refuses_every_change() {
    let dir = share();
    let root = dir.path().join("share");
    let mut c = Client::new(&root, true);
    c.walk(0, 1, &["greeting"]).ok();
    assert_eq!(c.open(1, libc::O_WRONLY as u32).errno(), Some(libc::EROFS));
    assert_eq!(
        c.open(1, (libc::O_RDONLY | libc::O_TRUNC) as u32).errno(),
        Some(libc::EROFS)
    );
    c.open(1, libc::O_RDONLY as u32).ok();
    assert_eq!(
        c.call(118, T::default().u32(1).u64(0).u32(1).bytes(b"x"))
            .errno(),
        Some(libc::EROFS)
    );
    c.walk(0, 2, &[]).ok();
    let create = T::default()
        .u32(2)
        .s("new")
        .u32(libc::O_RDWR as u32)
        .u32(0o644)
        .u32(0);
    assert_eq!(c.call(14, create).errno(), Some(libc::EROFS));
    assert_eq!(
        c.call(72, T::default().u32(0).s("d").u32(0o755).u32(0))
            .errno(),
        Some(libc::EROFS)
    );
    assert_eq!(
        c.call(76, T::default().u32(0).s("greeting").u32(0)).errno(),
        Some(libc::EROFS)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("greeting")).unwrap(),
        "hello over 9p\n"
    );
    assert!(!root.join("new").exists() && !root.join("d").exists());
}

#[test]
fn malformed_messages_get_errors() {
    let dir = share();
    let mut c = Client::new(&dir.path().join("share"), false);
    assert_eq!(
        c.server.handle(&[1, 2]),
        [11, 0, 0, 0, 7, 0xff, 0xff, 71, 0, 0, 0]
    );
    // A walk whose name length runs past the message.
    let bad = T::default().u32(0).u32(1).u16(1).u16(500).bytes(b"abc");
    assert_eq!(c.call(110, bad).errno(), Some(libc::EPROTO));
    // A write claiming more data than it carries.
    c.walk(0, 1, &["greeting"]).ok();
    c.open(1, libc::O_RDWR as u32).ok();
    let lying = T::default().u32(1).u64(0).u32(1 << 30).bytes(b"tiny");
    assert_eq!(c.call(118, lying).errno(), Some(libc::EPROTO));
    assert_eq!(
        c.walk(0, 9, &["x"; 17]).errno(),
        Some(libc::EINVAL),
        "too many names"
    );
    assert_eq!(c.call(99, T::default()).errno(), Some(libc::EOPNOTSUPP));
    assert_eq!(
        c.call(116, T::default().u32(77).u64(0).u32(1)).errno(),
        Some(libc::EBADF)
    );
}

/// The socket transport: a client speaks 9p over a Unix socket to `listen`.
#[test]
fn unix_socket_listener_serves_9p() {
    use std::io::{Read, Write};
    use virtio::ninep::listen::{listen, Address, MAX_CONNECTIONS};
    let _counting = counting_descriptors();
    let dir = share();
    let socket = dir.path().join("9p.sock");
    let config = ShareConfig {
        root: dir.path().join("share"),
        readonly: false,
        security_model: SecurityModel::None,
    };
    let address = Address::Unix(socket.clone());
    std::thread::spawn(move || listen(&address, &config));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut msg = vec![0, 0, 0, 0, 100, 0xff, 0xff];
    msg.extend_from_slice(&8192u32.to_le_bytes());
    msg.extend_from_slice(&8u16.to_le_bytes());
    msg.extend_from_slice(b"9P2000.L");
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_le_bytes());
    let version = |stream: &mut std::os::unix::net::UnixStream| {
        stream.write_all(&msg)?;
        let mut reply = vec![0u8; msg.len()];
        stream.read_exact(&mut reply).map(|()| reply)
    };
    let reply = version(&mut stream).unwrap();
    assert_eq!(reply[4], 101, "Rversion");
    assert_eq!(&reply[13..], b"9P2000.L");
    // MAX_CONNECTIONS at once are served; one more is closed; one that ends makes room.
    let mut others: Vec<_> = (1..MAX_CONNECTIONS)
        .map(|_| {
            let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            version(&mut s).unwrap();
            s
        })
        .collect();
    let mut refused = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    assert!(version(&mut refused).is_err(), "one connection too many");
    drop(others.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        if version(&mut s).is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "room again once one ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // A frame size beyond the limit ends the connection instead of allocating it.
    stream.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// virtio-9p: the config carries the mount tag; a chain carries one message and its reply.
#[test]
fn virtio_9p_device_answers_through_a_queue() {
    use virtio::ninep::Virtio9p;
    use virtio::{Memory, QueueDevice};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    let dir = share();
    let config = ShareConfig {
        root: dir.path().join("share"),
        readonly: true,
        security_model: SecurityModel::None,
    };
    let mut dev = Virtio9p::new("nix-store", config).unwrap();
    assert_eq!(dev.config(), b"\x09\x00nix-store");
    assert_ne!(dev.features() & 1, 0, "VIRTIO_9P_MOUNT_TAG");
    let mem = Memory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let mut msg = vec![21, 0, 0, 0, 100, 1, 0];
    msg.extend_from_slice(&16384u32.to_le_bytes());
    msg.extend_from_slice(&8u16.to_le_bytes());
    msg.extend_from_slice(b"9P2000.L");
    mem.write_slice(&msg, GuestAddress(0x10_0000)).unwrap();
    let mock = MockSplitQueue::new(&mem, 16);
    mock.build_desc_chain(&[
        RawDescriptor::from(Descriptor::new(0x10_0000, msg.len() as u32, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x20_0000, 4096, 2, 0)),
    ])
    .unwrap();
    let mut queue: virtio_queue::Queue = mock.create_queue().unwrap();
    assert!(dev.process_queue(0, &mut queue, &mem).unwrap());
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 21);
    let mut reply = [0u8; 21];
    mem.read_slice(&mut reply, GuestAddress(0x20_0000)).unwrap();
    assert_eq!((reply[4], &reply[13..]), (101, &b"9P2000.L"[..]));
}

#[test]
fn extended_attributes_round_trip() {
    let dir = share();
    let root = dir.path().join("share");
    let mut c = Client::new(&root, false);
    c.walk(0, 1, &["greeting"]).ok();
    assert_eq!(c.set_xattr(1, "user.comment", b"from the guest", 0), None);
    assert_eq!(c.get_xattr(1, "user.comment").unwrap(), b"from the guest");
    let list = c.get_xattr(1, "").unwrap();
    assert!(
        list.split(|b| *b == 0).any(|n| n == b"user.comment"),
        "{list:?}"
    );
    assert_eq!(c.get_xattr(1, "user.missing"), Err(libc::ENODATA));
    // Removal: an empty value with XATTR_REPLACE.
    assert_eq!(
        c.set_xattr(1, "user.comment", b"", libc::XATTR_REPLACE as u32),
        None
    );
    assert_eq!(c.get_xattr(1, "user.comment"), Err(libc::ENODATA));
    let too_big = T::default().u32(1).s("user.big").u64(1 << 20).u32(0);
    assert_eq!(c.call(32, too_big).errno(), Some(libc::E2BIG));
}

#[test]
fn mapped_xattr_keeps_the_guests_ownership_and_special_files() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = share();
    let root = dir.path().join("share");
    let mut c = Client::with(&root, false, SecurityModel::MappedXattr, 1000);
    c.walk(0, 1, &[]).ok();
    let create = T::default()
        .u32(1)
        .s("owned")
        .u32(libc::O_RDWR as u32)
        .u32(0o640)
        .u32(100);
    c.call(14, create).ok();
    c.walk(0, 2, &["owned"]).ok();
    assert_eq!(c.attrs(2), (libc::S_IFREG | 0o640, 1000, 100, 0));
    let host = std::fs::metadata(root.join("owned")).unwrap();
    assert_eq!(
        (host.permissions().mode() & 0o777, host.uid()),
        (0o600, 0),
        "host file private"
    );
    // chmod and chown change the guest's view only.
    let setattr = T::default()
        .u32(2)
        .u32(1 | 2)
        .u32(0o755)
        .u32(2000)
        .u32(0)
        .u64(0);
    c.call(26, setattr.u64(0).u64(0).u64(0).u64(0)).ok();
    assert_eq!(c.attrs(2), (libc::S_IFREG | 0o755, 2000, 100, 0));
    assert_eq!(
        std::fs::metadata(root.join("owned"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // A character device and a symlink are regular files on the host.
    let mknod = T::default()
        .u32(0)
        .s("tty")
        .u32(libc::S_IFCHR | 0o620)
        .u32(4)
        .u32(1)
        .u32(5);
    c.call(18, mknod).ok();
    c.walk(0, 3, &["tty"]).ok();
    let (mode, _, gid, rdev) = c.attrs(3);
    assert_eq!(
        (mode, gid, rdev),
        (libc::S_IFCHR | 0o620, 5, libc::makedev(4, 1))
    );
    assert!(std::fs::metadata(root.join("tty")).unwrap().is_file());
    c.call(16, T::default().u32(0).s("lnk").s("/nix/store/x").u32(0))
        .ok();
    c.walk(0, 4, &["lnk"]).ok();
    assert_eq!(c.attrs(4).0 & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        &c.call(22, T::default().u32(4)).ok().body[2..],
        b"/nix/store/x"
    );
    assert_eq!(c.open(4, libc::O_RDONLY as u32).errno(), Some(libc::ELOOP));
    assert!(std::fs::symlink_metadata(root.join("lnk"))
        .unwrap()
        .is_file());
    // The mapping's own attributes are invisible and untouchable.
    let list = c.get_xattr(2, "").unwrap();
    assert!(
        !String::from_utf8_lossy(&list).contains("virtfs"),
        "{list:?}"
    );
    assert_eq!(c.get_xattr(2, "user.virtfs.uid"), Err(libc::ENODATA));
    assert_eq!(
        c.set_xattr(2, "user.virtfs.uid", b"\0\0\0\0", 0),
        Some(libc::EPERM)
    );
}

#[test]
fn mapped_file_keeps_the_guests_view_in_hidden_metadata_files() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = share();
    let root = dir.path().join("share");
    let mut c = Client::with(&root, false, SecurityModel::MappedFile, 1000);
    c.call(72, T::default().u32(0).s("d").u32(0o750).u32(100))
        .ok();
    c.walk(0, 1, &["d"]).ok();
    assert_eq!(c.attrs(1), (libc::S_IFDIR | 0o750, 1000, 100, 0));
    let create = T::default()
        .u32(1)
        .s("f")
        .u32(libc::O_RDWR as u32)
        .u32(0o640)
        .u32(100);
    c.call(14, create).ok();
    c.walk(0, 2, &["d", "f"]).ok();
    assert_eq!(c.attrs(2), (libc::S_IFREG | 0o640, 1000, 100, 0));
    let host = std::fs::metadata(root.join("d/f")).unwrap();
    assert_eq!((host.uid(), host.permissions().mode() & 0o777), (0, 0o600));
    let meta = std::fs::read_to_string(root.join("d/.virtfs_metadata/f")).unwrap();
    assert!(
        meta.contains("virtfs.uid=1000") && meta.contains("virtfs.gid=100"),
        "{meta}"
    );
    // chown/chmod change the metadata file only.
    let setattr = T::default()
        .u32(2)
        .u32(1 | 2)
        .u32(0o600)
        .u32(2000)
        .u32(0)
        .u64(0);
    c.call(26, setattr.u64(0).u64(0).u64(0).u64(0)).ok();
    assert_eq!(c.attrs(2), (libc::S_IFREG | 0o600, 2000, 100, 0));
    // The metadata is invisible and unreachable (lcreate turned fid 1 into the new file).
    c.walk(0, 7, &["d"]).ok();
    c.walk(7, 3, &[]).ok();
    c.open(3, (libc::O_RDONLY | libc::O_DIRECTORY) as u32).ok();
    let listing = c.call(40, T::default().u32(3).u64(0).u32(8192)).ok();
    assert!(!String::from_utf8_lossy(&listing.body).contains("virtfs"));
    assert_eq!(
        c.walk(7, 4, &[".virtfs_metadata"]).errno(),
        Some(libc::EINVAL)
    );
    let sneaky = T::default().u32(7).s(".virtfs_metadata").u32(0o755).u32(0);
    assert_eq!(c.call(72, sneaky).errno(), Some(libc::EINVAL));
    // Renames carry the metadata along; removal takes it away, so the folder can go.
    c.call(74, T::default().u32(7).s("f").u32(0).s("g")).ok();
    c.walk(0, 5, &["g"]).ok();
    assert_eq!(c.attrs(5).1, 2000, "guest owner kept across the rename");
    assert!(root.join(".virtfs_metadata/g").exists());
    c.call(76, T::default().u32(0).s("g").u32(0)).ok();
    assert!(!root.join(".virtfs_metadata/g").exists());
    c.call(
        76,
        T::default().u32(0).s("d").u32(libc::AT_REMOVEDIR as u32),
    )
    .ok();
    assert!(!root.join("d").exists());
    // A hard link shows the same guest owner (lcreate on a clone of the root: it turns its
    // fid into the new file).
    c.walk(0, 10, &[]).ok();
    let create = T::default()
        .u32(10)
        .s("orig")
        .u32(libc::O_RDWR as u32)
        .u32(0o640)
        .u32(7);
    c.call(14, create).ok();
    c.walk(0, 8, &["orig"]).ok();
    c.call(70, T::default().u32(0).u32(8).s("alias")).ok();
    c.walk(0, 9, &["alias"]).ok();
    assert_eq!(c.attrs(9), (libc::S_IFREG | 0o640, 1000, 7, 0));
    // Special files are regular host files.
    let mknod = T::default()
        .u32(0)
        .s("tty")
        .u32(libc::S_IFCHR | 0o620)
        .u32(4)
        .u32(1)
        .u32(5);
    c.call(18, mknod).ok();
    c.walk(0, 6, &["tty"]).ok();
    assert_eq!(c.attrs(6).3, libc::makedev(4, 1));
    assert!(std::fs::metadata(root.join("tty")).unwrap().is_file());
}

#[test]
fn trename_moves_the_file_a_fid_stands_for() {
    let dir = share();
    let root = dir.path().join("share");
    let mut c = Client::new(&root, false);
    c.walk(0, 1, &["greeting"]).ok();
    c.walk(0, 2, &["sub"]).ok();
    c.call(20, T::default().u32(1).u32(2).s("moved")).ok();
    assert!(root.join("sub/moved").exists() && !root.join("greeting").exists());
    // The fid follows the file: a second rename starts from the new place.
    c.call(20, T::default().u32(1).u32(0).s("back")).ok();
    assert!(root.join("back").exists());
    assert_eq!(
        c.call(20, T::default().u32(1).u32(0).s("../out")).errno(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        c.call(20, T::default().u32(0).u32(2).s("root")).errno(),
        Some(libc::EOPNOTSUPP)
    );
}

#[test]
fn statfs_fsync_and_locks_answer() {
    let dir = share();
    let mut c = Client::new(&dir.path().join("share"), false);
    let st = c.call(8, T::default().u32(0)).ok();
    assert_eq!(st.u32_at(0), 0x0102_1997, "V9FS_MAGIC");
    assert!(st.u32_at(4) > 0, "block size");
    c.walk(0, 1, &["greeting"]).ok();
    c.open(1, libc::O_RDWR as u32).ok();
    c.call(50, T::default().u32(1).u32(0)).ok();
    let lock = T::default()
        .u32(1)
        .bytes(&[1])
        .u32(0)
        .u64(0)
        .u64(10)
        .u32(42)
        .s("guest");
    assert_eq!(c.call(52, lock).ok().body, [0], "lock granted");
    let getlock = T::default()
        .u32(1)
        .bytes(&[1])
        .u64(0)
        .u64(10)
        .u32(42)
        .s("guest");
    let r = c.call(54, getlock).ok();
    assert_eq!(r.body[0], libc::F_UNLCK as u8, "no conflicting lock");
}

/// Found by fuzzing: message type 255 made the reply type overflow.
#[test]
fn the_last_message_type_is_answered() {
    let dir = share();
    let mut c = Client::new(&dir.path().join("share"), false);
    assert_eq!(c.call(255, T::default()).errno(), Some(libc::EOPNOTSUPP));
}
