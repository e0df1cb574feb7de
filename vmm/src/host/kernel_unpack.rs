//! Decompressing a bzImage's payload on the host, once per kernel, so that the guest skips its
//! own decompressor (measured under nested KVM here: 4.3 s of a 10 s boot were the guest
//! decompressing its xz payload).
//!
//! The decompressed vmlinux is kept in a cache named by the BLAKE3 hash of the bzImage's
//! contents: `$NIXVMM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/nixvmm/kernels` or
//! `~/.cache/nixvmm/kernels`, else (a read-only home, as in the tier-4 L1 guest) a folder of
//! the user's own under the temporary directory. A folder that is not the user's own or that
//! others may write is never used. Beside each entry, a small file named by the bzImage's
//! device, inode, size, mtime and ctime records its hash, so an unchanged file is not hashed
//! again (about 110 ms of a nested boot); any change to the file changes its ctime. xz, zstd and gzip payloads are decompressed here (Debian's
//! liblzma and libzstd, flate2); anything else, and anything that goes wrong, falls back to the
//! guest's own decompressor with a log line saying why.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use firmware::boot::{self, read_up_to, LoadedKernel, BZIMAGE_HEAD_LEN};
use vm_memory::GuestMemory;

/// The largest vmlinux nixvmm writes out; a payload that decompresses to more is refused (a
/// stock x86-64 vmlinux is 30 to 80 MiB).
const MAX_VMLINUX: u64 = 1 << 30;
/// Overrides the cache folder.
const CACHE_ENV: &str = "NIXVMM_KERNEL_CACHE";

/// How a payload is compressed, told by its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    Gzip,
}

impl Compression {
    pub fn of(payload_start: &[u8]) -> Option<Compression> {
        match payload_start {
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Some(Compression::Xz),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Some(Compression::Zstd),
            [0x1f, 0x8b, ..] => Some(Compression::Gzip),
            _ => None,
        }
    }

    /// Writes the decompressed bytes of the first stream in `compressed` to `out`, at most
    /// `limit` of them (and one more, to tell that there were more); returns how many. The
    /// kernel's build appends the uncompressed size after an xz or zstd stream, so each
    /// decoder stops at the end of its first stream.
    fn decompress(self, compressed: &[u8], out: &mut impl Write, limit: u64) -> io::Result<u64> {
        match self {
            Compression::Xz => unxz(compressed, out, limit),
            Compression::Zstd => {
                let decoder = zstd::stream::read::Decoder::new(compressed)?.single_frame();
                io::copy(&mut decoder.take(limit + 1), out)
            }
            Compression::Gzip => {
                let decoder = flate2::read::GzDecoder::new(compressed);
                io::copy(&mut decoder.take(limit + 1), out)
            }
        }
    }
}

/// xz2's readers treat bytes after the end of the stream as corruption, so the stream is
/// driven here until liblzma says it ended.
fn unxz(compressed: &[u8], out: &mut impl Write, limit: u64) -> io::Result<u64> {
    let mut stream = xz2::stream::Stream::new_stream_decoder(u64::MAX, 0)?;
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let (read, written) = (stream.total_in(), stream.total_out());
        let input = compressed.get(read as usize..).unwrap_or_default();
        let status = stream.process(input, &mut chunk, xz2::stream::Action::Run)?;
        let produced = (stream.total_out() - written) as usize;
        out.write_all(&chunk[..produced])?;
        if status == xz2::stream::Status::StreamEnd || stream.total_out() > limit {
            return Ok(stream.total_out());
        }
        if produced == 0 && stream.total_in() == read {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the xz stream ends early",
            ));
        }
    }
}

/// Loads the kernel at `path`: a bzImage with a payload nixvmm can decompress is entered as
/// its vmlinux, from the cache (made on first use); every other kernel, and a bzImage whose
/// unpacking fails, is loaded as it is.
pub fn load_kernel<M: GuestMemory>(mem: &M, path: &Path) -> firmware::Result<LoadedKernel> {
    let start = std::time::Instant::now();
    match unpacked_vmlinux(path, cache_dir().as_deref()) {
        Ok(Some((head, mut vmlinux))) => {
            let found = start.elapsed();
            match boot::load_unpacked_bzimage(mem, &head, &mut vmlinux) {
                Ok(kernel) => {
                    log::debug!(
                        "kernel: vmlinux found in {} ms, loaded in {} ms",
                        found.as_millis(),
                        (start.elapsed() - found).as_millis()
                    );
                    return Ok(kernel);
                }
                Err(e) => log::warn!(
                    "{}: the guest decompresses the kernel itself: {e}",
                    path.display()
                ),
            }
        }
        Ok(None) => {}
        Err(e) => log::warn!(
            "{}: the guest decompresses the kernel itself: {e}",
            path.display()
        ),
    }
    boot::load_kernel(mem, path)
}

/// The bzImage's first bytes and its decompressed vmlinux, taken from or put into the `cache`
/// folder when there is one; `None` when `path` is no bzImage whose payload nixvmm
/// decompresses.
pub fn unpacked_vmlinux(path: &Path, cache: Option<&Path>) -> io::Result<Option<(Vec<u8>, File)>> {
    let mut image = File::open(path)?;
    let mut head = vec![0; BZIMAGE_HEAD_LEN];
    if read_up_to(&mut image, &mut head)? < BZIMAGE_HEAD_LEN {
        return Ok(None);
    }
    let Some(payload) = boot::bzimage_payload(&head) else {
        return Ok(None);
    };
    image.seek(SeekFrom::Start(payload.start))?;
    let mut magic = [0u8; 6];
    let got = read_up_to(&mut image, &mut magic)?;
    let Some(compression) = Compression::of(&magic[..got]) else {
        log::info!(
            "{}: payload compressed with a method nixvmm does not decompress; the guest does",
            path.display()
        );
        return Ok(None);
    };
    let meta = image.metadata()?;
    // The cache entry, and the index to write when the hash was computed here.
    let (cached, unrecorded) = match cache {
        Some(dir) => {
            let index = dir.join(index_name(&meta));
            let (hash, unrecorded) = match recorded_hash(&index, dir) {
                Some(hash) => (hash, None),
                None => {
                    let hash = content_hash(&mut image)?;
                    (hash.clone(), Some((index, hash)))
                }
            };
            (Some(dir.join(format!("{hash}.vmlinux"))), unrecorded)
        }
        None => (None, None),
    };
    let record = || {
        if let Some((index, hash)) = &unrecorded {
            record_hash(index, hash, &meta);
        }
    };
    if let Some(file) = cached.as_ref().and_then(|p| File::open(p).ok()) {
        record();
        return Ok(Some((head, file)));
    }
    image.seek(SeekFrom::Start(payload.start))?;
    let mut compressed = Vec::new();
    (&mut image)
        .take(payload.end - payload.start)
        .read_to_end(&mut compressed)?;
    if let Some(target) = &cached {
        match decompress_into_cache(compression, &compressed, target) {
            Ok(file) => {
                record();
                return Ok(Some((head, file)));
            }
            Err(e) => log::info!("kernel cache {}: {e}", target.display()),
        }
    }
    let mut file = tempfile::tempfile()?;
    decompress(compression, &compressed, &mut file)?;
    Ok(Some((head, file)))
}

/// Decompresses into a new file beside `target` and renames it there, so that a cache entry
/// is always whole; returns the entry, opened.
fn decompress_into_cache(
    compression: Compression,
    compressed: &[u8],
    target: &Path,
) -> io::Result<File> {
    let partial = target.with_extension(format!("partial{}", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&partial)?;
    let done = decompress(compression, compressed, &mut file)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&partial, target));
    if let Err(e) = done {
        let _ = fs::remove_file(&partial);
        return Err(e);
    }
    log::info!(
        "decompressed the kernel's payload into {}",
        target.display()
    );
    File::open(target)
}

/// Writes the decompressed payload to `out` and rewinds it; an output that is not an ELF
/// file or is larger than [`MAX_VMLINUX`] is an error.
pub fn decompress(compression: Compression, compressed: &[u8], out: &mut File) -> io::Result<()> {
    decompress_at_most(compression, compressed, out, MAX_VMLINUX)
}

fn decompress_at_most(
    compression: Compression,
    compressed: &[u8],
    out: &mut File,
    limit: u64,
) -> io::Result<()> {
    let written = compression.decompress(compressed, out, limit)?;
    if written > limit {
        return Err(io::Error::other(format!(
            "the payload decompresses to more than {} MiB",
            limit >> 20
        )));
    }
    out.flush()?;
    out.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 4];
    if read_up_to(out, &mut magic)? < 4 || &magic != b"\x7fELF" {
        return Err(io::Error::other(
            "the decompressed payload is not an ELF vmlinux",
        ));
    }
    out.seek(SeekFrom::Start(0))?;
    Ok(())
}

/// The name of the file that records the hash of the file whose metadata this is.
fn index_name(meta: &fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}-{}.{}-{}.{}.hash",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// The hash `index` records, if it is one and its entry is in `dir`.
fn recorded_hash(index: &Path, dir: &Path) -> Option<String> {
    let text = fs::read_to_string(index).ok()?;
    let hash = text.trim();
    let is_hash = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    (is_hash && dir.join(format!("{hash}.vmlinux")).exists()).then(|| hash.to_string())
}

/// Records `hash` in `index` (written beside it and renamed, so it is whole or absent),
/// unless the file changed in the last two seconds: timestamps have a coarse tick, and a
/// file rewritten again within it, at the same size, would keep its name (Git's "racy" rule).
fn record_hash(index: &Path, hash: &str, meta: &fs::Metadata) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if meta.ctime() >= now - 2 {
        return;
    }
    let partial = index.with_extension(format!("partial{}", std::process::id()));
    let written = fs::write(&partial, hash).and_then(|()| fs::rename(&partial, index));
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        log::debug!("kernel cache {}: {e}", index.display());
    }
}

/// The BLAKE3 hash of the whole file, in hex.
fn content_hash(file: &mut File) -> io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut chunk)? {
            0 => break,
            n => hasher.update(&chunk[..n]),
        };
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The first usable cache folder, made if missing; `None` when there is none.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env(CACHE_ENV) {
        return usable(&dir).then_some(dir);
    }
    let user_cache = env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")));
    let fallback = std::env::temp_dir().join(format!("nixvmm-{}", euid()));
    let candidates = user_cache
        .map(|c| c.join("nixvmm/kernels"))
        .into_iter()
        .chain([fallback.join("kernels")]);
    for dir in candidates {
        if usable(&dir) {
            return Some(dir);
        }
        log::debug!("kernel cache: {} is not usable", dir.display());
    }
    None
}

/// Whether `dir` exists or could be made, and is closed to everyone else: this user's own,
/// writable by no one else, in a folder of this user's or root's (so no one else can swap it).
/// Missing parts are made with mode 0700.
fn usable(dir: &Path) -> bool {
    let made = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir);
    let closed = |p: &Path| {
        fs::symlink_metadata(p)
            .is_ok_and(|m| m.is_dir() && m.uid() == euid() && m.permissions().mode() & 0o022 == 0)
    };
    let trusted_parent =
        |p: &Path| fs::metadata(p).is_ok_and(|m| m.uid() == euid() || m.uid() == 0);
    made.is_ok() && closed(dir) && dir.parent().is_none_or(trusted_parent)
}

fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;
    use std::io::Write;

    /// A stand-in vmlinux: what the checks look at is the ELF magic and the bytes.
    fn vmlinux() -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..200_000u32).map(|i| (i * 7 % 251) as u8));
        v
    }

    /// The kernel build's `size_append`: the uncompressed size after the stream.
    fn with_size(mut compressed: Vec<u8>, size: usize) -> Vec<u8> {
        compressed.extend((size as u32).to_le_bytes());
        compressed
    }

    fn compress(compression: Compression, data: &[u8]) -> Vec<u8> {
        match compression {
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                with_size(e.finish().unwrap(), data.len())
            }
            Compression::Zstd => with_size(zstd::encode_all(data, 3).unwrap(), data.len()),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    /// A bzImage (boot protocol 2.15, one setup sector, 64-bit entry) around `payload`.
    fn bzimage(dir: &Path, payload: &[u8]) -> PathBuf {
        let mut image = vec![0u8; 1024];
        image[0x1f1] = 1;
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        image[0x211] = 1; // LOADED_HIGH
        image[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
        image[0x248..0x24c].copy_from_slice(&0x40u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend([0x90; 0x40]); // the decompressor's code would be here
        image.extend(payload);
        image.extend([0xcc; 100]);
        let path = dir.join("bzImage");
        std::fs::write(&path, image).unwrap();
        path
    }

    fn unpacked(path: &Path, cache: Option<&Path>) -> io::Result<Option<Vec<u8>>> {
        Ok(unpacked_vmlinux(path, cache)?.map(|(_, mut file)| {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).unwrap();
            bytes
        }))
    }

    fn cache(dir: &Path) -> PathBuf {
        let cache = dir.join("cache");
        assert!(usable(&cache));
        cache
    }

    #[test]
    fn xz_zstd_and_gzip_payloads_come_out_whole() {
        for compression in [Compression::Xz, Compression::Zstd, Compression::Gzip] {
            let dir = tempfile::tempdir().unwrap();
            let image = bzimage(dir.path(), &compress(compression, &vmlinux()));
            assert_eq!(
                unpacked(&image, Some(&cache(dir.path()))).unwrap().unwrap(),
                vmlinux(),
                "{compression:?}"
            );
            assert_eq!(unpacked(&image, None).unwrap().unwrap(), vmlinux());
        }
    }

    #[test]
    fn a_second_boot_takes_the_vmlinux_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let image = bzimage(dir.path(), &compress(Compression::Zstd, &vmlinux()));
        let cache = cache(dir.path());
        unpacked(&image, Some(&cache)).unwrap().unwrap();
        let entries = files_in(&cache);
        assert_eq!(entries.len(), 1, "one entry, no partial files");
        let entry = entries
            .iter()
            .find(|p| p.extension().is_some_and(|e| e == "vmlinux"))
            .unwrap();
        std::fs::write(entry, b"\x7fELF from the cache").unwrap();
        assert_eq!(
            unpacked(&image, Some(&cache)).unwrap().unwrap(),
            b"\x7fELF from the cache"
        );
        // Another kernel has another entry.
        let other = tempfile::tempdir().unwrap();
        let mut changed = vmlinux();
        changed[100] ^= 1;
        let image = bzimage(other.path(), &compress(Compression::Zstd, &changed));
        assert_eq!(unpacked(&image, Some(&cache)).unwrap().unwrap(), changed);
        assert_eq!(files_in(&cache).len(), 2);
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn an_unchanged_bzimage_is_found_by_its_index_and_a_rewritten_one_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let image = bzimage(dir.path(), &compress(Compression::Gzip, &vmlinux()));
        let cache = cache(dir.path());
        unpacked(&image, Some(&cache)).unwrap().unwrap();
        assert_eq!(
            files_in(&cache).len(),
            1,
            "a file just written gets no index yet"
        );
        std::thread::sleep(std::time::Duration::from_millis(3100));
        unpacked(&image, Some(&cache)).unwrap().unwrap();
        let index = files_in(&cache)
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "hash"))
            .unwrap();
        // The index is what names the entry: point it at another one.
        let other = "ab".repeat(32);
        std::fs::write(
            cache.join(format!("{other}.vmlinux")),
            b"\x7fELF by the index",
        )
        .unwrap();
        std::fs::write(&index, &other).unwrap();
        assert_eq!(
            unpacked(&image, Some(&cache)).unwrap().unwrap(),
            b"\x7fELF by the index"
        );
        // A rewritten bzImage (new ctime, same path and size) is hashed again.
        let mut changed = vmlinux();
        changed[7] ^= 1;
        let again = bzimage(dir.path(), &compress(Compression::Gzip, &changed));
        assert_eq!(again, image);
        assert_eq!(unpacked(&image, Some(&cache)).unwrap().unwrap(), changed);
        // The rewritten bzImage's own index, holding no hash or naming no entry: ignored.
        // The hash is computed again and the right entry used; no entry is made under the
        // index's name.
        let index = cache.join(index_name(&std::fs::metadata(&image).unwrap()));
        let entries = |dir: &Path| -> Vec<PathBuf> {
            files_in(dir)
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == "vmlinux"))
                .collect()
        };
        let before = entries(&cache);
        for text in ["not a hash", &"cd".repeat(32)] {
            std::fs::write(&index, text).unwrap();
            assert_eq!(unpacked(&image, Some(&cache)).unwrap().unwrap(), changed);
            assert_eq!(entries(&cache), before, "{text}");
        }
    }

    #[test]
    fn payloads_nixvmm_does_not_decompress_are_left_to_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let bzip2 = bzimage(dir.path(), b"BZh91AY&SY not really");
        assert!(unpacked(&bzip2, None).unwrap().is_none());
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, vmlinux()).unwrap();
        assert!(unpacked(&elf, None).unwrap().is_none());
        let short = dir.path().join("short");
        std::fs::write(&short, b"HdrS").unwrap();
        assert!(unpacked(&short, None).unwrap().is_none());
    }

    #[test]
    fn corrupt_truncated_or_foreign_payloads_are_errors_and_leave_no_cache_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache(dir.path());
        let good = compress(Compression::Xz, &vmlinux());
        let mut corrupt = good.clone();
        corrupt[200] ^= 0xff;
        let truncated = good[..good.len() / 2].to_vec();
        let not_elf = compress(Compression::Gzip, b"MZ this is no vmlinux");
        for (what, payload) in [
            ("corrupt", corrupt),
            ("truncated", truncated),
            ("not ELF", not_elf),
        ] {
            let image = bzimage(dir.path(), &payload);
            let err = unpacked(&image, Some(&cache)).unwrap_err();
            assert!(!err.to_string().is_empty(), "{what}");
            assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0, "{what}");
        }
    }

    #[test]
    fn a_payload_that_decompresses_past_the_limit_is_refused() {
        let mut out = tempfile::tempfile().unwrap();
        let zeros = compress(Compression::Zstd, &vec![0; 4 << 20]);
        let err = decompress_at_most(Compression::Zstd, &zeros, &mut out, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("more than 1 MiB"), "{err}");
    }

    #[test]
    fn only_a_folder_closed_to_others_is_a_cache() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!usable(&open));
        let link = dir.path().join("link");
        let closed = dir.path().join("closed");
        assert!(usable(&closed));
        std::os::unix::fs::symlink(&closed, &link).unwrap();
        assert!(!usable(&link));
        assert_eq!(
            fs::metadata(&closed).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
