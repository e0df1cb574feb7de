//! The QEMU door: `qemu-system-x86_64 …` / `qemu-kvm …` (nixvmm under that name) or `nixvmm
//! qemu …`. It reads the subset of QEMU's options that qemu-vm.nix, the NixOS test driver and
//! `vmTools.runInLinuxVM` pass, maps it onto the same [`VmConfig`] as `nixvmm run`, and says
//! when a boot belongs to the real QEMU (firmware, a bootloader, no KVM).

pub mod args;
mod devices;
pub mod fallback;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::config::console::ChardevSpec;
use crate::config::options::{split_items, Options};
use crate::config::{parse_size, Decompress, Kernel, Monitor, Serial, VmConfig, MAX_CPUS};
use crate::seccomp::Seccomp;
use args::{tokenize, Arg};
use devices::Devices;

/// The QEMU version whose options the door follows, as `-version` reports it.
pub const QEMU_VERSION: &str = "9.2.0";
/// QEMU's default RAM when `-m` is absent.
const DEFAULT_MEMORY: u64 = 128 << 20;

/// What a QEMU command line asks of nixvmm.
#[derive(Debug)]
pub enum QemuCommand {
    Run(Box<QemuRun>),
    /// Not a boot nixvmm serves: exec the real QEMU with the same arguments, for this reason.
    Fallback(String),
    /// `-version` or `-help`: print this on stdout, exit 0.
    Answer(String),
}

/// A boot nixvmm serves.
#[derive(Debug)]
pub struct QemuRun {
    pub config: VmConfig,
    /// `-pidfile`: nixvmm's PID is written there while it runs.
    pub pidfile: Option<PathBuf>,
    /// `-D`: nixvmm's log goes there instead of stderr.
    pub log_file: Option<PathBuf>,
    /// The accelerators allow TCG (`accel=kvm:tcg`): without /dev/kvm, QEMU runs it.
    pub tcg_allowed: bool,
    /// What nixvmm accepted but does not do (graphics, USB input), said once on stderr.
    pub ignored: Vec<String>,
}

/// A command line the door refuses.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum QemuError {
    /// An option, device or backend nixvmm does not serve; `NIXVMM_UNKNOWN=fallback` hands
    /// such a command line to the real QEMU.
    #[error("{0}")]
    Unsupported(String),
    /// A mistake QEMU would refuse too.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, QemuError>;

fn invalid(message: impl Into<String>) -> QemuError {
    QemuError::Invalid(message.into())
}

fn unsupported(message: impl Into<String>) -> QemuError {
    QemuError::Unsupported(message.into())
}

/// An option error (`-drive: unknown key …`) from the shared option parser.
fn option_error(e: crate::config::options::OptionError) -> QemuError {
    match e {
        crate::config::options::OptionError::UnknownKey { .. } => unsupported(e.to_string()),
        _ => invalid(e.to_string()),
    }
}

/// Whether `NIXVMM_UNKNOWN=fallback` asks that what nixvmm does not serve go to QEMU.
pub fn unknown_falls_back() -> bool {
    std::env::var_os("NIXVMM_UNKNOWN").is_some_and(|v| v == "fallback")
}

/// `value`'s items, the first one given as `key=` when it was written without a key, as
/// QEMU's implied first keys (`-smp 4`, `-machine pc`, `-sandbox on`).
fn with_implied_key(value: &str, key: &str) -> Vec<String> {
    let mut items = split_items(value);
    if let Some(first) = items.first_mut().filter(|i| !i.contains('=')) {
        *first = format!("{key}={first}");
    }
    items
}

/// `-sandbox on|off[,obsolete=…,elevateprivileges=…,spawn=…,resourcecontrol=…]`: nixvmm's
/// filters are its own (an allow-list per thread, no process spawning but libslirp's guestfwd
/// commands), so only on or off counts.
fn sandbox(value: &str) -> Result<Seccomp> {
    let known = [
        "enable",
        "obsolete",
        "elevateprivileges",
        "spawn",
        "resourcecontrol",
    ];
    let items = with_implied_key(value, "enable");
    let o = Options::parse_items("-sandbox", items, &known, &[]).map_err(option_error)?;
    let enabled = o.flag("enable", false).map_err(option_error)?;
    Ok(if enabled { Seccomp::On } else { Seccomp::Off })
}

/// Who decompresses a bzImage's payload through this door: `NIXVMM_DECOMPRESS_KERNEL=host`
/// (the default) or `guest`, as the native `--decompress-kernel`.
fn decompress_from_env() -> Result<Decompress> {
    match std::env::var("NIXVMM_DECOMPRESS_KERNEL").as_deref() {
        Err(_) | Ok("") | Ok("host") => Ok(Decompress::Host),
        Ok("guest") => Ok(Decompress::Guest),
        Ok(other) => Err(invalid(format!(
            "NIXVMM_DECOMPRESS_KERNEL={other}: give host or guest"
        ))),
    }
}

/// Reads a QEMU command line (without the program name).
pub fn parse(words: &[String]) -> Result<QemuCommand> {
    let args = tokenize(words);
    if args.iter().any(|a| a.name == "version") {
        return Ok(QemuCommand::Answer(version()));
    }
    if args.iter().any(|a| matches!(a.name.as_str(), "help" | "h")) {
        return Ok(QemuCommand::Answer(help()));
    }
    if let Some(reason) = fallback_reason(&args)? {
        return Ok(QemuCommand::Fallback(reason));
    }
    if let Some(arg) = args.iter().find(|a| !a.known) {
        return Err(unsupported(format!(
            "-{}: not an option nixvmm knows (set NIXVMM_UNKNOWN=fallback to hand such \
             command lines to QEMU)",
            arg.name
        )));
    }
    Builder::default().build(&args)
}

/// `-version`, worded as QEMU's first line so that tools reading the version understand it.
pub fn version() -> String {
    format!(
        "QEMU emulator version {QEMU_VERSION} (nixvmm {}: KVM direct Linux boots; other boots \
         run the real QEMU)\n",
        env!("CARGO_PKG_VERSION")
    )
}

fn help() -> String {
    format!(
        "{}usage: qemu-system-x86_64 [options]   (nixvmm's QEMU door)\n\n\
         Served by nixvmm (direct Linux boot on KVM):\n  \
         -kernel -initrd -append -m -smp -cpu max|host|kvm64|qemu64 -name -machine/-M \
         pc|q35|microvm[,accel=kvm…][,memory-backend=ID] -accel kvm -enable-kvm -no-reboot\n  \
         -nographic -display -vga -usb -serial stdio|mon:stdio -pidfile -D -d -sandbox \
         -nodefaults -boot -rtc base=utc\n  \
         -drive file=…,if=none|virtio[,format=raw|qcow2][,cache=…][,werror=report][,readonly=on]\n  \
         -virtfs local,path=…,mount_tag=…,security_model=… -chardev socket,id=…,path=… \
         -object memory-backend-memfd|memory-backend-file,…\n  \
         -netdev user|vde|tap,id=… -net nic,netdev=…,model=virtio -nic user|vde|tap,…\n  \
         -device virtio-rng-pci | virtio-blk-pci,drive=… | virtio-net-pci,netdev=… | \
         vhost-user-fs-pci,chardev=…,tag=… (graphics and USB input devices are accepted and \
         ignored)\n\n\
         Handed to the real QEMU (NIXVMM_QEMU, else the next qemu-system-x86_64 on PATH): no \
         -kernel (a bootloader boot), -bios, -drive if=pflash, -pflash, a machine other than \
         pc/q35/microvm, accelerators without kvm, and with NIXVMM_UNKNOWN=fallback anything \
         nixvmm does not know.\n",
        version()
    )
}

/// Why the real QEMU should run this command line, if it should.
fn fallback_reason(args: &[Arg]) -> Result<Option<String>> {
    if args.iter().any(|a| a.name == "bios") {
        return Ok(Some("-bios: a firmware boot".into()));
    }
    if args.iter().any(|a| a.name == "pflash") {
        return Ok(Some("-pflash: a firmware (UEFI) boot".into()));
    }
    for arg in args.iter().filter(|a| a.name == "drive") {
        let items = split_items(arg.value.as_deref().unwrap_or(""));
        if items.iter().any(|i| i == "if=pflash") {
            return Ok(Some("-drive if=pflash: a firmware (UEFI) boot".into()));
        }
    }
    for arg in args.iter().filter(|a| a.name == "machine" || a.name == "M") {
        let machine = Machine::parse(arg.value.as_deref().unwrap_or(""))?;
        if let Some(kind) = machine.kind {
            if !direct_boot_machine(&kind) {
                return Ok(Some(format!(
                    "-machine {kind}: nixvmm boots pc, q35 and microvm-like machines"
                )));
            }
        }
        if let Some(accel) = machine.accel {
            if !accel.split(':').any(|a| a == "kvm") {
                return Ok(Some(format!(
                    "-machine accel={accel}: nixvmm runs on KVM only"
                )));
            }
        }
    }
    let accels: Vec<String> = args
        .iter()
        .filter(|a| a.name == "accel")
        .map(|a| accel_name(a.value.as_deref().unwrap_or("")))
        .collect();
    if !accels.is_empty() && !accels.iter().any(|a| a == "kvm") {
        return Ok(Some(format!(
            "-accel {}: nixvmm runs on KVM only",
            accels.join(" -accel ")
        )));
    }
    if !args.iter().any(|a| a.name == "kernel") {
        return Ok(Some("no -kernel: a bootloader boot".into()));
    }
    Ok(None)
}

fn accel_name(value: &str) -> String {
    split_items(value)
        .into_iter()
        .next()
        .map(|first| first.strip_prefix("accel=").unwrap_or(&first).to_string())
        .unwrap_or_default()
}

fn direct_boot_machine(kind: &str) -> bool {
    matches!(kind, "pc" | "q35" | "microvm")
        || kind.starts_with("pc-i440fx-")
        || kind.starts_with("pc-q35-")
}

/// `-machine [type=]KIND[,accel=…][,memory-backend=ID][,…]`.
struct Machine {
    kind: Option<String>,
    accel: Option<String>,
    memory_backend: Option<String>,
}

/// Machine properties that change nothing nixvmm builds (it has no SMM, vmport or HPET, and
/// no USB or graphics).
const MACHINE_NEUTRAL: &[&str] = &[
    "vmport",
    "smm",
    "usb",
    "graphics",
    "dump-guest-core",
    "mem-merge",
    "hpet",
    "kernel-irqchip",
    "i8042",
    "sata",
    "pit",
    "pic",
    "rtc",
];

impl Machine {
    fn parse(value: &str) -> Result<Machine> {
        let items = with_implied_key(value, "type");
        let mut known = vec!["type", "accel", "memory-backend"];
        known.extend_from_slice(MACHINE_NEUTRAL);
        let o = Options::parse_items("-machine", items, &known, &[]).map_err(option_error)?;
        Ok(Machine {
            kind: o.get("type").map(String::from),
            accel: o.get("accel").map(String::from),
            memory_backend: o.get("memory-backend").map(String::from),
        })
    }
}

/// Gathers the options into a [`QemuRun`].
#[derive(Default)]
struct Builder {
    config_memory: Option<u64>,
    cpus: Option<u8>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: String,
    no_reboot: bool,
    pidfile: Option<PathBuf>,
    log_file: Option<PathBuf>,
    tcg_allowed: bool,
    serial_seen: bool,
    /// A `-monitor` (`none` too) or `-qmp` was given: then, as in QEMU, the default serial
    /// port is plain stdio, not `mon:stdio`.
    monitor_seen: bool,
    serial: Serial,
    memory_backend: Option<String>,
    monitor: Option<Monitor>,
    qmp: Option<PathBuf>,
    /// QEMU's `-sandbox`; nixvmm's own default (on) without it.
    seccomp: Seccomp,
    ignored: Vec<String>,
    devices: Devices,
}

impl Builder {
    fn build(mut self, args: &[Arg]) -> Result<QemuCommand> {
        for arg in args {
            self.take(arg)?;
        }
        let memory = self.memory()?;
        let devices = self.devices.finish()?;
        self.ignored.extend(devices.ignored);
        let Some(kernel) = self.kernel else {
            return Ok(QemuCommand::Fallback(
                "no -kernel: a bootloader boot".into(),
            ));
        };
        let config = VmConfig {
            kernel: Kernel::File(kernel),
            initrd: self.initrd,
            cmdline: self.cmdline,
            memory,
            cpus: self.cpus.unwrap_or(1),
            no_reboot: self.no_reboot,
            decompress: decompress_from_env()?,
            rng: devices.rng,
            disks: devices.disks,
            shares: devices.shares,
            nics: devices.nics,
            ports: devices.ports,
            monitor: self.monitor,
            qmp: self.qmp,
            vsock: devices.vsock,
            serial: match self.serial_seen {
                true => self.serial,
                false => Serial::Stdio {
                    escapes: !self.monitor_seen,
                },
            },
            tpm: devices.tpm,
            seccomp: self.seccomp,
        };
        config.validate().map_err(|e| invalid(e.to_string()))?;
        self.ignored.dedup();
        Ok(QemuCommand::Run(Box::new(QemuRun {
            config,
            pidfile: self.pidfile,
            log_file: self.log_file,
            tcg_allowed: self.tcg_allowed,
            ignored: self.ignored,
        })))
    }

    /// RAM: `-m`, or the size of the `memory-backend` object (they must agree, as in QEMU).
    fn memory(&self) -> Result<u64> {
        let Some(id) = &self.memory_backend else {
            return Ok(self.config_memory.unwrap_or(DEFAULT_MEMORY));
        };
        let size = self.devices.memory_backend_size(id).ok_or_else(|| {
            invalid(format!(
                "-machine memory-backend={id}: no -object memory-backend-…,id={id}"
            ))
        })?;
        match self.config_memory {
            Some(m) if m != size => Err(invalid(format!(
                "-m {}M and memory-backend {id} size {}M differ; give both the same size",
                m >> 20,
                size >> 20
            ))),
            _ => Ok(size),
        }
    }

    fn take(&mut self, arg: &Arg) -> Result<()> {
        let value = arg.value.as_deref();
        let name = arg.name.as_str();
        let need = || value.ok_or_else(|| invalid(format!("-{name} needs a value")));
        match name {
            "" => {
                return Err(unsupported(format!(
                    "`{}`: a bare argument is a -hda disk image in QEMU; nixvmm boots -kernel \
                     with -drive disks",
                    value.unwrap_or("")
                )))
            }
            "m" => self.config_memory = Some(parse_memory(need()?)?),
            "smp" => self.cpus = Some(parse_smp(need()?)?),
            "cpu" => check_cpu(need()?)?,
            "name" | "L" | "k" | "d" | "boot" => {}
            "machine" | "M" => {
                let machine = Machine::parse(need()?)?;
                if let Some(accel) = machine.accel {
                    self.tcg_allowed |= accel.split(':').any(|a| a == "tcg");
                }
                if machine.memory_backend.is_some() {
                    self.memory_backend = machine.memory_backend;
                }
            }
            "accel" => self.tcg_allowed |= accel_name(need()?) == "tcg",
            "enable-kvm" | "nodefaults" | "no-user-config" | "nodefconfig" => {}
            "kernel" => self.kernel = Some(PathBuf::from(need()?)),
            "initrd" => self.initrd = Some(PathBuf::from(need()?)),
            "append" => need()?.clone_into(&mut self.cmdline),
            "no-reboot" => self.no_reboot = true,
            "nographic" => {}
            "display" | "vga" => self.ignored.push(format!("-{name} {}", need()?)),
            "usb" => self.ignored.push("-usb".into()),
            "serial" => self.serial(need()?)?,
            "monitor" => self.monitor(need()?)?,
            "qmp" => self.qmp(need()?)?,
            "pidfile" => self.pidfile = Some(PathBuf::from(need()?)),
            "D" => self.log_file = Some(PathBuf::from(need()?)),
            "sandbox" => self.seccomp = sandbox(need()?)?,
            "rtc" => check_rtc(need()?)?,
            "daemonize" => {
                return Err(unsupported(
                    "-daemonize: nixvmm stays in the foreground, where its exit status is the \
                     guest's; start it in the background (`&`) or under a supervisor",
                ))
            }
            "readconfig" => {
                return Err(unsupported(
                    "-readconfig: nixvmm reads its options from the command line only; write \
                     them there",
                ))
            }
            "device" => self.devices.device(need()?)?,
            "drive" => self.devices.drive(need()?)?,
            "netdev" => self.devices.netdev(need()?)?,
            "net" => self.devices.net(need()?)?,
            "nic" => self.devices.nic(need()?)?,
            "virtfs" => self.devices.virtfs(need()?)?,
            "chardev" => self.devices.chardev(need()?)?,
            "object" => self.devices.object(need()?)?,
            "tpmdev" => self.devices.tpmdev(need()?)?,
            other => {
                return Err(unsupported(format!(
                    "-{other}: nixvmm does not serve this QEMU option (set \
                     NIXVMM_UNKNOWN=fallback to hand such command lines to QEMU)"
                )))
            }
        }
        Ok(())
    }

    /// `-monitor unix:PATH` (nixvmm connects, as the test driver listens),
    /// `-monitor unix:PATH,server=on[,wait=off]` (nixvmm listens) or `none`.
    fn monitor(&mut self, value: &str) -> Result<()> {
        self.monitor_seen = true;
        if value == "none" {
            return Ok(());
        }
        if value == "stdio" {
            if self.monitor.replace(Monitor::Stdio).is_some() {
                return Err(unsupported("-monitor: nixvmm has one monitor"));
            }
            return Ok(());
        }
        let (path, o) = unix_socket("-monitor", value, "-monitor unix:PATH[,server=on]")?;
        let path = PathBuf::from(path);
        let monitor = if o.flag("server", false).map_err(option_error)? {
            Monitor::Listen {
                path,
                wait: o.flag("wait", true).map_err(option_error)?,
            }
        } else {
            Monitor::Connect(path)
        };
        if self.monitor.replace(monitor).is_some() {
            return Err(unsupported("-monitor: nixvmm has one monitor"));
        }
        Ok(())
    }

    /// `-qmp unix:PATH,server=on,wait=off`: nixvmm listens, clients come when they like.
    fn qmp(&mut self, value: &str) -> Result<()> {
        self.monitor_seen = true;
        let (path, o) = unix_socket("-qmp", value, "-qmp unix:PATH,server=on,wait=off")?;
        if !o.flag("server", false).map_err(option_error)?
            || o.flag("wait", true).map_err(option_error)?
        {
            return Err(unsupported(format!(
                "-qmp {value}: nixvmm's QMP socket is a server that does not wait for its \
                 first client; write server=on,wait=off"
            )));
        }
        if self.qmp.replace(PathBuf::from(path)).is_some() {
            return Err(unsupported("-qmp: nixvmm has one QMP socket"));
        }
        Ok(())
    }

    /// nixvmm's one serial port (ttyS0): `-serial stdio` (every byte typed goes to the
    /// guest), `mon:stdio` (Ctrl-A x quits, Ctrl-A c reaches the monitor; the default, as
    /// `-nographic`'s, unless a `-monitor` or `-qmp` is given), `none`, `null`, `file:PATH`,
    /// or `chardev:ID` naming a file or null chardev.
    fn serial(&mut self, value: &str) -> Result<()> {
        if self.serial_seen {
            return Err(unsupported(format!(
                "-serial {value}: nixvmm has one serial port (ttyS0)"
            )));
        }
        self.serial_seen = true;
        self.serial = match value {
            "stdio" => Serial::Stdio { escapes: false },
            "mon:stdio" => Serial::Stdio { escapes: true },
            "none" | "null" => Serial::Null,
            other => match (other.strip_prefix("file:"), other.strip_prefix("chardev:")) {
                (Some(path), _) if !path.is_empty() => Serial::File(PathBuf::from(path)),
                (_, Some(id)) => match self.devices.chardev_spec(id) {
                    Some(ChardevSpec::File { path }) => Serial::File(path.clone()),
                    Some(ChardevSpec::Null) => Serial::Null,
                    Some(_) => {
                        return Err(unsupported(format!(
                            "-serial {other}: nixvmm's serial port takes a file or null \
                             chardev (a socket is not served yet)"
                        )))
                    }
                    None => {
                        return Err(invalid(format!(
                            "-serial {other}: no -chardev …,id={id} before it"
                        )))
                    }
                },
                _ => {
                    return Err(unsupported(format!(
                        "-serial {other}: nixvmm's serial port takes stdio, mon:stdio, none, \
                         null, file:PATH or chardev:ID"
                    )))
                }
            },
        };
        Ok(())
    }
}

/// `unix:PATH[,server=…][,wait=…]` as `-monitor` and `-qmp` take it; `form` is what to write.
fn unix_socket(option: &str, value: &str, form: &str) -> Result<(String, Options)> {
    let mut items = split_items(value);
    let path = match items.first().and_then(|first| first.strip_prefix("unix:")) {
        Some(path) => path.to_string(),
        None => {
            return Err(unsupported(format!(
                "{option} {value}: nixvmm's {option} is a Unix socket; write {form}"
            )))
        }
    };
    items.remove(0);
    let o = Options::parse_items(option, items, &["server", "wait"], &[]).map_err(option_error)?;
    Ok((path, o))
}

/// `-m 1024`, `-m 1G`, `-m size=1G` (a bare number is MiB); no memory hotplug.
fn parse_memory(value: &str) -> Result<u64> {
    let items = split_items(value);
    let text = match items.first() {
        Some(first) if !first.contains('=') => {
            let mut rest = items.clone();
            rest[0] = format!("size={first}");
            rest
        }
        _ => items,
    };
    let o = Options::parse_items("-m", text, &["size", "slots", "maxmem"], &[])
        .map_err(option_error)?;
    for key in ["slots", "maxmem"] {
        if let Some(v) = o.get(key) {
            return Err(unsupported(format!(
                "-m {key}={v}: nixvmm has no memory hotplug; give only the size"
            )));
        }
    }
    let size = o.required("size").map_err(option_error)?;
    parse_size(size).map_err(|_| {
        invalid(format!(
            "-m {size}: not a size; write e.g. 1024 (MiB) or 2G"
        ))
    })
}

/// `-smp N[,cpus=N][,sockets=S][,dies=D][,cores=C][,threads=T][,maxcpus=M]`.
fn parse_smp(value: &str) -> Result<u8> {
    let items = with_implied_key(value, "cpus");
    let o = Options::parse_items(
        "-smp",
        items,
        &[
            "cpus", "sockets", "dies", "clusters", "cores", "threads", "maxcpus",
        ],
        &[],
    )
    .map_err(option_error)?;
    let number = |key: &str| -> Result<Option<u32>> {
        o.get(key)
            .map(|v| {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid(format!("-smp {key}={v}: expected a number from 1")))
            })
            .transpose()
    };
    let topology = ["sockets", "dies", "clusters", "cores", "threads"]
        .iter()
        .map(|k| number(k))
        .collect::<Result<Vec<_>>>()?;
    let product = topology
        .iter()
        .flatten()
        .try_fold(1u32, |acc, n| acc.checked_mul(*n));
    let cpus = match (number("cpus")?, topology.iter().any(Option::is_some)) {
        (Some(n), _) => n,
        (None, true) => product.unwrap_or(u32::MAX),
        (None, false) => 1,
    };
    if let Some(max) = number("maxcpus")? {
        if max != cpus {
            return Err(unsupported(format!(
                "-smp maxcpus={max}: nixvmm has no CPU hotplug; give maxcpus equal to the \
                 CPU count ({cpus}) or leave it out"
            )));
        }
    }
    u8::try_from(cpus)
        .ok()
        .filter(|n| *n <= MAX_CPUS)
        .ok_or_else(|| invalid(format!("-smp {value}: at most {MAX_CPUS} vCPUs")))
}

/// nixvmm gives the guest the host CPU as KVM supports it: `max`, `host`, or the generic
/// x86-64 models whose flags a Linux guest probes rather than assumes.
fn check_cpu(value: &str) -> Result<()> {
    let model = split_items(value).into_iter().next().unwrap_or_default();
    match model.as_str() {
        "max" | "host" | "kvm64" | "qemu64" => Ok(()),
        other => Err(unsupported(format!(
            "-cpu {other}: nixvmm gives the guest the host's CPU (as -cpu host); write -cpu \
             max or -cpu host"
        ))),
    }
}

/// `-rtc base=utc[,clock=host][,driftfix=…]`: the CMOS clock reads the host's UTC time.
fn check_rtc(value: &str) -> Result<()> {
    let o = Options::parse("-rtc", value, &["base", "clock", "driftfix"]).map_err(option_error)?;
    match o.get("base") {
        None | Some("utc") => Ok(()),
        Some(other) => Err(unsupported(format!(
            "-rtc base={other}: nixvmm's clock runs on UTC; write base=utc"
        ))),
    }
}
