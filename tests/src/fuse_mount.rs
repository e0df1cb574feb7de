//! nixvmm's virtio-fs filesystem (the passthrough over a share) mounted on the host through
//! /dev/fuse, so a file-operations suite and benchmarks can use it with ordinary file calls.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::FuseSession;
use virtio::fs::{passthrough, FsConfig};

/// A mounted share; dropping it unmounts.
pub struct HostMount {
    session: FuseSession,
    thread: Option<JoinHandle<()>>,
    pub path: PathBuf,
}

impl HostMount {
    /// Mounts the share described by `config` at `mountpoint` (needs root and /dev/fuse).
    pub fn new(config: &FsConfig, mountpoint: &Path) -> Result<HostMount, String> {
        let fs = passthrough(config).map_err(|e| e.to_string())?;
        let server = Arc::new(Server::new(Arc::new(fs)));
        let mut session = FuseSession::new(mountpoint, "nixvmm", "", config.readonly)
            .map_err(|e| format!("FUSE session: {e}"))?;
        session.mount().map_err(|e| {
            format!(
                "mounting on {} (needs root and /dev/fuse): {e}",
                mountpoint.display()
            )
        })?;
        let mut channel = session.new_channel().map_err(|e| e.to_string())?;
        let thread = std::thread::spawn(move || loop {
            match channel.get_request() {
                Ok(Some((reader, writer))) => {
                    if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                        eprintln!("FUSE request failed: {e}");
                    }
                }
                Ok(None) | Err(_) => return,
            }
        });
        Ok(HostMount {
            session,
            thread: Some(thread),
            path: mountpoint.to_path_buf(),
        })
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = self.session.umount();
        let _ = self.session.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
