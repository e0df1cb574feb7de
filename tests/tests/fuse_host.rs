//! Tier 1: nixvmm's virtio-fs filesystem mounted on the host through /dev/fuse passes a
//! file-operations suite: what the guest's kernel asks of it, asked by the host's.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nixvmm_tests::fuse_mount::HostMount;
use virtio::fs::FsConfig;

fn mount(share: &Path, at: &Path, readonly: bool) -> HostMount {
    HostMount::new(
        &FsConfig {
            shared_dir: share.to_path_buf(),
            tag: None,
            readonly,
            xattr: true,
        },
        at,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn file_operations_suite() {
    let dir = tempfile::tempdir().unwrap();
    let (share, mnt) = (dir.path().join("share"), dir.path().join("mnt"));
    fs::create_dir_all(&share).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    fs::write(share.join("existing"), "from the host\n").unwrap();
    let m = mount(&share, &mnt, false);
    let p = |name: &str| m.path.join(name);

    // Read what the host wrote; write what the host reads.
    assert_eq!(
        fs::read_to_string(p("existing")).unwrap(),
        "from the host\n"
    );
    fs::write(p("new"), "from the mount").unwrap();
    assert_eq!(
        fs::read_to_string(share.join("new")).unwrap(),
        "from the mount"
    );
    // Random access, append, truncate.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("new"))
        .unwrap();
    f.seek(SeekFrom::Start(5)).unwrap();
    f.write_all(b"XX").unwrap();
    let mut back = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut back).unwrap();
    assert_eq!(back, "from XXe mount");
    f.set_len(4).unwrap();
    drop(f);
    let mut a = fs::OpenOptions::new().append(true).open(p("new")).unwrap();
    a.write_all(b"!").unwrap();
    drop(a);
    assert_eq!(fs::read_to_string(share.join("new")).unwrap(), "from!");
    // Directories, listing, rename, hard and symbolic links, permissions, removal.
    fs::create_dir_all(p("a/b")).unwrap();
    fs::rename(p("new"), p("a/b/moved")).unwrap();
    assert!(share.join("a/b/moved").exists());
    let names: Vec<String> = fs::read_dir(p("a/b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["moved"]);
    fs::hard_link(p("a/b/moved"), p("hard")).unwrap();
    assert_eq!(fs::metadata(p("hard")).unwrap().nlink(), 2);
    std::os::unix::fs::symlink("a/b/moved", p("soft")).unwrap();
    assert_eq!(fs::read_link(p("soft")).unwrap(), Path::new("a/b/moved"));
    assert_eq!(fs::read_to_string(p("soft")).unwrap(), "from!");
    fs::set_permissions(p("hard"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        fs::metadata(share.join("hard"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    fs::remove_file(p("soft")).unwrap();
    fs::remove_file(p("hard")).unwrap();
    fs::remove_dir_all(p("a")).unwrap();
    assert!(!share.join("a").exists() && !share.join("soft").exists());
}

#[test]
fn read_only_mount_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (share, mnt) = (dir.path().join("share"), dir.path().join("mnt"));
    fs::create_dir_all(&share).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    fs::write(share.join("file"), "data").unwrap();
    let m = mount(&share, &mnt, true);
    assert_eq!(fs::read_to_string(m.path.join("file")).unwrap(), "data");
    assert!(fs::write(m.path.join("other"), "x").is_err());
    assert!(fs::write(m.path.join("file"), "x").is_err());
    assert!(fs::remove_file(m.path.join("file")).is_err());
    assert_eq!(fs::read_to_string(share.join("file")).unwrap(), "data");
    assert!(!share.join("other").exists());
}
