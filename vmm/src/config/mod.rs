//! `VmConfig`: the one validated description of a VM, whichever front door built it.

pub mod console;
pub mod net;
pub mod options;
pub mod system;

use std::path::PathBuf;

use firmware::layout::MIN_MEMORY;
use virtio::block::{BlockConfig, Format};
use virtio::fs::FsConfig;
use virtio::ninep::ShareConfig;

use crate::config::net::NicConfig;
use crate::config::options::{OptionError, Options};
use crate::seccomp::Seccomp;

/// Highest vCPU count: APIC IDs are 8-bit in the MADT entries nixvmm writes.
pub const MAX_CPUS: u8 = 254;
/// Guest RAM beyond this is almost certainly a typo (2 TiB); the user can still ask for less.
pub const MAX_MEMORY: u64 = 2 << 40;

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// A bzImage or ELF vmlinux file.
    File(PathBuf),
    /// The tiny guest embedded in nixvmm: prints a greeting and powers off.
    BuiltinGreeting,
}

/// Where a bzImage's compressed kernel is decompressed (`--decompress-kernel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Decompress {
    /// On the host, once per kernel, cached; the guest enters the vmlinux (no KASLR).
    Host,
    /// In the guest, by the bzImage's own decompressor, at every boot (with KASLR).
    Guest,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: Kernel,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub cpus: u8,
    /// A guest reboot ends nixvmm (status 0) instead of restarting the guest (QEMU's
    /// `-no-reboot`).
    pub no_reboot: bool,
    /// Who decompresses a bzImage's payload: nixvmm, once, into its kernel cache (the guest
    /// then starts at the vmlinux's link address, without KASLR), or the guest's own
    /// decompressor at every boot.
    pub decompress: Decompress,
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, …).
    pub disks: Vec<BlockConfig>,
    /// Shared host directories.
    pub shares: Vec<Share>,
    /// virtio-net NICs, in the order the guest sees them (eth0, …).
    pub nics: Vec<NicConfig>,
    /// virtio-console ports, on one device: the first console is port 0 (/dev/hvc0), the
    /// others follow in order from port 1.
    pub ports: Vec<console::PortSpec>,
    /// QEMU's human monitor, on this Unix socket that a peer listens on (`-monitor
    /// unix:PATH`, as the NixOS test driver gives it).
    pub monitor: Option<Monitor>,
    /// QMP, on this Unix socket nixvmm listens on (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// Where the serial port (ttyS0) goes.
    pub serial: Serial,
    /// A TPM 2.0 (TIS) run by the swtpm whose control socket this is.
    pub tpm: Option<PathBuf>,
    /// nixvmm's own threads under seccomp filters (`--seccomp`, QEMU's `-sandbox`).
    pub seccomp: Seccomp,
}

/// Where QEMU's human monitor is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Monitor {
    /// nixvmm connects to a socket the peer listens on (`-monitor unix:PATH`, as the NixOS
    /// test driver gives it).
    Connect(PathBuf),
    /// nixvmm listens and serves one client at a time (`-monitor unix:PATH,server=on`);
    /// with `wait` the guest starts only once the first client came.
    Listen { path: PathBuf, wait: bool },
    /// On nixvmm's stdin and stdout (`-monitor stdio`), with the serial console elsewhere.
    Stdio,
}

/// The serial port's host side (`--serial`, QEMU's `-serial`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Serial {
    /// Output on stdout, input from stdin, the terminal in raw mode. With `escapes`, Ctrl-A
    /// starts a command (x quits, c switches to the monitor), as QEMU's `mon:stdio` and
    /// `-nographic`; without, every byte typed goes to the guest, as QEMU's `-serial stdio`.
    Stdio { escapes: bool },
    /// Output dropped, no input.
    Null,
    /// Output written to this file (made or truncated at start), no input.
    File(PathBuf),
}

/// This terminal, with Ctrl-A commands.
impl Default for Serial {
    fn default() -> Serial {
        Serial::Stdio { escapes: true }
    }
}

/// Parses `--serial stdio|null|file:PATH`.
pub fn parse_serial(text: &str) -> Result<Serial, ConfigError> {
    match text {
        "stdio" => Ok(Serial::Stdio { escapes: true }),
        "null" | "none" => Ok(Serial::Null),
        _ => match text.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(Serial::File(PathBuf::from(path))),
            _ => Err(ConfigError::BadSerial(text.to_string())),
        },
    }
}

/// A virtio-vsock device (`--vsock`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsockConfig {
    /// nixvmm's own device with guest CID `cid`; host programs reach it through Unix sockets
    /// at `uds` (Firecracker's `CONNECT PORT` protocol).
    Muxer { cid: u64, uds: PathBuf },
    /// The host kernel's vhost-vsock serves it (QEMU's `vhost-vsock-pci`): host programs use
    /// AF_VSOCK to `cid`.
    Kernel { cid: u64 },
    /// Served by a vhost-user backend listening on `socket` (vhost-device-vsock), which also
    /// gives the guest's CID.
    VhostUser { socket: PathBuf },
}

/// Parses `--vsock cid=N,uds=PATH`, `--vsock cid=N,backend=kernel` or `--vsock
/// vhost-user=SOCKET`.
pub fn parse_vsock(text: &str) -> Result<VsockConfig, ConfigError> {
    let o = Options::parse("--vsock", text, &["vhost-user", "cid", "uds", "backend"])?;
    if let Some(socket) = o.get("vhost-user") {
        return Ok(VsockConfig::VhostUser {
            socket: PathBuf::from(socket),
        });
    }
    let cid = parse_guest_cid("--vsock cid", o.required("cid")?)?;
    match o.get("backend") {
        Some("kernel") => Ok(VsockConfig::Kernel { cid }),
        None | Some("muxer") => Ok(VsockConfig::Muxer {
            cid,
            uds: PathBuf::from(o.required("uds")?),
        }),
        Some(other) => Err(o
            .bad("backend", other, "muxer (with uds=PATH) or kernel")
            .into()),
    }
}

/// `--tpm socket=PATH`: swtpm's control socket.
pub fn parse_tpm(text: &str) -> Result<PathBuf, ConfigError> {
    let o = Options::parse("--tpm", text, &["socket"])?;
    Ok(PathBuf::from(o.required("socket")?))
}

/// A guest CID: 3 up to 2^32 - 2 (0 to 2 are reserved, 2^32 - 1 is VMADDR_CID_ANY).
pub fn parse_guest_cid(what: &'static str, text: &str) -> Result<u64, ConfigError> {
    match text.parse::<u64>() {
        Ok(cid) if (virtio::vsock::MIN_GUEST_CID..u64::from(u32::MAX)).contains(&cid) => Ok(cid),
        _ => Err(ConfigError::BadCid {
            what,
            given: text.to_string(),
        }),
    }
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            kernel: Kernel::BuiltinGreeting,
            initrd: None,
            cmdline: String::new(),
            memory: 512 << 20,
            cpus: 1,
            no_reboot: false,
            decompress: Decompress::Host,
            rng: false,
            disks: Vec::new(),
            shares: Vec::new(),
            nics: Vec::new(),
            ports: Vec::new(),
            monitor: None,
            qmp: None,
            vsock: None,
            serial: Serial::default(),
            tpm: None,
            seccomp: Seccomp::On,
        }
    }
}

/// A user error in the configuration, worded with the option to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--memory {0}: not a size; write e.g. 512M or 2G (a bare number means MiB)")]
    BadSize(String),
    #[error("--memory {given}: at least {min} MiB is needed to boot")]
    MemoryTooSmall { given: String, min: u64 },
    #[error("--memory {0}: more than 2 TiB; give a smaller size")]
    MemoryTooLarge(String),
    #[error("--cpus {0}: give a number of vCPUs from 1 to {MAX_CPUS}")]
    BadCpus(u32),
    #[error("{what} {path}: file not found; check the path")]
    Missing { what: &'static str, path: String },
    #[error("--initrd needs a kernel: give --kernel or --system")]
    InitrdWithoutKernel,
    #[error("stdio is taken twice (the serial console, a console port's chardev, the monitor): keep one there and move the others (--serial null or file:PATH; QEMU: -serial none)")]
    StdioTwice,
    #[error("--serial {0}: write stdio, null or file:PATH")]
    BadSerial(String),
    #[error("{what}={given}: give a guest CID from 3 to 4294967294")]
    BadCid { what: &'static str, given: String },
    #[error(transparent)]
    Option(#[from] OptionError),
}

/// A shared host directory, served by virtio-fs or virtio-9p.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Share {
    VirtioFs(FsConfig),
    NineP {
        tag: String,
        config: ShareConfig,
    },
    /// virtio-fs served by an external backend (virtiofsd) listening on `socket`.
    VhostUser {
        tag: String,
        socket: PathBuf,
    },
}

/// Parses `--share tag=TAG,path=DIR[,fs=9p|virtiofs][,readonly=on][,security-model=M][,xattr=on]`.
pub fn parse_share(text: &str) -> Result<Share, ConfigError> {
    let o = Options::parse(
        "--share",
        text,
        &[
            "tag",
            "path",
            "readonly",
            "fs",
            "xattr",
            "security-model",
            "socket",
        ],
    )?;
    let tag = o.required("tag")?.to_string();
    if o.get("fs") == Some("vhost-user") || o.get("socket").is_some() {
        if o.get("fs").is_some_and(|fs| fs != "vhost-user") {
            return Err(o
                .bad(
                    "socket",
                    o.get("socket").unwrap_or(""),
                    "needs fs=vhost-user",
                )
                .into());
        }
        if let Err(need) = virtio::fs::check_tag(&tag) {
            return Err(o.bad("tag", &tag, &need).into());
        }
        return Ok(Share::VhostUser {
            tag,
            socket: PathBuf::from(o.required("socket")?),
        });
    }
    let path = PathBuf::from(o.required("path")?);
    if !path.is_dir() {
        return Err(ConfigError::Missing {
            what: "--share",
            path: path.display().to_string(),
        });
    }
    if tag.is_empty() {
        return Err(o.bad("tag", &tag, "a non-empty mount tag").into());
    }
    let readonly = o.flag("readonly", false)?;
    match o.get("fs").unwrap_or("9p") {
        "virtiofs" => {
            if let Some(model) = o.get("security-model") {
                return Err(o
                    .bad(
                        "security-model",
                        model,
                        "security models apply to 9p shares only",
                    )
                    .into());
            }
            if let Err(need) = virtio::fs::check_tag(&tag) {
                return Err(o.bad("tag", &tag, &need).into());
            }
            Ok(Share::VirtioFs(FsConfig {
                shared_dir: path,
                tag: Some(tag),
                readonly,
                xattr: o.flag("xattr", false)?,
            }))
        }
        "9p" => {
            let model = o.get("security-model").unwrap_or("none");
            let security_model = model
                .parse()
                .map_err(|why: String| o.bad("security-model", model, &why))?;
            Ok(Share::NineP {
                tag,
                config: ShareConfig {
                    root: path,
                    readonly,
                    security_model,
                },
            })
        }
        other => Err(o.bad("fs", other, "expected 9p or virtiofs").into()),
    }
}

/// Parses `--disk path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID]`.
pub fn parse_disk(text: &str) -> Result<BlockConfig, ConfigError> {
    let o = Options::parse("--disk", text, &["path", "format", "readonly", "serial"])?;
    let path = PathBuf::from(o.required("path")?);
    if !path.is_file() {
        return Err(ConfigError::Missing {
            what: "--disk",
            path: path.display().to_string(),
        });
    }
    let format = match o.choice("format", &["raw", "qcow2"])?.as_deref() {
        Some("qcow2") => Some(Format::Qcow2),
        Some(_) => Some(Format::Raw),
        None => None,
    };
    let serial = o.get("serial").map(String::from);
    if let Some(id) = &serial {
        if id.len() > 20 {
            return Err(o.bad("serial", id, "at most 20 characters").into());
        }
    }
    Ok(BlockConfig {
        path,
        format,
        readonly: o.flag("readonly", false)?,
        serial,
    })
}

impl VmConfig {
    /// Checks everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                given: format!("{}M", self.memory >> 20),
                min: MIN_MEMORY >> 20,
            });
        }
        if self.memory > MAX_MEMORY {
            return Err(ConfigError::MemoryTooLarge(format!(
                "{}M",
                self.memory >> 20
            )));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::BadCpus(u32::from(self.cpus)));
        }
        match &self.kernel {
            Kernel::File(path) if !path.is_file() => {
                return Err(ConfigError::Missing {
                    what: "kernel",
                    path: path.display().to_string(),
                })
            }
            Kernel::BuiltinGreeting if self.initrd.is_some() => {
                return Err(ConfigError::InitrdWithoutKernel)
            }
            _ => {}
        }
        let stdio_port = self
            .ports
            .iter()
            .any(|p| p.chardev == console::ChardevSpec::Stdio);
        let stdio_monitor = self.monitor == Some(Monitor::Stdio);
        if (stdio_port || stdio_monitor) && matches!(self.serial, Serial::Stdio { .. }) {
            return Err(ConfigError::StdioTwice);
        }
        if stdio_port && stdio_monitor {
            return Err(ConfigError::StdioTwice);
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::Missing {
                    what: "initrd",
                    path: initrd.display().to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Parses a memory size as QEMU's `-m` does: a bare number is MiB; suffixes K, M, G, T
/// (binary, optionally followed by `B` or `iB`).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let suffix = suffix.trim().to_ascii_uppercase();
    let unit = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(&suffix);
    let shift = match unit {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    if number.leading_zeros() < shift {
        return Err(ConfigError::MemoryTooLarge(text.to_string()));
    }
    Ok(number << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_takes_a_vhost_user_socket_or_a_cid_and_uds() {
        assert_eq!(
            parse_vsock("vhost-user=/run/vsock.sock"),
            Ok(VsockConfig::VhostUser {
                socket: "/run/vsock.sock".into()
            })
        );
        assert_eq!(
            parse_vsock("cid=3,uds=/run/vm.vsock"),
            Ok(VsockConfig::Muxer {
                cid: 3,
                uds: "/run/vm.vsock".into()
            })
        );
        assert_eq!(
            parse_vsock("cid=9,backend=kernel"),
            Ok(VsockConfig::Kernel { cid: 9 })
        );
        for (text, says) in [
            ("cid=3", "uds"),
            ("cid=3,backend=magic", "muxer (with uds=PATH) or kernel"),
            ("cid=2,uds=/u", "cid=2: give a guest CID from 3"),
            ("cid=4294967295,uds=/u", "give a guest CID"),
            ("cid=x,uds=/u", "give a guest CID"),
            ("port=1", "port"),
            ("", "cid"),
        ] {
            let err = parse_vsock(text).unwrap_err().to_string();
            assert!(
                err.contains("--vsock") && err.contains(says),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("512"), Ok(512 << 20));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1024k"), Ok(1 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "M", "12X", "-1", "1.5G", "G2"] {
            assert_eq!(
                parse_size(bad),
                Err(ConfigError::BadSize(bad.into())),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999T"),
            Err(ConfigError::MemoryTooLarge(_))
        ));
    }

    #[test]
    fn disks_parse_with_their_options() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("nixos.qcow2");
        std::fs::write(&image, b"QFI\xfb").unwrap();
        let text = format!("path={},serial=root,format=qcow2", image.display());
        let disk = parse_disk(&text).unwrap();
        assert_eq!(disk.path, image);
        assert_eq!(disk.format, Some(Format::Qcow2));
        assert_eq!(disk.serial.as_deref(), Some("root"));
        assert!(!disk.readonly);
        let text = format!("path={},readonly=on", image.display());
        assert!(parse_disk(&text).unwrap().readonly);
        for (bad, says) in [
            ("path=/no/such.img", "--disk /no/such.img"),
            ("readonly=on", "`path` is required"),
            ("path=x,format=vmdk", "expected one of raw, qcow2"),
            ("path=x,cache=none", "unknown key `cache`"),
        ] {
            let bad = bad.replace("path=x", &format!("path={}", image.display()));
            let err = parse_disk(&bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn shares_parse_and_name_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "tag=data,path={},fs=virtiofs,readonly=on",
            dir.path().display()
        );
        let Share::VirtioFs(share) = parse_share(&text).unwrap() else {
            panic!("a virtio-fs share")
        };
        assert_eq!(share.tag.as_deref(), Some("data"));
        assert!(share.readonly);
        let nine_p = format!("tag=nix-store,path={},readonly=on", dir.path().display());
        let Share::NineP { tag, config } = parse_share(&nine_p).unwrap() else {
            panic!("9p is the default")
        };
        assert_eq!((tag.as_str(), config.readonly), ("nix-store", true));
        let mapped = format!(
            "tag=x,path={},security-model=mapped-xattr",
            dir.path().display()
        );
        let Share::NineP { config, .. } = parse_share(&mapped).unwrap() else {
            panic!("a 9p share")
        };
        assert_eq!(
            config.security_model,
            virtio::ninep::SecurityModel::MappedXattr
        );
        let Share::VhostUser { tag, socket } =
            parse_share("tag=store2,socket=/run/virtiofsd.sock,fs=vhost-user").unwrap()
        else {
            panic!("a vhost-user share")
        };
        assert_eq!(
            (tag.as_str(), socket.to_str()),
            ("store2", Some("/run/virtiofsd.sock"))
        );
        assert!(
            parse_share("tag=x,fs=vhost-user").is_err(),
            "socket= is required"
        );
        let file = format!(
            "tag=x,path={},security-model=mapped-file",
            dir.path().display()
        );
        let Share::NineP { config, .. } = parse_share(&file).unwrap() else {
            panic!("a 9p share")
        };
        assert_eq!(
            config.security_model,
            virtio::ninep::SecurityModel::MappedFile
        );
        let bad = format!(
            "tag=x,path={},security-model=mapped-y",
            dir.path().display()
        );
        let err = parse_share(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown security_model"), "{err}");
        let err = parse_share("tag=x,path=/no/such/dir,fs=virtiofs")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--share /no/such/dir"), "{err}");
    }

    #[test]
    fn validation_names_the_option() {
        let ok = VmConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let small = VmConfig {
            memory: 1 << 20,
            ..VmConfig::default()
        };
        assert!(small
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--memory"));
        let cpus = VmConfig {
            cpus: 0,
            ..VmConfig::default()
        };
        assert!(cpus
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--cpus 0"));
        let missing = VmConfig {
            kernel: Kernel::File("/nonexistent/bzImage".into()),
            ..VmConfig::default()
        };
        let err = missing.validate().unwrap_err().to_string();
        assert!(err.contains("kernel /nonexistent/bzImage"), "{err}");
    }
}
