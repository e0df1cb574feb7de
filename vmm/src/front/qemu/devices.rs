//! QEMU's device options (`-device`, `-drive`, `-netdev`, `-net`, `-nic`, `-virtfs`,
//! `-chardev`, `-object`) onto nixvmm's disks, NICs, shares, console ports and rng. A device may name its
//! backend before the backend's option comes (`-net nic,netdev=user.0 -netdev user,id=user.0`),
//! so references are resolved at the end, in the order the devices came.

use std::path::PathBuf;

use virtio::block::{BlockConfig, Format};
use virtio::ninep::ShareConfig;

use super::{invalid, option_error, unsupported, Result};
use crate::config::console::{chardev_from, ChardevSpec, PortSpec};
use crate::config::net::{parse_mac, parse_net_as, NicConfig};
use crate::config::options::{split_items, Options};
use crate::config::{parse_size, Share, VsockConfig};

/// Devices a headless VMM accepts and does without: graphics and USB input.
const HEADLESS: &[&str] = &[
    "virtio-keyboard",
    "virtio-keyboard-pci",
    "virtio-mouse",
    "virtio-mouse-pci",
    "virtio-tablet",
    "virtio-tablet-pci",
    "usb-tablet",
    "usb-kbd",
    "usb-mouse",
    "usb-ehci",
    "qemu-xhci",
    "nec-usb-xhci",
    "piix3-usb-uhci",
    "VGA",
    "virtio-vga",
    "virtio-gpu-pci",
    "qxl-vga",
    "cirrus-vga",
    "bochs-display",
    "ramfb",
];

/// Keys every PCI device takes that change nothing for nixvmm (its own slot numbering).
const PCI_KEYS: &[&str] = &["id", "bus", "addr", "multifunction", "romfile", "bootindex"];

#[derive(Default)]
pub struct Devices {
    drives: Vec<Drive>,
    netdevs: Vec<(String, NicConfig)>,
    chardevs: Vec<Chardev>,
    memory_backends: Vec<(String, u64)>,
    rng_objects: Vec<String>,
    /// `-tpmdev emulator,id=ID,chardev=CHARDEV`: (ID, CHARDEV).
    tpmdevs: Vec<(String, String)>,
    /// Devices in command-line order, their backends not yet looked up.
    pending: Vec<Pending>,
    rng: bool,
    /// A `-device virtio-serial` came: console ports may follow.
    serial_bus: bool,
    ignored: Vec<String>,
}

struct Drive {
    id: Option<String>,
    config: BlockConfig,
    /// `if=virtio`: a disk by itself; `if=none`: a backend for `-device virtio-blk-pci`.
    standalone: bool,
}

struct Chardev {
    id: String,
    spec: ChardevSpec,
}

enum Pending {
    Disk {
        drive: String,
        serial: Option<String>,
    },
    Nic {
        netdev: String,
        mac: Option<[u8; 6]>,
    },
    ReadyNic(NicConfig),
    VhostUserVsock {
        chardev: String,
    },
    Vsock(VsockConfig),
    VhostUserFs {
        chardev: String,
        tag: String,
    },
    Share(Share),
    Port {
        console: bool,
        name: Option<String>,
        chardev: String,
    },
    Tpm {
        tpmdev: String,
    },
}

/// The devices, their backends resolved.
pub struct Resolved {
    pub rng: bool,
    pub disks: Vec<BlockConfig>,
    pub shares: Vec<Share>,
    pub nics: Vec<NicConfig>,
    pub ports: Vec<PortSpec>,
    pub vsock: Option<VsockConfig>,
    /// swtpm's control socket.
    pub tpm: Option<PathBuf>,
    pub ignored: Vec<String>,
}

/// `DRIVER,key=value,…` with the driver as the first word or as `driver=`.
fn driver_and_items(option: &str, value: &str) -> Result<(String, Vec<String>)> {
    let mut items = split_items(value);
    if items.first().is_some_and(|i| !i.contains('=')) {
        let driver = items.remove(0);
        return Ok((driver, items));
    }
    match items.iter().position(|i| i.starts_with("driver=")) {
        Some(at) => {
            let driver = items.remove(at)["driver=".len()..].to_string();
            Ok((driver, items))
        }
        None => Err(invalid(format!("{option} {value}: name the driver first"))),
    }
}

fn keys<'a>(specific: &[&'a str]) -> Vec<&'a str> {
    let mut all = PCI_KEYS.to_vec();
    all.extend_from_slice(specific);
    all
}

fn serial(option: &str, o: &Options) -> Result<Option<String>> {
    match o.get("serial") {
        Some(s) if s.len() > 20 => Err(invalid(format!(
            "{option} serial={s}: at most 20 characters"
        ))),
        other => Ok(other.map(String::from)),
    }
}

impl Devices {
    pub fn device(&mut self, value: &str) -> Result<()> {
        let (driver, items) = driver_and_items("-device", value)?;
        let option = format!("-device {driver}");
        let parse = |specific: &[&str]| {
            Options::parse_items(&option, items.clone(), &keys(specific), &[]).map_err(option_error)
        };
        match driver.as_str() {
            "virtio-rng-pci" | "virtio-rng" => {
                let o = parse(&["rng", "max-bytes", "period"])?;
                if let Some(id) = o.get("rng") {
                    if !self.rng_objects.iter().any(|r| r == id) {
                        return Err(invalid(format!(
                            "{option},rng={id}: no -object rng-random or rng-builtin with id={id}"
                        )));
                    }
                }
                self.rng = true;
            }
            "virtio-blk-pci" | "virtio-blk" => {
                let o = parse(&["drive", "serial", "num-queues", "queue-size", "write-cache"])?;
                self.pending.push(Pending::Disk {
                    drive: o.required("drive").map_err(option_error)?.to_string(),
                    serial: serial(&option, &o)?,
                });
            }
            "virtio-net-pci" | "virtio-net" => {
                let o = parse(&["netdev", "mac"])?;
                self.pending.push(Pending::Nic {
                    netdev: o.required("netdev").map_err(option_error)?.to_string(),
                    mac: o
                        .get("mac")
                        .map(|m| parse_mac(&o, m))
                        .transpose()
                        .map_err(option_error)?,
                });
            }
            "vhost-user-fs-pci" | "vhost-user-fs" => {
                let o = parse(&["chardev", "tag", "queue-size", "num-request-queues"])?;
                let tag = o.required("tag").map_err(option_error)?.to_string();
                if let Err(need) = virtio::fs::check_tag(&tag) {
                    return Err(invalid(format!("{option} tag={tag}: {need}")));
                }
                self.pending.push(Pending::VhostUserFs {
                    chardev: o.required("chardev").map_err(option_error)?.to_string(),
                    tag,
                });
            }
            headless if HEADLESS.contains(&headless) => {
                self.ignored.push(format!("-device {headless}"));
            }
            "virtio-serial" | "virtio-serial-pci" => {
                parse(&["max_ports", "vectors", "ioeventfd"])?;
                self.serial_bus = true;
            }
            "virtconsole" | "virtserialport" => {
                let o = parse(&["chardev", "name", "nr"])?;
                if !self.serial_bus {
                    return Err(invalid(format!(
                        "{option}: needs a -device virtio-serial before it"
                    )));
                }
                let console = driver == "virtconsole";
                let name = o.get("name").map(String::from);
                if !console && name.is_none() {
                    return Err(invalid(format!(
                        "{option}: give the port a name= (the guest's /dev/virtio-ports/NAME)"
                    )));
                }
                self.pending.push(Pending::Port {
                    console,
                    name,
                    chardev: o.required("chardev").map_err(option_error)?.to_string(),
                });
            }
            "vhost-user-vsock-pci" | "vhost-user-vsock" => {
                let o = parse(&["chardev"])?;
                self.pending.push(Pending::VhostUserVsock {
                    chardev: o.required("chardev").map_err(option_error)?.to_string(),
                });
            }
            "vhost-vsock-pci" | "vhost-vsock" => {
                let o = parse(&["guest-cid", "vhostfd"])?;
                if o.get("vhostfd").is_some() {
                    return Err(unsupported(format!(
                        "{option},vhostfd=…: nixvmm opens /dev/vhost-vsock itself; drop vhostfd"
                    )));
                }
                let cid = o.required("guest-cid").map_err(option_error)?;
                let cid = crate::config::parse_guest_cid("-device vhost-vsock-pci,guest-cid", cid)
                    .map_err(|e| invalid(e.to_string()))?;
                self.pending
                    .push(Pending::Vsock(VsockConfig::Kernel { cid }));
            }
            "tpm-tis" => {
                let o = parse(&["tpmdev"])?;
                self.pending.push(Pending::Tpm {
                    tpmdev: o.required("tpmdev").map_err(option_error)?.to_string(),
                });
            }
            "tpm-crb" => {
                return Err(unsupported(format!(
                    "{option}: nixvmm's TPM is tpm-tis (give -device tpm-tis,tpmdev=…)"
                )))
            }
            other => {
                return Err(unsupported(format!(
                    "-device {other}: not a device nixvmm has (it serves virtio-rng-pci, \
                     virtio-blk-pci, virtio-net-pci, vhost-user-fs-pci, vhost-user-vsock-pci, \
                     virtio-serial with \
                     virtconsole and virtserialport; set \
                     NIXVMM_UNKNOWN=fallback to hand such command lines to QEMU)"
                )))
            }
        }
        Ok(())
    }

    pub fn drive(&mut self, value: &str) -> Result<()> {
        let o = Options::parse(
            "-drive",
            value,
            &[
                "file",
                "format",
                "if",
                "id",
                "index",
                "cache",
                "werror",
                "rerror",
                "readonly",
                "serial",
                "aio",
                "discard",
                "media",
                "snapshot",
                "detect-zeroes",
                "cache.direct",
                "cache.no-flush",
            ],
        )
        .map_err(option_error)?;
        let standalone = match o.get("if").unwrap_or("ide") {
            "virtio" => true,
            "none" => false,
            other => {
                return Err(unsupported(format!(
                    "-drive if={other}: nixvmm's disks are virtio; write if=virtio, or if=none \
                     with -device virtio-blk-pci,drive=ID"
                )))
            }
        };
        o.choice(
            "cache",
            &["writeback", "none", "writethrough", "directsync", "unsafe"],
        )
        .map_err(option_error)?;
        for key in ["werror", "rerror"] {
            if let Some(v) = o.get(key).filter(|v| *v != "report") {
                return Err(unsupported(format!(
                    "-drive {key}={v}: nixvmm reports I/O errors to the guest; write \
                     {key}=report"
                )));
            }
        }
        if let Some(media) = o.get("media").filter(|m| *m != "disk") {
            return Err(unsupported(format!(
                "-drive media={media}: nixvmm has disks only"
            )));
        }
        if o.flag("snapshot", false).map_err(option_error)? {
            return Err(unsupported(
                "-drive snapshot=on: nixvmm writes to the image; use a qcow2 overlay \
                 (qemu-img create -f qcow2 -b IMAGE -F FORMAT overlay.qcow2)",
            ));
        }
        let format = match o.get("format") {
            None => None,
            Some("raw") => Some(Format::Raw),
            Some("qcow2") => Some(Format::Qcow2),
            Some(other) => {
                return Err(unsupported(format!(
                    "-drive format={other}: nixvmm reads raw and qcow2 images"
                )))
            }
        };
        let file = o.get("file").ok_or_else(|| {
            unsupported("-drive without file=: nixvmm has no empty drives (e.g. CD-ROM drives)")
        })?;
        let path = PathBuf::from(file);
        if !path.is_file() {
            return Err(invalid(format!(
                "-drive file={file}: file not found; check the path"
            )));
        }
        self.drives.push(Drive {
            id: o.get("id").map(String::from),
            config: BlockConfig {
                path,
                format,
                readonly: o.flag("readonly", false).map_err(option_error)?,
                serial: serial("-drive", &o)?,
            },
            standalone,
        });
        Ok(())
    }

    pub fn netdev(&mut self, value: &str) -> Result<()> {
        let items = split_items(value);
        let kind = items.first().map(String::as_str).unwrap_or_default();
        if !matches!(kind, "user" | "vde" | "tap") {
            return Err(unsupported(format!(
                "-netdev {kind}: nixvmm's networks are user, vde and tap"
            )));
        }
        let id = items
            .iter()
            .find_map(|i| i.strip_prefix("id="))
            .ok_or_else(|| invalid(format!("-netdev {kind}: `id` is required")))?
            .to_string();
        let nic = parse_net_as("-netdev", value).map_err(option_error)?;
        if self.netdevs.iter().any(|(other, _)| *other == id) {
            return Err(invalid(format!("-netdev id={id}: given twice")));
        }
        self.netdevs.push((id, nic));
        Ok(())
    }

    /// `-net nic,netdev=ID[,model=virtio][,macaddr=MAC]` or `-net none`.
    pub fn net(&mut self, value: &str) -> Result<()> {
        let (kind, items) = driver_and_items("-net", value)?;
        match kind.as_str() {
            "none" => Ok(()),
            "nic" => {
                let o = Options::parse_items(
                    "-net nic",
                    items,
                    &[
                        "netdev", "model", "macaddr", "id", "name", "addr", "vectors",
                    ],
                    &[],
                )
                .map_err(option_error)?;
                if let Some(model) = o.get("model").filter(|m| *m != "virtio") {
                    return Err(unsupported(format!(
                        "-net nic,model={model}: nixvmm's NIC is virtio; write model=virtio"
                    )));
                }
                let netdev = o.get("netdev").ok_or_else(|| {
                    unsupported(
                        "-net nic without netdev=: nixvmm has no QEMU hubs; write -netdev \
                         …,id=ID and -net nic,netdev=ID,model=virtio",
                    )
                })?;
                self.pending.push(Pending::Nic {
                    netdev: netdev.to_string(),
                    mac: o
                        .get("macaddr")
                        .map(|m| parse_mac(&o, m))
                        .transpose()
                        .map_err(option_error)?,
                });
                Ok(())
            }
            other => Err(unsupported(format!(
                "-net {other}: nixvmm has no QEMU hubs; write -netdev {other},id=ID with -net \
                 nic,netdev=ID,model=virtio"
            ))),
        }
    }

    /// `-nic KIND,…`: a NIC and its network in one option.
    pub fn nic(&mut self, value: &str) -> Result<()> {
        if value == "none" {
            return Ok(());
        }
        let kind = split_items(value).into_iter().next().unwrap_or_default();
        if !matches!(kind.as_str(), "user" | "vde" | "tap") {
            return Err(unsupported(format!(
                "-nic {kind}: nixvmm's networks are user, vde and tap"
            )));
        }
        let nic = parse_net_as("-nic", value).map_err(option_error)?;
        self.pending.push(Pending::ReadyNic(nic));
        Ok(())
    }

    /// `-virtfs local,path=DIR,mount_tag=TAG,security_model=M[,readonly=on][,multidevs=…]`.
    pub fn virtfs(&mut self, value: &str) -> Result<()> {
        let (driver, items) = driver_and_items("-virtfs", value)?;
        if driver != "local" {
            return Err(unsupported(format!(
                "-virtfs {driver}: nixvmm shares host directories (-virtfs local,…)"
            )));
        }
        let o = Options::parse_items(
            "-virtfs local",
            items,
            &[
                "path",
                "mount_tag",
                "security_model",
                "readonly",
                "multidevs",
                "id",
                "writeout",
                "fmode",
                "dmode",
            ],
            &[],
        )
        .map_err(option_error)?;
        let path = o.required("path").map_err(option_error)?;
        if !std::path::Path::new(path).is_dir() {
            return Err(invalid(format!(
                "-virtfs path={path}: no such directory; check the path"
            )));
        }
        let tag = o.required("mount_tag").map_err(option_error)?;
        let model = o.required("security_model").map_err(option_error)?;
        let security_model = model
            .parse()
            .map_err(|why: String| invalid(format!("-virtfs security_model={model}: {why}")))?;
        o.choice("multidevs", &["remap", "forbid", "warn"])
            .map_err(option_error)?;
        self.pending.push(Pending::Share(Share::NineP {
            tag: tag.to_string(),
            config: ShareConfig {
                root: path.into(),
                readonly: o.flag("readonly", false).map_err(option_error)?,
                security_model,
            },
        }));
        Ok(())
    }

    /// `-chardev socket|file|null|pipe|pty|stdio,id=ID,…`: a console port's host side, or the frontend
    /// side of a vhost-user connection (a socket nixvmm connects to).
    pub fn chardev(&mut self, value: &str) -> Result<()> {
        let (backend, items) = driver_and_items("-chardev", value)?;
        let option = format!("-chardev {backend}");
        let o = Options::parse_items(
            &option,
            items,
            &[
                "id",
                "path",
                "server",
                "wait",
                "reconnect",
                "reconnect-ms",
                "append",
                "logfile",
                "signal",
            ],
            &[],
        )
        .map_err(option_error)?;
        if o.get("logfile").is_some() || o.flag("append", false).map_err(option_error)? {
            return Err(unsupported(format!(
                "{option}: logfile= and append=on are not served yet"
            )));
        }
        let spec = match backend.as_str() {
            "socket" | "file" | "null" | "pipe" | "pty" | "stdio" => {
                chardev_from(&backend, &o, &option).map_err(option_error)?
            }
            other => {
                return Err(unsupported(format!(
                    "-chardev {other}: nixvmm's chardevs are socket (Unix), file, null, pipe, \
                     pty and stdio"
                )))
            }
        };
        self.chardevs.push(Chardev {
            id: o.required("id").map_err(option_error)?.to_string(),
            spec,
        });
        Ok(())
    }

    /// `-tpmdev emulator,id=ID,chardev=CHARDEV`: swtpm, reached through a `-chardev socket`.
    pub fn tpmdev(&mut self, value: &str) -> Result<()> {
        let (backend, items) = driver_and_items("-tpmdev", value)?;
        if backend != "emulator" {
            return Err(unsupported(format!(
                "-tpmdev {backend}: nixvmm's TPM is swtpm's (-tpmdev emulator,chardev=…)"
            )));
        }
        let o = Options::parse_items("-tpmdev emulator", items, &["id", "chardev"], &[])
            .map_err(option_error)?;
        self.tpmdevs.push((
            o.required("id").map_err(option_error)?.to_string(),
            o.required("chardev").map_err(option_error)?.to_string(),
        ));
        Ok(())
    }

    /// The socket of a vhost-user backend, from the `-chardev socket` the device names.
    fn backend_socket(&self, device: &str, chardev: &str) -> Result<PathBuf> {
        match self.find_chardev(device, chardev)? {
            ChardevSpec::SocketClient { path, .. } => Ok(path.clone()),
            _ => Err(unsupported(format!(
                "{device},chardev={chardev}: nixvmm connects to vhost-user backends; give \
                 -chardev socket,id={chardev},path=… without server=on"
            ))),
        }
    }

    /// The chardev `-chardev …,id=ID` defined so far.
    pub fn chardev_spec(&self, id: &str) -> Option<&ChardevSpec> {
        self.chardevs.iter().find(|c| c.id == id).map(|c| &c.spec)
    }

    fn find_chardev(&self, device: &str, id: &str) -> Result<&ChardevSpec> {
        self.chardevs
            .iter()
            .find(|c| c.id == id)
            .map(|c| &c.spec)
            .ok_or_else(|| invalid(format!("{device},chardev={id}: no -chardev …,id={id}")))
    }

    /// `-object memory-backend-memfd|file|ram,id=ID,size=S,…` and `-object rng-…,id=ID`.
    pub fn object(&mut self, value: &str) -> Result<()> {
        let (kind, items) = driver_and_items("-object", value)?;
        let option = format!("-object {kind}");
        match kind.as_str() {
            "memory-backend-memfd" | "memory-backend-file" | "memory-backend-ram" => {
                // nixvmm's guest RAM is always one shareable memfd; how QEMU would back it
                // changes nothing here.
                let o = Options::parse_items(
                    &option,
                    items,
                    &[
                        "id",
                        "size",
                        "share",
                        "mem-path",
                        "prealloc",
                        "merge",
                        "dump",
                        "seal",
                        "reserve",
                        "discard-data",
                    ],
                    &[],
                )
                .map_err(option_error)?;
                let size = o.required("size").map_err(option_error)?;
                let bytes = parse_size(size)
                    .map_err(|_| invalid(format!("{option} size={size}: not a size")))?;
                self.memory_backends
                    .push((o.required("id").map_err(option_error)?.to_string(), bytes));
            }
            "rng-random" | "rng-builtin" => {
                // The guest's entropy comes from the host's getrandom either way.
                let o = Options::parse_items(&option, items, &["id", "filename"], &[])
                    .map_err(option_error)?;
                self.rng_objects
                    .push(o.required("id").map_err(option_error)?.to_string());
            }
            other => {
                return Err(unsupported(format!(
                    "-object {other}: nixvmm knows memory backends and rng objects only"
                )))
            }
        }
        Ok(())
    }

    pub fn memory_backend_size(&self, id: &str) -> Option<u64> {
        self.memory_backends
            .iter()
            .find(|(other, _)| other == id)
            .map(|(_, size)| *size)
    }

    /// Looks every reference up, in device order.
    pub fn finish(&mut self) -> Result<Resolved> {
        let mut resolved = Resolved {
            rng: self.rng,
            disks: Vec::new(),
            shares: Vec::new(),
            nics: Vec::new(),
            ports: Vec::new(),
            vsock: None,
            tpm: None,
            ignored: std::mem::take(&mut self.ignored),
        };
        resolved.disks.extend(
            self.drives
                .iter()
                .filter(|d| d.standalone)
                .map(|d| d.config.clone()),
        );
        let mut used_netdevs = Vec::new();
        let mut used_drives = Vec::new();
        let mut used_chardevs: Vec<String> = Vec::new();
        for pending in std::mem::take(&mut self.pending) {
            match pending {
                Pending::Disk { drive, serial } => {
                    let found = self
                        .drives
                        .iter()
                        .find(|d| !d.standalone && d.id.as_deref() == Some(drive.as_str()))
                        .ok_or_else(|| {
                            invalid(format!(
                                "-device virtio-blk-pci,drive={drive}: no -drive \
                                 if=none,id={drive}"
                            ))
                        })?;
                    if used_drives.contains(&drive) {
                        return Err(invalid(format!("-drive id={drive}: used by two devices")));
                    }
                    let mut config = found.config.clone();
                    config.serial = serial.or(config.serial);
                    resolved.disks.push(config);
                    used_drives.push(drive);
                }
                Pending::Nic { netdev, mac } => {
                    let (_, nic) = self
                        .netdevs
                        .iter()
                        .find(|(id, _)| *id == netdev)
                        .ok_or_else(|| {
                            invalid(format!("netdev={netdev}: no -netdev …,id={netdev}"))
                        })?;
                    if used_netdevs.contains(&netdev) {
                        return Err(invalid(format!("-netdev id={netdev}: used by two NICs")));
                    }
                    let mut nic = nic.clone();
                    nic.mac = mac.or(nic.mac);
                    resolved.nics.push(nic);
                    used_netdevs.push(netdev);
                }
                Pending::ReadyNic(nic) => resolved.nics.push(nic),
                Pending::VhostUserFs { chardev, tag } => {
                    let socket = self.backend_socket("vhost-user-fs-pci", &chardev)?;
                    resolved.shares.push(Share::VhostUser { tag, socket });
                }
                Pending::VhostUserVsock { chardev } => {
                    if resolved.vsock.is_some() {
                        return Err(unsupported("vhost-user-vsock-pci: nixvmm has one vsock"));
                    }
                    let socket = self.backend_socket("vhost-user-vsock-pci", &chardev)?;
                    resolved.vsock = Some(VsockConfig::VhostUser { socket });
                }
                Pending::Vsock(vsock) => {
                    if resolved.vsock.is_some() {
                        return Err(unsupported("vhost-vsock-pci: nixvmm has one vsock"));
                    }
                    resolved.vsock = Some(vsock);
                }
                Pending::Port {
                    console,
                    name,
                    chardev,
                } => {
                    let device = if console {
                        "virtconsole"
                    } else {
                        "virtserialport"
                    };
                    if used_chardevs.contains(&chardev) {
                        return Err(invalid(format!("-chardev id={chardev}: used by two ports")));
                    }
                    let spec = self.find_chardev(device, &chardev)?.clone();
                    resolved.ports.push(PortSpec {
                        console,
                        name,
                        chardev: spec,
                    });
                    used_chardevs.push(chardev);
                }
                Pending::Share(share) => resolved.shares.push(share),
                Pending::Tpm { tpmdev } => {
                    let device = format!("-device tpm-tis,tpmdev={tpmdev}");
                    if resolved.tpm.is_some() {
                        return Err(unsupported("tpm-tis: nixvmm has one TPM"));
                    }
                    let (_, chardev) = self
                        .tpmdevs
                        .iter()
                        .find(|(id, _)| *id == tpmdev)
                        .ok_or_else(|| invalid(format!("{device}: no -tpmdev …,id={tpmdev}")))?;
                    let socket = match self.find_chardev("-tpmdev emulator", chardev)? {
                        ChardevSpec::SocketClient { path, .. } => path.clone(),
                        _ => {
                            return Err(unsupported(format!(
                                "-tpmdev emulator,chardev={chardev}: give -chardev \
                                 socket,id={chardev},path=SWTPM_CONTROL_SOCKET"
                            )))
                        }
                    };
                    resolved.tpm = Some(socket);
                }
            }
        }
        for (id, _) in &self.netdevs {
            if !used_netdevs.contains(id) {
                resolved
                    .ignored
                    .push(format!("-netdev id={id} (no NIC uses it)"));
            }
        }
        Ok(resolved)
    }
}
