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

/// The `mapped-file` security model's layout (QEMU's): the guest's view of `dir/name` lives in
/// `dir/.virtfs_metadata/name`, of the share's root in `.virtfs_metadata_root`, as lines
/// `virtfs.uid=N`, `virtfs.gid=N`, `virtfs.mode=N`, `virtfs.rdev=N`.
pub mod file {
    use std::io::Write;
    use std::os::fd::{AsRawFd, OwnedFd};

    use crate::ninep::sys;

    pub const META_DIR: &str = ".virtfs_metadata";
    pub const ROOT_META: &str = ".virtfs_metadata_root";

    /// What the metadata says; absent fields keep the host's values.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Meta {
        pub uid: Option<u32>,
        pub gid: Option<u32>,
        pub mode: Option<u32>,
        pub rdev: Option<u64>,
    }

    impl Meta {
        pub fn overlay(&self, st: &mut libc::stat) {
            if let Some(uid) = self.uid {
                st.st_uid = uid;
            }
            if let Some(gid) = self.gid {
                st.st_gid = gid;
            }
            if let Some(mode) = self.mode {
                st.st_mode = mode;
            }
            if let Some(rdev) = self.rdev {
                st.st_rdev = rdev;
            }
        }
    }

    /// Where an entry's metadata file is: (directory holding it, file name).
    fn place(
        root: &OwnedFd,
        entry: Option<(&OwnedFd, &str)>,
        create: bool,
    ) -> std::io::Result<(OwnedFd, String)> {
        match entry {
            None => Ok((root.try_clone()?, ROOT_META.to_string())),
            Some((dir, name)) => {
                if create {
                    match sys::mkdirat(dir, META_DIR, 0o700) {
                        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                        _ => {}
                    }
                }
                let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
                Ok((
                    sys::openat(dir.as_raw_fd(), META_DIR, flags, 0)?,
                    name.to_string(),
                ))
            }
        }
    }

    /// Reads the metadata of `entry` (`None`: the share's root).
    pub fn read(root: &OwnedFd, entry: Option<(&OwnedFd, &str)>) -> Meta {
        let Ok((dir, name)) = place(root, entry, false) else {
            return Meta::default();
        };
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW;
        let Ok(fd) = sys::openat(dir.as_raw_fd(), &name, flags, 0) else {
            return Meta::default();
        };
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(
            &mut std::io::Read::take(std::fs::File::from(fd), 4096),
            &mut text,
        );
        let mut meta = Meta::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "virtfs.uid" => meta.uid = value.parse().ok(),
                "virtfs.gid" => meta.gid = value.parse().ok(),
                "virtfs.mode" => meta.mode = value.parse().ok(),
                "virtfs.rdev" => meta.rdev = value.parse().ok(),
                _ => {}
            }
        }
        meta
    }

    /// Writes the metadata of `entry`.
    pub fn write(
        root: &OwnedFd,
        entry: Option<(&OwnedFd, &str)>,
        meta: &Meta,
    ) -> std::io::Result<()> {
        let (dir, name) = place(root, entry, true)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW;
        let mut file = std::fs::File::from(sys::openat(dir.as_raw_fd(), &name, flags, 0o600)?);
        let mut text = String::new();
        for (key, value) in [
            ("uid", meta.uid.map(u64::from)),
            ("gid", meta.gid.map(u64::from)),
            ("mode", meta.mode.map(u64::from)),
            ("rdev", meta.rdev),
        ] {
            if let Some(value) = value {
                text.push_str(&format!("virtfs.{key}={value}\n"));
            }
        }
        file.write_all(text.as_bytes())
    }

    /// Removes the metadata of `dir/name`, if any.
    pub fn remove(dir: &OwnedFd, name: &str) {
        if let Ok((meta_dir, name)) = place(dir, Some((dir, name)), false) {
            let _ = sys::unlinkat(&meta_dir, &name, 0);
        }
    }

    /// Moves the metadata of `old_dir/old` to `new_dir/new`, if any.
    pub fn rename(old_dir: &OwnedFd, old: &str, new_dir: &OwnedFd, new: &str) {
        let (Ok((from, old)), Ok((to, new))) = (
            place(old_dir, Some((old_dir, old)), false),
            place(new_dir, Some((new_dir, new)), true),
        ) else {
            return;
        };
        let _ = sys::renameat(&from, &old, &to, &new);
    }
}
