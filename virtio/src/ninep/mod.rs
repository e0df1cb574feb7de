//! A 9P2000.L file server over a host directory, transport-free: one T-message in, one
//! R-message out. The virtio-9p device and the socket listener of `nixvmm device 9p` carry
//! the messages.
//!
//! Confinement is by file descriptors: every fid holds an O_PATH descriptor of a file inside
//! the share, every name is resolved with `openat(…, O_NOFOLLOW)` relative to its directory's
//! descriptor, names with `/` (and `.`/`..` where a new name is expected) are refused, `..` at
//! the root stays at the root, symlinks are never followed by the server, and files are opened
//! for I/O through their own descriptor, never by path.

mod device;
pub mod listen;
mod mapped;
mod server;
mod sys;
pub mod wire;

pub use device::Virtio9p;
pub use server::{Server, ShareConfig, MAX_FIDS};

/// How guest ownership and modes map to the host (qemu-vm.nix's `security_model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecurityModel {
    /// Host ownership and modes as they are; failures to change ownership are ignored.
    None,
    /// Host ownership and modes as they are; failures are reported.
    Passthrough,
    /// Guest ownership, modes and special files kept in `user.virtfs.*` xattrs (QEMU's
    /// `mapped-xattr`); host files stay private to the server.
    MappedXattr,
    /// The same kept in `.virtfs_metadata` files beside the entries (QEMU's `mapped-file`).
    MappedFile,
}

impl std::str::FromStr for SecurityModel {
    type Err = String;
    fn from_str(s: &str) -> Result<SecurityModel, String> {
        match s {
            "none" => Ok(SecurityModel::None),
            "passthrough" => Ok(SecurityModel::Passthrough),
            "mapped-xattr" | "mapped" => Ok(SecurityModel::MappedXattr),
            "mapped-file" => Ok(SecurityModel::MappedFile),
            other => Err(format!(
                "unknown security_model `{other}` (none, passthrough, mapped-xattr, mapped-file)"
            )),
        }
    }
}
