//! `--net KIND,key=value,…`: a virtio-net NIC and the network behind it, written as QEMU's
//! `-netdev KIND,…` takes it (so the QEMU door shares this parser). `user` is QEMU's
//! user-mode network (libslirp) with its defaults: 10.0.2.0/24, host 10.0.2.2, DNS 10.0.2.3,
//! DHCP from 10.0.2.15, IPv6 fec0::/64.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::config::options::{split_items, OptionError, Options};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicConfig {
    /// The NIC's MAC; `None` takes QEMU's default numbering (52:54:00:12:34:56, :57, …).
    pub mac: Option<[u8; 6]>,
    pub backend: NetBackend,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetBackend {
    User(UserNet),
    /// A port on the VDE switch whose socket directory this is.
    Vde {
        sock: std::path::PathBuf,
    },
    /// A host tap device, by name or as an inherited descriptor.
    Tap(TapTarget),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapTarget {
    Name(String),
    Fd(i32),
}

/// The network mask of a `prefix_len`-bit prefix (0 to 32).
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len.min(32)))
            .unwrap_or(0),
    )
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserNet {
    pub ipv4: bool,
    pub net: Ipv4Addr,
    pub prefix_len: u8,
    pub host: Ipv4Addr,
    pub dhcp_start: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub ipv6: bool,
    pub ipv6_prefix: Ipv6Addr,
    pub ipv6_prefix_len: u8,
    pub ipv6_host: Ipv6Addr,
    pub ipv6_dns: Ipv6Addr,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub dnssearch: Vec<String>,
    /// `restrict=on`: the guest reaches nothing outside but forwarded ports.
    pub restrict: bool,
    pub hostfwd: Vec<HostFwd>,
    pub guestfwd: Vec<GuestFwd>,
}

/// `hostfwd=[tcp|udp]:[haddr]:hport-[gaddr]:gport`: connections to the host's `haddr:hport`
/// reach the guest's `gaddr:gport` (the first DHCP address when `gaddr` is empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_addr: Option<Ipv4Addr>,
    pub guest_port: u16,
}

/// `guestfwd=[tcp]:addr:port-TARGET`: the guest's connections to `addr:port` reach TARGET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestFwd {
    pub addr: Option<Ipv4Addr>,
    pub port: u16,
    pub target: GuestFwdTarget,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestFwdTarget {
    /// `cmd:COMMAND`: a command run per connection, on its stdin and stdout.
    Command(String),
    /// `tcp:HOST:PORT`: a new connection from the host to HOST:PORT per guest connection.
    Tcp { host: String, port: u16 },
}

const USER_KEYS: &[&str] = &[
    "id",
    "mac",
    "model",
    "ipv4",
    "net",
    "host",
    "dhcpstart",
    "dns",
    "ipv6",
    "ipv6-net",
    "ipv6-host",
    "ipv6-dns",
    "hostname",
    "domainname",
    "dnssearch",
    "restrict",
    "hostfwd",
    "guestfwd",
];
const USER_REPEATABLE: &[&str] = &["hostfwd", "guestfwd", "dnssearch"];

/// Parses a whole `--net` value.
pub fn parse_net(text: &str) -> Result<NicConfig, OptionError> {
    parse_net_as("--net", text)
}

/// Parses a network written as `option` takes it (`--net`, or QEMU's `-netdev` and `-nic`),
/// errors naming `option`.
pub fn parse_net_as(option: &str, text: &str) -> Result<NicConfig, OptionError> {
    let mut items = split_items(text);
    let kind = if items.first().is_some_and(|i| !i.contains('=')) {
        items.remove(0)
    } else {
        String::new()
    };
    match kind.as_str() {
        "user" => {
            let o =
                Options::parse_items(&format!("{option} user"), items, USER_KEYS, USER_REPEATABLE)?;
            check_model(&o)?;
            Ok(NicConfig {
                mac: o.get("mac").map(|m| parse_mac(&o, m)).transpose()?,
                backend: NetBackend::User(user_net(&o)?),
            })
        }
        "vde" => {
            let o = Options::parse_items(
                &format!("{option} vde"),
                items,
                &["id", "mac", "model", "sock"],
                &[],
            )?;
            check_model(&o)?;
            Ok(NicConfig {
                mac: o.get("mac").map(|m| parse_mac(&o, m)).transpose()?,
                backend: NetBackend::Vde {
                    sock: o.required("sock")?.into(),
                },
            })
        }
        "tap" => {
            let o = Options::parse_items(
                &format!("{option} tap"),
                items,
                &[
                    "id",
                    "mac",
                    "model",
                    "ifname",
                    "fd",
                    "script",
                    "downscript",
                    "vnet_hdr",
                ],
                &[],
            )?;
            check_model(&o)?;
            for key in ["script", "downscript"] {
                if let Some(v) = o.get(key) {
                    if v != "no" {
                        return Err(o.bad(
                            key,
                            v,
                            "nixvmm runs no scripts: set the tap up first and write no",
                        ));
                    }
                }
            }
            if !o.flag("vnet_hdr", true)? {
                return Err(o.bad(
                    "vnet_hdr",
                    "off",
                    "nixvmm's tap NICs always use vnet headers",
                ));
            }
            let target = match (o.get("ifname"), o.get("fd")) {
                (Some(name), None) => TapTarget::Name(name.to_string()),
                (None, Some(fd)) => {
                    TapTarget::Fd(fd.parse().ok().filter(|fd| *fd >= 0).ok_or_else(|| {
                        o.bad("fd", fd, "expected an open file descriptor number")
                    })?)
                }
                _ => {
                    return Err(o.bad(
                        "ifname",
                        o.get("ifname").unwrap_or(""),
                        "give exactly one of ifname=NAME and fd=N",
                    ))
                }
            };
            Ok(NicConfig {
                mac: o.get("mac").map(|m| parse_mac(&o, m)).transpose()?,
                backend: NetBackend::Tap(target),
            })
        }
        other => Err(OptionError::BadValue {
            option: option.into(),
            key: "the first word".into(),
            value: other.into(),
            expected: format!(
                "expected `user` (e.g. {option} user,hostfwd=tcp::2222-:22), `vde` \
                 ({option} vde,sock=DIR) or `tap` ({option} tap,ifname=tap0)"
            ),
        }),
    }
}

pub fn parse_mac(o: &Options, text: &str) -> Result<[u8; 6], OptionError> {
    let bad = || {
        o.bad(
            "mac",
            text,
            "expected six hex bytes such as 52:54:00:12:34:56",
        )
    };
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| {
            if b.len() == 2 {
                u8::from_str_radix(b, 16).map_err(|_| bad())
            } else {
                Err(bad())
            }
        })
        .collect::<Result<_, _>>()?;
    let mac: [u8; 6] = bytes.try_into().map_err(|_| bad())?;
    if mac[0] & 1 != 0 {
        return Err(o.bad(
            "mac",
            text,
            "a multicast address cannot be a NIC's (first byte even)",
        ));
    }
    Ok(mac)
}

fn ipv4(o: &Options, key: &str, text: &str) -> Result<Ipv4Addr, OptionError> {
    text.parse()
        .map_err(|_| o.bad(key, text, "expected an IPv4 address such as 10.0.2.2"))
}

fn ipv6(o: &Options, key: &str, text: &str) -> Result<Ipv6Addr, OptionError> {
    text.parse()
        .map_err(|_| o.bad(key, text, "expected an IPv6 address such as fec0::2"))
}

/// `net=ADDR[/MASK]` (MASK a prefix length or a dotted mask), as QEMU reads it.
fn parse_network(o: &Options, text: &str) -> Result<(Ipv4Addr, u8), OptionError> {
    let (addr, mask) = text.split_once('/').unwrap_or((text, "24"));
    let addr = ipv4(o, "net", addr)?;
    let bad = || o.bad("net", text, "expected ADDR/PREFIX such as 10.0.2.0/24");
    let prefix = match mask.parse::<u8>() {
        Ok(p) if p <= 32 => p,
        Ok(_) => return Err(bad()),
        Err(_) => {
            let bits = u32::from(mask.parse::<Ipv4Addr>().map_err(|_| bad())?);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(bad());
            }
            bits.leading_ones() as u8
        }
    };
    if !(8..=30).contains(&prefix) {
        return Err(o.bad(
            "net",
            text,
            "the prefix must leave room for hosts (8 to 30)",
        ));
    }
    Ok((addr, prefix))
}

fn check_model(o: &Options) -> Result<(), OptionError> {
    match o.get("model") {
        None | Some("virtio" | "virtio-net-pci") => Ok(()),
        Some(model) => Err(o.bad("model", model, "nixvmm's NIC is virtio (virtio-net-pci)")),
    }
}

fn user_net(o: &Options) -> Result<UserNet, OptionError> {
    let (net, prefix_len) = parse_network(o, o.get("net").unwrap_or("10.0.2.0/24"))?;
    let mask = u32::from(netmask(prefix_len));
    let net = Ipv4Addr::from(u32::from(net) & mask);
    let in_net = |n: u32| Ipv4Addr::from(u32::from(net) | n);
    let address = |key: &str, default: Ipv4Addr| -> Result<Ipv4Addr, OptionError> {
        let Some(text) = o.get(key) else {
            return Ok(default);
        };
        let addr = ipv4(o, key, text)?;
        if u32::from(addr) & mask != u32::from(net) {
            return Err(o.bad(key, text, &format!("not inside net={net}/{prefix_len}")));
        }
        Ok(addr)
    };
    let (ipv6_prefix, ipv6_prefix_len) = match o.get("ipv6-net") {
        None => (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 64),
        Some(text) => {
            let (addr, len) = text.split_once('/').unwrap_or((text, "64"));
            let len = len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= 126)
                .ok_or_else(|| o.bad("ipv6-net", text, "expected PREFIX/LEN such as fec0::/64"))?;
            (ipv6(o, "ipv6-net", addr)?, len)
        }
    };
    let in6 = |n: u16| {
        let mut s = ipv6_prefix.segments();
        s[7] = n;
        Ipv6Addr::from(s)
    };
    let ipv6_address = |key: &str, n: u16| match o.get(key) {
        None => Ok(in6(n)),
        Some(text) => ipv6(o, key, text),
    };
    let mut user = UserNet {
        ipv4: o.flag("ipv4", true)?,
        net,
        prefix_len,
        host: address("host", in_net(2))?,
        dhcp_start: address("dhcpstart", in_net(15))?,
        dns: address("dns", in_net(3))?,
        ipv6: o.flag("ipv6", true)?,
        ipv6_prefix,
        ipv6_prefix_len,
        ipv6_host: ipv6_address("ipv6-host", 2)?,
        ipv6_dns: ipv6_address("ipv6-dns", 3)?,
        hostname: o.get("hostname").map(str::to_string),
        domainname: o.get("domainname").map(str::to_string),
        dnssearch: o.all("dnssearch").to_vec(),
        restrict: o.flag("restrict", false)?,
        hostfwd: Vec::new(),
        guestfwd: Vec::new(),
    };
    if !user.ipv4 && !user.ipv6 {
        return Err(o.bad("ipv4", "off", "ipv4=off needs ipv6=on"));
    }
    check_model(o)?;
    for text in o.all("hostfwd") {
        user.hostfwd
            .push(parse_hostfwd(text).map_err(|expected| o.bad("hostfwd", text, &expected))?);
    }
    for text in o.all("guestfwd") {
        user.guestfwd
            .push(parse_guestfwd(text).map_err(|expected| o.bad("guestfwd", text, &expected))?);
    }
    Ok(user)
}

fn port(text: &str, what: &str) -> Result<u16, String> {
    text.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{what} `{text}` is not a port number (1 to 65535)"))
}

fn optional_ipv4(text: &str, what: &str) -> Result<Option<Ipv4Addr>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("{what} `{text}` is not an IPv4 address"))
}

const HOSTFWD_FORM: &str =
    "expected [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport, e.g. tcp::2222-:22";

/// `[tcp|udp]:[haddr]:hport-[gaddr]:gport`; also what HMP's `hostfwd_add` takes.
pub fn parse_hostfwd(text: &str) -> Result<HostFwd, String> {
    let form = || HOSTFWD_FORM.to_string();
    let (proto, rest) = text.split_once(':').ok_or_else(form)?;
    let udp = match proto {
        "" | "tcp" => false,
        "udp" => true,
        other => {
            return Err(format!(
                "protocol `{other}` is not tcp or udp; {HOSTFWD_FORM}"
            ))
        }
    };
    let (host, guest) = rest.split_once('-').ok_or_else(form)?;
    let (host_addr, host_port) = host.rsplit_once(':').ok_or_else(form)?;
    let (guest_addr, guest_port) = guest.rsplit_once(':').ok_or_else(form)?;
    Ok(HostFwd {
        udp,
        host_addr: optional_ipv4(host_addr, "host address")?.unwrap_or(Ipv4Addr::UNSPECIFIED),
        host_port: port(host_port, "host port")?,
        guest_addr: optional_ipv4(guest_addr, "guest address")?,
        guest_port: port(guest_port, "guest port")?,
    })
}

const GUESTFWD_FORM: &str =
    "expected [tcp]:addr:port-cmd:COMMAND or [tcp]:addr:port-tcp:HOST:PORT, e.g. tcp:10.0.2.100:80-cmd:nc 127.0.0.1 8080";

pub fn parse_guestfwd(text: &str) -> Result<GuestFwd, String> {
    let form = || GUESTFWD_FORM.to_string();
    let (proto, rest) = text.split_once(':').ok_or_else(form)?;
    if !proto.is_empty() && proto != "tcp" {
        return Err(format!(
            "protocol `{proto}`: only tcp can be forwarded; {GUESTFWD_FORM}"
        ));
    }
    let (addr, rest) = rest.split_once(':').ok_or_else(form)?;
    let (port_text, target) = rest.split_once('-').ok_or_else(form)?;
    let target = if let Some(command) = target.strip_prefix("cmd:") {
        if command.trim().is_empty() {
            return Err(format!("an empty command; {GUESTFWD_FORM}"));
        }
        GuestFwdTarget::Command(command.to_string())
    } else if let Some(address) = target.strip_prefix("tcp:") {
        let (host, port_text) = address
            .rsplit_once(':')
            .filter(|(host, _)| !host.is_empty())
            .ok_or_else(|| format!("target `{target}`: expected tcp:HOST:PORT"))?;
        GuestFwdTarget::Tcp {
            host: host.to_string(),
            port: port(port_text, "target port")?,
        }
    } else {
        return Err(format!(
            "target `{target}`: expected cmd:COMMAND or tcp:HOST:PORT; {GUESTFWD_FORM}"
        ));
    };
    Ok(GuestFwd {
        addr: optional_ipv4(addr, "address")?,
        port: port(port_text, "port")?,
        target,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn user(text: &str) -> UserNet {
        match parse_net(text).unwrap().backend {
            NetBackend::User(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn qemu_defaults() {
        let u = user("user");
        assert_eq!(u.net, Ipv4Addr::new(10, 0, 2, 0));
        assert_eq!(u.prefix_len, 24);
        assert_eq!(u.host, Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(u.dns, Ipv4Addr::new(10, 0, 2, 3));
        assert_eq!(u.dhcp_start, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(u.ipv6_prefix, "fec0::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(u.ipv6_host, "fec0::2".parse::<Ipv6Addr>().unwrap());
        assert!(u.ipv4 && u.ipv6 && !u.restrict);
    }

    #[test]
    fn the_forms_qemu_vm_nix_and_the_qemu_manual_write() {
        // qemu-vm.nix: forwardPorts (host and guest), restrictNetwork, and QEMU_NET_OPTS.
        let nic = parse_net(
            "user,id=user.0,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,\
             guestfwd=tcp:10.0.2.100:80-cmd:nc 127.0.0.1 8080,restrict=on,\
             mac=52:54:00:12:01:01",
        )
        .unwrap();
        assert_eq!(nic.mac, Some([0x52, 0x54, 0, 0x12, 1, 1]));
        let NetBackend::User(u) = nic.backend else {
            panic!("user")
        };
        assert!(u.restrict);
        assert_eq!(
            u.hostfwd,
            vec![
                HostFwd {
                    udp: false,
                    host_addr: Ipv4Addr::UNSPECIFIED,
                    host_port: 2222,
                    guest_addr: None,
                    guest_port: 22
                },
                HostFwd {
                    udp: true,
                    host_addr: Ipv4Addr::LOCALHOST,
                    host_port: 5353,
                    guest_addr: None,
                    guest_port: 53
                }
            ]
        );
        assert_eq!(
            u.guestfwd,
            vec![GuestFwd {
                addr: Some(Ipv4Addr::new(10, 0, 2, 100)),
                port: 80,
                target: GuestFwdTarget::Command("nc 127.0.0.1 8080".into())
            }]
        );
        // From QEMU's manual.
        let u = user("user,net=192.168.76.0/24,dhcpstart=192.168.76.9,hostname=vm,dnssearch=a.org,dnssearch=b.org,domainname=example.org");
        assert_eq!(u.host, Ipv4Addr::new(192, 168, 76, 2));
        assert_eq!(u.dns, Ipv4Addr::new(192, 168, 76, 3));
        assert_eq!(u.dhcp_start, Ipv4Addr::new(192, 168, 76, 9));
        assert_eq!(u.dnssearch, vec!["a.org", "b.org"]);
        assert_eq!(u.hostname.as_deref(), Some("vm"));
        let u = user("user,net=10.1.0.0/255.255.0.0,hostfwd=tcp:127.0.0.1:6001-10.1.0.5:6000");
        assert_eq!(u.prefix_len, 16);
        assert_eq!(u.hostfwd[0].guest_addr, Some(Ipv4Addr::new(10, 1, 0, 5)));
        let u = user("user,ipv6-net=fd00:1::/48,ipv6-host=fd00:1::99");
        assert_eq!(u.ipv6_prefix_len, 48);
        assert_eq!(u.ipv6_host, "fd00:1::99".parse::<Ipv6Addr>().unwrap());
        assert_eq!(u.ipv6_dns, "fd00:1::3".parse::<Ipv6Addr>().unwrap());
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let err = |t: &str| parse_net(t).unwrap_err().to_string();
        assert!(
            err("bridge,br=br0").contains("expected `user`"),
            "{}",
            err("bridge,br=br0")
        );
        assert!(err("user,hostfwd=tcp:2222:22").contains("hostfwd=tcp:2222:22"));
        assert!(err("user,hostfwd=tcp::0-:22").contains("not a port number"));
        assert!(err("user,hostfwd=sctp::1-:2").contains("not tcp or udp"));
        assert!(err("user,dns=10.0.3.3").contains("not inside net=10.0.2.0/24"));
        assert!(err("user,net=10.0.2.0/31").contains("8 to 30"));
        assert!(err("user,mac=01:00:00:00:00:01").contains("multicast"));
        assert!(err("user,mac=52:54:00:12:34").contains("six hex bytes"));
        assert!(err("user,guestfwd=tcp:10.0.2.100:80-udp:127.0.0.1:8080")
            .contains("expected cmd:COMMAND or tcp:HOST:PORT"));
        assert!(err("user,guestfwd=tcp:10.0.2.100:80-tcp:8080").contains("tcp:HOST:PORT"));
        let u = user("user,guestfwd=tcp:10.0.2.100:1234-tcp:127.0.0.1:4321");
        assert_eq!(
            u.guestfwd[0].target,
            GuestFwdTarget::Tcp {
                host: "127.0.0.1".into(),
                port: 4321
            }
        );
        assert!(err("user,bogus=1").contains("unknown key `bogus`"));
        assert!(err("user,restrict=on,restrict=off").contains("twice"));
        assert!(err("user,ipv4=off,ipv6=off").contains("needs ipv6=on"));
        assert!(err("vde,mac=52:54:00:12:01:01").contains("`sock` is required"));
        assert!(err("tap").contains("exactly one of ifname=NAME and fd=N"));
        assert!(err("tap,ifname=tap0,fd=3").contains("exactly one"));
        assert!(err("tap,ifname=tap0,script=/etc/qemu-ifup").contains("runs no scripts"));
        assert!(err("tap,fd=-1").contains("file descriptor"));
    }

    #[test]
    fn netmasks_for_every_prefix_length() {
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(200), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn tap_forms() {
        let nic = parse_net("tap,id=net0,ifname=tap0,script=no,downscript=no").unwrap();
        assert_eq!(nic.backend, NetBackend::Tap(TapTarget::Name("tap0".into())));
        let nic = parse_net("tap,fd=3").unwrap();
        assert_eq!(nic.backend, NetBackend::Tap(TapTarget::Fd(3)));
    }

    #[test]
    fn the_test_drivers_vlan_form() {
        let nic = parse_net("vde,id=vlan1,sock=/tmp/vde1.ctl,mac=52:54:00:12:01:02").unwrap();
        assert_eq!(nic.mac, Some([0x52, 0x54, 0, 0x12, 1, 2]));
        assert_eq!(
            nic.backend,
            NetBackend::Vde {
                sock: "/tmp/vde1.ctl".into()
            }
        );
    }
}
