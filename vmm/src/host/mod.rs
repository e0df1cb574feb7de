//! What a VM uses on the host: the terminal (`console`) and connections to backends outside
//! nixvmm (`vhost_user_fs`). [`HostResources`] holds those that outlive one VM: the runner
//! owns it, and every VM a run builds (a guest reboot builds a new one) uses the same ones.

pub mod console;
pub mod vhost_user_fs;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config::{Share, VmConfig};
use vhost_user_fs::{ConnectError, SharedVhostUserFs, VhostUserFs};

/// Host resources made once per run and shared by every VM of the run.
pub struct HostResources {
    fs: Vec<(PathBuf, SharedVhostUserFs)>,
}

impl HostResources {
    /// Connects to every backend `config` names.
    pub fn connect(config: &VmConfig) -> Result<HostResources, ConnectError> {
        let mut fs = Vec::new();
        for share in &config.shares {
            if let Share::VhostUser { tag, socket } = share {
                let device = VhostUserFs::connect(socket, tag)?;
                fs.push((
                    socket.clone(),
                    SharedVhostUserFs(Arc::new(Mutex::new(device))),
                ));
            }
        }
        Ok(HostResources { fs })
    }

    /// The connection to the vhost-user-fs backend at `socket`.
    pub fn vhost_user_fs(&self, socket: &Path) -> Option<SharedVhostUserFs> {
        self.fs
            .iter()
            .find(|(path, _)| path == socket)
            .map(|(_, fs)| fs.clone())
    }
}
