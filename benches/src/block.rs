//! `nixvmm-bench blk`: the virtio-blk request path measured host-side — requests through
//! nixvmm's device model on a mock virtqueue — next to the same I/O through `qemu-io` on the
//! same image, for raw and qcow2, 4 KiB random and 1 MiB sequential, reads and writes.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use virtio::block::{Block, BlockConfig, Format};
use virtio::{Memory, QueueDevice};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm::seccomp::{self, DeviceKind, Needs, Seccomp, ThreadKind};

const QUEUE_SIZE: u16 = 256;
/// Requests made available before each notification.
const BATCH: usize = 32;
const RING: u64 = 0;
const HEADERS: u64 = 0x10_0000;
const STATUS: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
const WRITE_ONLY: u16 = 2;

/// One workload: what each request does and where.
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub size: u64,
    pub offsets: Vec<u64>,
}

/// The four workloads on a disk of `disk_size` bytes, offsets from a fixed seed.
pub fn workloads(disk_size: u64) -> Vec<Workload> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = |blocks: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % blocks) * 4096
    };
    let random_offsets: Vec<u64> = (0..8192).map(|_| random(disk_size / 4096)).collect();
    let sequential: Vec<u64> = (0..disk_size / (1 << 20)).map(|i| i << 20).collect();
    vec![
        Workload {
            name: "4 KiB random read",
            write: false,
            size: 4096,
            offsets: random_offsets.clone(),
        },
        Workload {
            name: "4 KiB random write",
            write: true,
            size: 4096,
            offsets: random_offsets,
        },
        Workload {
            name: "1 MiB sequential read",
            write: false,
            size: 1 << 20,
            offsets: sequential.clone(),
        },
        Workload {
            name: "1 MiB sequential write",
            write: true,
            size: 1 << 20,
            offsets: sequential,
        },
    ]
}

fn open(image: &Path, format: Format) -> Result<Block, String> {
    Block::open(&BlockConfig {
        path: image.to_path_buf(),
        format: Some(format),
        readonly: false,
        serial: None,
    })
    .map_err(|e| e.to_string())
}

/// Runs `workload` through the device model; returns the elapsed time.
pub fn through_device(
    image: &Path,
    format: Format,
    workload: &Workload,
) -> Result<Duration, String> {
    serve(open(image, format)?, workload)
}

/// [`through_device`] on a thread under the virtio-blk worker's seccomp filter, as nixvmm
/// runs the model (the image opened before, as the main thread opens it).
pub fn through_confined_device(
    image: &Path,
    format: Format,
    workload: &Workload,
) -> Result<Duration, String> {
    let block = open(image, format)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let kind = ThreadKind::Device(DeviceKind::Block);
                seccomp::confine(kind, Needs::default(), Seccomp::On).map_err(|e| e.to_string())?;
                serve(block, workload)
            })
            .join()
            .map_err(|_| "the confined thread panicked".to_string())?
    })
}

fn serve(mut block: Block, workload: &Workload) -> Result<Duration, String> {
    let data_span = workload.size * BATCH as u64;
    let mem = Memory::from_ranges(&[(GuestAddress(0), (DATA + data_span) as usize)])
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    for batch in workload.offsets.chunks(BATCH) {
        // A fresh ring per batch (the mock cannot wrap its rings).
        mem.write_slice(&[0u8; 0x1_0000], GuestAddress(RING))
            .map_err(|e| e.to_string())?;
        let mock = MockSplitQueue::create(&mem, GuestAddress(RING), QUEUE_SIZE);
        let mut chains = Vec::new();
        for (i, offset) in batch.iter().enumerate() {
            let header = HEADERS + i as u64 * 16;
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&u32::from(workload.write).to_le_bytes());
            bytes[8..].copy_from_slice(&(offset / 512).to_le_bytes());
            mem.write_slice(&bytes, GuestAddress(header))
                .map_err(|e| e.to_string())?;
            let data_flags = if workload.write { 0 } else { WRITE_ONLY };
            let first = (i * 3) as u16;
            chains.extend([
                RawDescriptor::from(Descriptor::new(header, 16, 1, first + 1)),
                RawDescriptor::from(Descriptor::new(
                    DATA + i as u64 * workload.size,
                    workload.size as u32,
                    data_flags | 1,
                    first + 2,
                )),
                RawDescriptor::from(Descriptor::new(STATUS + i as u64, 1, WRITE_ONLY, 0)),
            ]);
        }
        mock.add_desc_chains(&chains, 0)
            .map_err(|e| format!("{e:?}"))?;
        let mut queue: Queue = mock.create_queue().map_err(|e| e.to_string())?;
        block
            .process_queue(0, &mut queue, &mem)
            .map_err(|e| e.to_string())?;
        let mut status = vec![0u8; batch.len()];
        mem.read_slice(&mut status, GuestAddress(STATUS))
            .map_err(|e| e.to_string())?;
        if status.iter().any(|s| *s != 0) {
            return Err(format!("{}: a request failed", workload.name));
        }
    }
    if workload.write {
        // Writes end with the guest's flush, as a filesystem's sync does.
        drop(block);
    }
    Ok(start.elapsed())
}

/// Runs the same requests through `qemu-io` (one command per request on its stdin).
pub fn through_qemu_io(
    image: &Path,
    format: Format,
    workload: &Workload,
) -> Result<Duration, String> {
    let fmt = match format {
        Format::Raw => "raw",
        Format::Qcow2 => "qcow2",
    };
    let verb = if workload.write { "write" } else { "read" };
    let mut script = String::new();
    for offset in &workload.offsets {
        script.push_str(&format!("{verb} {offset} {}\n", workload.size));
    }
    script.push_str("flush\nquit\n");
    let start = Instant::now();
    let mut child = Command::new("qemu-io")
        .args(["-f", fmt, "-t", "writeback"])
        .arg(image)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("qemu-io (Debian package qemu-utils): {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "qemu-io failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(start.elapsed())
}

/// Makes a `size`-byte image of `format`, filled so reads touch allocated data.
pub fn make_image(dir: &Path, format: Format, size: u64) -> Result<std::path::PathBuf, String> {
    let raw = dir.join("filled.raw");
    if !raw.exists() {
        let mut file = std::fs::File::create(&raw).map_err(|e| e.to_string())?;
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..size >> 20 {
            file.write_all(&chunk).map_err(|e| e.to_string())?;
        }
    }
    let (name, fmt) = match format {
        Format::Raw => ("image.raw", "raw"),
        Format::Qcow2 => ("image.qcow2", "qcow2"),
    };
    let image = dir.join(name);
    let out = Command::new("qemu-img")
        .args(["convert", "-O", fmt])
        .arg(&raw)
        .arg(&image)
        .output()
        .map_err(|e| format!("qemu-img (Debian package qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(image)
}

/// Requests per second and MiB per second of `count` requests of `size` bytes in `elapsed`.
pub fn rates(count: usize, size: u64, elapsed: Duration) -> (f64, f64) {
    let secs = elapsed.as_secs_f64().max(1e-9);
    (
        count as f64 / secs,
        count as f64 * size as f64 / secs / f64::from(1 << 20),
    )
}

/// Runs of each nixvmm variant per workload.
const REPEATS: usize = 5;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

/// Runs every workload on both formats and prints the table.
pub fn run(disk_mib: u64) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut out = String::from(
        "| image | workload | nixvmm req/s | nixvmm MiB/s | qemu-io req/s | qemu-io MiB/s | nixvmm/qemu-io | seccomp on/off |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for format in [Format::Raw, Format::Qcow2] {
        for workload in workloads(disk_mib << 20) {
            // A fresh image for each run, so writes allocate alike in all. With and without
            // the filter alternate, five runs each: the median of each is compared.
            let (mut free, mut confined) = (Vec::new(), Vec::new());
            for _ in 0..REPEATS {
                let image = make_image(dir.path(), format, disk_mib << 20)?;
                free.push(through_device(&image, format, &workload)?);
                let image = make_image(dir.path(), format, disk_mib << 20)?;
                confined.push(through_confined_device(&image, format, &workload)?);
            }
            let (ours, confined) = (median(free), median(confined));
            let image = make_image(dir.path(), format, disk_mib << 20)?;
            let theirs = through_qemu_io(&image, format, &workload)?;
            let (our_iops, our_mib) = rates(workload.offsets.len(), workload.size, ours);
            let (their_iops, their_mib) = rates(workload.offsets.len(), workload.size, theirs);
            out.push_str(&format!(
                "| {format:?} | {} | {our_iops:.0} | {our_mib:.1} | {their_iops:.0} | {their_mib:.1} | {:.2} | {:.3} |\n",
                workload.name,
                our_iops / their_iops,
                confined.as_secs_f64() / ours.as_secs_f64().max(1e-9)
            ));
        }
    }
    out.push_str(&format!(
        "\n{disk_mib} MiB images; 8192 random 4 KiB requests, or the whole disk in 1 MiB requests. \
         nixvmm: the device model on a mock virtqueue, {BATCH} requests per notification, \
         median of {REPEATS} runs; \
         qemu-io: one command per request (-t writeback), process start included. \
         Write runs end with a flush. seccomp on/off: the time of the same run on a thread \
         under the virtio-blk worker's filter over the time without it (1.000: no cost)."
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_stay_inside_the_disk() {
        let size = 64 << 20;
        for w in workloads(size) {
            assert!(w.offsets.iter().all(|o| o + w.size <= size), "{}", w.name);
            assert!(w.offsets.iter().all(|o| o % 4096 == 0));
        }
    }

    #[test]
    fn device_path_reads_and_writes_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let image = make_image(dir.path(), Format::Raw, 4 << 20).unwrap();
        let write = Workload {
            name: "w",
            write: true,
            size: 4096,
            offsets: vec![0, 8192, (4 << 20) - 4096],
        };
        through_device(&image, Format::Raw, &write).unwrap();
        let read = Workload {
            name: "r",
            write: false,
            size: 1 << 20,
            offsets: vec![0, 1 << 20],
        };
        through_device(&image, Format::Raw, &read).unwrap();
        let past_end = Workload {
            name: "x",
            write: false,
            size: 4096,
            offsets: vec![4 << 20],
        };
        assert!(through_device(&image, Format::Raw, &past_end).is_err());
        assert_eq!(rates(10, 1 << 20, Duration::from_secs(2)), (5.0, 5.0));
    }
}
