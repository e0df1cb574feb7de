//! The one place nixvmm's own device models are built, for `nixvmm run` (each then runs in a
//! worker thread of the VMM) and for `nixvmm device` (served over vhost-user).

use std::path::PathBuf;

use virtio::block::{Block, BlockConfig, DiskError};
use virtio::fs::{FsConfig, FsError, VirtioFs};
use virtio::net::Net;
use virtio::ninep::{ShareConfig, Virtio9p};
use virtio::rng::Rng;
use virtio::QueueDevice;

use crate::seccomp::DeviceKind;

/// A device model and what it serves.
pub enum Model<'a> {
    Block(&'a BlockConfig),
    VirtioFs(&'a FsConfig),
    NineP {
        tag: &'a str,
        config: &'a ShareConfig,
    },
    Rng,
    Net {
        mac: [u8; 6],
        backend: Box<dyn virtio::net::Backend>,
        link: virtio::net::Link,
    },
    /// virtio-console, its ports by id (`None`: no port with that id).
    Console(Vec<Option<virtio::console::PortConfig>>),
    /// nixvmm's own virtio-vsock, its host side on Unix sockets at `uds`.
    Vsock {
        cid: u64,
        uds: &'a std::path::Path,
    },
}

impl Model<'_> {
    /// Which seccomp filter the thread serving this model gets.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Model::Block(_) => DeviceKind::Block,
            Model::VirtioFs(_) => DeviceKind::Fs,
            Model::NineP { .. } => DeviceKind::NineP,
            Model::Rng => DeviceKind::Rng,
            Model::Net { .. } => DeviceKind::Net,
            Model::Console(_) => DeviceKind::Console,
            Model::Vsock { .. } => DeviceKind::Vsock,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    VirtioFs(#[from] FsError),
    #[error("virtio-console: {0}")]
    Console(std::io::Error),
    #[error("--vsock: cannot listen: {0}")]
    Vsock(std::io::Error),
    #[error("--share {path}: {source}")]
    NineP {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Opens what `model` serves and returns the model.
pub fn build(model: Model) -> Result<Box<dyn QueueDevice>, ModelError> {
    Ok(match model {
        Model::Block(config) => Box::new(Block::open(config)?),
        Model::VirtioFs(config) => Box::new(VirtioFs::new(config)?),
        Model::NineP { tag, config } => Box::new(Virtio9p::new(tag, config.clone()).map_err(
            |source| ModelError::NineP {
                path: config.root.clone(),
                source,
            },
        )?),
        Model::Rng => Box::new(Rng::new()),
        Model::Net { mac, backend, link } => Box::new(Net::new(mac, backend, link)),
        Model::Console(ports) => {
            Box::new(virtio::console::Console::new(ports).map_err(ModelError::Console)?)
        }
        Model::Vsock { cid, uds } => {
            let muxer = virtio::vsock::Muxer::new(cid, uds).map_err(ModelError::Vsock)?;
            Box::new(virtio::vsock::Vsock::new(cid, muxer))
        }
    })
}
