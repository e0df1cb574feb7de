//! Operations that create, rename or remove directory entries, and locks.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::fids::join;
use super::{errno, new_name, Place, Server};
use crate::ninep::mapped;
use crate::ninep::sys;
use crate::ninep::wire::{message, Decoder, Encoder, Errno};

impl Server {
    /// Operations that create, rename or remove entries.
    pub(super) fn change(
        &mut self,
        kind: u8,
        d: &mut Decoder,
        r: &mut Encoder,
    ) -> Result<(), Errno> {
        match kind {
            message::TMKDIR => {
                let (dir, name, mode, gid) = (d.u32()?, d.string()?, d.u32()?, d.u32()?);
                self.writable()?;
                let (dir, _, uid) = self.folder(dir)?;
                let host_mode = if self.mapped() {
                    mapped::DIR_MODE
                } else {
                    mode & 0o7777
                };
                sys::mkdirat(&dir, new_name(&name)?, host_mode).map_err(errno)?;
                let mode = libc::S_IFDIR | (mode & 0o7777);
                self.take_ownership(&dir, &name, (uid, gid), mode, 0)?;
                r.qid(self.qid_at(&dir, &name)?);
            }
            message::TSYMLINK => {
                let (dir, name, target, gid) = (d.u32()?, d.string()?, d.string()?, d.u32()?);
                self.writable()?;
                let (dir, _, uid) = self.folder(dir)?;
                let name = new_name(&name)?;
                if self.mapped() {
                    // A regular file holding the target, marked as a symlink.
                    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW;
                    let file = sys::openat(dir.as_raw_fd(), name, flags, mapped::FILE_MODE)
                        .map_err(errno)?;
                    File::from(file)
                        .write_all_at(target.as_bytes(), 0)
                        .map_err(errno)?;
                    let mode = libc::S_IFLNK | 0o777;
                    self.take_ownership(&dir, name, (uid, gid), mode, 0)?;
                } else {
                    sys::symlinkat(&target, &dir, name).map_err(errno)?;
                }
                r.qid(self.qid_at(&dir, name)?);
            }
            message::TMKNOD => {
                let (dir, name, mode) = (d.u32()?, d.string()?, d.u32()?);
                let (major, minor, gid) = (d.u32()?, d.u32()?, d.u32()?);
                self.writable()?;
                let (dir, _, uid) = self.folder(dir)?;
                let dev = libc::makedev(major, minor);
                if self.mapped() {
                    let host_mode = libc::S_IFREG | mapped::FILE_MODE;
                    sys::mknodat(&dir, new_name(&name)?, host_mode, 0).map_err(errno)?;
                } else {
                    sys::mknodat(&dir, new_name(&name)?, mode, dev).map_err(errno)?;
                }
                self.take_ownership(&dir, &name, (uid, gid), mode, dev)?;
                r.qid(self.qid_at(&dir, &name)?);
            }
            message::TLINK => {
                let (dir, fid, name) = (d.u32()?, d.u32()?, d.string()?);
                self.writable()?;
                let target = self.fid(fid)?;
                let (dir, _, _) = self.folder(dir)?;
                let name = new_name(&name)?;
                sys::linkat(&*self.fd_of(target)?, &dir, name).map_err(errno)?;
                if self.mapped_file() {
                    // The new name shows the same guest owner and mode.
                    let place = Place::At(&target.rel);
                    if let Ok(meta) = self.with_entry(place, |e| mapped::file::read(&self.root, e))
                    {
                        mapped::file::write(&self.root, Some((&dir, name)), &meta)
                            .map_err(errno)?;
                    }
                }
            }
            message::TRENAMEAT => {
                let (old_dir, old) = (d.u32()?, d.string()?);
                let (new_dir, new) = (d.u32()?, d.string()?);
                self.writable()?;
                let ((old_dir, old_rel, _), (new_dir, new_rel, _)) =
                    (self.folder(old_dir)?, self.folder(new_dir)?);
                let (old, new) = (new_name(&old)?, new_name(&new)?);
                let (from, to) = (join(&old_rel, old), join(&new_rel, new));
                if !self.fids.can_move(&from, &to) {
                    return Err(libc::ENAMETOOLONG);
                }
                sys::renameat(&old_dir, old, &new_dir, new).map_err(errno)?;
                if self.mapped_file() {
                    mapped::file::rename(&old_dir, old, &new_dir, new);
                }
                self.fids.moved(&from, &to);
            }
            message::TUNLINKAT => {
                let (dir, name, flags) = (d.u32()?, d.string()?, d.u32()?);
                self.writable()?;
                let flags = flags as i32 & libc::AT_REMOVEDIR;
                let (dir, _, _) = self.folder(dir)?;
                let name = new_name(&name)?;
                if self.mapped_file() && flags != 0 {
                    // The directory's own (empty) metadata folder goes first.
                    if let Ok(sub) = self.lookup(&dir, name) {
                        let _ = sys::unlinkat(&sub, mapped::file::META_DIR, libc::AT_REMOVEDIR);
                    }
                }
                sys::unlinkat(&dir, name, flags).map_err(errno)?;
                if self.mapped_file() {
                    mapped::file::remove(&dir, name);
                }
            }
            message::TRENAME => {
                // Trename: move the file `fid` stands for to `dir/name`.
                let (fid, dir, name) = (d.u32()?, d.u32()?, d.string()?);
                self.writable()?;
                let from = self.fid(fid)?.rel.clone();
                let Some((old_dir, old)) = self.parent_of(&from)? else {
                    return Err(libc::EOPNOTSUPP); // the root
                };
                let (new_dir, new_rel, _) = self.folder(dir)?;
                let name = new_name(&name)?;
                let to = join(&new_rel, name);
                if !self.fids.can_move(&from, &to) {
                    return Err(libc::ENAMETOOLONG);
                }
                sys::renameat(&old_dir, old, &new_dir, name).map_err(errno)?;
                if self.mapped_file() {
                    mapped::file::rename(&old_dir, old, &new_dir, name);
                }
                self.fids.moved(&from, &to);
            }
            message::TXATTRWALK => self.xattr_walk(d, r)?,
            message::TXATTRCREATE => self.xattr_create(d)?,
            message::TLOCK => {
                // Tlock: locks are advisory between this guest's processes; grant them.
                self.fid(d.u32()?)?;
                r.u8(0);
            }
            message::TGETLOCK => {
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
}
