//! A filesystem that holds at most so many descriptors for the guest: each open handle is
//! one, and so is each inode the guest has looked up and not forgotten (fuse-backend-rs keeps
//! an O_PATH descriptor per inode). A guest that opens without releasing, or looks up without
//! forgetting, would otherwise take them all, and with them nixvmm's QMP and monitor clients.
//! Every call goes to the filesystem inside; opens and lookups of new inodes past the cap
//! fail with ENFILE (said once).

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter, ROOT_ID,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

pub struct Bounded<F> {
    inner: F,
    /// Handles open now (counted from what `inner` opened and released).
    handles: AtomicUsize,
    /// The inodes the guest holds, with how many lookups of each it has not forgotten
    /// (the root, which is never forgotten, aside).
    inodes: Mutex<HashMap<u64, u64>>,
    /// The most handles and inodes held at once, together.
    cap: usize,
    said_full: AtomicBool,
}

impl<F> Bounded<F> {
    pub fn new(inner: F, cap: usize) -> Bounded<F> {
        Bounded {
            inner,
            handles: AtomicUsize::new(0),
            inodes: Mutex::new(HashMap::new()),
            cap,
            said_full: AtomicBool::new(false),
        }
    }

    /// Descriptors the guest holds: its open handles and its looked-up inodes.
    fn held(&self, inodes: &HashMap<u64, u64>) -> usize {
        self.handles.load(Ordering::Relaxed) + inodes.len()
    }

    /// Whether the guest may hold `more` descriptors besides those it holds.
    fn room_for(&self, more: usize) -> io::Result<()> {
        if self.held(&devices::bus::lock(&self.inodes)) + more <= self.cap {
            return Ok(());
        }
        Err(self.full())
    }

    /// The error past the cap, said once.
    fn full(&self) -> io::Error {
        let message = format_args!(
            "virtio-fs: the guest holds {} files open or looked up (the share's descriptor \
             budget); refusing more until it closes or forgets some (raise `ulimit -n`)",
            self.cap
        );
        devices::warn_once(&self.said_full, message);
        io::Error::from_raw_os_error(libc::ENFILE)
    }

    fn opened(&self, handle: Option<u64>) {
        if handle.is_some() {
            self.handles.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one lookup of `inode` the guest now holds; `false` (nothing counted) where the
    /// inode is new and the guest holds as many as it may.
    fn hold(&self, inode: u64) -> bool {
        if inode == ROOT_ID {
            return true;
        }
        let mut inodes = devices::bus::lock(&self.inodes);
        let full = self.held(&inodes) >= self.cap;
        match inodes.get_mut(&inode) {
            Some(lookups) => *lookups = lookups.saturating_add(1),
            None if full => return false,
            None => {
                inodes.insert(inode, 1);
            }
        }
        true
    }

    /// Counts `count` lookups of `inode` the guest forgot.
    fn release(&self, inode: u64, count: u64) {
        let mut inodes = devices::bus::lock(&self.inodes);
        if let Some(lookups) = inodes.get_mut(&inode) {
            *lookups = lookups.saturating_sub(count);
            if *lookups == 0 {
                inodes.remove(&inode);
            }
        }
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> Bounded<F> {
    /// Counts the lookup `entry` gives the guest, or, where the guest holds as many inodes as
    /// it may and this one is new, hands the lookup back to the filesystem and refuses it.
    fn looked_up(&self, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if self.hold(entry.inode) {
            return Ok(entry);
        }
        self.inner.forget(ctx, entry.inode, 1);
        Err(self.full())
    }
}

impl<F: FileSystem<Inode = u64, Handle = u64>> FileSystem for Bounded<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.inner.destroy();
        // The filesystem closed every handle and forgot every inode.
        self.handles.store(0, Ordering::Relaxed);
        devices::bus::lock(&self.inodes).clear();
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.looked_up(ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.inner.forget(ctx, inode, count);
        self.release(inode, count);
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        for &(inode, count) in &requests {
            self.release(inode, count);
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.room_for(1)?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.looked_up(ctx, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.room_for(1)?;
        let entry = self.inner.mknod(ctx, inode, name, mode, rdev, umask)?;
        self.looked_up(ctx, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.room_for(1)?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.looked_up(ctx, entry)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.looked_up(ctx, entry)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        self.room_for(1)?;
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.opened(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        // A handle and (as a rule) a new inode: room for both.
        self.room_for(2)?;
        let created = self.inner.create(ctx, parent, name, args)?;
        // Room was made sure of above: requests that add inodes come on the one request
        // queue, served in order.
        self.hold(created.0.inode);
        self.opened(created.1);
        Ok(created)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.handles.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.room_for(1)?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.opened(opened.0);
        Ok(opened)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        // Each entry sent with its attributes is a lookup the guest holds. One that would be
        // a new inode past the cap is sent by name only (node ID 0: Linux lists it and looks
        // it up when it needs it, which is refused then), and its lookup handed back: the
        // listing stays whole.
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
                let inode = entry.inode;
                if !self.hold(inode) {
                    self.full();
                    let name_only = Entry {
                        inode: 0,
                        generation: 0,
                        attr_timeout: Duration::ZERO,
                        entry_timeout: Duration::ZERO,
                        ..entry
                    };
                    let sent = add_entry(dir_entry, name_only);
                    // The filesystem forgets an entry that did not fit (Ok(0)) itself.
                    if matches!(sent, Ok(n) if n > 0) {
                        self.inner.forget(ctx, inode, 1);
                    }
                    return sent;
                }
                let sent = add_entry(dir_entry, entry);
                // The filesystem forgets an entry that did not fit (Ok(0)), and only that.
                if matches!(sent, Ok(0)) {
                    self.release(inode, 1);
                }
                sent
            })
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.handles.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    /// Query file lock status
    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file read lock
    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file write lock
    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    /// send ioctl to the file
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }
}
