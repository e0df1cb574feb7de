//! The `mapped-xattr` security model (QEMU's): the guest's owner, group, mode and device
//! number live in `user.virtfs.*` extended attributes of the host file, which itself stays
//! owned by the server with private permissions; special files and symlinks are regular files
//! on the host (a symlink's target is its content).

use std::os::fd::OwnedFd;

use super::sys;

pub const UID: &str = "user.virtfs.uid";
pub const GID: &str = "user.virtfs.gid";
pub const MODE: &str = "user.virtfs.mode";
pub const RDEV: &str = "user.virtfs.rdev";
/// Host permissions of files and directories created under this model (QEMU's).
pub const FILE_MODE: u32 = 0o600;
pub const DIR_MODE: u32 = 0o700;

/// Whether a guest may see or set this attribute name (the mapping's own are hidden).
pub fn is_private(name: &str) -> bool {
    name.starts_with("user.virtfs.")
}

fn get_u32(fd: &OwnedFd, attr: &str) -> Option<u32> {
    let bytes = sys::getxattr(fd, attr).ok()??;
    Some(u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn get_u64(fd: &OwnedFd, attr: &str) -> Option<u64> {
    let bytes = sys::getxattr(fd, attr).ok()??;
    Some(u64::from_ne_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// Overlays the guest's view on a host `stat` of a non-symlink host file.
pub fn overlay(fd: &OwnedFd, st: &mut libc::stat) {
    if let Some(uid) = get_u32(fd, UID) {
        st.st_uid = uid;
    }
    if let Some(gid) = get_u32(fd, GID) {
        st.st_gid = gid;
    }
    if let Some(mode) = get_u32(fd, MODE) {
        st.st_mode = mode;
    }
    if let Some(rdev) = get_u64(fd, RDEV) {
        st.st_rdev = rdev;
    }
}

/// Records the guest's view of a file nixvmm just created.
pub fn record(fd: &OwnedFd, uid: u32, gid: u32, mode: u32, rdev: u64) -> std::io::Result<()> {
    sys::setxattr(fd, UID, &uid.to_ne_bytes(), 0)?;
    sys::setxattr(fd, GID, &gid.to_ne_bytes(), 0)?;
    sys::setxattr(fd, MODE, &mode.to_ne_bytes(), 0)?;
    if rdev != 0 {
        sys::setxattr(fd, RDEV, &rdev.to_ne_bytes(), 0)?;
    }
    Ok(())
}

pub fn set_mode(fd: &OwnedFd, mode: u32) -> std::io::Result<()> {
    sys::setxattr(fd, MODE, &mode.to_ne_bytes(), 0)
}

pub fn set_owner(fd: &OwnedFd, uid: Option<u32>, gid: Option<u32>) -> std::io::Result<()> {
    if let Some(uid) = uid {
        sys::setxattr(fd, UID, &uid.to_ne_bytes(), 0)?;
    }
    if let Some(gid) = gid {
        sys::setxattr(fd, GID, &gid.to_ne_bytes(), 0)?;
    }
    Ok(())
}

/// The guest's mode of a file, if mapped.
pub fn mode(fd: &OwnedFd) -> Option<u32> {
    get_u32(fd, MODE)
}
