//! Arbitrary FUSE requests on a virtio-fs request queue over a throwaway share (read-only or
//! not): the device answers without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::fs::{FsConfig, VirtioFs};
use virtio::{Memory, QueueDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

/// A fresh share for each input, so no input sees what an earlier one did (a crash then
/// reproduces from its own input alone).
fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("share/sub")).expect("share");
    std::fs::write(dir.path().join("share/file"), b"content").expect("file");
    dir
}

fuzz_target!(|data: &[u8]| {
    let dir = share();
    let Some((&flags, request)) = data.split_first() else { return };
    let mut fs = VirtioFs::new(&FsConfig {
        shared_dir: dir.path().join("share"),
        tag: Some("fuzz".into()),
        readonly: flags & 1 == 1,
        xattr: flags & 2 == 2,
    })
    .expect("share");
    let mem = Memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    let request = &request[..request.len().min(0x1_0000)];
    if request.is_empty() || mem.write_slice(request, GuestAddress(0x1_0000)).is_err() {
        return;
    }
    let mock = MockSplitQueue::new(&mem, 16);
    let chain = [
        RawDescriptor::from(Descriptor::new(0x1_0000, request.len() as u32, 1, 1)),
        RawDescriptor::from(Descriptor::new(0x8_0000, 0x1_0000, 2, 0)),
    ];
    if mock.add_desc_chains(&chain, 0).is_err() {
        return;
    }
    let Ok(mut queue) = mock.create_queue::<Queue>() else { return };
    let _ = fs.process_queue(1, &mut queue, &mem);
});
