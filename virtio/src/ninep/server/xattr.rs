//! Extended attributes (Txattrwalk, Txattrcreate) and mapped symlinks.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use super::{errno, Fid, Place, Server, Xattr, XATTR_SIZE_MAX};
use crate::ninep::mapped;
use crate::ninep::sys;
use crate::ninep::wire::{Decoder, Encoder, Errno};

impl Server {
    pub(super) fn readlink(&self, fid: &Fid) -> Result<String, Errno> {
        let fd = &self.fd_of(fid)?;
        let host = sys::stat(fd).map_err(errno)?;
        if self.mapped() && host.st_mode & libc::S_IFMT == libc::S_IFREG {
            // A mapped symlink: its target is the file's content.
            if self.stat_at(fd, Place::At(&fid.rel))?.st_mode & libc::S_IFMT != libc::S_IFLNK {
                return Err(libc::EINVAL);
            }
            let file = File::from(sys::reopen(fd, libc::O_RDONLY).map_err(errno)?);
            let mut target = vec![0u8; libc::PATH_MAX as usize];
            let n = file.read_at(&mut target, 0).map_err(errno)?;
            target.truncate(n);
            return String::from_utf8(target).map_err(|_| libc::EINVAL);
        }
        sys::readlink(fd).map_err(errno)
    }

    /// Txattrwalk: `newfid` holds the value of attribute `name` (or, with an empty name, the
    /// list of names) for Tread.
    pub(super) fn xattr_walk(&mut self, d: &mut Decoder, r: &mut Encoder) -> Result<(), Errno> {
        let (fid, new_fid, name) = (d.u32()?, d.u32()?, d.string()?);
        let source = self.fid(fid)?;
        let fd = self.fd_of(source)?;
        if sys::stat(&fd).map_err(errno)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(libc::EOPNOTSUPP);
        }
        let value = if name.is_empty() {
            let names = sys::listxattr(&fd).map_err(errno)?;
            names
                .split(|b| *b == 0)
                .filter(|n| !n.is_empty())
                .filter(|n| !(self.mapped() && mapped::is_private(&String::from_utf8_lossy(n))))
                .flat_map(|n| n.iter().copied().chain([0]))
                .collect()
        } else {
            if self.mapped() && mapped::is_private(&name) {
                return Err(libc::ENODATA);
            }
            sys::getxattr(&fd, &name)
                .map_err(errno)?
                .ok_or(libc::ENODATA)?
        };
        let mut fid = Fid::new(source.rel.clone(), fd, source.uid);
        r.u64(value.len() as u64);
        fid.xattr = Some(Xattr::Read(value));
        self.insert_fid(new_fid, fid)
    }

    /// Txattrcreate: `fid` collects the value through Twrite; Tclunk sets it.
    pub(super) fn xattr_create(&mut self, d: &mut Decoder) -> Result<(), Errno> {
        let (fid, name, size, flags) = (d.u32()?, d.string()?, d.u64()?, d.u32()?);
        self.writable()?;
        if size > XATTR_SIZE_MAX {
            return Err(libc::E2BIG);
        }
        if self.mapped() && mapped::is_private(&name) {
            return Err(libc::EPERM);
        }
        *self.fids.xattr_mut(fid)? = Some(Xattr::Write {
            name,
            size: size as usize,
            flags: flags as i32,
            data: Vec::new(),
        });
        Ok(())
    }

    pub(super) fn commit_xattr(
        &self,
        fd: &OwnedFd,
        name: &str,
        size: usize,
        flags: i32,
        data: &[u8],
    ) -> Result<(), Errno> {
        if sys::stat(fd).map_err(errno)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(libc::EOPNOTSUPP);
        }
        if size == 0 && flags & libc::XATTR_REPLACE != 0 {
            // How Linux's 9p client removes an attribute.
            return sys::removexattr(fd, name).map_err(errno);
        }
        if data.len() != size {
            return Err(libc::EINVAL);
        }
        let flags = flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE);
        sys::setxattr(fd, name, data, flags).map_err(errno)
    }
}
