//! QMP, QEMU's machine protocol, on a Unix socket nixvmm listens on (`-qmp
//! unix:PATH,server=on,wait=off`, as the NixOS test driver asks; `--qmp PATH`). Each client
//! gets the greeting, negotiates with `qmp_capabilities`, then sends commands as JSON
//! objects (`{"execute": …, "arguments": …, "id": …}`) and receives one reply per command
//! and the VM's events (SHUTDOWN, RESET, STOP, RESUME) as they happen.
//!
//! Commands: `qmp_capabilities`, `query-status`, `query-version`, `query-commands`, `stop`,
//! `cont`, `system_reset`, `quit`, `human-monitor-command` (the HMP commands of
//! [`super::hmp`]), `system_powerdown` (the ACPI power button). Errors are QEMU's `{"error": {"class": …, "desc": …}}`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};

use crate::control::VmEvent;
use crate::Control;

/// Input a client may send without completing a command (a cap against a peer that never
/// ends its JSON).
const MAX_INPUT: usize = 1 << 20;
/// Clients at once.
const MAX_CLIENTS: usize = 16;
/// Whether each cap was said (once per run).
static SAID_TOO_MANY: AtomicBool = AtomicBool::new(false);
static SAID_TOO_LONG: AtomicBool = AtomicBool::new(false);
static SAID_NO_FDS: AtomicBool = AtomicBool::new(false);

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-status",
    "query-version",
    "query-commands",
    "stop",
    "cont",
    "system_reset",
    "system_powerdown",
    "quit",
    "human-monitor-command",
];

pub fn greeting() -> Value {
    let mut version = crate::front::qemu::QEMU_VERSION
        .split('.')
        .map(|n| n.parse::<u64>().unwrap_or(0));
    json!({"QMP": {
        "version": {
            "qemu": {
                "major": version.next().unwrap_or(0),
                "minor": version.next().unwrap_or(0),
                "micro": version.next().unwrap_or(0),
            },
            "package": format!("nixvmm {}", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": ["oob"],
    }})
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

/// The JSON of one event, timestamped as QEMU does.
pub fn event_json(event: VmEvent) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (name, data) = match event {
        VmEvent::Shutdown { guest, reason } => {
            ("SHUTDOWN", Some(json!({"guest": guest, "reason": reason})))
        }
        VmEvent::Reset { guest, reason } => {
            ("RESET", Some(json!({"guest": guest, "reason": reason})))
        }
        VmEvent::Stop => ("STOP", None),
        VmEvent::Resume => ("RESUME", None),
        VmEvent::Powerdown => ("POWERDOWN", None),
    };
    let mut value = json!({
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        "event": name,
    });
    if let (Some(data), Some(map)) = (data, value.as_object_mut()) {
        map.insert("data".into(), data);
    }
    value
}

/// One client's protocol state.
#[derive(Default)]
pub struct Session {
    pub negotiated: bool,
}

/// The reply to one request, and whether the client asked nixvmm to quit.
pub fn execute(request: &Value, session: &mut Session, control: &Control) -> (Value, bool) {
    let id = request.get("id").cloned();
    let (mut reply, quit) = reply_to(request, session, control);
    if let (Some(id), Some(map)) = (id, reply.as_object_mut()) {
        map.insert("id".into(), id);
    }
    (reply, quit)
}

fn reply_to(request: &Value, session: &mut Session, control: &Control) -> (Value, bool) {
    let Some(command) = request.get("execute").and_then(Value::as_str) else {
        return (
            error(
                "GenericError",
                "QMP input lacks member 'execute' (or it is not a string)",
            ),
            false,
        );
    };
    let ok = || json!({"return": {}});
    if !session.negotiated && command != "qmp_capabilities" {
        return (
            error(
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ),
            false,
        );
    }
    let reply = match command {
        "qmp_capabilities" if session.negotiated => error(
            "CommandNotFound",
            "Capabilities negotiation is already complete, command ignored",
        ),
        "qmp_capabilities" => {
            session.negotiated = true;
            ok()
        }
        "query-status" => {
            let paused = control.paused();
            json!({"return": {
                "status": if paused { "paused" } else { "running" },
                "running": !paused,
                "singlestep": false,
            }})
        }
        "query-version" => json!({"return": greeting()["QMP"]["version"]}),
        "query-commands" => {
            json!({"return": COMMANDS.iter().map(|c| json!({"name": c})).collect::<Vec<_>>()})
        }
        "stop" => match control.pause() {
            Ok(()) => ok(),
            Err(e) => error("GenericError", e.to_string()),
        },
        "cont" => match control.resume() {
            Ok(()) => ok(),
            Err(e) => error("GenericError", e.to_string()),
        },
        "system_reset" => {
            control.reset();
            ok()
        }
        "system_powerdown" => {
            control.press_power_button();
            ok()
        }
        "quit" => {
            control.stop_for("host-qmp-quit");
            return (ok(), true);
        }
        "human-monitor-command" => {
            match request
                .pointer("/arguments/command-line")
                .and_then(Value::as_str)
            {
                Some(line) => {
                    let answer = super::hmp::execute(line, control);
                    return (json!({"return": answer.text}), answer.quit);
                }
                None => error("GenericError", "Parameter 'command-line' is missing"),
            }
        }
        other => error(
            "CommandNotFound",
            format!("The command {other} has not been found"),
        ),
    };
    (reply, false)
}

struct Client {
    stream: UnixStream,
    session: Session,
    input: Vec<u8>,
}

impl Client {
    fn send(&mut self, value: &Value) -> std::io::Result<()> {
        let mut text = value.to_string();
        text.push_str("\r\n");
        super::send_answer(&mut self.stream, text.as_bytes())
    }

    /// Answers every complete request in the input; false when the client is done.
    fn serve(&mut self, control: &Control) -> bool {
        let text = std::mem::take(&mut self.input);
        let mut stream = serde_json::Deserializer::from_slice(&text).into_iter::<Value>();
        let mut used = 0;
        let mut keep = true;
        loop {
            match stream.next() {
                Some(Ok(request)) => {
                    used = stream.byte_offset();
                    // After `quit` the connection stays until nixvmm exits, so that the
                    // SHUTDOWN event reaches this client too.
                    let (reply, _quit) = execute(&request, &mut self.session, control);
                    if self.send(&reply).is_err() {
                        keep = false;
                        break;
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    // QEMU answers bad JSON and starts over after it.
                    used = text.len();
                    keep = self
                        .send(&error("GenericError", format!("JSON parse error, {e}")))
                        .is_ok();
                    break;
                }
                None => {
                    used = text.len();
                    break;
                }
            }
        }
        self.input = text.get(used..).unwrap_or_default().to_vec();
        if self.input.len() > MAX_INPUT {
            self.input.clear();
            let message = format_args!("QMP: a client sent {MAX_INPUT} bytes without a command");
            super::warn_once(&SAID_TOO_LONG, message);
            keep &= self
                .send(&error("GenericError", "QMP input too long"))
                .is_ok();
        }
        keep
    }
}

/// Where events go: a writing handle of each client, and whether it has negotiated.
type EventSinks = Arc<Mutex<BTreeMap<RawFd, (UnixStream, bool)>>>;

/// The control plane's subscriber for the QMP socket and its clients.
pub struct QmpServer {
    listener: UnixListener,
    spare: devices::host_listener::SpareFd,
    path: PathBuf,
    clients: BTreeMap<RawFd, Client>,
    sinks: EventSinks,
    control: Control,
}

impl QmpServer {
    /// Listens on `path` (a socket file left from an earlier run is replaced, as QEMU does)
    /// and has `control`'s events sent to negotiated clients.
    pub fn listen(path: &Path, control: Control) -> std::io::Result<QmpServer> {
        let listener = crate::host::chardev::listen_replacing(path)?;
        listener.set_nonblocking(true)?;
        let sinks: EventSinks = Arc::default();
        let watched = sinks.clone();
        control.watch_events(Arc::new(move |event| {
            let mut text = event_json(event).to_string();
            text.push_str("\r\n");
            // One deadline for every client: clients that do not read hold the control
            // plane no longer than one would.
            let deadline = std::time::Instant::now() + super::ANSWER_DEADLINE;
            for (stream, negotiated) in lock(&watched).values_mut() {
                // Whole lines only. A client that leaves them unread for long is dropped
                // as one that leaves its answers unread: its socket is shut down here, and
                // the control plane, seeing it end, forgets it.
                if *negotiated
                    && super::send_answer_until(stream, text.as_bytes(), deadline).is_err()
                {
                    *negotiated = false;
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
            }
        }));
        Ok(QmpServer {
            listener,
            spare: devices::host_listener::SpareFd::default(),
            path: path.to_path_buf(),
            clients: BTreeMap::new(),
            sinks,
            control,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Ok(Some(stream)) = self.spare.accept(&self.listener, &SAID_NO_FDS, &"QMP") else {
            return;
        };
        if self.clients.len() >= MAX_CLIENTS {
            let message = format_args!("QMP: {MAX_CLIENTS} clients at once; refusing more");
            super::warn_once(&SAID_TOO_MANY, message);
            return;
        }
        let sink = match stream.try_clone() {
            Ok(sink) => sink,
            Err(e) => {
                if devices::host_listener::out_of_descriptors(&e) {
                    devices::host_listener::say_out_of_descriptors(&SAID_NO_FDS, &"QMP");
                }
                return;
            }
        };
        let mut client = Client {
            stream,
            session: Session::default(),
            input: Vec::new(),
        };
        if client.stream.set_nonblocking(true).is_err() || client.send(&greeting()).is_err() {
            return;
        }
        let fd = client.stream.as_raw_fd();
        if ops.add(Events::new_raw(fd, EventSet::IN)).is_ok() {
            self.clients.insert(fd, client);
            lock(&self.sinks).insert(fd, (sink, false));
        }
    }
}

impl MutEventSubscriber for QmpServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::warn!("QMP: cannot watch {}: {e}", self.path.display());
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let Some(client) = self.clients.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let keep = match client.stream.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                client.input.extend_from_slice(&buf[..n]);
                let keep = client.serve(&self.control);
                if let Some(sink) = lock(&self.sinks).get_mut(&fd) {
                    sink.1 = client.session.negotiated;
                }
                keep
            }
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        };
        if !keep {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            self.clients.remove(&fd);
            lock(&self.sinks).remove(&fd);
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(session: &mut Session, request: &str) -> (Value, bool) {
        execute(
            &serde_json::from_str(request).unwrap(),
            session,
            &Control::default(),
        )
    }

    #[test]
    fn a_session_as_qemu_answers_it() {
        let greeting = greeting();
        assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 9);
        assert_eq!(greeting["QMP"]["capabilities"], json!(["oob"]));
        let mut session = Session::default();
        let (before, _) = run(&mut session, r#"{"execute": "query-status"}"#);
        assert_eq!(before["error"]["class"], "CommandNotFound");
        assert_eq!(
            run(&mut session, r#"{"execute": "qmp_capabilities", "id": 7}"#).0,
            json!({"return": {}, "id": 7})
        );
        let (again, _) = run(&mut session, r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(again["error"]["class"], "CommandNotFound");
        assert_eq!(
            run(&mut session, r#"{"execute": "query-status"}"#).0,
            json!({"return": {"status": "running", "running": true, "singlestep": false}})
        );
        let (hmp, _) = run(
            &mut session,
            r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}"#,
        );
        assert_eq!(hmp, json!({"return": "VM status: running\r\n"}));
        let (unknown, _) = run(&mut session, r#"{"execute": "blockdev-add"}"#);
        assert_eq!(
            unknown["error"]["desc"],
            "The command blockdev-add has not been found"
        );
        let (bad, _) = run(&mut session, r#"{"exec": "quit"}"#);
        assert_eq!(bad["error"]["class"], "GenericError");
        let (power, _) = run(&mut session, r#"{"execute": "system_powerdown"}"#);
        assert_eq!(power, json!({"return": {}}));
        let (quit, done) = run(&mut session, r#"{"execute": "quit"}"#);
        assert!(done);
        assert_eq!(quit, json!({"return": {}}));
    }

    #[test]
    fn events_are_timestamped_and_carry_their_data() {
        let shutdown = event_json(VmEvent::Shutdown {
            guest: true,
            reason: "guest-shutdown",
        });
        assert_eq!(shutdown["event"], "SHUTDOWN");
        assert_eq!(
            shutdown["data"],
            json!({"guest": true, "reason": "guest-shutdown"})
        );
        assert!(shutdown["timestamp"]["seconds"].as_u64().unwrap() > 1_700_000_000);
        let stop = event_json(VmEvent::Stop);
        assert_eq!(stop["event"], "STOP");
        assert!(stop.get("data").is_none());
    }

    /// A negotiated client of a QMP server that `manager` runs.
    fn negotiated_client(
        path: &Path,
        manager: &mut event_manager::EventManager<crate::event::Subscriber>,
    ) -> std::io::BufReader<UnixStream> {
        use std::io::{BufRead, Write};
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        while line.is_empty() {
            manager.run_with_timeout(100).unwrap();
            let _ = reader.read_line(&mut line);
        }
        assert!(line.contains("QMP"), "{line}");
        reader
            .get_mut()
            .write_all(b"{\"execute\": \"qmp_capabilities\"}\r\n")
            .unwrap();
        manager.run_with_timeout(1000).unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"return\":{}}\r\n");
        reader
    }

    #[test]
    fn events_reach_a_slow_client_whole_and_a_client_that_never_reads_is_dropped() {
        use event_manager::SubscriberOps;
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp");
        let control = Control::default();
        let mut manager = event_manager::EventManager::<crate::event::Subscriber>::new().unwrap();
        manager.add_subscriber(Box::new(QmpServer::listen(&path, control.clone()).unwrap()));
        // More events than a socket buffer holds, to a client that starts reading late.
        const EVENTS: usize = 20_000;
        let slow = negotiated_client(&path, &mut manager);
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let mut events = 0;
            for line in slow.lines().take(EVENTS) {
                let line = line.unwrap();
                let event: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(event["event"], "STOP", "{line}");
                events += 1;
            }
            events
        });
        for _ in 0..EVENTS {
            control.pause().unwrap();
        }
        assert_eq!(
            reader.join().unwrap(),
            EVENTS,
            "every event, each a whole line"
        );
        manager.run_with_timeout(100).unwrap();
        // A client that never reads: whole lines until its socket is full, then, after the
        // answer deadline, nothing more: it was dropped.
        let mute = negotiated_client(&path, &mut manager);
        let started = std::time::Instant::now();
        for _ in 0..EVENTS {
            control.pause().unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let mut lines = 0;
        for line in mute.lines() {
            let line = line.unwrap();
            serde_json::from_str::<Value>(&line).unwrap();
            lines += 1;
        }
        assert!(0 < lines && lines < EVENTS, "{lines} events, then the end");
        manager.run_with_timeout(100).unwrap();
    }
}
