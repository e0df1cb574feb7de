//! The 9P2000.L operations.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::sys;
use super::wire::{Decoder, Encoder, Errno, Qid, QID_DIR, QID_FILE, QID_SYMLINK};
use super::SecurityModel;

/// The largest message nixvmm negotiates (Linux asks for up to its msize= option).
pub const MAX_MSIZE: u32 = (1 << 20) + 4096;
/// Bytes of a read or write reply that are not data (size, type, tag, count).
const IO_HEADER: u32 = 24;
const MAX_FIDS: usize = 65536;
const MAX_WALK: u16 = 16;
const O_PATH_NOFOLLOW: libc::c_int = libc::O_PATH | libc::O_NOFOLLOW;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    pub root: PathBuf,
    pub readonly: bool,
    pub security_model: SecurityModel,
}

struct Fid {
    /// O_PATH | O_NOFOLLOW descriptor of the file.
    path: OwnedFd,
    /// Set by lopen/lcreate: the file opened for I/O.
    open: Option<File>,
    /// A directory listing taken at readdir offset 0.
    listing: Option<Vec<(Qid, u8, String)>>,
}

pub struct Server {
    root: OwnedFd,
    root_id: (u64, u64),
    config: ShareConfig,
    msize: u32,
    fids: HashMap<u32, Fid>,
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
    if name.is_empty() || name.contains('/') || name.contains('\0') {
        return Err(libc::EINVAL);
    }
    Ok(name)
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
            config,
            msize: 8192,
            fids: HashMap::new(),
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
        self.fids.get(&fid).ok_or(libc::EBADF)
    }

    fn insert_fid(&mut self, id: u32, fid: Fid) -> Result<(), Errno> {
        if !self.fids.contains_key(&id) && self.fids.len() >= MAX_FIDS {
            return Err(libc::ENFILE);
        }
        self.fids.insert(id, fid);
        Ok(())
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
        let mut r = Encoder::new(kind + 1, tag);
        match kind {
            100 => {
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
            104 => {
                let fid = d.u32()?;
                let (_afid, _uname, _aname) = (d.u32()?, d.string()?, d.string()?);
                let path =
                    sys::openat(self.root.as_raw_fd(), ".", O_PATH_NOFOLLOW, 0).map_err(errno)?;
                let qid = qid_of(&sys::stat(&path).map_err(errno)?);
                self.insert_fid(
                    fid,
                    Fid {
                        path,
                        open: None,
                        listing: None,
                    },
                )?;
                r.qid(qid);
            }
            102 => return Err(libc::EOPNOTSUPP), // Tauth: no authentication
            108 => {
                d.u16()?; // the flushed tag: every request is answered before the next
            }
            110 => self.walk(d, &mut r)?,
            120 => {
                let fid = d.u32()?;
                self.fids.remove(&fid).ok_or(libc::EBADF)?;
            }
            122 => {
                let fid = d.u32()?;
                self.fids.remove(&fid);
                return Err(libc::EOPNOTSUPP); // Linux removes through unlinkat
            }
            24 => self.getattr(d, &mut r)?,
            26 => self.setattr(d)?,
            8 => self.statfs(d, &mut r)?,
            12 => self.lopen(d, &mut r)?,
            14 => self.lcreate(d, &mut r)?,
            116 => self.read(d, &mut r)?,
            118 => self.write(d, &mut r)?,
            40 => self.readdir(d, &mut r)?,
            50 => {
                let fid = self.fid(d.u32()?)?;
                if let Some(file) = &fid.open {
                    file.sync_all().map_err(errno)?;
                }
            }
            22 => {
                let fid = self.fid(d.u32()?)?;
                r.string(&sys::readlink(&fid.path).map_err(errno)?);
            }
            _ => self.change(kind, d, &mut r)?,
        }
        Ok(r)
    }

    /// Operations that create, rename or remove entries.
    fn change(&mut self, kind: u8, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        match kind {
            72 => {
                let (dir, name, mode, _gid) = (d.u32()?, d.string()?, d.u32()?, d.u32()?);
                self.writable()?;
                let dir = &self.fid(dir)?.path;
                sys::mkdirat(dir, new_name(&name)?, mode & 0o7777).map_err(errno)?;
                r.qid(self.qid_at(dir, &name)?);
            }
            16 => {
                let (dir, name, target, _gid) = (d.u32()?, d.string()?, d.string()?, d.u32()?);
                self.writable()?;
                let dir = &self.fid(dir)?.path;
                sys::symlinkat(&target, dir, new_name(&name)?).map_err(errno)?;
                r.qid(self.qid_at(dir, &name)?);
            }
            18 => {
                let (dir, name, mode) = (d.u32()?, d.string()?, d.u32()?);
                let (major, minor, _gid) = (d.u32()?, d.u32()?, d.u32()?);
                self.writable()?;
                let dir = &self.fid(dir)?.path;
                let dev = libc::makedev(major, minor);
                sys::mknodat(dir, new_name(&name)?, mode, dev).map_err(errno)?;
                r.qid(self.qid_at(dir, &name)?);
            }
            70 => {
                let (dir, fid, name) = (d.u32()?, d.u32()?, d.string()?);
                self.writable()?;
                sys::linkat(&self.fid(fid)?.path, &self.fid(dir)?.path, new_name(&name)?)
                    .map_err(errno)?;
            }
            74 => {
                let (old_dir, old) = (d.u32()?, d.string()?);
                let (new_dir, new) = (d.u32()?, d.string()?);
                self.writable()?;
                sys::renameat(
                    &self.fid(old_dir)?.path,
                    new_name(&old)?,
                    &self.fid(new_dir)?.path,
                    new_name(&new)?,
                )
                .map_err(errno)?;
            }
            76 => {
                let (dir, name, flags) = (d.u32()?, d.string()?, d.u32()?);
                self.writable()?;
                let flags = flags as i32 & libc::AT_REMOVEDIR;
                sys::unlinkat(&self.fid(dir)?.path, new_name(&name)?, flags).map_err(errno)?;
            }
            20 => return Err(libc::EOPNOTSUPP), // Trename: Linux falls back from renameat only
            30 | 32 => return Err(libc::EOPNOTSUPP), // extended attributes: not yet
            52 => {
                // Tlock: locks are advisory between this guest's processes; grant them.
                self.fid(d.u32()?)?;
                r.u8(0);
            }
            54 => {
                let fid = d.u32()?;
                let (_kind, start, length, proc_id) = (d.u8()?, d.u64()?, d.u64()?, d.u32()?);
                let client = d.string()?;
                self.fid(fid)?;
                r.u8(libc::F_UNLCK as u8)
                    .u64(start)
                    .u64(length)
                    .u32(proc_id)
                    .string(&client);
            }
            _ => return Err(libc::EOPNOTSUPP),
        }
        Ok(())
    }

    fn qid_at(&self, dir: &OwnedFd, name: &str) -> Result<Qid, Errno> {
        let fd = self.lookup(dir, name)?;
        Ok(qid_of(&sys::stat(&fd).map_err(errno)?))
    }

    fn walk(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, new_fid, count) = (d.u32()?, d.u32()?, d.u16()?);
        if count > MAX_WALK {
            return Err(libc::EINVAL);
        }
        let names = (0..count)
            .map(|_| d.string())
            .collect::<Result<Vec<_>, _>>()?;
        let start = &self.fid(fid)?.path;
        let mut current = start.try_clone().map_err(errno)?;
        let mut qids = Vec::new();
        for (i, name) in names.iter().enumerate() {
            match self.lookup(&current, name) {
                Ok(next) => {
                    qids.push(qid_of(&sys::stat(&next).map_err(errno)?));
                    current = next;
                }
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        if qids.len() == names.len() {
            self.insert_fid(
                new_fid,
                Fid {
                    path: current,
                    open: None,
                    listing: None,
                },
            )?;
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
        let st = sys::stat(&fid.path).map_err(errno)?;
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
        let st = sys::stat(&fid.path).map_err(errno)?;
        let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        const MODE: u32 = 1;
        const UID: u32 = 2;
        const GID: u32 = 4;
        const SIZE: u32 = 8;
        const ATIME: u32 = 16;
        const MTIME: u32 = 32;
        const ATIME_SET: u32 = 128;
        const MTIME_SET: u32 = 256;
        if valid & (UID | GID) != 0 {
            let uid = if valid & UID != 0 { uid } else { u32::MAX };
            let gid = if valid & GID != 0 { gid } else { u32::MAX };
            if let Err(e) = sys::chown(&fid.path, uid, gid) {
                if self.config.security_model == SecurityModel::Passthrough {
                    return Err(errno(e));
                }
            }
        }
        // The rest works on the file itself, which a symlink's descriptor would follow to.
        if valid & (MODE | SIZE | ATIME | MTIME) == 0 || symlink {
            return Ok(());
        }
        let flags = if valid & SIZE != 0 {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        let file = sys::reopen(&fid.path, flags | libc::O_NONBLOCK).map_err(errno)?;
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
        let st = sys::statvfs(&fid.path).map_err(errno)?;
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
        let fid = self.fids.get_mut(&id).ok_or(libc::EBADF)?;
        let st = sys::stat(&fid.path).map_err(errno)?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(libc::ELOOP);
        }
        let file = sys::reopen(&fid.path, open_flags(flags)).map_err(errno)?;
        fid.open = Some(File::from(file));
        fid.listing = None;
        r.qid(qid_of(&st)).u32(iounit);
        Ok(())
    }

    fn lcreate(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (id, name, flags, mode, _gid) = (d.u32()?, d.string()?, d.u32()?, d.u32()?, d.u32()?);
        self.writable()?;
        let iounit = self.msize - IO_HEADER;
        let dir = &self.fid(id)?.path;
        let name = new_name(&name)?;
        let file = sys::openat(
            dir.as_raw_fd(),
            name,
            open_flags(flags) | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode & 0o7777,
        )
        .map_err(errno)?;
        let path = self.lookup(dir, name)?;
        let qid = qid_of(&sys::stat(&path).map_err(errno)?);
        // The fid now stands for the new file, opened.
        self.insert_fid(
            id,
            Fid {
                path,
                open: Some(File::from(file)),
                listing: None,
            },
        )?;
        r.qid(qid).u32(iounit);
        Ok(())
    }

    fn read(&self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, offset, count) = (d.u32()?, d.u64()?, d.u32()?);
        let file = self.fid(fid)?.open.as_ref().ok_or(libc::EBADF)?;
        let count = count.min(self.msize - IO_HEADER) as usize;
        let mut buf = vec![0u8; count];
        let n = file.read_at(&mut buf, offset).map_err(errno)?;
        r.u32(n as u32).bytes(&buf[..n]);
        Ok(())
    }

    fn write(&self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, offset, count) = (d.u32()?, d.u64()?, d.u32()?);
        let data = d.bytes(count as usize)?;
        self.writable()?;
        let file = self.fid(fid)?.open.as_ref().ok_or(libc::EBADF)?;
        let n = file.write_at(data, offset).map_err(errno)?;
        r.u32(n as u32);
        Ok(())
    }

    fn readdir(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (id, offset, count) = (d.u32()?, d.u64()?, d.u32()?);
        let limit = count.min(self.msize - IO_HEADER) as usize;
        let fid = self.fids.get_mut(&id).ok_or(libc::EBADF)?;
        let file = fid.open.as_ref().ok_or(libc::EBADF)?;
        if offset == 0 || fid.listing.is_none() {
            fid.listing = Some(list_dir(file)?);
        }
        let listing = fid.listing.as_deref().unwrap_or_default();
        let mut entries = Encoder::new(0, 0);
        let start = entries.len();
        for (i, (qid, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            let size = 13 + 8 + 1 + 2 + name.len();
            if entries.len() - start + size > limit {
                break;
            }
            entries.qid(*qid).u64(i as u64 + 1).u8(*kind).string(name);
        }
        let data = entries.finish();
        let body = &data[start..];
        r.u32(body.len() as u32).bytes(body);
        Ok(())
    }
}

/// The entries of an opened directory, `.` and `..` included, with their qids.
fn list_dir(dir: &File) -> Result<Vec<(Qid, u8, String)>, Errno> {
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut out = Vec::new();
    for name in [".", ".."] {
        out.push((
            Qid {
                kind: QID_DIR,
                version: 0,
                path: 0,
            },
            libc::DT_DIR,
            name.to_string(),
        ));
    }
    for entry in std::fs::read_dir(&path).map_err(errno)? {
        let entry = entry.map_err(errno)?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let file_type = entry.file_type().map_err(errno)?;
        let (kind, dtype) = if file_type.is_dir() {
            (QID_DIR, libc::DT_DIR)
        } else if file_type.is_symlink() {
            (QID_SYMLINK, libc::DT_LNK)
        } else if file_type.is_file() {
            (QID_FILE, libc::DT_REG)
        } else {
            (QID_FILE, libc::DT_UNKNOWN)
        };
        let ino = std::os::unix::fs::DirEntryExt::ino(&entry);
        out.push((
            Qid {
                kind,
                version: 0,
                path: ino,
            },
            dtype,
            name,
        ));
    }
    Ok(out)
}

/// An Rlerror reply.
fn lerror(tag: u16, errno: Errno) -> Vec<u8> {
    let mut r = Encoder::new(7, tag);
    r.u32(errno as u32);
    r.finish()
}
