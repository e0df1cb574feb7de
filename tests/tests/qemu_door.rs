//! The QEMU door from outside, as a run script meets it: nixvmm run as `qemu-system-x86_64`
//! or `qemu-kvm` (a symlink) or as `nixvmm qemu`; boots it cannot serve handed to the real
//! QEMU (a stand-in here that records what it was given), unknown options refused, and a tiny
//! guest booted through the door under KVM (tier 2).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixvmm_tests::nixvmm_bin;
use nixvmm_tests::tiny::Guest;
use nixvmm_tests::tiny_run::write_guest;

/// A folder with nixvmm linked under QEMU's names (first on PATH) and, in a folder after it,
/// a stand-in `qemu-system-x86_64` that writes its path, arguments and `$MARK` to `record`
/// and ends with status 7.
struct Door {
    dir: tempfile::TempDir,
}

impl Door {
    fn new() -> Door {
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        let real = dir.path().join("real");
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::create_dir_all(&real).unwrap();
        for name in ["qemu-system-x86_64", "qemu-kvm"] {
            symlink(nixvmm_bin(), ours.join(name)).unwrap();
        }
        let stand_in = format!(
            "#!/bin/sh\n{{ echo \"program=$0\"; for a in \"$@\"; do echo \"arg=$a\"; done; echo \"mark=$MARK\"; }} > {}\nexit 7\n",
            dir.path().join("record").display()
        );
        let path = real.join("qemu-system-x86_64");
        std::fs::write(&path, stand_in).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Door { dir }
    }

    fn ours(&self, name: &str) -> PathBuf {
        self.dir.path().join("ours").join(name)
    }

    /// The stand-in for the real QEMU.
    fn real(&self) -> PathBuf {
        self.dir.path().join("real/qemu-system-x86_64")
    }

    /// PATH as a run script sees it: nixvmm's folder, then the real QEMU's.
    fn path(&self) -> String {
        format!(
            "{}:{}:/usr/bin:/bin",
            self.dir.path().join("ours").display(),
            self.dir.path().join("real").display()
        )
    }

    fn run(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(self.ours(name))
            .args(args)
            .env("PATH", self.path())
            .env("MARK", "kept")
            .env_remove("NIXVMM_QEMU")
            .env_remove("NIXVMM_UNKNOWN")
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    /// What the stand-in QEMU recorded, one line per item.
    fn record(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("record"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn expected_record(program: &Path, args: &[&str]) -> Vec<String> {
    let mut lines = vec![format!("program={}", program.display())];
    lines.extend(args.iter().map(|a| format!("arg={a}")));
    lines.push("mark=kept".into());
    lines
}

#[test]
fn an_efi_boot_goes_to_the_real_qemu_with_its_command_line_and_environment_unchanged() {
    let door = Door::new();
    let args = [
        "-machine",
        "q35,accel=kvm",
        "-m",
        "1024",
        "-drive",
        "if=pflash,format=raw,unit=0,readonly=on,file=/OVMF_CODE.fd",
        "-append",
        "two words",
        "-kernel",
        "/k",
    ];
    let out = door.run("qemu-system-x86_64", &args, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nixvmm: handing this boot to QEMU (")
            && stderr(&out).contains("pflash"),
        "{}",
        stderr(&out)
    );
    assert_eq!(door.record(), expected_record(&door.real(), &args));
}

#[test]
fn a_bootloader_boot_through_qemu_kvm_goes_to_the_real_qemu() {
    let door = Door::new();
    let args = [
        "-cpu",
        "max",
        "-m",
        "512",
        "-drive",
        "file=/disk.qcow2,if=virtio",
    ];
    let out = door.run("qemu-kvm", &args, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("no -kernel"), "{}", stderr(&out));
    assert_eq!(door.record(), expected_record(&door.real(), &args));
}

#[test]
fn nixvmm_qemu_names_the_real_qemu_to_hand_boots_to() {
    let door = Door::new();
    let named = door.dir.path().join("my-qemu");
    std::fs::copy(door.real(), &named).unwrap();
    let out = door.run(
        "qemu-system-x86_64",
        &["-bios", "/OVMF.fd", "-kernel", "/k"],
        &[
            ("NIXVMM_QEMU", named.to_str().unwrap()),
            ("PATH", "/usr/bin:/bin"),
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(
        door.record(),
        expected_record(&named, &["-bios", "/OVMF.fd", "-kernel", "/k"])
    );
}

#[test]
fn no_real_qemu_is_an_error_naming_nixvmm_qemu() {
    let door = Door::new();
    let path = door.dir.path().join("ours");
    let out = door.run(
        "qemu-system-x86_64",
        &["-bios", "/OVMF.fd"],
        &[("PATH", path.to_str().unwrap())],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("set NIXVMM_QEMU"), "{}", stderr(&out));
    assert!(door.record().is_empty());
}

#[test]
fn an_unknown_option_is_an_error_unless_nixvmm_unknown_asks_for_qemu() {
    let door = Door::new();
    let args = ["-kernel", "/k", "-m", "256", "-spice", "port=5930"];
    let out = door.run("qemu-system-x86_64", &args, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("-spice") && err.contains("NIXVMM_UNKNOWN=fallback"),
        "{err}"
    );
    assert!(door.record().is_empty());

    let out = door.run(
        "qemu-system-x86_64",
        &args,
        &[("NIXVMM_UNKNOWN", "fallback")],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("-spice"), "{}", stderr(&out));
    assert_eq!(door.record(), expected_record(&door.real(), &args));
}

#[test]
fn nixvmm_decompress_kernel_takes_host_or_guest_and_names_itself_otherwise() {
    let door = Door::new();
    let args = ["-kernel", "/k", "-m", "256"];
    let out = door.run(
        "qemu-kvm",
        &args,
        &[("NIXVMM_DECOMPRESS_KERNEL", "sometimes")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("NIXVMM_DECOMPRESS_KERNEL=sometimes: give host or guest"),
        "{err}"
    );
    for value in ["host", "guest"] {
        let out = door.run("qemu-kvm", &args, &[("NIXVMM_DECOMPRESS_KERNEL", value)]);
        let err = stderr(&out);
        assert!(
            err.contains("/k"),
            "{value}: gets as far as the kernel: {err}"
        );
        assert!(!err.contains("NIXVMM_DECOMPRESS_KERNEL"), "{value}: {err}");
    }
}

#[test]
fn version_and_help_answer_as_qemu_does() {
    let out = Command::new(nixvmm_bin())
        .args(["qemu", "-version"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("QEMU emulator version "), "{text}");
    assert!(text.contains("nixvmm"), "{text}");
    let out = Command::new(nixvmm_bin())
        .args(["qemu", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("-kernel"));
}

/// Tier 2: the door's own boot path. A tiny guest given as `-kernel` prints on the serial
/// console and powers off; nixvmm writes `-pidfile` while it runs and removes it after, and
/// sends its log to `-D`.
#[test]
fn a_tiny_guest_boots_through_the_door_and_poweroff_ends_it_with_status_0() {
    let door = Door::new();
    let mut g = Guest::new();
    g.text("hello through the door\n").unwrap();
    g.poweroff().unwrap();
    let kernel = write_guest(door.dir.path(), g);
    let pidfile = door.dir.path().join("vm.pid");
    let log = door.dir.path().join("vm.log");
    let out = door.run(
        "qemu-kvm",
        &[
            "-cpu",
            "max",
            "-name",
            "tiny",
            "-m",
            "64",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-serial",
            "mon:stdio",
            "-kernel",
            kernel.to_str().unwrap(),
            "-pidfile",
            pidfile.to_str().unwrap(),
            "-D",
            log.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through the door\n"
    );
    assert!(door.record().is_empty(), "served by nixvmm, not QEMU");
    assert!(!pidfile.exists(), "the pidfile is removed at exit");
    assert!(log.exists(), "-D names nixvmm's log file");
}

/// runInLinuxVM's `vm-run` starts virtiofsd in the background and QEMU at once: nixvmm waits
/// for a backend socket that is not there yet, and names it when none comes within 10 s.
#[test]
fn a_virtiofsd_socket_that_comes_late_is_waited_for_and_one_that_never_comes_is_named() {
    let door = Door::new();
    let mut g = Guest::new();
    g.text("the share's backend came\n").unwrap();
    g.poweroff().unwrap();
    let kernel = write_guest(door.dir.path(), g);
    let shared = tempfile::tempdir().unwrap();
    let args = |socket: &Path| -> Vec<String> {
        let words = format!(
            "-m 64 -object memory-backend-memfd,id=mem,size=64M,share=on -machine \
             memory-backend=mem -chardev socket,id=store,path={} -device \
             vhost-user-fs-pci,chardev=store,tag=store -nographic -kernel {}",
            socket.display(),
            kernel.display()
        );
        words.split(' ').map(String::from).collect()
    };
    let socket = door.dir.path().join("virtio-store.sock");
    let backend = {
        let (socket, shared) = (socket.clone(), shared.path().to_path_buf());
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(1));
            Command::new(nixvmm_bin())
                .args(["device", "fs", "--socket"])
                .arg(&socket)
                .arg("--shared-dir")
                .arg(&shared)
                .output()
                .unwrap()
        })
    };
    let words = args(&socket);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let out = door.run("qemu-kvm", &words, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "the share's backend came\n"
    );
    let served = backend.join().unwrap();
    assert!(
        served.status.success(),
        "nixvmm device fs: {}",
        stderr(&served)
    );

    let missing = door.dir.path().join("never.sock");
    let words = args(&missing);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let out = door.run("qemu-kvm", &words, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains(&format!("{}: no connection within 10 s", missing.display())),
        "{message}"
    );
}
