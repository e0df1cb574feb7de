//! The few system calls the 9p server needs that std does not offer, each relative to a
//! directory file descriptor (so no path is ever resolved from outside the share), behind safe
//! wrappers. All unsafe code of the 9p server is here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn name(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `openat(dir, name, flags, mode)`.
pub fn openat(dir: RawFd, path: &str, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let path = name(path)?;
    // SAFETY: `path` is a valid C string; the returned descriptor is new and owned by us.
    let fd = check(unsafe { libc::openat(dir, path.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the file an O_PATH descriptor refers to, with `flags`, through /proc/self/fd. The
/// caller must not pass a symlink's descriptor (that would follow the link).
pub fn reopen(fd: &OwnedFd, flags: libc::c_int) -> io::Result<OwnedFd> {
    openat(
        libc::AT_FDCWD,
        &format!("/proc/self/fd/{}", fd.as_raw_fd()),
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY),
        0,
    )
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the file the descriptor is.
pub fn stat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data that the call fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let empty = name("")?;
    // SAFETY: valid descriptor, C string and out pointer.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            empty.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn mkdirat(dir: &OwnedFd, path: &str, mode: u32) -> io::Result<()> {
    let path = name(path)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), path.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: &OwnedFd, path: &str, mode: u32, dev: u64) -> io::Result<()> {
    let path = name(path)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), path.as_ptr(), mode, dev) }).map(drop)
}

pub fn symlinkat(target: &str, dir: &OwnedFd, path: &str) -> io::Result<()> {
    let (target, path) = (name(target)?, name(path)?);
    // SAFETY: valid descriptor and C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), path.as_ptr()) }).map(drop)
}

/// The target of the symlink the descriptor (O_PATH | O_NOFOLLOW) refers to.
pub fn readlink(fd: &OwnedFd) -> io::Result<String> {
    let empty = name("")?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: valid descriptor, C string, and a buffer of the length given.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            empty.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    String::from_utf8(buf).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// A hard link to the file `fd` refers to, named `path` in `dir`.
pub fn linkat(fd: &OwnedFd, dir: &OwnedFd, path: &str) -> io::Result<()> {
    let (empty, path) = (name("")?, name(path)?);
    // SAFETY: valid descriptors and C strings.
    check(unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            empty.as_ptr(),
            dir.as_raw_fd(),
            path.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
    .map(drop)
}

pub fn renameat(old_dir: &OwnedFd, old: &str, new_dir: &OwnedFd, new: &str) -> io::Result<()> {
    let (old, new) = (name(old)?, name(new)?);
    // SAFETY: valid descriptors and C strings.
    check(unsafe {
        libc::renameat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: &OwnedFd, path: &str, flags: libc::c_int) -> io::Result<()> {
    let path = name(path)?;
    // SAFETY: valid descriptor and C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), path.as_ptr(), flags) }).map(drop)
}

/// Changes owner and group of the file itself (never a symlink's target).
pub fn chown(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    let empty = name("")?;
    // SAFETY: valid descriptor and C string.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            empty.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fchmod(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    // SAFETY: valid descriptor.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn futimens(fd: &OwnedFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: valid descriptor and a pointer to two timespecs.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn statvfs(fd: &OwnedFd) -> io::Result<libc::statvfs> {
    // SAFETY: statvfs is plain data that the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out pointer.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// The path through which xattr calls reach the file `fd` refers to (never a symlink: the
/// callers check, since this path would follow one).
fn proc_path(fd: &OwnedFd) -> io::Result<CString> {
    name(&format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `getxattr`; `None` when the attribute does not exist.
pub fn getxattr(fd: &OwnedFd, attr: &str) -> io::Result<Option<Vec<u8>>> {
    let (path, attr) = (proc_path(fd)?, name(attr)?);
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            attr.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(err),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

/// `listxattr`: the names, each NUL-terminated.
pub fn listxattr(fd: &OwnedFd) -> io::Result<Vec<u8>> {
    let path = proc_path(fd)?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: valid C string and a buffer of the given length.
    let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn setxattr(fd: &OwnedFd, attr: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (path, attr) = (proc_path(fd)?, name(attr)?);
    // SAFETY: valid C strings and a value buffer of the given length.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(fd: &OwnedFd, attr: &str) -> io::Result<()> {
    let (path, attr) = (proc_path(fd)?, name(attr)?);
    // SAFETY: valid C strings.
    check(unsafe { libc::removexattr(path.as_ptr(), attr.as_ptr()) }).map(drop)
}

/// One directory entry, as getdents64 gives it.
pub struct DirEntry {
    pub ino: u64,
    /// The position of the entry after this one (to `read_entries` from).
    pub next: u64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// The entries of the open directory `dir` from `position` (0, or an entry's `next`), as
/// many as one getdents64 call gives; none at the end. Nothing is kept between calls but the
/// directory's own position.
pub fn read_entries(dir: &std::fs::File, position: u64) -> io::Result<Vec<DirEntry>> {
    // The position's bits as they came from d_off (a FUSE filesystem may use the top one).
    let position = position as libc::off_t;
    // SAFETY: lseek only moves the position of the descriptor `dir` owns.
    if unsafe { libc::lseek(dir.as_raw_fd(), position, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // struct linux_dirent64 { u64 d_ino; s64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    let mut entries = Vec::new();
    let mut at = 0;
    while at + 19 < n {
        let field = |from: usize, len: usize| &buf[at + from..at + from + len];
        let reclen = usize::from(u16::from_ne_bytes([buf[at + 16], buf[at + 17]]));
        if reclen < 20 || at + reclen > n {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let name = &buf[at + 19..at + reclen];
        let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        entries.push(DirEntry {
            ino: u64::from_ne_bytes(field(0, 8).try_into().unwrap_or_default()),
            next: u64::from_ne_bytes(field(8, 8).try_into().unwrap_or_default()),
            kind: buf[at + 18],
            name: name[..name_len].to_vec(),
        });
        at += reclen;
    }
    Ok(entries)
}
