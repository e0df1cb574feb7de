//! Disk images behind a block device: raw files and qcow2 (v2/v3, backing chains, compressed
//! clusters as QEMU writes them), both through the `imago` crate (by a QEMU block-layer
//! maintainer), used synchronously.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};

/// The image formats nixvmm reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unknown disk format `{other}` (raw or qcow2)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path}: not a qcow2 image (give format=raw if it is raw)")]
    NotQcow2 { path: PathBuf },
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Reads the first bytes of the image to tell qcow2 from raw.
fn detect(path: &Path) -> std::io::Result<Format> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path)?;
    let n = file.read(&mut magic)?;
    Ok(if n == 4 && &magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// An open disk image. Methods take `&self`; discards need exclusive access inside imago, so
/// the image sits in a mutex.
pub struct DiskImage {
    image: Mutex<FormatAccess<File>>,
    size: u64,
    pub format: Format,
    pub readonly: bool,
}

impl DiskImage {
    /// Opens `path` as `format` (detected from the file when `None`).
    pub fn open(
        path: &Path,
        format: Option<Format>,
        readonly: bool,
    ) -> Result<DiskImage, DiskError> {
        let err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        if !path.is_file() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file; check the path (qemu-img create makes one)",
            )));
        }
        let detected = detect(path).map_err(err)?;
        let format = format.unwrap_or(detected);
        if format == Format::Qcow2 && detected != Format::Qcow2 {
            return Err(DiskError::NotQcow2 {
                path: path.to_path_buf(),
            });
        }
        let gate = PermissiveImplicitOpenGate::default();
        let access = match format {
            Format::Qcow2 => FormatAccess::new(
                Qcow2::<File>::builder_path(path)
                    .write(!readonly)
                    .open(gate)
                    .map_err(err)?,
            ),
            Format::Raw => FormatAccess::new(
                Raw::<File>::builder_path(path)
                    .write(!readonly)
                    .open(gate)
                    .map_err(err)?,
            ),
        };
        Ok(DiskImage {
            size: access.size(),
            image: Mutex::new(access),
            format,
            readonly,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn image(&self) -> std::sync::MutexGuard<'_, FormatAccess<File>> {
        self.image.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.image().read(buf, offset)
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.image().write(buf, offset)
    }

    /// Writes back everything cached and makes it durable (fsync), as `cache=writeback`'s
    /// flush does.
    pub fn flush(&self) -> std::io::Result<()> {
        let image = self.image();
        image.flush()?;
        image.sync()
    }

    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.image().write_zeroes(offset, len)
    }

    /// Lets the image drop the range's storage; reads return zeroes afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.image().discard_to_zero(offset, len)
    }
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        if !self.readonly {
            if let Err(e) = self.flush() {
                log::warn!("flushing a disk image on close: {e}");
            }
        }
    }
}
