//! Decompressing a bzImage's payload on the host, once per kernel, so that the guest skips its
//! own decompressor (measured under nested KVM here: 4.3 s of a 10 s boot were the guest
//! decompressing its xz payload).
//!
//! The decompressed vmlinux is kept in a cache named by the BLAKE3 hash of the bzImage's
//! contents: `$NIXVMM_KERNEL_CACHE`, else `$XDG_CACHE_HOME/nixvmm/kernels` or
//! `~/.cache/nixvmm/kernels`, else (a read-only home, as in the tier-4 L1 guest) a folder of
//! the user's own under the temporary directory. A folder that is not the user's own or that
//! others may write is never used. xz, zstd and gzip payloads are decompressed here (Debian's
//! liblzma and libzstd, flate2); anything else, and anything that goes wrong, falls back to the
//! guest's own decompressor with a log line saying why.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use firmware::boot::{self, LoadedKernel, BZIMAGE_HEAD_LEN};
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
    match unpacked_vmlinux(path) {
        Ok(Some((head, mut vmlinux))) => {
            match boot::load_unpacked_bzimage(mem, &head, &mut vmlinux) {
                Ok(kernel) => return Ok(kernel),
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

/// The bzImage's first bytes and its decompressed vmlinux, or `None` when `path` is no bzImage
/// whose payload nixvmm decompresses.
pub fn unpacked_vmlinux(path: &Path) -> io::Result<Option<(Vec<u8>, File)>> {
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
    let cache = cache_dir();
    let cached = match &cache {
        Some(dir) => Some(dir.join(format!("{}.vmlinux", content_hash(&mut image)?))),
        None => None,
    };
    if let Some(file) = cached.as_ref().and_then(|p| File::open(p).ok()) {
        return Ok(Some((head, file)));
    }
    image.seek(SeekFrom::Start(payload.start))?;
    let mut compressed = Vec::new();
    (&mut image)
        .take(payload.end - payload.start)
        .read_to_end(&mut compressed)?;
    if let Some(target) = &cached {
        match decompress_into_cache(compression, &compressed, target) {
            Ok(file) => return Ok(Some((head, file))),
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
    let written = compression.decompress(compressed, out, MAX_VMLINUX)?;
    if written > MAX_VMLINUX {
        return Err(io::Error::other(format!(
            "the payload decompresses to more than {} MiB",
            MAX_VMLINUX >> 20
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

/// The BLAKE3 hash of the whole file, in hex.
fn content_hash(file: &mut File) -> io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    io::copy(file, &mut hasher)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// The first usable cache folder, made if missing; `None` when there is none.
fn cache_dir() -> Option<PathBuf> {
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

fn read_up_to(file: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
