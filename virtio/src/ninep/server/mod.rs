//! The 9P2000.L operations.

mod entries;
mod fids;
mod xattr;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::wire::{message, Decoder, Encoder, Errno, Qid, QID_DIR, QID_FILE, QID_SYMLINK};
use super::SecurityModel;
use super::{mapped, sys};
pub use fids::MAX_FIDS;
use fids::{child, split, Fid, Fids, Xattr};

/// The largest message nixvmm negotiates (Linux asks for up to its msize= option).
pub const MAX_MSIZE: u32 = (1 << 20) + 4096;
/// Bytes of a read or write reply that are not data (size, type, tag, count).
const IO_HEADER: u32 = 24;
const MAX_WALK: u16 = 16;
const O_PATH_NOFOLLOW: libc::c_int = libc::O_PATH | libc::O_NOFOLLOW;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    pub root: PathBuf,
    pub readonly: bool,
    pub security_model: SecurityModel,
}

/// Where the mapped-file model keeps a file's metadata: in the folder `dir` under `name`
/// (known at hand), or in the folder found by the file's place in the share ("" is the root).
#[derive(Clone, Copy)]
enum Place<'a> {
    In(&'a OwnedFd, &'a str),
    At(&'a str),
}

/// Largest extended attribute value (Linux's XATTR_SIZE_MAX).
const XATTR_SIZE_MAX: u64 = 65536;

pub struct Server {
    root: OwnedFd,
    root_id: (u64, u64),
    config: ShareConfig,
    msize: u32,
    fids: Fids,
}

fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn qid_of(st: &libc::stat) -> Qid {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => QID_DIR,
        libc::S_IFLNK => QID_SYMLINK,
        _ => QID_FILE,
    };
    Qid {
        kind,
        version: st.st_mtime as u32,
        path: st.st_ino,
    }
}

/// A name the guest gives for a new or looked-up entry: one path component.
fn component(name: &str) -> Result<&str, Errno> {
    if name.is_empty() || name.contains('/') || name.contains('\0') || is_metadata(name) {
        return Err(libc::EINVAL);
    }
    Ok(name)
}

/// The mapped-file model's own entries: never visible to, nor made by, the guest.
fn is_metadata(name: &str) -> bool {
    name == mapped::file::META_DIR || name == mapped::file::ROOT_META
}

/// A name for something the guest creates: not `.` or `..` either.
fn new_name(name: &str) -> Result<&str, Errno> {
    match component(name)? {
        "." | ".." => Err(libc::EEXIST),
        ok => Ok(ok),
    }
}

fn is_write_open(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_TRUNC | libc::O_APPEND) != 0
}

/// 9P2000.L open flags are Linux's on x86-64; keep the ones that make sense for a server.
fn open_flags(flags: u32) -> libc::c_int {
    let allowed =
        libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_DIRECTORY | libc::O_NONBLOCK;
    flags as i32 & allowed
}

impl Server {
    pub fn new(config: ShareConfig) -> io::Result<Server> {
        Server::with_budget(config, crate::descriptor_budget())
    }

    /// A server whose fids hold at most `budget` descriptors before idle ones give theirs up.
    pub fn with_budget(config: ShareConfig, budget: usize) -> io::Result<Server> {
        let root = sys::openat(
            libc::AT_FDCWD,
            config
                .root
                .to_str()
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let st = sys::stat(&root)?;
        Ok(Server {
            root,
            root_id: (st.st_dev, st.st_ino),
            fids: Fids::new(config.root.clone(), budget),
            config,
            msize: 8192,
        })
    }

    /// Handles one T-message; returns the R-message (Rlerror on failure).
    pub fn handle(&mut self, message: &[u8]) -> Vec<u8> {
        let mut d = Decoder::new(message);
        let header = (|| Ok::<_, Errno>((d.u32()?, d.u8()?, d.u16()?)))();
        let Ok((_size, kind, tag)) = header else {
            return lerror(u16::MAX, libc::EPROTO);
        };
        match self.dispatch(kind, tag, &mut d) {
            Ok(reply) => reply.finish(),
            Err(e) => lerror(tag, e),
        }
    }

    fn fid(&self, fid: u32) -> Result<&Fid, Errno> {
        self.fids.get(fid)
    }

    /// A descriptor of the file `fid` stands for: the one it holds, or one found by its
    /// place when it gave its own up.
    fn fd_of(&self, fid: &Fid) -> Result<Arc<OwnedFd>, Errno> {
        match &fid.fd {
            Some(fd) => Ok(Arc::clone(fd)),
            None => self.resolve(&fid.rel),
        }
    }

    /// The folder fid `id` stands for: a descriptor, its place, the fid's user.
    fn folder(&self, id: u32) -> Result<(Arc<OwnedFd>, Arc<str>, u32), Errno> {
        let fid = self.fid(id)?;
        Ok((self.fd_of(fid)?, fid.rel.clone(), fid.uid))
    }

    /// The file at `rel`, found name by name from the root without following symlinks.
    fn resolve(&self, rel: &str) -> Result<Arc<OwnedFd>, Errno> {
        let mut fd = sys::openat(self.root.as_raw_fd(), ".", O_PATH_NOFOLLOW, 0).map_err(errno)?;
        for name in rel.split('/').filter(|n| !n.is_empty()) {
            fd = self.lookup(&fd, name)?;
        }
        Ok(Arc::new(fd))
    }

    /// The folder the file at `rel` is in and its name there; `None` for the root.
    fn parent_of<'r>(&self, rel: &'r str) -> Result<Option<(Arc<OwnedFd>, &'r str)>, Errno> {
        match split(rel) {
            Some((dir, name)) => Ok(Some((self.resolve(dir)?, name))),
            None => Ok(None),
        }
    }

    fn insert_fid(&mut self, id: u32, fid: Fid) -> Result<(), Errno> {
        self.fids.insert(id, fid)
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.config.readonly {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    fn is_root(&self, fd: &OwnedFd) -> bool {
        sys::stat(fd).is_ok_and(|st| (st.st_dev, st.st_ino) == self.root_id)
    }

    /// Looks `name` up in the directory `dir` without following symlinks or leaving the root.
    fn lookup(&self, dir: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
        let name = component(name)?;
        let name = if name == ".." && self.is_root(dir) {
            "."
        } else {
            name
        };
        sys::openat(dir.as_raw_fd(), name, O_PATH_NOFOLLOW, 0).map_err(errno)
    }

    fn dispatch(&mut self, kind: u8, tag: u16, d: &mut Decoder) -> Result<Encoder, Errno> {
        // The R-message type follows its T-message (an unknown type is answered with Rlerror).
        let mut r = Encoder::new(kind.wrapping_add(1), tag);
        match kind {
            message::TVERSION => {
                let msize = d.u32()?;
                let version = d.string()?;
                self.fids.clear();
                self.msize = msize.clamp(4096, MAX_MSIZE);
                r.u32(self.msize);
                r.string(if version == "9P2000.L" {
                    "9P2000.L"
                } else {
                    "unknown"
                });
            }
            message::TATTACH => {
                let fid = d.u32()?;
                let (_afid, _uname, _aname) = (d.u32()?, d.string()?, d.string()?);
                let uid = d.u32()?; // n_uname: the user this attach acts for
                let path =
                    sys::openat(self.root.as_raw_fd(), ".", O_PATH_NOFOLLOW, 0).map_err(errno)?;
                let qid = qid_of(&self.stat_at(&path, Place::At(""))?);
                self.insert_fid(fid, Fid::new("".into(), Arc::new(path), uid))?;
                r.qid(qid);
            }
            message::TAUTH => return Err(libc::EOPNOTSUPP), // Tauth: no authentication
            message::TFLUSH => {
                d.u16()?; // the flushed tag: every request is answered before the next
            }
            message::TWALK => self.walk(d, &mut r)?,
            message::TCLUNK => {
                let fid = d.u32()?;
                let fid = self.fids.remove(fid).ok_or(libc::EBADF)?;
                if let Some(Xattr::Write {
                    name,
                    size,
                    flags,
                    data,
                }) = &fid.xattr
                {
                    self.commit_xattr(&*self.fd_of(&fid)?, name, *size, *flags, data)?;
                }
            }
            message::TREMOVE => {
                let fid = d.u32()?;
                self.fids.remove(fid);
                return Err(libc::EOPNOTSUPP); // Linux removes through unlinkat
            }
            message::TGETATTR => self.getattr(d, &mut r)?,
            message::TSETATTR => self.setattr(d)?,
            message::TSTATFS => self.statfs(d, &mut r)?,
            message::TLOPEN => self.lopen(d, &mut r)?,
            message::TLCREATE => self.lcreate(d, &mut r)?,
            message::TREAD => self.read(d, &mut r)?,
            message::TWRITE => self.write(d, &mut r)?,
            message::TREADDIR => self.readdir(d, &mut r)?,
            message::TFSYNC => {
                let fid = self.fid(d.u32()?)?;
                if let Some(file) = &fid.open {
                    file.sync_all().map_err(errno)?;
                }
            }
            message::TREADLINK => {
                let fid = self.fid(d.u32()?)?;
                r.string(&self.readlink(fid)?);
            }
            _ => self.change(kind, d, &mut r)?,
        }
        Ok(r)
    }

    /// The qid of `name` in the folder `dir`.
    fn qid_at(&self, dir: &OwnedFd, name: &str) -> Result<Qid, Errno> {
        let fd = self.lookup(dir, name)?;
        Ok(qid_of(&self.stat_at(&fd, Place::In(dir, name))?))
    }

    /// Whether the guest's ownership and modes are mapped (kept apart from the host's).
    fn mapped(&self) -> bool {
        matches!(
            self.config.security_model,
            SecurityModel::MappedXattr | SecurityModel::MappedFile
        )
    }

    fn mapped_file(&self) -> bool {
        self.config.security_model == SecurityModel::MappedFile
    }

    /// Calls `f` with the folder and name where the mapped-file model keeps metadata of the
    /// file at `place` (`None`: the root's).
    fn with_entry<T>(
        &self,
        place: Place,
        f: impl FnOnce(Option<(&OwnedFd, &str)>) -> T,
    ) -> Result<T, Errno> {
        match place {
            Place::In(dir, name) => Ok(f(Some((dir, name)))),
            Place::At(rel) => {
                let parent = self.parent_of(rel)?;
                Ok(f(parent.as_ref().map(|(dir, name)| (&**dir, *name))))
            }
        }
    }

    /// The file (`fd`, at `place`) as the guest sees it: the host's stat, with the mapped
    /// owner and mode.
    fn stat_at(&self, fd: &OwnedFd, place: Place) -> Result<libc::stat, Errno> {
        let mut st = sys::stat(fd).map_err(errno)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(st);
        }
        match self.config.security_model {
            SecurityModel::MappedXattr => mapped::overlay(fd, &mut st),
            SecurityModel::MappedFile => {
                // A place no longer there (moved on the host) shows the host's view.
                if let Ok(meta) = self.with_entry(place, |e| mapped::file::read(&self.root, e)) {
                    meta.overlay(&mut st);
                }
            }
            _ => {}
        }
        Ok(st)
    }

    /// Writes the guest's view of a file (`fd`, at `place`) under the mapped models.
    fn record(&self, fd: &OwnedFd, place: Place, meta: mapped::file::Meta) -> io::Result<()> {
        if self.mapped_file() {
            return self
                .with_entry(place, |e| mapped::file::write(&self.root, e, &meta))
                .map_err(io::Error::from_raw_os_error)?;
        }
        if let Some(mode) = meta.mode {
            mapped::set_mode(fd, mode)?;
        }
        mapped::set_owner(fd, meta.uid, meta.gid)?;
        if let Some(rdev) = meta.rdev.filter(|r| *r != 0) {
            sys::setxattr(fd, mapped::RDEV, &rdev.to_ne_bytes(), 0)?;
        }
        Ok(())
    }

    /// Gives a new entry `name` in `dir` to the guest user and group `owner`: mapped, the
    /// guest's view goes into xattrs; otherwise the host file is chowned (failures ignored
    /// under `none`).
    fn take_ownership(
        &self,
        dir: &OwnedFd,
        name: &str,
        (uid, gid): (u32, u32),
        mode: u32,
        rdev: u64,
    ) -> Result<(), Errno> {
        let fd = self.lookup(dir, name)?;
        let result = if self.mapped() {
            let meta = mapped::file::Meta {
                uid: Some(uid),
                gid: Some(gid),
                mode: Some(mode),
                rdev: Some(rdev),
            };
            self.record(&fd, Place::In(dir, name), meta)
        } else {
            sys::chown(&fd, uid, gid)
        };
        match result {
            Err(e) if self.config.security_model != SecurityModel::None => Err(errno(e)),
            _ => Ok(()),
        }
    }

    fn walk(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, new_fid, count) = (d.u32()?, d.u32()?, d.u16()?);
        if count > MAX_WALK {
            return Err(libc::EINVAL);
        }
        let names = (0..count)
            .map(|_| d.string())
            .collect::<Result<Vec<_>, _>>()?;
        let start = self.fid(fid)?;
        let uid = start.uid;
        let mut current = self.fd_of(start)?;
        let mut rel = start.rel.clone();
        let mut qids = Vec::new();
        for (i, name) in names.iter().enumerate() {
            match self.lookup(&current, name) {
                Ok(next) => {
                    rel = match child(&rel, name) {
                        Ok(rel) => rel,
                        Err(e) if i == 0 => return Err(e),
                        Err(_) => break,
                    };
                    let place = match name.as_str() {
                        "." | ".." => Place::At(&rel),
                        _ => Place::In(&current, name),
                    };
                    qids.push(qid_of(&self.stat_at(&next, place)?));
                    current = Arc::new(next);
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if qids.len() == names.len() {
            self.insert_fid(new_fid, Fid::new(rel, current, uid))?;
        }
        r.u16(qids.len() as u16);
        for q in qids {
            r.qid(q);
        }
        Ok(())
    }

    fn getattr(&self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let fid = self.fid(d.u32()?)?;
        let _mask = d.u64()?;
        let st = self.stat_at(&*self.fd_of(fid)?, Place::At(&fid.rel))?;
        const BASIC: u64 = 0x7ff; // mode … blocks, as Linux's P9_STATS_BASIC
        r.u64(BASIC).qid(qid_of(&st));
        r.u32(st.st_mode)
            .u32(st.st_uid)
            .u32(st.st_gid)
            .u64(st.st_nlink);
        r.u64(st.st_rdev)
            .u64(st.st_size as u64)
            .u64(st.st_blksize as u64)
            .u64(st.st_blocks as u64);
        for (sec, nsec) in [
            (st.st_atime, st.st_atime_nsec),
            (st.st_mtime, st.st_mtime_nsec),
            (st.st_ctime, st.st_ctime_nsec),
            (0, 0),
        ] {
            r.u64(sec as u64).u64(nsec as u64);
        }
        r.u64(0).u64(0); // gen, data_version
        Ok(())
    }

    fn setattr(&self, d: &mut Decoder) -> Result<(), Errno> {
        let (fid, valid, mode, uid, gid) = (d.u32()?, d.u32()?, d.u32()?, d.u32()?, d.u32()?);
        let size = d.u64()?;
        let (atime_sec, atime_nsec, mtime_sec, mtime_nsec) =
            (d.u64()?, d.u64()?, d.u64()?, d.u64()?);
        self.writable()?;
        let fid = self.fid(fid)?;
        let fd = self.fd_of(fid)?;
        let st = sys::stat(&fd).map_err(errno)?;
        let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        const MODE: u32 = 1;
        const UID: u32 = 2;
        const GID: u32 = 4;
        const SIZE: u32 = 8;
        const ATIME: u32 = 16;
        const MTIME: u32 = 32;
        const ATIME_SET: u32 = 128;
        const MTIME_SET: u32 = 256;
        if self.mapped() && !symlink {
            let guest = self.stat_at(&fd, Place::At(&fid.rel))?;
            let meta = mapped::file::Meta {
                uid: Some(if valid & UID != 0 { uid } else { guest.st_uid }),
                gid: Some(if valid & GID != 0 { gid } else { guest.st_gid }),
                mode: Some(if valid & MODE != 0 {
                    (guest.st_mode & libc::S_IFMT) | (mode & 0o7777)
                } else {
                    guest.st_mode
                }),
                rdev: Some(guest.st_rdev),
            };
            self.record(&fd, Place::At(&fid.rel), meta).map_err(errno)?;
        } else if valid & (UID | GID) != 0 {
            let uid = if valid & UID != 0 { uid } else { u32::MAX };
            let gid = if valid & GID != 0 { gid } else { u32::MAX };
            if let Err(e) = sys::chown(&fd, uid, gid) {
                if self.config.security_model == SecurityModel::Passthrough {
                    return Err(errno(e));
                }
            }
        }
        // Mapped, the guest's mode lives in the xattr only.
        let valid = if self.mapped() { valid & !MODE } else { valid };
        // The rest works on the file itself, which a symlink's descriptor would follow to.
        if valid & (MODE | SIZE | ATIME | MTIME) == 0 || symlink {
            return Ok(());
        }
        let flags = if valid & SIZE != 0 {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        let file = sys::reopen(&fd, flags | libc::O_NONBLOCK).map_err(errno)?;
        if valid & MODE != 0 {
            sys::fchmod(&file, mode & 0o7777).map_err(errno)?;
        }
        if valid & SIZE != 0 {
            File::from(file.try_clone().map_err(errno)?)
                .set_len(size)
                .map_err(errno)?;
        }
        if valid & (ATIME | MTIME) != 0 {
            let time = |set: bool, given: bool, sec: u64, nsec: u64| libc::timespec {
                tv_sec: if given && set { sec as i64 } else { 0 },
                tv_nsec: match (given, set) {
                    (false, _) => libc::UTIME_OMIT,
                    (true, false) => libc::UTIME_NOW,
                    (true, true) => nsec as i64,
                },
            };
            let times = [
                time(
                    valid & ATIME_SET != 0,
                    valid & ATIME != 0,
                    atime_sec,
                    atime_nsec,
                ),
                time(
                    valid & MTIME_SET != 0,
                    valid & MTIME != 0,
                    mtime_sec,
                    mtime_nsec,
                ),
            ];
            sys::futimens(&file, &times).map_err(errno)?;
        }
        Ok(())
    }

    fn statfs(&self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let fid = self.fid(d.u32()?)?;
        let st = sys::statvfs(&*self.fd_of(fid)?).map_err(errno)?;
        const V9FS_MAGIC: u32 = 0x0102_1997;
        r.u32(V9FS_MAGIC)
            .u32(st.f_bsize as u32)
            .u64(st.f_blocks)
            .u64(st.f_bfree);
        r.u64(st.f_bavail)
            .u64(st.f_files)
            .u64(st.f_ffree)
            .u64(st.f_fsid)
            .u32(st.f_namemax as u32);
        Ok(())
    }

    fn lopen(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (id, flags) = (d.u32()?, d.u32()?);
        if is_write_open(flags) {
            self.writable()?;
        }
        let iounit = self.msize - IO_HEADER;
        // Neither a host symlink nor, mapped, a guest one is ever opened.
        let fid = self.fid(id)?;
        let fd = self.fd_of(fid)?;
        let (st, host) = (
            self.stat_at(&fd, Place::At(&fid.rel))?,
            sys::stat(&fd).map_err(errno)?,
        );
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK
            || host.st_mode & libc::S_IFMT == libc::S_IFLNK
        {
            return Err(libc::ELOOP);
        }
        self.fids.room_for_an_open_file()?;
        let file = sys::reopen(&fd, open_flags(flags)).map_err(errno)?;
        self.fids.set_open(id, File::from(file))?;
        r.qid(qid_of(&st)).u32(iounit);
        Ok(())
    }

    fn lcreate(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (id, name, flags, mode, gid) = (d.u32()?, d.string()?, d.u32()?, d.u32()?, d.u32()?);
        self.writable()?;
        let iounit = self.msize - IO_HEADER;
        let (dir, dir_rel, uid) = self.folder(id)?;
        let name = new_name(&name)?;
        let rel = child(&dir_rel, name)?;
        let host_mode = if self.mapped() {
            mapped::FILE_MODE
        } else {
            mode & 0o7777
        };
        self.fids.room_for_an_open_file()?;
        let file = sys::openat(
            dir.as_raw_fd(),
            name,
            open_flags(flags) | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            host_mode,
        )
        .map_err(errno)?;
        let mode = libc::S_IFREG | (mode & 0o7777);
        self.take_ownership(&dir, name, (uid, gid), mode, 0)?;
        let path = self.lookup(&dir, name)?;
        let qid = qid_of(&self.stat_at(&path, Place::In(&dir, name))?);
        // The fid now stands for the new file, opened.
        let mut fid = Fid::new(rel, Arc::new(path), uid);
        fid.open = Some(File::from(file));
        self.insert_fid(id, fid)?;
        r.qid(qid).u32(iounit);
        Ok(())
    }

    fn read(&self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, offset, count) = (d.u32()?, d.u64()?, d.u32()?);
        let count = count.min(self.msize - IO_HEADER) as usize;
        if let Some(Xattr::Read(value)) = &self.fid(fid)?.xattr {
            let start = (offset as usize).min(value.len());
            let end = start.saturating_add(count).min(value.len());
            r.u32((end - start) as u32).bytes(&value[start..end]);
            return Ok(());
        }
        let file = self.fid(fid)?.open.as_ref().ok_or(libc::EBADF)?;
        let mut buf = vec![0u8; count];
        let n = file.read_at(&mut buf, offset).map_err(errno)?;
        r.u32(n as u32).bytes(&buf[..n]);
        Ok(())
    }

    fn write(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, offset, count) = (d.u32()?, d.u64()?, d.u32()?);
        let data = d.bytes(count as usize)?;
        self.writable()?;
        if let Some(Xattr::Write {
            size, data: value, ..
        }) = self.fids.xattr_mut(fid)?
        {
            let end = (offset as usize)
                .checked_add(data.len())
                .ok_or(libc::EINVAL)?;
            if offset as usize != value.len() || end > *size {
                return Err(libc::EINVAL);
            }
            value.extend_from_slice(data);
            r.u32(data.len() as u32);
            return Ok(());
        }
        let file = self.fid(fid)?.open.as_ref().ok_or(libc::EBADF)?;
        let n = file.write_at(data, offset).map_err(errno)?;
        r.u32(n as u32);
        Ok(())
    }

    /// Treaddir: entries from the directory's own position `offset` (0, or the offset of the
    /// last entry the guest got), read as they are sent: nothing is held between calls.
    fn readdir(&self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (id, mut offset, count) = (d.u32()?, d.u64()?, d.u32()?);
        let limit = count.min(self.msize - IO_HEADER) as usize;
        let file = self.fid(id)?.open.as_ref().ok_or(libc::EBADF)?;
        let mut entries = Encoder::new(0, 0);
        let start = entries.len();
        'reply: loop {
            let batch = sys::read_entries(file, offset).map_err(errno)?;
            if batch.is_empty() {
                break;
            }
            for entry in batch {
                let Ok(name) = String::from_utf8(entry.name) else {
                    offset = entry.next;
                    continue;
                };
                if is_metadata(&name) {
                    offset = entry.next;
                    continue;
                }
                let size = 13 + 8 + 1 + 2 + name.len();
                if entries.len() - start + size > limit {
                    if entries.len() == start {
                        // An empty reply would read as the folder's end.
                        return Err(libc::EINVAL);
                    }
                    break 'reply;
                }
                entries
                    .qid(dir_entry_qid(&name, entry.ino, entry.kind))
                    .u64(entry.next)
                    .u8(entry.kind)
                    .string(&name);
                offset = entry.next;
            }
        }
        let data = entries.finish();
        let body = &data[start..];
        r.u32(body.len() as u32).bytes(body);
        Ok(())
    }
}

/// The qid of a directory entry: its inode number and kind (`.` and `..` as path 0, which
/// shows nothing of the host above the share).
fn dir_entry_qid(name: &str, ino: u64, dtype: u8) -> Qid {
    let kind = match dtype {
        libc::DT_DIR => QID_DIR,
        libc::DT_LNK => QID_SYMLINK,
        _ => QID_FILE,
    };
    let path = if name == "." || name == ".." { 0 } else { ino };
    Qid {
        kind,
        version: 0,
        path,
    }
}

/// An Rlerror reply.
fn lerror(tag: u16, errno: Errno) -> Vec<u8> {
    let mut r = Encoder::new(7, tag);
    r.u32(errno as u32);
    r.finish()
}
