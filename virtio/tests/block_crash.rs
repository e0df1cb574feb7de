//! Crash safety: a process serving virtio-blk writes and flushes on a qcow2 image (alone and
//! over a backing file) or a raw one is killed with SIGKILL at several points. Afterwards
//! `qemu-img check` finds no corruption (leaked clusters at most) and every write that was
//! flushed before the kill reads back, checked by qemu-io (Debian's qemu-utils), not by
//! nixvmm's own reader. The writer is this test binary run again as a child.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{desc, memory, request, DATA};
use virtio::block::{Block, BlockConfig};
use vm_memory::{Bytes, GuestAddress};

mod common;

const CHILD: &str = "NIXVMM_BLOCK_CRASH_IMAGE";
const SLOT: usize = 64 << 10;
const SLOTS: usize = 1024;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

fn pattern(i: usize) -> u8 {
    (i % 251) as u8 + 1
}

/// The child: writes slot after slot, each followed by a flush, and says which it flushed.
fn write_until_killed(image: &Path) -> ! {
    let mut block = Block::open(&BlockConfig {
        path: image.to_path_buf(),
        format: None,
        readonly: false,
        serial: None,
    })
    .unwrap();
    let mem = memory();
    let mut out = std::io::stdout().lock();
    for i in 0..SLOTS {
        mem.write_slice(&[pattern(i); SLOT], GuestAddress(DATA))
            .unwrap();
        let sector = (i * SLOT / 512) as u64;
        let data = [desc(DATA, SLOT as u32, 0)];
        assert_eq!(request(&mut block, &mem, T_OUT, sector, &data).0, 0);
        assert_eq!(request(&mut block, &mem, T_FLUSH, 0, &[]).0, 0);
        writeln!(out, "FLUSHED {i}").unwrap();
        out.flush().unwrap();
    }
    std::process::exit(0)
}

fn qemu(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (install Debian's qemu-utils)"))
}

/// Runs the writer on `image` and kills it once `flushes` writes were flushed; returns the
/// last slot it said it had flushed.
fn write_and_kill(image: &Path, flushes: usize) -> usize {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_writer_leaves_every_flushed_write_and_a_clean_image",
            "--nocapture",
        ])
        .env(CHILD, image)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut last = None;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let Some(i) = line
            .unwrap()
            .strip_prefix("FLUSHED ")
            .map(|n| n.parse().unwrap())
        else {
            continue;
        };
        last = Some(i);
        if i + 1 >= flushes {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    last.expect("the writer flushed nothing")
}

/// Everything flushed reads back; with a backing file, the last slot (never written) still
/// shows the backing file's data.
fn check(image: &Path, format: &str, last: usize, base: Option<u8>) {
    let path = image.to_str().unwrap();
    // 0: no problems; 3: leaked clusters only (space lost, no data). A raw image has no
    // metadata to check.
    let checked = qemu("qemu-img", &["check", "-f", format, path]);
    assert!(
        format == "raw" || matches!(checked.status.code(), Some(0) | Some(3)),
        "qemu-img check {path} after a kill: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let mut args = vec!["-f".to_string(), format.to_string(), "-r".to_string()];
    for i in 0..=last {
        args.push("-c".into());
        args.push(format!("read -P {} {} {SLOT}", pattern(i), i * SLOT));
    }
    if let Some(base) = base {
        // A slot the writer never reached shows the backing file.
        args.push("-c".into());
        args.push(format!("read -P {base} {} {SLOT}", (SLOTS - 1) * SLOT));
    }
    args.push(path.to_string());
    let read = Command::new("qemu-io").args(&args).output().unwrap();
    let text =
        String::from_utf8_lossy(&read.stdout).to_string() + &String::from_utf8_lossy(&read.stderr);
    assert!(
        read.status.success() && !text.contains("Pattern verification failed"),
        "flushed writes (0..={last}) after a kill: {text}"
    );
}

#[test]
fn a_killed_writer_leaves_every_flushed_write_and_a_clean_image() {
    if let Some(image) = std::env::var_os(CHILD) {
        write_until_killed(Path::new(&image));
    }
    let dir = tempfile::tempdir().unwrap();
    let size = format!("{}", SLOTS * SLOT);
    for (n, (format, backing, flushes)) in [
        ("qcow2", false, 1),
        ("qcow2", false, 37),
        ("qcow2", false, 300),
        ("qcow2", true, 25),
        ("raw", false, 40),
    ]
    .into_iter()
    .enumerate()
    {
        let image = dir.path().join(format!("disk{n}.{format}"));
        let path = image.to_str().unwrap();
        let base_pattern = backing.then_some(0xee_u8);
        if backing {
            let base = dir.path().join(format!("base{n}.qcow2"));
            let base = base.to_str().unwrap();
            assert!(
                qemu("qemu-img", &["create", "-q", "-f", "qcow2", base, &size])
                    .status
                    .success()
            );
            let filled = qemu(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -P 0xee 0 {size}"),
                    base,
                ],
            );
            assert!(filled.status.success(), "{filled:?}");
            let made = qemu(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, path,
                ],
            );
            assert!(made.status.success(), "{made:?}");
        } else {
            assert!(
                qemu("qemu-img", &["create", "-q", "-f", format, path, &size])
                    .status
                    .success()
            );
        }
        let last = write_and_kill(&image, flushes);
        assert!(last + 1 >= flushes, "{format}: killed after {last}");
        check(&image, format, last, base_pattern);
    }
}
