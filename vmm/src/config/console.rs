//! virtio-console ports and the chardevs behind them (`--port`, and the QEMU door's
//! `-chardev` with `virtconsole` / `virtserialport`).

use std::path::PathBuf;

use crate::config::options::{OptionError, Options};

/// The host side of a port, as QEMU's `-chardev` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChardevSpec {
    /// Connects to a listening Unix socket (`socket,path=…`, QEMU's default `server=off`);
    /// with `reconnect`, a peer that leaves (or is not there yet) is tried again at that
    /// interval, and output meanwhile is dropped.
    SocketClient {
        path: PathBuf,
        reconnect: Option<std::time::Duration>,
    },
    /// The FIFOs `PATH.in` (input) and `PATH.out` (output), or `PATH` both ways when those do
    /// not exist (`pipe,path=PATH`).
    Pipe { path: PathBuf },
    /// A new pseudo-terminal; nixvmm says its /dev/pts name on stderr, as QEMU does (`pty`).
    Pty,
    /// nixvmm's own stdin and stdout (`stdio`; the serial console must then be elsewhere).
    Stdio,
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
/// (`socket`, `file`, `null`, `pipe`, `pty`, `stdio`), then `path`, `server`, `wait`,
/// `reconnect` (seconds) or `reconnect-ms`.
pub fn chardev_from(kind: &str, o: &Options, option: &str) -> Result<ChardevSpec, OptionError> {
    let path = || o.required("path").map(PathBuf::from);
    Ok(match kind {
        "socket" => {
            if o.flag("server", false)? {
                ChardevSpec::SocketServer {
                    path: path()?,
                    wait: o.flag("wait", true)?,
                }
            } else {
                ChardevSpec::SocketClient {
                    path: path()?,
                    reconnect: reconnect_interval(o)?,
                }
            }
        }
        "file" => ChardevSpec::File { path: path()? },
        "null" => ChardevSpec::Null,
        "pipe" => ChardevSpec::Pipe { path: path()? },
        "pty" => ChardevSpec::Pty,
        "stdio" => ChardevSpec::Stdio,
        other => {
            return Err(OptionError::BadValue {
                option: option.into(),
                key: "chardev".into(),
                value: other.into(),
                expected: "nixvmm's chardevs are socket, file, null, pipe, pty and stdio".into(),
            })
        }
    })
}

/// `reconnect=SECONDS` or `reconnect-ms=MS`; 0 (QEMU's default) never reconnects.
fn reconnect_interval(o: &Options) -> Result<Option<std::time::Duration>, OptionError> {
    let number = |key: &str| -> Result<Option<u64>, OptionError> {
        o.get(key)
            .map(|v| v.parse().map_err(|_| o.bad(key, v, "a whole number")))
            .transpose()
    };
    let interval = match (number("reconnect")?, number("reconnect-ms")?) {
        (_, Some(ms)) => std::time::Duration::from_millis(ms),
        (Some(s), None) => std::time::Duration::from_secs(s),
        (None, None) => return Ok(None),
    };
    Ok((!interval.is_zero()).then_some(interval))
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
            "reconnect-ms",
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
                    path: "/state/shell".into(),
                    reconnect: None,
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
        for (text, reconnect) in [
            ("reconnect=0", None),
            ("reconnect=2", Some(2000)),
            ("reconnect-ms=250", Some(250)),
        ] {
            assert_eq!(
                parse_port(&format!("console=on,chardev=socket,path=/s,{text}"))
                    .unwrap()
                    .chardev,
                ChardevSpec::SocketClient {
                    path: "/s".into(),
                    reconnect: reconnect.map(std::time::Duration::from_millis),
                },
                "{text}"
            );
        }
        for (text, spec) in [
            (
                "chardev=pipe,path=/p",
                ChardevSpec::Pipe { path: "/p".into() },
            ),
            ("chardev=pty", ChardevSpec::Pty),
            ("chardev=stdio", ChardevSpec::Stdio),
        ] {
            assert_eq!(
                parse_port(&format!("console=on,{text}")).unwrap().chardev,
                spec
            );
        }
        for (bad, says) in [
            ("chardev=null", "name (or console=on)"),
            (
                "console=on,chardev=tty",
                "socket, file, null, pipe, pty and stdio",
            ),
            ("console=on,chardev=socket", "path"),
            ("console=on,chardev=pipe", "path"),
            (
                "console=on,chardev=socket,path=/s,reconnect=soon",
                "a whole number",
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
