//! The command lines qemu-vm.nix, the test driver and runInLinuxVM write, as they write them.

use std::path::{Path, PathBuf};

use super::*;
use crate::config::net::NetBackend;
use crate::config::Share;
use virtio::block::Format;

/// A folder with a kernel, initrd, disks and share folders that the command lines name.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::tempdir().unwrap();
        for file in [
            "kernel",
            "initrd",
            "nixos.qcow2",
            "empty0.qcow2",
            "store.img",
            "disk.img",
        ] {
            std::fs::write(dir.path().join(file), b"x").unwrap();
        }
        for folder in ["store", "xchg", "shared"] {
            std::fs::create_dir(dir.path().join(folder)).unwrap();
        }
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `line` split like a shell would (single quotes group words), `@` standing for the
    /// folder.
    fn words(&self, line: &str) -> Vec<String> {
        let line = line.replace('@', self.dir.path().to_str().unwrap());
        let (mut words, mut word, mut quoted) = (Vec::new(), None::<String>, false);
        for c in line.chars() {
            match c {
                '\'' => {
                    quoted = !quoted;
                    word.get_or_insert_with(String::new);
                }
                c if c.is_whitespace() && !quoted => words.extend(word.take()),
                c => word.get_or_insert_with(String::new).push(c),
            }
        }
        words.extend(word);
        words
    }

    fn run(&self, line: &str) -> QemuRun {
        match parse(&self.words(line)) {
            Ok(QemuCommand::Run(run)) => *run,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn error(&self, line: &str) -> QemuError {
        match parse(&self.words(line)) {
            Err(e) => e,
            other => panic!("{line}: not refused: {other:?}"),
        }
    }

    fn fallback(&self, line: &str) -> String {
        match parse(&self.words(line)) {
            Ok(QemuCommand::Fallback(reason)) => reason,
            other => panic!("{line}: no fallback: {other:?}"),
        }
    }
}

const BOOT: &str = "-kernel @/kernel -initrd @/initrd";

/// qemu-vm.nix's line with default options (its `$QEMU_OPTS` empty).
fn qemu_vm_nix(extra: &str) -> String {
    format!(
        "-cpu max -name nixos -m 1024 -smp 1 -device virtio-rng-pci \
         -net nic,netdev=user.0,model=virtio -netdev user,id=user.0,hostfwd=tcp::2222-:22 \
         -virtfs local,path=@/store,security_model=none,mount_tag=nix-store \
         -virtfs local,path=@/shared,security_model=none,mount_tag=shared \
         -virtfs local,path=@/xchg,security_model=none,mount_tag=xchg \
         -drive cache=writeback,file=@/nixos.qcow2,id=drive1,if=none,index=1,werror=report \
         -device virtio-blk-pci,bootindex=1,drive=drive1,serial=root \
         -device virtio-keyboard -usb -device usb-tablet,bus=usb-bus.0 {BOOT} \
         -append 'init=/nix/store/x/init regInfo=/nix/store/y/registration console=ttyS0,115200n8 console=tty0' \
         {extra}"
    )
}

fn tags(shares: &[Share]) -> Vec<&str> {
    shares
        .iter()
        .map(|s| match s {
            Share::NineP { tag, .. } | Share::VhostUser { tag, .. } => tag.as_str(),
            Share::VirtioFs(fs) => fs.tag.as_deref().unwrap_or(""),
        })
        .collect()
}

fn user(nic: &NicConfig) -> &crate::config::net::UserNet {
    match &nic.backend {
        NetBackend::User(user) => user,
        other => panic!("not a user network: {other:?}"),
    }
}

use crate::config::net::NicConfig;

#[test]
fn qemu_vm_nix_default_line() {
    let files = Files::new();
    let run = files.run(&qemu_vm_nix(""));
    let c = &run.config;
    assert_eq!(c.kernel, Kernel::File(files.path("kernel")));
    assert_eq!(c.initrd, Some(files.path("initrd")));
    assert!(c.cmdline.starts_with("init=/nix/store/x/init regInfo="));
    assert_eq!(
        (c.memory, c.cpus, c.rng, c.no_reboot),
        (1 << 30, 1, true, false)
    );
    assert_eq!(tags(&c.shares), ["nix-store", "shared", "xchg"]);
    let Share::NineP { config, .. } = &c.shares[0] else {
        panic!("9p")
    };
    assert_eq!(config.root, files.path("store"));
    assert_eq!(config.security_model, virtio::ninep::SecurityModel::None);
    assert_eq!(c.disks.len(), 1);
    assert_eq!(c.disks[0].path, files.path("nixos.qcow2"));
    assert_eq!(c.disks[0].serial.as_deref(), Some("root"));
    assert!(!c.disks[0].readonly);
    assert_eq!(c.nics.len(), 1);
    assert_eq!(user(&c.nics[0]).hostfwd.len(), 1);
    assert_eq!(user(&c.nics[0]).hostfwd[0].host_port, 2222);
    assert_eq!(
        run.ignored,
        ["-usb", "-device virtio-keyboard", "-device usb-tablet"]
    );
    assert!(!run.tcg_allowed);
}

#[test]
fn graphics_off_forwards_and_restrict() {
    let files = Files::new();
    let line = qemu_vm_nix("-nographic").replace(
        "hostfwd=tcp::2222-:22",
        "hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,\
         'guestfwd=tcp:10.0.2.100:80-cmd:nc localhost 8080',restrict=on",
    );
    let run = files.run(&line);
    let net = user(&run.config.nics[0]);
    assert!(net.restrict);
    assert_eq!(net.hostfwd.len(), 2);
    assert!(net.hostfwd[1].udp);
    assert_eq!(net.guestfwd.len(), 1);
    assert_eq!(net.guestfwd[0].port, 80);
}

#[test]
fn vlans_empty_disks_and_the_store_image() {
    let files = Files::new();
    let run = files.run(&qemu_vm_nix(
        "-device virtio-net-pci,netdev=vlan1,mac=52:54:00:12:01:01 \
         -netdev vde,id=vlan1,sock=@/vde1.ctl \
         -drive cache=writeback,file=@/empty0.qcow2,id=drive2,if=none,index=2,werror=report \
         -device virtio-blk-pci,drive=drive2 \
         -drive cache=writeback,file=@/store.img,id=drive3,if=none,index=3,readonly=on,werror=report,format=raw \
         -device virtio-blk-pci,bootindex=2,drive=drive3,serial=nix-store",
    ));
    let c = &run.config;
    assert_eq!(c.nics.len(), 2);
    assert_eq!(c.nics[1].mac, Some([0x52, 0x54, 0, 0x12, 1, 1]));
    assert_eq!(
        c.nics[1].backend,
        NetBackend::Vde {
            sock: files.path("vde1.ctl")
        }
    );
    let disks: Vec<(&Path, Option<&str>, bool)> = c
        .disks
        .iter()
        .map(|d| (d.path.as_path(), d.serial.as_deref(), d.readonly))
        .collect();
    assert_eq!(
        disks,
        [
            (files.path("nixos.qcow2").as_path(), Some("root"), false),
            (files.path("empty0.qcow2").as_path(), None, false),
            (files.path("store.img").as_path(), Some("nix-store"), true),
        ]
    );
    assert_eq!(c.disks[2].format, Some(Format::Raw));
}

#[test]
fn virtiofs_shares_with_a_memfd_backend() {
    let files = Files::new();
    let line = qemu_vm_nix(
        "-chardev socket,id=fs0,path=@/store.sock -device vhost-user-fs-pci,chardev=fs0,tag=nix-store \
         -object memory-backend-memfd,id=mem,size=1024M,share=on -machine memory-backend=mem",
    )
    .replace(
        "-virtfs local,path=@/store,security_model=none,mount_tag=nix-store",
        "",
    );
    let run = files.run(&line);
    let c = &run.config;
    assert_eq!(c.memory, 1 << 30);
    assert_eq!(tags(&c.shares), ["shared", "xchg", "nix-store"]);
    assert_eq!(
        c.shares[2],
        Share::VhostUser {
            tag: "nix-store".into(),
            socket: files.path("store.sock")
        }
    );
    let err = files.error(&line.replace("size=1024M", "size=2G"));
    assert!(err.to_string().contains("differ"), "{err}");
}

#[test]
fn run_in_linux_vm_line() {
    let files = Files::new();
    let run = files.run(&format!(
        "-nographic -no-reboot -device virtio-rng-pci \
         -chardev socket,id=store,path=@/virtio-store.sock \
         -device vhost-user-fs-pci,chardev=store,tag=store \
         -chardev socket,id=xchg,path=@/virtio-xchg.sock \
         -device vhost-user-fs-pci,chardev=xchg,tag=xchg \
         -drive file=@/disk.img,if=virtio,cache=unsafe,werror=report {BOOT} \
         -append 'console=ttyS0 panic=1 command=/nix/store/z-builder out=/nix/store/o mountDisk=1 loglevel=4' \
         -m 512 -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem"
    ));
    let c = &run.config;
    assert!(c.no_reboot && c.rng);
    assert_eq!(c.memory, 512 << 20);
    assert_eq!(tags(&c.shares), ["store", "xchg"]);
    assert_eq!(c.disks.len(), 1);
    assert_eq!(c.disks[0].path, files.path("disk.img"));
    assert!(c.nics.is_empty());
}

#[test]
fn the_test_drivers_shell_console_and_named_ports() {
    use crate::config::console::{ChardevSpec, PortSpec};
    let files = Files::new();
    let run = files.run(&qemu_vm_nix(
        "-chardev socket,id=shell,path=@/shell -device virtio-serial \
         -device virtconsole,chardev=shell -device virtio-rng-pci -serial stdio \
         -chardev socket,id=qga,path=@/qga,server=on,wait=off \
         -device virtserialport,chardev=qga,name=org.qemu.guest_agent.0 \
         -chardev file,id=log,path=@/port.log -device virtserialport,chardev=log,name=log \
         -chardev null,id=nothing -device virtconsole,chardev=nothing",
    ));
    assert_eq!(
        run.config.ports,
        [
            PortSpec {
                console: true,
                name: None,
                chardev: ChardevSpec::SocketClient {
                    path: files.path("shell"),
                    reconnect: None,
                },
            },
            PortSpec {
                console: false,
                name: Some("org.qemu.guest_agent.0".into()),
                chardev: ChardevSpec::SocketServer {
                    path: files.path("qga"),
                    wait: false
                },
            },
            PortSpec {
                console: false,
                name: Some("log".into()),
                chardev: ChardevSpec::File {
                    path: files.path("port.log")
                },
            },
            PortSpec {
                console: true,
                name: None,
                chardev: ChardevSpec::Null,
            },
        ]
    );
    for (line, says) in [
        (
            "-chardev null,id=c -device virtconsole,chardev=c",
            "needs a -device virtio-serial before it",
        ),
        (
            "-device virtio-serial -chardev null,id=c -device virtserialport,chardev=c",
            "give the port a name=",
        ),
        (
            "-device virtio-serial -chardev null,id=c -device virtconsole,chardev=c \
             -device virtconsole,chardev=c",
            "-chardev id=c: used by two ports",
        ),
        (
            "-device virtio-serial -device virtconsole,chardev=gone",
            "virtconsole,chardev=gone: no -chardev …,id=gone",
        ),
        (
            "-chardev socket,id=fs,path=@/fs.sock,server=on,wait=off \
             -device vhost-user-fs-pci,chardev=fs,tag=store",
            "nixvmm connects to vhost-user backends",
        ),
    ] {
        let err = files.error(&format!("{BOOT} {line}")).to_string();
        assert!(err.contains(says), "{line}: {err}");
    }
    use crate::config::Monitor;
    let run = files.run(&format!("{BOOT} -monitor unix:@/monitor -serial stdio"));
    assert_eq!(
        run.config.monitor,
        Some(Monitor::Connect(files.path("monitor")))
    );
    assert_eq!(
        files.run(&format!("{BOOT} -monitor none")).config.monitor,
        None
    );
    assert_eq!(
        files
            .run(&format!("{BOOT} -serial none -monitor stdio"))
            .config
            .monitor,
        Some(Monitor::Stdio)
    );
    let err = files.error(&format!("{BOOT} -serial stdio -monitor stdio"));
    assert!(err.to_string().contains("stdio is taken twice"), "{err}");
    for (line, wait) in [("server=on,wait=off", false), ("server=on", true)] {
        let run = files.run(&format!("{BOOT} -monitor unix:@/m,{line}"));
        assert_eq!(
            run.config.monitor,
            Some(Monitor::Listen {
                path: files.path("m"),
                wait
            }),
            "{line}"
        );
    }
    let run = files.run(&format!("{BOOT} -qmp unix:@/qmp,server=on,wait=off"));
    assert_eq!(run.config.qmp, Some(files.path("qmp")));
    let err = files.error(&format!("{BOOT} -qmp unix:@/qmp,server=on"));
    assert!(
        matches!(&err, QemuError::Unsupported(m) if m.contains("wait=off")),
        "{err}"
    );
    let err = files.error(&format!("{BOOT} -chardev spicevmc,id=p"));
    assert!(
        matches!(&err, QemuError::Unsupported(m) if m.contains("-chardev spicevmc")),
        "{err}"
    );
}

#[test]
fn the_test_drivers_vsock_over_vhost_device_vsock_or_the_kernel() {
    use crate::config::VsockConfig;
    let files = Files::new();
    let run = files.run(&qemu_vm_nix("-device vhost-vsock-pci,guest-cid=5"));
    assert_eq!(run.config.vsock, Some(VsockConfig::Kernel { cid: 5 }));
    let run = files.run(&qemu_vm_nix(
        "-chardev socket,id=vsock_ssh,reconnect=0,path=@/vsock.sock \
         -device vhost-user-vsock-pci,chardev=vsock_ssh",
    ));
    assert_eq!(
        run.config.vsock,
        Some(VsockConfig::VhostUser {
            socket: files.path("vsock.sock")
        })
    );
    for (line, says) in [
        (
            "-device vhost-user-vsock-pci,chardev=gone",
            "vhost-user-vsock-pci,chardev=gone: no -chardev …,id=gone",
        ),
        (
            "-chardev socket,id=v,path=@/v,server=on,wait=off \
             -device vhost-user-vsock-pci,chardev=v",
            "nixvmm connects to vhost-user backends",
        ),
        (
            "-chardev socket,id=v,path=@/v -device vhost-user-vsock-pci,chardev=v \
             -chardev socket,id=w,path=@/w -device vhost-user-vsock-pci,chardev=w",
            "nixvmm has one vsock",
        ),
        ("-device vhost-user-vsock-pci", "chardev"),
        (
            "-device vhost-vsock-pci,guest-cid=2",
            "give a guest CID from 3",
        ),
        ("-device vhost-vsock-pci", "guest-cid"),
        (
            "-device vhost-vsock-pci,guest-cid=3,vhostfd=5",
            "drop vhostfd",
        ),
    ] {
        let err = files.error(&format!("{BOOT} {line}")).to_string();
        assert!(err.contains(says), "{line}: {err}");
    }
}

#[test]
fn serial_stdio_none_null_file_and_chardev() {
    use crate::config::Serial;
    let files = Files::new();
    for (line, serial) in [
        ("-serial stdio", Serial::Stdio { escapes: false }),
        ("-serial mon:stdio", Serial::Stdio { escapes: true }),
        ("", Serial::Stdio { escapes: true }),
        // As QEMU's -nographic: mon:stdio only when no monitor is elsewhere.
        ("-monitor none", Serial::Stdio { escapes: false }),
        (
            "-qmp unix:@/q,server=on,wait=off",
            Serial::Stdio { escapes: false },
        ),
        ("-serial none", Serial::Null),
        ("-serial null", Serial::Null),
        ("-serial file:@/s.log", Serial::File(files.path("s.log"))),
        (
            "-chardev file,id=c,path=@/c.log -serial chardev:c",
            Serial::File(files.path("c.log")),
        ),
        ("-chardev null,id=n -serial chardev:n", Serial::Null),
    ] {
        let run = files.run(&format!("{BOOT} {line}"));
        assert_eq!(run.config.serial, serial, "{line}");
    }
    for (line, says) in [
        ("-serial chardev:gone", "no -chardev …,id=gone before it"),
        (
            "-chardev socket,id=s,path=@/s -serial chardev:s",
            "takes a file or null chardev",
        ),
        (
            "-serial pty",
            "takes stdio, mon:stdio, none, null, file:PATH or chardev:ID",
        ),
        ("-serial stdio -serial null", "one serial port"),
    ] {
        let err = files.error(&format!("{BOOT} {line}")).to_string();
        assert!(err.contains(says), "{line}: {err}");
    }
}

#[test]
fn qemu_vm_nixs_tpm_line_is_a_tpm_on_the_swtpm_socket() {
    let files = Files::new();
    let run = files.run(&qemu_vm_nix(
        "-chardev socket,id=chrtpm,path=@/swtpm-sock -tpmdev emulator,id=tpm_dev_0,chardev=chrtpm \
         -device tpm-tis,tpmdev=tpm_dev_0",
    ));
    assert_eq!(run.config.tpm, Some(files.path("swtpm-sock")));
    for (line, says) in [
        (
            "-chardev socket,id=c,path=@/s -tpmdev emulator,id=t,chardev=c -device tpm-crb,tpmdev=t",
            "tpm-tis",
        ),
        ("-tpmdev passthrough,id=t,path=/dev/tpm0", "-tpmdev passthrough"),
        ("-device tpm-tis,tpmdev=t", "no -tpmdev"),
        ("-tpmdev emulator,id=t,chardev=c -device tpm-tis,tpmdev=t", "no -chardev"),
        (
            "-chardev file,id=c,path=@/f -tpmdev emulator,id=t,chardev=c -device tpm-tis,tpmdev=t",
            "-chardev socket,id=c",
        ),
    ] {
        let err = files.error(&qemu_vm_nix(line)).to_string();
        assert!(err.contains(says), "{line}: {err}");
    }
}

#[test]
fn firmware_bootloader_and_software_cpu_boots_go_to_qemu() {
    let files = Files::new();
    for (line, says) in [
        ("-m 1024 -drive file=@/disk.img,if=virtio", "no -kernel"),
        ("-bios /OVMF.fd -kernel @/kernel", "-bios"),
        (
            "-drive if=pflash,format=raw,readonly=on,file=/OVMF_CODE.fd -kernel @/kernel",
            "if=pflash",
        ),
        ("-pflash /OVMF.fd", "-pflash"),
        ("-M isapc -kernel @/kernel", "-machine isapc"),
        ("-machine virt,accel=kvm -kernel @/kernel", "-machine virt"),
        ("-machine accel=tcg -kernel @/kernel", "accel=tcg"),
        ("-accel tcg -kernel @/kernel", "-accel tcg"),
        // Fallback comes first: QEMU serves what nixvmm would refuse.
        ("-bogus -device e1000 -m 1024", "no -kernel"),
    ] {
        let reason = files.fallback(line);
        assert!(reason.contains(says), "{line}: {reason}");
    }
    for machine in ["pc", "q35", "microvm", "pc-q35-9.2", "pc-i440fx-8.0"] {
        files.run(&format!("-M {machine},accel=kvm {BOOT}"));
    }
    let run = files.run(&format!("-machine accel=kvm:tcg {BOOT}"));
    assert!(run.tcg_allowed, "kvm:tcg may run on QEMU without /dev/kvm");
    assert!(
        !files
            .run(&format!("-enable-kvm -accel kvm {BOOT}"))
            .tcg_allowed
    );
}

#[test]
fn grammar_corner_cases() {
    let files = Files::new();
    std::fs::create_dir(files.path("a,b")).unwrap();
    let run = files.run(&format!(
        "--m size=2G --smp cores=2,threads=2 -cpu host,+x2apic -device driver=virtio-rng-pci,id=rng0 \
         -virtfs local,path=@/a,,b,mount_tag=ab,security_model=mapped,readonly=yes,multidevs=remap \
         -drive file=@/disk.img,if=virtio,readonly=on,format=qcow2 -pidfile @/pid -D @/log \
         -sandbox on -nodefaults -display none -vga none -serial mon:stdio -rtc base=utc {BOOT}"
    ));
    let c = &run.config;
    assert_eq!((c.memory, c.cpus, c.rng), (2 << 30, 4, true));
    let Share::NineP { config, .. } = &c.shares[0] else {
        panic!("9p")
    };
    assert_eq!(config.root, files.path("a,b"));
    assert!(config.readonly);
    assert_eq!(
        config.security_model,
        virtio::ninep::SecurityModel::MappedXattr
    );
    assert!(c.disks[0].readonly);
    assert_eq!(run.pidfile, Some(files.path("pid")));
    assert_eq!(run.log_file, Some(files.path("log")));
    assert_eq!(run.config.seccomp, Seccomp::On);
    assert_eq!(files.run(BOOT).config.memory, 128 << 20, "QEMU's default");
    assert_eq!(
        files.run(&format!("-smp 3,maxcpus=3 {BOOT}")).config.cpus,
        3
    );
    assert_eq!(
        files
            .run(&format!("-smp 2,sockets=1,cores=2 {BOOT}"))
            .config
            .cpus,
        2
    );
    for (line, says) in [
        ("-smp 2,maxcpus=4", "no CPU hotplug"),
        ("-m 1G,slots=2,maxmem=4G", "no memory hotplug"),
        ("-m lots", "-m lots: not a size"),
        ("-drive file=@/disk.img,if=virtio,cache=fast", "cache=fast"),
        ("-smp 300", "at most 254"),
        (
            "-drive file=@/disk.img,if=virtio,readonly=maybe",
            "on or off",
        ),
        (
            "-drive file=@/nope.img,if=virtio",
            "file=@/nope.img: file not found",
        ),
        ("-device virtio-blk-pci,drive=d9", "no -drive if=none,id=d9"),
        ("-net nic,netdev=n1,model=virtio", "no -netdev …,id=n1"),
        (
            "-device vhost-user-fs-pci,chardev=c,tag=t",
            "vhost-user-fs-pci,chardev=c: no -chardev …,id=c",
        ),
        (
            "-virtfs local,path=@/store,mount_tag=s",
            "`security_model` is required",
        ),
        ("-kernel @/nope", "kernel @/nope: file not found"),
    ] {
        let line = format!("{BOOT} {line}");
        let err = files.error(&line).to_string();
        let says = says.replace('@', files.dir.path().to_str().unwrap());
        assert!(err.contains(&says), "{line}: {err}");
    }
}

#[test]
fn unknown_options_and_devices_are_named() {
    let files = Files::new();
    for (line, says) in [
        ("-bogus 1", "-bogus: not an option nixvmm knows"),
        (
            "-device e1000,netdev=n",
            "-device e1000: not a device nixvmm has",
        ),
        ("-drive file=@/disk.img", "-drive if=ide"),
        (
            "-drive file=@/disk.img,if=virtio,werror=stop",
            "werror=stop",
        ),
        ("-netdev socket,id=s,listen=:1234", "-netdev socket"),
        ("-net user", "no QEMU hubs"),
        ("-daemonize", "stays in the foreground"),
        ("-readconfig vm.cfg", "-readconfig"),
        ("-monitor telnet::4444,server,nowait", "-monitor telnet"),
        ("-serial pty", "-serial pty"),
        ("-cpu Skylake-Client", "-cpu Skylake-Client"),
        ("disk.img", "a bare argument"),
        ("-object tls-creds-x509,id=t", "-object tls-creds-x509"),
        (
            "-machine q35,smm=off,confidential-guest-support=sev0",
            "confidential",
        ),
    ] {
        let line = format!("{BOOT} {line}");
        let err = files.error(&line);
        assert!(
            matches!(&err, QemuError::Unsupported(m) if m.contains(says)),
            "{line}: {err:?}"
        );
    }
}

#[test]
fn version_and_help_answer_like_qemu() {
    let Ok(QemuCommand::Answer(text)) = parse(&["-version".to_string()]) else {
        panic!("-version")
    };
    assert!(text.starts_with("QEMU emulator version 9."), "{text}");
    let Ok(QemuCommand::Answer(text)) = parse(&["--help".to_string()]) else {
        panic!("--help")
    };
    assert!(
        text.contains("-kernel") && text.contains("NIXVMM_QEMU"),
        "{text}"
    );
}

#[test]
fn sandbox_turns_nixvmms_filters_on_or_off_and_they_are_on_without_it() {
    let files = Files::new();
    let seccomp = |args: &str| files.run(&format!("{args} {BOOT}")).config.seccomp;
    assert_eq!(seccomp(""), Seccomp::On, "nixvmm's default");
    assert_eq!(seccomp("-sandbox off"), Seccomp::Off);
    assert_eq!(
        seccomp("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny"),
        Seccomp::On
    );
    assert_eq!(seccomp("-sandbox enable=off"), Seccomp::Off);
    let refused = files.error(&format!("-sandbox maybe {BOOT}"));
    assert!(
        matches!(&refused, QemuError::Invalid(m) if m.contains("-sandbox: enable=maybe")),
        "{refused:?}"
    );
    let unknown = files.error(&format!("-sandbox on,frobnicate=1 {BOOT}"));
    assert!(
        matches!(&unknown, QemuError::Unsupported(m) if m.contains("frobnicate")),
        "{unknown:?}"
    );
}
