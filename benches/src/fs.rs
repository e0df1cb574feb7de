//! `nixvmm-bench fs`: a store-like tree (thousands of small files and symlinks) read through
//! virtio-fs by the same Linux guest under the same QEMU, served once by `nixvmm device fs` and
//! once by virtiofsd: metadata-heavy (`find`) and read-heavy (`find | xargs cat`) times, as the
//! guest measures them, with ratios.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixvmm_tests::fuse_mount::HostMount;
use nixvmm_tests::linux_kit::{
    boot_nixvmm, boot_qemu, boot_qemu_tcg, tier4_kernel, Boot, BootLog, KernelKit,
};

/// Writes `packages` store-like folders of small files, each with a symlink.
pub fn store_tree(root: &Path, packages: usize) -> Result<usize, String> {
    let mut files = 0;
    for p in 0..packages {
        let pkg = root.join(format!("{p:032x}-package-{p}"));
        std::fs::create_dir_all(pkg.join("bin")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(pkg.join("share/doc")).map_err(|e| e.to_string())?;
        for f in 0..8 {
            let body = format!("{p}:{f}\n").repeat(64 + f * 32);
            std::fs::write(pkg.join(format!("share/doc/file{f}")), body)
                .map_err(|e| e.to_string())?;
            files += 1;
        }
        std::os::unix::fs::symlink("../share/doc/file0", pkg.join("bin/tool"))
            .map_err(|e| e.to_string())?;
    }
    Ok(files)
}

/// How the guest mounts the share under test.
const MOUNT_VIRTIOFS: &str = "mount -t virtiofs store /mnt";
const MOUNT_9P: &str =
    "mount -t 9p -o trans=virtio,version=9p2000.L,msize=16384,cache=loose store /mnt";

/// The guest's workload after its mount command.
const WORKLOAD: &str = "\n\
    t() { cut -d' ' -f1 /proc/uptime; }\n\
    a=$(t); n=$(find /mnt | wc -l); b=$(t)\n\
    echo ENTRIES=$n\n\
    echo FIND_S=$(awk -v a=$a -v b=$b 'BEGIN { printf \"%.2f\", b - a }')\n\
    a=$(t); find /mnt -type f | xargs cat | wc -c > /tmp/bytes; b=$(t)\n\
    echo BYTES=$(cat /tmp/bytes)\n\
    echo CAT_S=$(awk -v a=$a -v b=$b 'BEGIN { printf \"%.2f\", b - a }')";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(mut cmd: Command, socket: &Path) -> Result<Server, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "{:?} did not listen on {}",
                cmd.get_program(),
                socket.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(Server(child))
}

fn script(mount: &str) -> String {
    format!("{mount} || echo MOUNT=failed{WORKLOAD}")
}

/// The (find, cat) seconds the guest reported.
fn times(log: &BootLog, entries: usize) -> Result<(f64, f64), String> {
    let number = |key: &str| -> Result<f64, String> {
        log.value_of(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("the guest did not report {key}:\n{}", log.tail()))
    };
    let seen = number("ENTRIES")? as usize;
    if seen < entries {
        return Err(format!("the guest saw {seen} entries of {entries}"));
    }
    Ok((number("FIND_S")?, number("CAT_S")?))
}

/// QEMU's arguments for a vhost-user-fs device (tag `store`) on `socket`, with guest RAM the
/// backend can map.
fn vhost_user_fs_args(socket: &Path) -> Vec<String> {
    [
        "-object",
        "memory-backend-memfd,id=mem,size=512M,share=on",
        "-machine",
        "memory-backend=mem",
        "-chardev",
        &format!("socket,id=store,path={}", socket.display()),
        "-device",
        "vhost-user-fs-pci,chardev=store,tag=store",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Boots the guest against the server listening on `socket`; returns (find s, cat s).
fn measure(kit: &KernelKit, socket: &Path, entries: usize) -> Result<(f64, f64), String> {
    let initrd = kit.initrd(&["virtio_pci", "virtiofs"], &script(MOUNT_VIRTIOFS))?;
    let extra = vhost_user_fs_args(socket);
    let log = boot_qemu_tcg(
        &Boot {
            kernel: &kit.vmlinuz,
            initrd: &initrd,
            cmdline: "quiet",
            memory_mib: 512,
            cpus: 1,
            timeout: Duration::from_secs(600),
        },
        &extra,
    )?;
    times(&log, entries)
}

/// A server's name and its (find, cat) seconds, or why it has none.
type Row = (&'static str, Result<(f64, f64), String>);

fn tier4_boot<'a>(kernel: &'a Path, initrd: &'a Path) -> Boot<'a> {
    Boot {
        kernel,
        initrd,
        cmdline: "quiet",
        memory_mib: 512,
        cpus: 1,
        timeout: Duration::from_secs(600),
    }
}

/// With a kernel KVM runs at speed (tier 4): the guest booted by nixvmm with its in-VMM 9p and
/// virtio-fs, against QEMU (KVM) with its 9p and virtiofsd.
fn tier4_rows(
    nixvmm: &Path,
    virtiofsd: &Path,
    store: &Path,
    entries: usize,
) -> Result<Vec<Row>, String> {
    let kernel = tier4_kernel()?;
    let kit = KernelKit::obtain()?;

    let mut rows = Vec::new();
    for (name, modules, mount, fs) in [
        (
            "nixvmm 9p (in-VMM)",
            &["virtio_pci", "9pnet_virtio", "9p"][..],
            MOUNT_9P,
            "9p",
        ),
        (
            "nixvmm virtio-fs (in-VMM)",
            &["virtio_pci", "virtiofs"][..],
            MOUNT_VIRTIOFS,
            "virtiofs",
        ),
    ] {
        let initrd = kit.initrd(modules, &script(mount))?;
        let share = format!("tag=store,path={},fs={fs},readonly=on", store.display());
        let log = boot_nixvmm(
            nixvmm,
            &tier4_boot(&kernel, &initrd),
            &["--share".to_string(), share],
        )?;
        rows.push((name, times(&log, entries)));
    }
    let initrd = kit.initrd(&["virtio_pci", "9pnet_virtio", "9p"], &script(MOUNT_9P))?;
    let virtfs = format!(
        "local,path={},security_model=none,mount_tag=store",
        store.display()
    );
    let extra = ["-virtfs".to_string(), virtfs];
    let log = boot_qemu(&tier4_boot(&kernel, &initrd), "kvm", &extra)?;
    rows.push(("QEMU 9p (KVM)", times(&log, entries)));
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let socket = dir.path().join("virtiofsd.sock");
    let mut cmd = Command::new(virtiofsd);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(store);
    cmd.args(["--sandbox", "none", "--seccomp", "none"]);
    let _server = start(cmd, &socket)?;
    let initrd = kit.initrd(&["virtio_pci", "virtiofs"], &script(MOUNT_VIRTIOFS))?;
    let extra = vhost_user_fs_args(&socket);
    let log = boot_qemu(&tier4_boot(&kernel, &initrd), "kvm", &extra)?;
    rows.push(("QEMU virtiofsd (KVM)", times(&log, entries)));
    Ok(rows)
}

/// Walks `root` (lstat of every entry, links not followed) and, with `read`, reads every file:
/// `find` and `find | xargs cat` on the host. Returns (entries, bytes, seconds).
fn walk(root: &Path, read: bool) -> Result<(usize, u64, f64), String> {
    let start = Instant::now();
    let (mut entries, mut bytes) = (0usize, 0u64);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let meta = std::fs::symlink_metadata(entry.path()).map_err(|e| e.to_string())?;
            entries += 1;
            if meta.is_dir() {
                dirs.push(entry.path());
            } else if read && meta.is_file() {
                bytes += std::fs::read(entry.path())
                    .map_err(|e| e.to_string())?
                    .len() as u64;
            }
        }
    }
    Ok((entries, bytes, start.elapsed().as_secs_f64()))
}

/// The same tree walked on the host directly and through nixvmm's virtio-fs filesystem mounted
/// with FUSE (each walk on a fresh mount, so the kernel's caches start cold for FUSE).
fn host_side(store: &Path, mountpoint: &Path) -> Result<String, String> {
    let config = virtio::fs::FsConfig {
        shared_dir: store.to_path_buf(),
        tag: None,
        readonly: true,
        xattr: false,
    };
    let mut out = String::from("| host side | find (ms) | find + cat (ms) |\n|---|---|---|\n");
    let (_, _, direct_find) = walk(store, false)?;
    let (_, _, direct_cat) = walk(store, true)?;
    let fuse_find = {
        let mount = HostMount::new(&config, mountpoint)?;
        walk(&mount.path, false)?.2
    };
    let fuse_cat = {
        let mount = HostMount::new(&config, mountpoint)?;
        walk(&mount.path, true)?.2
    };
    for (name, find, cat) in [
        ("host directory", direct_find, direct_cat),
        ("nixvmm FUSE mount", fuse_find, fuse_cat),
    ] {
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} |\n",
            find * 1e3,
            cat * 1e3
        ));
    }
    out.push_str(&format!(
        "| **FUSE / host** | {:.2} | {:.2} |\n",
        fuse_find / direct_find.max(1e-9),
        fuse_cat / direct_cat.max(1e-9)
    ));
    Ok(out)
}

pub fn run(nixvmm: &Path, virtiofsd: Option<PathBuf>, packages: usize) -> Result<String, String> {
    let kit = KernelKit::obtain()?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let store = dir.path().join("store");
    let files = store_tree(&store, packages)?;
    // Every package: its folder, bin, share, doc, the files and the link; plus /mnt itself.
    let entries = 1 + packages * (4 + 8 + 1);
    let mut rows = Vec::new();

    let socket = dir.path().join("nixvmm.sock");
    let mut cmd = Command::new(nixvmm);
    cmd.args(["device", "fs", "--socket"])
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&store);
    let server = start(cmd, &socket)?;
    rows.push(("nixvmm device fs", measure(&kit, &socket, entries)));
    drop(server);

    let virtiofsd = virtiofsd.unwrap_or_else(|| PathBuf::from("virtiofsd"));
    let socket = dir.path().join("virtiofsd.sock");
    let mut cmd = Command::new(&virtiofsd);
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&store)
        .args(["--sandbox", "none", "--seccomp", "none", "--cache", "auto"]);
    match start(cmd, &socket) {
        Ok(_server) => rows.push(("virtiofsd", measure(&kit, &socket, entries))),
        Err(e) => rows.push((
            "virtiofsd",
            Err(format!(
                "{e} (install it with `cargo install virtiofsd`, or pass --virtiofsd)"
            )),
        )),
    }

    let mut out = String::from("| server | find (s) | find + cat (s) |\n|---|---|---|\n");
    for (name, result) in &rows {
        match result {
            Ok((find, cat)) => out.push_str(&format!("| {name} | {find:.2} | {cat:.2} |\n")),
            Err(e) => out.push_str(&format!(
                "| {name} | failed: {} | |\n",
                e.lines().next().unwrap_or("")
            )),
        }
    }
    if let [(_, Ok(ours)), (_, Ok(theirs))] = &rows[..] {
        out.push_str(&format!(
            "| **nixvmm / virtiofsd** | {:.2} | {:.2} |\n",
            ours.0 / theirs.0.max(0.01),
            ours.1 / theirs.1.max(0.01)
        ));
    }
    out.push_str(&format!(
        "\n{packages} store-like packages ({files} files, {packages} symlinks), Debian's kernel \
         under QEMU TCG (the same guest for both servers; times as the guest measures them).\n\n"
    ));
    match tier4_rows(nixvmm, &virtiofsd, &store, entries) {
        Ok(rows) => {
            out.push_str(
                "| guest booted by (tier 4) | find (s) | find + cat (s) |\n|---|---|---|\n",
            );
            for (name, result) in rows {
                match result {
                    Ok((find, cat)) => {
                        out.push_str(&format!("| {name} | {find:.2} | {cat:.2} |\n"))
                    }
                    Err(e) => out.push_str(&format!("| {name} | failed: {} | |\n", first_line(&e))),
                }
            }
            out.push('\n');
        }
        Err(e) => out.push_str(&format!(
            "Rows with nixvmm booting the guest (in-VMM 9p and virtio-fs against QEMU's 9p and \
             virtiofsd under KVM) skipped: {e}\n\n"
        )),
    }
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir_all(&mountpoint).map_err(|e| e.to_string())?;
    match host_side(&store, &mountpoint) {
        Ok(table) => out.push_str(&table),
        Err(e) => out.push_str(&format!("Host-side FUSE rows skipped: {e}\n")),
    }
    Ok(out)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_tree_has_files_and_links() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(store_tree(dir.path(), 3).unwrap(), 24);
        let pkg = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!(
            std::fs::read_link(pkg.join("bin/tool")).unwrap(),
            Path::new("../share/doc/file0")
        );
    }
}
