//! Any bytes as a sequence of 9p messages to a server over a throwaway share: it must answer
//! every one without panicking, and never touch anything outside the share.

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio::ninep::{SecurityModel, Server, ShareConfig};

/// A fresh share for each input, so no input sees what an earlier one did (a crash then
/// reproduces from its own input alone).
fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("share/sub")).expect("share");
    std::fs::write(dir.path().join("share/file"), b"content").expect("file");
    dir
}

fuzz_target!(|data: &[u8]| {
    let dir = share();
    let mut server = Server::new(ShareConfig {
        root: dir.path().join("share"),
        readonly: data.first().is_some_and(|b| b & 1 == 1),
        security_model: SecurityModel::None,
    })
    .expect("server");
    // Split the input into messages by their own size fields, as a transport would.
    let mut rest = data.get(1..).unwrap_or_default();
    while rest.len() >= 7 {
        let size = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let size = size.clamp(7, rest.len());
        let reply = server.handle(&rest[..size]);
        assert!(reply.len() >= 7, "every message gets a reply");
        rest = &rest[size..];
    }
});
