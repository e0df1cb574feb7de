//! virtio-console ports and the chardevs behind them (`--port`, and the QEMU door's
//! `-chardev` with `virtconsole` / `virtserialport`).

use std::path::PathBuf;

use crate::config::options::{OptionError, Options};

/// The host side of a port, as QEMU's `-chardev` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChardevSpec {
    /// Connects to a listening Unix socket (`socket,path=…`, QEMU's default `server=off`).
    SocketClient { path: PathBuf },
    /// Listens on a Unix socket, one peer at a time (`server=on`); with `wait`, nixvmm
    /// starts the guest only once the first peer is there (QEMU's default for servers).
    SocketServer { path: PathBuf, wait: bool },
    /// Output into a file (created or truncated); no input.
    File { path: PathBuf },
    /// Output dropped, no input.
    Null,
}

/// One virtio-console port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// A console (`virtconsole`, the guest's /dev/hvcN) rather than a named port
    /// (`virtserialport`, /dev/virtio-ports/NAME).
    pub console: bool,
    pub name: Option<String>,
    pub chardev: ChardevSpec,
}

/// The chardev keys of `option` (`-chardev` and `--port` share them): `chardev` is the kind
/// (`socket`, `file`, `null`), then `path`, `server`, `wait`, `reconnect`.
pub fn chardev_from(kind: &str, o: &Options, option: &str) -> Result<ChardevSpec, OptionError> {
    let path = || o.required("path").map(PathBuf::from);
    Ok(match kind {
        "socket" => {
            if let Some(reconnect) = o.get("reconnect").filter(|r| *r != "0") {
                return Err(o.bad(
                    "reconnect",
                    reconnect,
                    "nixvmm does not reconnect chardevs yet; only reconnect=0",
                ));
            }
            if o.flag("server", false)? {
                ChardevSpec::SocketServer {
                    path: path()?,
                    wait: o.flag("wait", true)?,
                }
            } else {
                ChardevSpec::SocketClient { path: path()? }
            }
        }
        "file" => ChardevSpec::File { path: path()? },
        "null" => ChardevSpec::Null,
        other => {
            return Err(OptionError::BadValue {
                option: option.into(),
                key: "chardev".into(),
                value: other.into(),
                expected: "nixvmm's chardevs are socket, file and null".into(),
            })
        }
    })
}

/// `--port [console=on,][name=NAME,]chardev=socket|file|null[,path=…][,server=on][,wait=off]`.
pub fn parse_port(text: &str) -> Result<PortSpec, OptionError> {
    let o = Options::parse(
        "--port",
        text,
        &[
            "console",
            "name",
            "chardev",
            "path",
            "server",
            "wait",
            "reconnect",
        ],
    )?;
    let console = o.flag("console", false)?;
    let name = o.get("name").map(String::from);
    if !console && name.is_none() {
        return Err(OptionError::Missing {
            option: "--port".into(),
            key: "name (or console=on)".into(),
        });
    }
    Ok(PortSpec {
        console,
        name,
        chardev: chardev_from(o.required("chardev")?, &o, "--port")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_as_the_test_driver_and_users_write_them() {
        assert_eq!(
            parse_port("console=on,chardev=socket,path=/state/shell").unwrap(),
            PortSpec {
                console: true,
                name: None,
                chardev: ChardevSpec::SocketClient {
                    path: "/state/shell".into()
                },
            }
        );
        assert_eq!(
            parse_port("name=org.qemu.guest_agent.0,chardev=socket,path=/qga,server=on,wait=off")
                .unwrap()
                .chardev,
            ChardevSpec::SocketServer {
                path: "/qga".into(),
                wait: false
            }
        );
        assert_eq!(
            parse_port("console=on,chardev=null").unwrap().chardev,
            ChardevSpec::Null
        );
        for (bad, says) in [
            ("chardev=null", "name (or console=on)"),
            ("console=on,chardev=pty", "socket, file and null"),
            ("console=on,chardev=socket", "path"),
            (
                "console=on,chardev=socket,path=/s,reconnect=5",
                "reconnect=0",
            ),
            ("console=maybe,chardev=null", "on or off"),
        ] {
            let err = parse_port(bad).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.starts_with("--port"),
                "{bad}: {err}"
            );
        }
    }
}
