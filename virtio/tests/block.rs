//! Tier 1: virtio-blk requests through a mock queue on raw and qcow2 images, including hostile
//! chains, and qcow2 interop with qemu-img (Debian package qemu-utils).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{desc, memory, request, DATA, HEADER, STATUS, WRITE};
use virtio::block::{Block, BlockConfig, Format};
use virtio::QueueDevice;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

mod common;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img not found: install Debian's qemu-utils");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn raw_disk(dir: &Path, size: usize) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut bytes = vec![0u8; size];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    std::fs::write(&path, bytes).unwrap();
    path
}

fn open(path: &Path, readonly: bool, serial: Option<&str>) -> Block {
    Block::open(&BlockConfig {
        path: path.to_path_buf(),
        format: None,
        readonly,
        serial: serial.map(String::from),
    })
    .unwrap()
}

#[test]
fn reads_writes_flushes_and_identifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), 64 << 10);
    let mut block = open(&path, false, Some("root"));
    let mem = memory();
    assert_eq!(block.capacity_sectors(), 128);
    assert_eq!(&block.config()[..8], &128u64.to_le_bytes());

    // Read sectors 3 and 4 into two segments.
    let (status, len) = request(
        &mut block,
        &mem,
        0,
        3,
        &[desc(DATA, 512, WRITE), desc(DATA + 512, 512, WRITE)],
    );
    assert_eq!((status, len), (0, 1025));
    let mut got = [0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));

    // Write sector 7, flush, and find it in the file.
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&mut block, &mem, 1, 7, &[desc(DATA, 512, 0)]),
        (0, 1)
    );
    assert_eq!(request(&mut block, &mem, 4, 0, &[]), (0, 1));
    let file = std::fs::read(&path).unwrap();
    assert!(file[7 * 512..8 * 512].iter().all(|b| *b == 0xab));

    // GET_ID: the serial, NUL padded to 20 bytes.
    let (status, len) = request(&mut block, &mem, 8, 0, &[desc(DATA, 20, WRITE)]);
    assert_eq!((status, len), (0, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..5], b"root\0");

    // Unknown request type.
    assert_eq!(request(&mut block, &mem, 99, 0, &[]).0, 2);
}

#[test]
fn discard_and_write_zeroes_clear_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), 64 << 10);
    let mut block = open(&path, false, None);
    let mem = memory();
    for (kind, sector) in [(11u32, 10u64), (13, 20)] {
        let mut segment = [0u8; 16];
        segment[..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&2u32.to_le_bytes());
        mem.write_slice(&segment, GuestAddress(DATA)).unwrap();
        assert_eq!(
            request(&mut block, &mem, kind, 0, &[desc(DATA, 16, 0)]).0,
            0
        );
    }
    let (status, _) = request(&mut block, &mem, 0, 10, &[desc(DATA, 1024, WRITE)]);
    assert_eq!(status, 0);
    let mut got = [1u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(
        got.iter().all(|b| *b == 0),
        "discarded sectors read as zero"
    );
    let file = std::fs::read(&path).unwrap();
    assert!(file[20 * 512..22 * 512].iter().all(|b| *b == 0));
    assert!(
        file[22 * 512..23 * 512].iter().all(|b| *b == 22),
        "beyond the range untouched"
    );
}

#[test]
fn read_only_disks_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), 8 << 10);
    let mut block = open(&path, true, None);
    assert_ne!(block.features() & virtio::block::features::RO, 0);
    let mem = memory();
    mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut block, &mem, 1, 0, &[desc(DATA, 512, 0)]).0, 1);
    assert_eq!(request(&mut block, &mem, 13, 0, &[desc(DATA, 16, 0)]).0, 1);
    assert!(std::fs::read(&path).unwrap()[..512].iter().all(|b| *b == 0));
    assert_eq!(
        request(&mut block, &mem, 0, 0, &[desc(DATA, 512, WRITE)]).0,
        0
    );
}

#[test]
fn hostile_requests_get_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = raw_disk(dir.path(), 8 << 10);
    let mut block = open(&path, false, None);
    let mem = memory();
    // Past the end, and a sector number that overflows the byte offset.
    assert_eq!(
        request(&mut block, &mem, 0, 16, &[desc(DATA, 512, WRITE)]).0,
        1
    );
    assert_eq!(
        request(&mut block, &mem, 0, 15, &[desc(DATA, 1024, WRITE)]).0,
        1
    );
    assert_eq!(
        request(&mut block, &mem, 0, u64::MAX / 4, &[desc(DATA, 512, WRITE)]).0,
        1
    );
    // A huge read buffer (beyond the disk): refused before any allocation of that size.
    assert_eq!(
        request(&mut block, &mem, 0, 0, &[desc(DATA, 0xc0_0000, WRITE)]).0,
        1
    );
    // Data outside guest memory: the chain comes back with nothing written.
    let mock = MockSplitQueue::new(&mem, 16);
    mock.build_desc_chain(&[
        desc(HEADER, 16, 0),
        desc(0xffff_f000, 512, WRITE),
        desc(STATUS, 1, WRITE),
    ])
    .unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    block.process_queue(0, &mut queue, &mem).unwrap();
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 0);
    // No writable byte for the status; a header too short.
    let mock = MockSplitQueue::new(&mem, 16);
    mock.build_desc_chain(&[desc(HEADER, 16, 0)]).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    block.process_queue(0, &mut queue, &mem).unwrap();
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 0);
    let mock = MockSplitQueue::new(&mem, 16);
    mock.build_desc_chain(&[desc(HEADER, 8, 0), desc(STATUS, 1, WRITE)])
        .unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    block.process_queue(0, &mut queue, &mem).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);
}

#[test]
fn missing_and_corrupt_images_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = |path: PathBuf, format| BlockConfig {
        path,
        format,
        readonly: false,
        serial: None,
    };
    let err = Block::open(&config(dir.path().join("nope.qcow2"), None))
        .err()
        .unwrap();
    assert!(err.to_string().contains("nope.qcow2"), "{err}");
    let garbage = dir.path().join("garbage.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xff; 100]);
    std::fs::write(&garbage, bytes).unwrap();
    let err = Block::open(&config(garbage, None)).err().unwrap();
    assert!(err.to_string().contains("garbage.qcow2"), "{err}");
    let raw = raw_disk(dir.path(), 4096);
    let err = Block::open(&config(raw, Some(Format::Qcow2)))
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a qcow2 image"), "{err}");
}

#[test]
fn qcow2_overlay_over_a_compressed_base_reads_and_writes_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let raw = raw_disk(dir.path(), 1 << 20);
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        &d("base.qcow2"),
    ]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &d("base.qcow2"),
        "-F",
        "qcow2",
        &d("top.qcow2"),
    ]);
    let mut block = open(Path::new(&d("top.qcow2")), false, None);
    let mem = memory();
    // Reads come from the compressed backing file.
    let (status, _) = request(&mut block, &mem, 0, 100, &[desc(DATA, 512, WRITE)]);
    assert_eq!(status, 0);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|b| *b == 100));
    // Writes land in the overlay; qemu-img sees a clean image with our data.
    mem.write_slice(&[0x5a; 4096], GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&mut block, &mem, 1, 200, &[desc(DATA, 4096, 0)]).0,
        0
    );
    assert_eq!(request(&mut block, &mem, 4, 0, &[]).0, 0);
    drop(block);
    qemu_img(&["check", &d("top.qcow2")]);
    qemu_img(&["convert", "-O", "raw", &d("top.qcow2"), &d("out.raw")]);
    let out = std::fs::read(d("out.raw")).unwrap();
    let mut expected = std::fs::read(&raw).unwrap();
    expected[200 * 512..200 * 512 + 4096].fill(0x5a);
    assert!(out == expected, "qemu-img reads back what the guest wrote");
}
