//! A connection's fids: where each file is in the share, and the descriptors the fids hold,
//! kept within a budget. Past it, the descriptors of fids without an open file are given up
//! (reclaimed) and such a fid's file is found again by its place when it is next used, as
//! QEMU's 9p server does.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use super::sys;
use crate::ninep::wire::Errno;

/// Fids at most per connection (memory only: a fid past the budget holds no descriptor).
pub const MAX_FIDS: usize = 65536;
/// Descriptors a share's fids may hold whatever the open-files limit.
const MIN_BUDGET: usize = 256;

/// The descriptors a share's fids may hold before idle ones are given up: a quarter of the
/// process's open-files limit, so that several shares leave descriptors for the rest of
/// nixvmm. Read once, by the first server (made before the seccomp filters: the threads that
/// make the others may not read limits).
pub fn descriptor_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| (sys::open_files_limit() / 4).max(MIN_BUDGET))
}

pub(super) enum Xattr {
    Read(Vec<u8>),
    Write {
        name: String,
        size: usize,
        flags: i32,
        data: Vec<u8>,
    },
}

pub(super) struct Fid {
    /// Where the file is: names from the share's root joined by `/` ("" is the root).
    /// Renames through this connection carry it along ([`Fids::moved`]).
    pub rel: String,
    /// O_PATH | O_NOFOLLOW descriptor of the file, shared by the fids cloned from this one;
    /// `None` once given up (the file is found again by `rel`).
    pub fd: Option<Arc<OwnedFd>>,
    /// The guest user this fid acts for (from Tattach), owner of what it creates.
    pub uid: u32,
    /// Set by lopen/lcreate: the file opened for I/O.
    pub open: Option<File>,
    /// An extended attribute being read (Txattrwalk) or written (Txattrcreate).
    pub xattr: Option<Xattr>,
}

impl Fid {
    pub fn new(rel: String, fd: Arc<OwnedFd>, uid: u32) -> Fid {
        Fid {
            rel,
            fd: Some(fd),
            uid,
            open: None,
            xattr: None,
        }
    }

    /// Descriptors this fid holds (shared ones counted for each fid: an upper bound).
    fn held(&self) -> usize {
        usize::from(self.fd.is_some()) + usize::from(self.open.is_some())
    }
}

pub(super) struct Fids {
    map: HashMap<u32, Fid>,
    /// Descriptors the fids hold ([`Fid::held`] summed).
    held: usize,
    budget: usize,
    share: PathBuf,
    said_full: bool,
    said_open: bool,
}

impl Fids {
    pub fn new(share: PathBuf) -> Fids {
        Fids {
            map: HashMap::new(),
            held: 0,
            budget: descriptor_budget(),
            share,
            said_full: false,
            said_open: false,
        }
    }

    pub fn get(&self, id: u32) -> Result<&Fid, Errno> {
        self.map.get(&id).ok_or(libc::EBADF)
    }

    /// The extended attribute a fid reads or writes.
    pub fn xattr_mut(&mut self, id: u32) -> Result<&mut Option<Xattr>, Errno> {
        Ok(&mut self.map.get_mut(&id).ok_or(libc::EBADF)?.xattr)
    }

    /// Sets fid `id` to `fid` (a fid of that number goes); past [`MAX_FIDS`], ENFILE.
    pub fn insert(&mut self, id: u32, fid: Fid) -> Result<(), Errno> {
        if !self.map.contains_key(&id) && self.map.len() >= MAX_FIDS {
            if !std::mem::replace(&mut self.said_full, true) {
                log::warn!(
                    "9p share {}: {MAX_FIDS} fids (MAX_FIDS); refusing more",
                    self.share.display()
                );
            }
            return Err(libc::ENFILE);
        }
        if fid.open.is_some() {
            self.room_for_an_open_file()?;
        }
        self.held += fid.held();
        if let Some(old) = self.map.insert(id, fid) {
            self.held -= old.held();
        }
        if self.held > self.budget {
            self.reclaim();
        }
        Ok(())
    }

    pub fn remove(&mut self, id: u32) -> Option<Fid> {
        let fid = self.map.remove(&id)?;
        self.held -= fid.held();
        Some(fid)
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.held = 0;
    }

    /// Fid `id` now has `file` open (the caller asked [`Fids::room_for_an_open_file`]).
    pub fn set_open(&mut self, id: u32, file: File) -> Result<(), Errno> {
        let fid = self.map.get_mut(&id).ok_or(libc::EBADF)?;
        self.held -= fid.held();
        fid.open = Some(file);
        self.held += fid.held();
        Ok(())
    }

    /// Whether one more file may be opened: idle descriptors are given up first; open files
    /// alone at the budget are refused (ENFILE, said once).
    pub fn room_for_an_open_file(&mut self) -> Result<(), Errno> {
        if self.held + 2 > self.budget {
            self.reclaim();
        }
        if self.held + 2 <= self.budget {
            return Ok(());
        }
        if !std::mem::replace(&mut self.said_open, true) {
            log::warn!(
                "9p share {}: {} descriptors held by open files (a quarter of the open-files \
                 limit); refusing to open more (raise `ulimit -n`)",
                self.share.display(),
                self.held
            );
        }
        Err(libc::ENFILE)
    }

    /// Gives up the descriptors of fids without an open file.
    fn reclaim(&mut self) {
        let before = self.held;
        for fid in self.map.values_mut().filter(|f| f.open.is_none()) {
            if fid.fd.take().is_some() {
                self.held -= 1;
            }
        }
        log::debug!(
            "9p share {}: {} descriptors given up",
            self.share.display(),
            before - self.held
        );
    }

    /// The file at `from` is now at `to`: fids at or under it follow.
    pub fn moved(&mut self, from: &str, to: &str) {
        for fid in self.map.values_mut() {
            if fid.rel == from {
                fid.rel = to.to_string();
            } else if let Some(rest) = fid.rel.strip_prefix(from).filter(|r| r.starts_with('/')) {
                if !from.is_empty() {
                    fid.rel = format!("{to}{rest}");
                }
            }
        }
    }
}

/// The place of `name` in the folder at `dir`: `.` is the folder, `..` its parent (the root's
/// is the root).
pub(super) fn child(dir: &str, name: &str) -> String {
    match name {
        "." => dir.to_string(),
        ".." => dir
            .rsplit_once('/')
            .map_or("", |(parent, _)| parent)
            .to_string(),
        _ if dir.is_empty() => name.to_string(),
        _ => format!("{dir}/{name}"),
    }
}

/// The folder a place is in and its name there; `None` for the root.
pub(super) fn split(rel: &str) -> Option<(&str, &str)> {
    match rel.rsplit_once('/') {
        Some((dir, name)) => Some((dir, name)),
        None if rel.is_empty() => None,
        None => Some(("", rel)),
    }
}
