//! A connection's fids: where each file is in the share, and the descriptors the fids hold,
//! kept within a budget. Past it, the descriptors of fids without an open file are given up
//! (reclaimed) and such a fid's file is found again by its place when it is next used, as
//! QEMU's 9p server does.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::ninep::wire::Errno;

/// Fids at most per connection (memory only: a fid past the budget holds no descriptor).
pub const MAX_FIDS: usize = 65536;
/// The longest place (Linux's PATH_MAX): a walk, create or rename past it is ENAMETOOLONG.
pub const MAX_PLACE: usize = 4096;
/// Bytes of places the fids of a connection may have between them (each fid counted, also
/// a clone sharing its source's): past it, new fids are refused (ENFILE). Real places are a
/// few dozen bytes; only a guest that walks deep folders without end reaches this.
pub const MAX_PLACE_BYTES: usize = 64 << 20;
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
    pub rel: Arc<str>,
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
    pub fn new(rel: Arc<str>, fd: Arc<OwnedFd>, uid: u32) -> Fid {
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
    /// Bytes of the fids' places, summed.
    place_bytes: usize,
    share: PathBuf,
    said_full: bool,
    said_open: bool,
}

impl Fids {
    /// The fids of a connection to the share at `share`, holding at most `budget`
    /// descriptors before idle ones give theirs up ([`crate::descriptor_budget`]).
    pub fn new(share: PathBuf, budget: usize) -> Fids {
        Fids {
            map: HashMap::new(),
            held: 0,
            budget,
            place_bytes: 0,
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

    /// Sets fid `id` to `fid` (a fid of that number goes); past [`MAX_FIDS`] or
    /// [`MAX_PLACE_BYTES`], ENFILE.
    pub fn insert(&mut self, id: u32, fid: Fid) -> Result<(), Errno> {
        let replaced = self.map.get(&id).map_or(0, |old| old.rel.len());
        let too_many = !self.map.contains_key(&id) && self.map.len() >= MAX_FIDS;
        if too_many || self.place_bytes - replaced + fid.rel.len() > MAX_PLACE_BYTES {
            if !std::mem::replace(&mut self.said_full, true) {
                log::warn!(
                    "9p share {}: {} fids with {} bytes of places (MAX_FIDS {MAX_FIDS}, \
                     MAX_PLACE_BYTES {MAX_PLACE_BYTES}); refusing more",
                    self.share.display(),
                    self.map.len(),
                    self.place_bytes
                );
            }
            return Err(libc::ENFILE);
        }
        if fid.open.is_some() {
            self.room_for_an_open_file()?;
        }
        self.held += fid.held();
        self.place_bytes += fid.rel.len();
        if let Some(old) = self.map.insert(id, fid) {
            self.held -= old.held();
            self.place_bytes -= old.rel.len();
        }
        if self.held > self.budget {
            self.reclaim();
        }
        Ok(())
    }

    pub fn remove(&mut self, id: u32) -> Option<Fid> {
        let fid = self.map.remove(&id)?;
        self.held -= fid.held();
        self.place_bytes -= fid.rel.len();
        Some(fid)
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.held = 0;
        self.place_bytes = 0;
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

    /// Whether the fids at or under `from` can follow it to `to`: their places stay within
    /// [`MAX_PLACE`], and all places within [`MAX_PLACE_BYTES`].
    pub fn can_move(&self, from: &str, to: &str) -> bool {
        let moving: Vec<usize> = (self.map.values())
            .filter(|f| is_at_or_under(&f.rel, from))
            .map(|f| f.rel.len())
            .collect();
        let Some(longest) = moving.iter().max() else {
            return true; // no fid there
        };
        let grown: usize = moving.iter().map(|len| len - from.len() + to.len()).sum();
        let shrunk: usize = moving.iter().sum();
        longest - from.len() + to.len() <= MAX_PLACE
            && self.place_bytes - shrunk + grown <= MAX_PLACE_BYTES
    }

    /// The file at `from` is now at `to`: fids at or under it follow.
    pub fn moved(&mut self, from: &str, to: &str) {
        for fid in self.map.values_mut() {
            if is_at_or_under(&fid.rel, from) {
                let moved: Arc<str> = format!("{to}{}", &fid.rel[from.len()..]).into();
                self.place_bytes = self.place_bytes - fid.rel.len() + moved.len();
                fid.rel = moved;
            }
        }
    }
}

/// Whether `rel` is the place `at` or one under it (`a` holds `a/b`, not `ab`); the root
/// holds nothing here: it never moves.
fn is_at_or_under(rel: &str, at: &str) -> bool {
    !at.is_empty()
        && rel
            .strip_prefix(at)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The place of `name` in the folder at `dir`: `.` is the folder, `..` its parent (the root's
/// is the root); ENAMETOOLONG past [`MAX_PLACE`].
pub(super) fn child(dir: &str, name: &str) -> Result<Arc<str>, Errno> {
    let place = join(dir, name);
    if place.len() > MAX_PLACE {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(place.into())
}

/// [`child`] without the limit (a rename's places: no fid needs to be there).
pub(super) fn join(dir: &str, name: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ninep::sys;

    #[test]
    fn places_of_names_and_their_folders() {
        assert_eq!(&*child("", "a").unwrap(), "a");
        assert_eq!(&*child("a", "b").unwrap(), "a/b");
        assert_eq!(&*child("a/b", ".").unwrap(), "a/b");
        assert_eq!(&*child("a/b", "..").unwrap(), "a");
        assert_eq!(&*child("a", "..").unwrap(), "");
        assert_eq!(
            &*child("", "..").unwrap(),
            "",
            "the root's parent is the root"
        );
        let deep = "d".repeat(MAX_PLACE - 1);
        assert_eq!(child(&deep, "x").err(), Some(libc::ENAMETOOLONG));
        assert_eq!(split("a/b/c"), Some(("a/b", "c")));
        assert_eq!(split("a"), Some(("", "a")));
        assert_eq!(split(""), None);
    }

    fn root() -> Arc<OwnedFd> {
        Arc::new(sys::openat(libc::AT_FDCWD, "/", libc::O_PATH, 0).unwrap())
    }

    #[test]
    fn fids_follow_a_move_of_their_place_or_a_folder_above_it_only() {
        let mut fids = Fids::new(PathBuf::from("/share"), 64);
        for (id, rel) in [(1, "a"), (2, "a/x"), (3, "ab/x"), (4, "b")] {
            fids.insert(id, Fid::new(rel.into(), root(), 0)).unwrap();
        }
        assert!(fids.can_move("a", "c"));
        assert!(
            !fids.can_move("a", &"c".repeat(MAX_PLACE)),
            "a/x would be too long"
        );
        fids.moved("a", "c/d");
        let places: Vec<&str> = (1..=4).map(|id| &*fids.get(id).unwrap().rel).collect();
        assert_eq!(places, ["c/d", "c/d/x", "ab/x", "b"]);
        assert_eq!(
            fids.place_bytes,
            "c/d".len() + "c/d/x".len() + "ab/x".len() + 1
        );
    }

    #[test]
    fn idle_fids_give_their_descriptors_up_past_the_budget_and_open_files_stop_there() {
        let mut fids = Fids::new(PathBuf::from("/share"), 4);
        for id in 0..5 {
            fids.insert(id, Fid::new("a".into(), root(), 0)).unwrap();
        }
        assert!(fids.held <= 4, "{} held", fids.held);
        let open = || std::fs::File::open("/dev/null").unwrap();
        for id in 0..3 {
            fids.room_for_an_open_file().unwrap();
            fids.set_open(id, open()).unwrap();
        }
        assert_eq!(fids.held, 3, "three open files, no idle descriptor");
        assert_eq!(fids.room_for_an_open_file(), Err(libc::ENFILE));
        fids.remove(1);
        assert_eq!(fids.room_for_an_open_file(), Ok(()));
    }

    #[test]
    fn places_past_their_byte_budget_are_refused() {
        let mut fids = Fids::new(PathBuf::from("/share"), 64);
        let deep: Arc<str> = "d".repeat(MAX_PLACE).into();
        let fits = MAX_PLACE_BYTES / MAX_PLACE;
        for id in 0..fits as u32 {
            fids.insert(id, Fid::new(Arc::clone(&deep), root(), 0))
                .unwrap();
        }
        let over = fids.insert(fits as u32, Fid::new(deep, root(), 0));
        assert_eq!(over, Err(libc::ENFILE));
    }
}
