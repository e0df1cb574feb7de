//! The native front door: `nixvmm run …`. It only parses; [`RunArgs::into_config`] produces
//! the [`VmConfig`] everything downstream uses.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::console::parse_port;
use crate::config::net::parse_net;
use crate::config::system::{read_system, SystemError};
use crate::config::{
    parse_disk, parse_serial, parse_share, parse_size, parse_tpm, parse_vsock, ConfigError,
    Decompress, Kernel, Monitor, VmConfig, MAX_CPUS,
};
use crate::seccomp::Seccomp;

#[derive(Debug, Parser)]
#[command(
    name = "nixvmm",
    version,
    about = "A fast KVM VMM for directly booted NixOS systems"
)]
pub struct Cli {
    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel or a NixOS system. Without a kernel, a built-in tiny guest greets and
    /// powers off.
    Run(Box<RunArgs>),
    /// Serve one of nixvmm's device models to a vhost-user frontend (e.g. QEMU's
    /// vhost-user-rng-pci) on a Unix socket, until the frontend disconnects.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// What a user network's guestfwd runs per guest connection: takes a connection slot,
    /// then copies stdin and stdout to and from a TCP connection to HOST:PORT, or runs a
    /// program (--exec).
    #[command(hide = true)]
    Relay {
        /// The network's folder of connection slots.
        #[arg(long)]
        slots: std::path::PathBuf,
        /// Run the program named by the rest of the command line.
        #[arg(long)]
        exec: bool,
        /// HOST:PORT, or with --exec the program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        target: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// virtio-rng fed from the host's getrandom.
    Rng {
        /// The Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        #[command(flatten)]
        confinement: Confinement,
    },
    /// virtio-fs on a host directory (for vhost-user-fs-pci): a virtiofsd drop-in that also
    /// takes virtiofsd's options as qemu-vm.nix and runInLinuxVM pass them.
    Fs(FsArgs),
    /// The 9P2000.L server on a socket, for Linux's 9p client (`mount -t 9p -o trans=tcp` or
    /// `trans=unix`).
    #[command(name = "9p")]
    NineP {
        /// unix:PATH or tcp:HOST:PORT
        #[arg(long)]
        listen: String,
        /// The directory to share.
        #[arg(long)]
        shared_dir: PathBuf,
        /// Refuse every change to the share.
        #[arg(long)]
        readonly: bool,
        /// none or passthrough (qemu-vm.nix's security_model).
        #[arg(long, default_value = "none")]
        security_model: String,
        #[command(flatten)]
        confinement: Confinement,
    },
    /// virtio-blk on a raw or qcow2 image (for vhost-user-blk-pci).
    Blk {
        /// The Unix socket to listen on.
        #[arg(long)]
        socket: PathBuf,
        /// path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID]
        #[arg(long, value_name = "OPTIONS")]
        disk: String,
        #[command(flatten)]
        confinement: Confinement,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: a bzImage or an ELF vmlinux.
    #[arg(long, conflicts_with = "system")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, conflicts_with = "system")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; with --system, appended to the system's own.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// A NixOS system (toplevel): boots its kernel, initrd, kernel-params and init.
    #[arg(long)]
    pub system: Option<PathBuf>,
    /// The closure-info `registration` file passed to the guest as regInfo=.
    #[arg(long, requires = "system")]
    pub reg_info: Option<String>,
    /// Guest RAM, e.g. 512M or 4G (a bare number is MiB).
    #[arg(long, short = 'm', default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    pub cpus: u8,
    /// End nixvmm (status 0) when the guest reboots, instead of booting it again.
    #[arg(long)]
    pub no_reboot: bool,
    /// Who decompresses a bzImage's payload: `host` (once, cached in ~/.cache/nixvmm/kernels
    /// or $NIXVMM_KERNEL_CACHE; the kernel then runs at its link address, without KASLR) or
    /// `guest` (the bzImage's own decompressor, at every boot).
    #[arg(long, value_enum, default_value = "host")]
    pub decompress_kernel: Decompress,
    /// Give the guest a virtio-rng device (/dev/hwrng) fed from the host's getrandom.
    #[arg(long)]
    pub rng: bool,
    /// A virtio-blk disk: path=FILE[,format=raw|qcow2][,readonly=on][,serial=ID]. Repeat for
    /// more disks (vda, vdb, …).
    #[arg(long, value_name = "OPTIONS")]
    pub disk: Vec<String>,
    /// A shared host directory, repeatable. 9p (the default):
    /// tag=TAG,path=DIR[,fs=9p][,security-model=none|passthrough|mapped-xattr|mapped-file]
    /// [,readonly=on], mounted with `mount -t 9p -o trans=virtio TAG /mnt`. Built-in virtio-fs:
    /// tag=TAG,path=DIR,fs=virtiofs[,readonly=on][,xattr=on]. virtio-fs served by virtiofsd or
    /// `nixvmm device fs`: tag=TAG,socket=SOCKET,fs=vhost-user. virtio-fs shares are mounted
    /// with `mount -t virtiofs TAG /mnt`.
    #[arg(long, value_name = "OPTIONS")]
    pub share: Vec<String>,
    /// A virtio-net NIC, repeatable, with the network behind it written as QEMU's -netdev:
    /// user[,hostfwd=tcp::2222-:22][,guestfwd=tcp:10.0.2.100:80-cmd:COMMAND][,restrict=on]
    /// [,net=10.0.2.0/24][,dns=…][,dhcpstart=…][,hostname=…][,mac=52:54:00:12:34:56] (the
    /// user-mode network: DHCP gives the guest 10.0.2.15, the host is 10.0.2.2).
    #[arg(long, value_name = "OPTIONS")]
    pub net: Vec<String>,
    /// A virtio-console port, repeatable: console=on (the guest's /dev/hvc0, hvc1, …) or
    /// name=NAME (/dev/virtio-ports/NAME), and its host side as QEMU's -chardev:
    /// chardev=socket,path=SOCKET[,server=on[,wait=off]] | chardev=file,path=FILE | chardev=null.
    #[arg(long, value_name = "OPTIONS")]
    pub port: Vec<String>,
    /// QEMU's human monitor (HMP) on a Unix socket that something listens on: nixvmm
    /// connects and answers `info status`, `stop`, `cont`, `system_reset`, `quit`,
    /// `hostfwd_add`, `set_link`, …
    #[arg(long, value_name = "SOCKET", conflicts_with = "monitor_listen")]
    pub monitor: Option<PathBuf>,
    /// The human monitor on a Unix socket nixvmm listens on, one client at a time (as QEMU's
    /// -monitor unix:SOCKET,server=on,wait=off).
    #[arg(long, value_name = "SOCKET")]
    pub monitor_listen: Option<PathBuf>,
    /// QMP on a Unix socket nixvmm listens on (qmp_capabilities, query-status, stop, cont,
    /// system_reset, quit, human-monitor-command; SHUTDOWN, RESET, STOP, RESUME events).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// A virtio-vsock device: cid=N,uds=PATH (nixvmm's own; host programs connect to the Unix
    /// socket PATH and send `CONNECT PORT`), cid=N,backend=kernel (the host's vhost-vsock) or
    /// vhost-user=SOCKET (e.g. vhost-device-vsock --vm guest-cid=3,socket=SOCKET,uds-path=…,
    /// which gives the guest's CID).
    #[arg(long, value_name = "OPTIONS")]
    pub vsock: Option<String>,
    /// A TPM 2.0 (TIS at 0xfed40000, ACPI TPM2 table) run by swtpm: socket=PATH, its control
    /// socket (`swtpm socket --tpmstate dir=D --ctrl type=unixio,path=D/socket --tpm2`).
    #[arg(long, value_name = "OPTIONS")]
    pub tpm: Option<String>,
    /// Where the serial console (ttyS0) goes: stdio (the default: this terminal), null, or
    /// file:PATH (output only).
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    #[command(flatten)]
    pub confinement: Confinement,
}

/// `nixvmm device fs` (and virtiofsd's spelling of the same options).
#[derive(Debug, Args)]
pub struct FsArgs {
    /// The Unix socket to listen on.
    #[arg(long, alias = "socket-path")]
    pub socket: PathBuf,
    /// The directory to share.
    #[arg(long)]
    pub shared_dir: PathBuf,
    /// Refuse every change to the share.
    #[arg(long)]
    pub readonly: bool,
    /// Pass extended attributes through.
    #[arg(long)]
    pub xattr: bool,
    /// virtiofsd's sandbox mode; nixvmm accepts `none` (it confines by file descriptors).
    #[arg(long, value_parser = ["none"])]
    pub sandbox: Option<String>,
    #[command(flatten)]
    pub confinement: Confinement,
}

/// `--seccomp`, for `run` and every `device`.
#[derive(Debug, Args)]
pub struct Confinement {
    /// seccomp filters on nixvmm's threads: on (a forbidden call ends nixvmm, naming it), log
    /// (the kernel logs it), off; virtiofsd's none, kill and trap are taken too.
    #[arg(long, value_parser = parse_seccomp, default_value = "on")]
    pub seccomp: Seccomp,
}

/// `--seccomp`: nixvmm's on, log and off, and virtiofsd's none, kill and trap.
pub fn parse_seccomp(text: &str) -> Result<Seccomp, String> {
    match text {
        "on" | "kill" | "trap" => Ok(Seccomp::On),
        "log" => Ok(Seccomp::Log),
        "off" | "none" => Ok(Seccomp::Off),
        other => Err(format!(
            "{other:?}: expected on, log or off (or virtiofsd's kill, trap or none)"
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    System(#[from] SystemError),
}

impl RunArgs {
    pub fn into_config(self) -> Result<VmConfig, CliError> {
        let memory = parse_size(&self.memory)?;
        let (kernel, initrd, cmdline) = match &self.system {
            Some(dir) => {
                let boot = read_system(dir, self.reg_info.as_deref(), &self.cmdline)?;
                (Kernel::File(boot.kernel), Some(boot.initrd), boot.cmdline)
            }
            None => (
                self.kernel.map_or(Kernel::BuiltinGreeting, Kernel::File),
                self.initrd,
                self.cmdline,
            ),
        };
        let config = VmConfig {
            kernel,
            initrd,
            cmdline,
            memory,
            cpus: self.cpus,
            no_reboot: self.no_reboot,
            decompress: self.decompress_kernel,
            rng: self.rng,
            disks: self
                .disk
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<_, _>>()?,
            nics: self
                .net
                .iter()
                .map(|n| parse_net(n).map_err(ConfigError::from))
                .collect::<Result<_, _>>()?,
            shares: self
                .share
                .iter()
                .map(|s| parse_share(s))
                .collect::<Result<_, _>>()?,
            ports: self
                .port
                .iter()
                .map(|p| parse_port(p).map_err(ConfigError::from))
                .collect::<Result<_, _>>()?,
            monitor: match (self.monitor, self.monitor_listen) {
                (Some(path), _) => Some(Monitor::Connect(path)),
                (None, Some(path)) => Some(Monitor::Listen { path, wait: false }),
                (None, None) => None,
            },
            qmp: self.qmp,
            vsock: self.vsock.as_deref().map(parse_vsock).transpose()?,
            serial: parse_serial(&self.serial)?,
            tpm: self.tpm.as_deref().map(parse_tpm).transpose()?,
            seccomp: self.confinement.seccomp,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nixvmm").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).unwrap().command {
            Command::Run(run) => *run,
            other => panic!("not a run command: {other:?}"),
        }
    }

    #[test]
    fn defaults_boot_the_builtin_guest() {
        let config = run_args(&["run"]).into_config().unwrap();
        assert_eq!(config.kernel, Kernel::BuiltinGreeting);
        assert_eq!(
            (config.memory, config.cpus, config.no_reboot),
            (512 << 20, 1, false)
        );
    }

    #[test]
    fn kernel_options_reach_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"x").unwrap();
        let k = kernel.to_str().unwrap();
        let config = run_args(&[
            "run",
            "--kernel",
            k,
            "--cmdline",
            "console=ttyS0",
            "--memory",
            "2G",
            "--cpus",
            "4",
            "--no-reboot",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.kernel, Kernel::File(kernel.clone()));
        assert_eq!(config.cmdline, "console=ttyS0");
        assert_eq!(
            (config.memory, config.cpus, config.no_reboot),
            (2 << 30, 4, true)
        );
        assert_eq!(
            config.decompress,
            Decompress::Host,
            "nixvmm unpacks by default"
        );
        let guest = run_args(&["run", "--kernel", k, "--decompress-kernel", "guest"]);
        assert_eq!(guest.into_config().unwrap().decompress, Decompress::Guest);
        assert!(parse(&["run", "--kernel", k, "--decompress-kernel", "often"]).is_err());
    }

    #[test]
    fn device_subcommand_takes_a_socket() {
        let cli = parse(&["device", "rng", "--socket", "/run/rng.sock"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Device(DeviceCommand::Rng { socket, .. }) if socket == Path::new("/run/rng.sock")
        ));
        assert!(parse(&["device", "rng"]).is_err(), "--socket is required");
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        assert!(parse(&["run", "--cpus", "0"]).is_err());
        assert!(parse(&["run", "--bogus"]).is_err());
        assert!(parse(&["run", "--system", "/x", "--kernel", "/y"]).is_err());
        let err = run_args(&["run", "--memory", "lots"])
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("--memory lots"), "{err}");
        let err = run_args(&["run", "--kernel", "/no/such/bzImage"])
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("/no/such/bzImage"), "{err}");
    }

    #[test]
    fn seccomp_takes_nixvmms_words_and_virtiofsds() {
        assert_eq!(
            run_args(&["run"]).confinement.seccomp,
            Seccomp::On,
            "on by default"
        );
        for (word, mode) in [
            ("on", Seccomp::On),
            ("log", Seccomp::Log),
            ("off", Seccomp::Off),
            ("none", Seccomp::Off),
            ("kill", Seccomp::On),
            ("trap", Seccomp::On),
        ] {
            assert_eq!(
                run_args(&["run", "--seccomp", word]).confinement.seccomp,
                mode,
                "{word}"
            );
        }
        let refused = parse(&["run", "--seccomp", "maybe"])
            .unwrap_err()
            .to_string();
        assert!(refused.contains("expected on, log or off"), "{refused}");
    }
}
