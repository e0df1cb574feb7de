//! QEMU's human monitor (HMP) on a Unix socket nixvmm connects to (`-monitor unix:PATH`, as
//! the NixOS test driver listens for it): a banner, then one command per line, each answer
//! ending in the `(qemu) ` prompt the driver waits for. Commands: `info status`, `stop`,
//! `cont`, `system_reset`, `quit`, `hostfwd_add`, `hostfwd_remove`, `set_link`, `sendkey`,
//! `system_powerdown`, `help`; `screendump` answers that there is no display; anything else
//! as QEMU answers an unknown command.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use devices::host_listener::SpareFd;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::Control;

pub const PROMPT: &str = "(qemu) ";
/// A line longer than this is answered as an error and dropped, so a peer cannot make the
/// monitor buffer without end.
const MAX_LINE: usize = 4096;
/// Whether a line too long was said (once per run).
static SAID_TOO_LONG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static SAID_NO_FDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn banner() -> String {
    format!(
        "QEMU {} monitor (nixvmm) - type 'help' for more information\r\n{PROMPT}",
        crate::front::qemu::QEMU_VERSION
    )
}

/// What a command line asks: the answer, and whether the monitor user asked to quit.
pub struct Answer {
    pub text: String,
    pub quit: bool,
}

fn answer(text: impl Into<String>) -> Answer {
    Answer {
        text: text.into(),
        quit: false,
    }
}

/// The NIC a `set_link` name means: QEMU's automatic device names (`virtio-net-pci.N`, the
/// N-th virtio-net NIC from 0) or `nicN`.
fn nic_index(name: &str) -> Option<usize> {
    name.strip_prefix("virtio-net-pci.")
        .or_else(|| name.strip_prefix("nic"))
        .and_then(|n| n.parse().ok())
}

/// Runs one command line; the answer has no prompt yet.
pub fn execute(line: &str, control: &Control) -> Answer {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&command, args)) = words.split_first() else {
        return answer("");
    };
    let done = |result: Result<(), String>| match result {
        Ok(()) => answer(""),
        Err(e) => answer(format!("Error: {e}\r\n")),
    };
    match (command, args) {
        ("help" | "?", _) => answer(
            "info status | stop | cont | system_reset | system_powerdown | quit | hostfwd_add [netdev] RULE | \
             hostfwd_remove [netdev] RULE | set_link NAME on|off | sendkey KEYS\r\n",
        ),
        ("info", ["status"]) => {
            let paused = control.paused();
            answer(format!(
                "VM status: {}\r\n",
                if paused { "paused" } else { "running" }
            ))
        }
        ("info", _) => answer("Error: nixvmm answers `info status` only\r\n"),
        ("stop", []) => done(control.pause().map_err(|e| e.to_string())),
        ("cont" | "c", []) => done(control.resume().map_err(|e| e.to_string())),
        ("system_reset", []) => {
            control.reset();
            answer("")
        }
        ("quit" | "q", []) => {
            control.stop_for("host-qmp-quit");
            Answer {
                text: String::new(),
                quit: true,
            }
        }
        ("hostfwd_add" | "hostfwd_remove", [.., rule]) if args.len() <= 2 => {
            // The netdev may be named first; nixvmm's user network is the first NIC's
            // that has one.
            let result = if command == "hostfwd_add" {
                control.add_hostfwd_anywhere(rule)
            } else {
                control.remove_hostfwd_anywhere(rule)
            };
            done(result.map_err(|e| e.to_string()))
        }
        ("set_link", [name, state @ ("on" | "off")]) => match nic_index(name) {
            Some(nic) => done(
                control
                    .set_link(nic, *state == "on")
                    .map_err(|e| e.to_string()),
            ),
            None => answer(format!("Error: Device '{name}' not found\r\n")),
        },
        ("screendump", _) => answer("Error: there is no display to dump: nixvmm is headless\r\n"),
        ("sendkey", [chord, ..]) => done(control.send_keys(chord).map_err(|e| e.to_string())),
        ("system_powerdown", []) => {
            control.press_power_button();
            answer("")
        }
        (
            "stop" | "cont" | "c" | "system_reset" | "system_powerdown" | "quit" | "q"
            | "hostfwd_add" | "hostfwd_remove" | "set_link" | "sendkey",
            _,
        ) => answer(format!("Error: {command}: wrong arguments; see `help`\r\n")),
        (other, _) => answer(format!("unknown command: '{other}'\r\n")),
    }
}

/// The control plane's subscriber for the monitor: one connection nixvmm made, or a socket
/// nixvmm listens on and the client connected now (one at a time, as QEMU's monitor; others
/// wait in the backlog until it leaves).
pub struct HmpMonitor {
    /// A listening monitor's socket, with its descriptor in reserve.
    listener: Option<(UnixListener, SpareFd)>,
    stream: Option<Peer>,
    control: Control,
    input: Vec<u8>,
    /// The line being received is longer than [`MAX_LINE`]: dropped up to its end, which is
    /// answered with an error.
    overlong: bool,
}

impl HmpMonitor {
    /// Connects to the monitor socket at `path` (the peer listens) and greets it.
    pub fn connect(path: &Path, control: Control) -> std::io::Result<HmpMonitor> {
        let stream = greet(UnixStream::connect(path)?)?;
        Ok(HmpMonitor {
            listener: None,
            stream: Some(Peer::Socket(stream)),
            control,
            input: Vec::new(),
            overlong: false,
        })
    }

    /// The monitor on nixvmm's stdin and stdout (`-monitor stdio`; the serial console is
    /// elsewhere then). Input that ends (stdin closed) ends the monitor, not the VM.
    pub fn stdio(control: Control) -> std::io::Result<HmpMonitor> {
        let input = crate::host::chardev::dup_nonblocking(libc::STDIN_FILENO)?;
        let mut monitor = HmpMonitor {
            listener: None,
            stream: Some(Peer::Stdio(input)),
            control,
            input: Vec::new(),
            overlong: false,
        };
        monitor.send(banner().as_bytes())?;
        Ok(monitor)
    }

    /// Listens on `path` (a socket left from an earlier run is replaced); with `wait`, returns
    /// only once the first client connected.
    pub fn listen(path: &Path, wait: bool, control: Control) -> std::io::Result<HmpMonitor> {
        let listener = crate::host::chardev::listen_replacing(path)?;
        let stream = if wait {
            log::info!("monitor: waiting for a client on {}", path.display());
            Some(Peer::Socket(greet(listener.accept()?.0)?))
        } else {
            None
        };
        listener.set_nonblocking(true)?;
        Ok(HmpMonitor {
            listener: Some((listener, SpareFd::default())),
            stream,
            control,
            input: Vec::new(),
            overlong: false,
        })
    }

    /// What to watch now: the client, else the listener.
    fn events(&self) -> Option<Events> {
        match (&self.stream, &self.listener) {
            (Some(peer), _) => Some(Events::new_raw(peer.fd(), EventSet::IN)),
            (None, Some((listener, _))) => Some(Events::new(listener, EventSet::IN)),
            (None, None) => None,
        }
    }

    fn watch(&self, ops: &mut EventOps) {
        if let Some(events) = self.events() {
            if let Err(e) = ops.add(events) {
                log::warn!("the monitor cannot be watched: {e}");
            }
        }
    }

    /// Answers every complete line; returns false when the connection should end.
    fn serve_lines(&mut self) -> bool {
        while let Some(end) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            if std::mem::take(&mut self.overlong) {
                let text = format!("Error: a line longer than {MAX_LINE} bytes\r\n{PROMPT}");
                if self.send(text.as_bytes()).is_err() {
                    return false;
                }
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            let reply = execute(line.trim_end_matches(['\r', '\n']), &self.control);
            let mut text = reply.text;
            if !reply.quit {
                text.push_str(PROMPT);
            }
            if self.send(text.as_bytes()).is_err() || reply.quit {
                return false;
            }
        }
        if self.input.len() > MAX_LINE {
            self.input.clear();
            self.overlong = true;
            let message = format_args!("monitor: a line longer than {MAX_LINE} bytes");
            super::warn_once(&SAID_TOO_LONG, message);
        }
        true
    }

    /// Writes a whole answer (answers are short; the peer is waiting for them).
    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.stream {
            Some(Peer::Socket(stream)) => super::send_answer(stream, bytes),
            Some(Peer::Stdio(_)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            None => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Takes the next client of a listening monitor.
    fn accept(&mut self, ops: &mut EventOps) {
        let Some((listener, spare)) = &mut self.listener else {
            return;
        };
        let Ok(Some(stream)) = spare.accept(listener, &SAID_NO_FDS, &"monitor") else {
            return;
        };
        let Ok(stream) = greet(stream) else {
            return;
        };
        let _ = ops.remove(Events::new(listener, EventSet::IN));
        self.stream = Some(Peer::Socket(stream));
        self.input.clear();
        self.overlong = false;
        self.watch(ops);
    }
}

/// Where the monitor's client is.
enum Peer {
    Socket(UnixStream),
    /// stdin (a non-blocking duplicate); answers go to stdout.
    Stdio(std::fs::File),
}

impl Peer {
    fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Peer::Socket(stream) => stream.as_raw_fd(),
            Peer::Stdio(input) => input.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Peer::Socket(stream) => stream.read(buf),
            Peer::Stdio(input) => input.read(buf),
        }
    }
}

/// Greets a new monitor peer and makes its stream non-blocking.
fn greet(mut stream: UnixStream) -> std::io::Result<UnixStream> {
    stream.write_all(banner().as_bytes())?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

impl MutEventSubscriber for HmpMonitor {
    fn init(&mut self, ops: &mut EventOps) {
        self.watch(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let Some(stream) = self.stream.as_mut() else {
            if self
                .listener
                .as_ref()
                .is_some_and(|(l, _)| l.as_raw_fd() == events.fd())
            {
                self.accept(ops);
            }
            return;
        };
        if stream.fd() != events.fd() {
            return;
        }
        let mut buf = [0u8; 1024];
        let keep = match stream.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.input.extend_from_slice(&buf[..n]);
                self.serve_lines()
            }
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        };
        if !keep {
            if let Some(events) = self.events() {
                let _ = ops.remove(events);
            }
            self.stream = None;
            // A listening monitor takes its next client.
            self.watch(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_qemus_monitor_does() {
        let control = Control::default();
        assert!(banner().ends_with("\r\n(qemu) "));
        assert_eq!(
            execute("info status", &control).text,
            "VM status: running\r\n"
        );
        assert_eq!(execute("", &control).text, "");
        assert_eq!(
            execute("frobnicate now", &control).text,
            "unknown command: 'frobnicate'\r\n"
        );
        assert!(execute("screendump /tmp/x.ppm", &control)
            .text
            .starts_with("Error: there is no display"));
        assert_eq!(
            execute("set_link eth9 off", &control).text,
            "Error: Device 'eth9' not found\r\n"
        );
        assert_eq!(
            execute("set_link virtio-net-pci.1 off", &control).text,
            "Error: no NIC 1 (the VM has 0)\r\n"
        );
        assert!(execute("set_link virtio-net-pci.1 maybe", &control)
            .text
            .contains("wrong arguments"));
        assert!(execute("hostfwd_add tcp::2222-:22", &control)
            .text
            .starts_with("Error: "));
        assert_eq!(execute("sendkey ctrl-alt-delete", &control).text, "");
        assert_eq!(
            execute("sendkey ctrl-frob", &control).text,
            "Error: unknown key 'frob'\r\n"
        );
        let quit = execute("quit", &control);
        assert!(quit.quit && quit.text.is_empty());
    }

    #[test]
    fn nic_names_as_qemu_gives_them() {
        assert_eq!(nic_index("virtio-net-pci.0"), Some(0));
        assert_eq!(nic_index("virtio-net-pci.12"), Some(12));
        assert_eq!(nic_index("nic1"), Some(1));
        assert_eq!(nic_index("user.0"), None);
    }
}
