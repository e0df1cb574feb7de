//! Tier 2: nixvmm's QMP and HMP framing side by side with QEMU's own (Debian's
//! qemu-system-x86_64 with `-M none`, no guest), the same commands sent to both: what the NixOS
//! test driver and QMP clients rely on must match.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixvmm_tests::nixvmm_bin;
use nixvmm_tests::tiny::Guest;
use nixvmm_tests::tiny_run::write_guest;
use serde_json::Value;

fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if Instant::now() > deadline => panic!("{}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Both VMMs, each with a QMP socket and a listening monitor in `dir`.
struct Pair {
    qemu: Child,
    nixvmm: Child,
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.nixvmm.kill();
        let _ = self.qemu.wait();
        let _ = self.nixvmm.wait();
    }
}

fn start(dir: &Path) -> Pair {
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "none", "-nodefaults", "-display", "none"])
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qemu.qmp").display()
        ))
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("qemu.mon").display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (Debian's qemu-system-x86; scripts/setup installs it)");
    // nixvmm's guest says each boot on its serial port.
    let mut g = Guest::new();
    g.text("boot\n").unwrap();
    g.halt_forever().unwrap();
    let kernel = write_guest(dir, g);
    let nixvmm = Command::new(nixvmm_bin())
        .args(["qemu", "-m", "64", "-kernel"])
        .arg(&kernel)
        .arg("-serial")
        .arg(format!("file:{}", dir.join("nixvmm.serial").display()))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("nixvmm.qmp").display()
        ))
        .arg("-monitor")
        .arg(format!(
            "unix:{},server=on,wait=off",
            dir.join("nixvmm.mon").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Pair { qemu, nixvmm }
}

/// Reads up to and including the next `(qemu) ` prompt.
fn until_prompt(stream: &mut UnixStream) -> String {
    let mut text = Vec::new();
    let mut byte = [0u8; 1];
    while !text.ends_with(b"(qemu) ") {
        stream.read_exact(&mut byte).unwrap();
        text.push(byte[0]);
    }
    String::from_utf8_lossy(&text).into_owned()
}

/// An answer without QEMU's echo of the typed line (its readline echoes, with escape
/// sequences; the test driver reads past it to the prompt) and without the prompt.
fn answer_of(text: &str, command: &str) -> String {
    let body = text.strip_suffix("(qemu) ").unwrap_or(text);
    // QEMU's echo ends its line with an erase-to-end escape and CRLF.
    match body.rfind(command) {
        Some(at) => {
            let rest = &body[at + command.len()..];
            match rest.find("\r\n") {
                Some(end) => rest[end + 2..].to_string(),
                None => rest.to_string(),
            }
        }
        None => body.to_string(),
    }
}

#[test]
fn hmp_banner_prompt_and_answers_frame_as_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let _pair = start(dir.path());
    let mut answers = Vec::new();
    for who in ["qemu", "nixvmm"] {
        let mut mon = connect(&dir.path().join(format!("{who}.mon")));
        let banner = until_prompt(&mut mon);
        assert!(banner.starts_with("QEMU "), "{who}: {banner:?}");
        assert!(
            banner.contains(" monitor - type 'help' for more information\r\n")
                || banner.contains(" monitor (nixvmm) - type 'help' for more information\r\n"),
            "{who}: {banner:?}"
        );
        let mut got = Vec::new();
        for command in ["info status", "frobnicate now"] {
            mon.write_all(format!("{command}\n").as_bytes()).unwrap();
            got.push(answer_of(&until_prompt(&mut mon), command));
        }
        answers.push(got);
    }
    assert_eq!(answers[1][0], "VM status: running\r\n");
    assert_eq!(answers[0][0], answers[1][0], "info status");
    assert_eq!(answers[0][1], answers[1][1], "an unknown command");
}

fn qmp_line(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// The keys of a JSON object, recursively, values left out.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), shape(v))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(shape).collect()),
        _ => Value::Null,
    }
}

#[test]
fn qmp_greeting_negotiation_errors_and_replies_frame_as_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let _pair = start(dir.path());
    let requests = [
        r#"{"execute": "query-status"}"#,
        r#"{"execute": "qmp_capabilities", "id": "n1"}"#,
        r#"{"execute": "query-status", "id": 2}"#,
        r#"{"execute": "no-such-command"}"#,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}"#,
        r#"{"exec": "query-status"}"#,
    ];
    let mut sessions = Vec::new();
    for who in ["qemu", "nixvmm"] {
        let stream = connect(&dir.path().join(format!("{who}.qmp")));
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut replies = vec![qmp_line(&mut reader)];
        for request in requests {
            (&stream).write_all(request.as_bytes()).unwrap();
            (&stream).write_all(b"\r\n").unwrap();
            replies.push(qmp_line(&mut reader));
        }
        sessions.push(replies);
    }
    let (qemu, ours) = (&sessions[0], &sessions[1]);
    assert_eq!(
        shape(&qemu[0]),
        shape(&ours[0]),
        "greeting: {} vs {}",
        qemu[0],
        ours[0]
    );
    assert_eq!(
        qemu[0]["QMP"]["capabilities"],
        ours[0]["QMP"]["capabilities"]
    );
    // Before qmp_capabilities: the same error class and text.
    assert_eq!(
        qemu[1]["error"], ours[1]["error"],
        "{} vs {}",
        qemu[1], ours[1]
    );
    assert_eq!(qemu[2], ours[2], "negotiation, with its id");
    assert_eq!(
        shape(&qemu[3]),
        shape(&ours[3]),
        "query-status: {} vs {}",
        qemu[3],
        ours[3]
    );
    assert_eq!(qemu[3]["id"], ours[3]["id"]);
    assert_eq!(
        qemu[4]["error"], ours[4]["error"],
        "unknown command: {} vs {}",
        qemu[4], ours[4]
    );
    assert_eq!(qemu[5], ours[5], "human-monitor-command");
    assert_eq!(
        qemu[6]["error"]["class"], ours[6]["error"]["class"],
        "{} vs {}",
        qemu[6], ours[6]
    );
}

/// What a QMP session said: each command's reply, the events in the order they came (their
/// timestamps left out), and replies and events in one sequence ("return", "STOP", …).
struct Said {
    replies: Vec<Value>,
    events: Vec<Value>,
    order: Vec<String>,
}

/// Sends each of `commands` after negotiation (`before` is told each one first), reads its
/// reply (and events meanwhile), and after the last reads on until the peer closes.
fn qmp_session(socket: &Path, commands: &[&str], mut before: impl FnMut(&str)) -> Said {
    let stream = connect(socket);
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut said = Said {
        replies: Vec::new(),
        events: Vec::new(),
        order: Vec::new(),
    };
    let mut read_message = |said: &mut Said| -> Option<bool> {
        let mut line = String::new();
        // A VMM that quit may reset the connection instead of closing it.
        if matches!(reader.read_line(&mut line), Ok(0) | Err(_)) {
            return None;
        }
        let mut message: Value = serde_json::from_str(&line).unwrap();
        if let Some(event) = message.get("event") {
            said.order.push(event.as_str().unwrap().to_string());
            message.as_object_mut().unwrap().remove("timestamp");
            said.events.push(message);
            Some(false)
        } else {
            let kind = ["QMP", "return", "error"]
                .iter()
                .find(|k| message.get(**k).is_some());
            said.order.push(kind.unwrap().to_string());
            said.replies.push(message);
            Some(true)
        }
    };
    read_message(&mut said); // the greeting
    for command in ["qmp_capabilities"].iter().chain(commands) {
        before(command);
        let request = format!("{{\"execute\": \"{command}\"}}\r\n");
        (&stream).write_all(request.as_bytes()).unwrap();
        while read_message(&mut said) == Some(false) {}
    }
    while read_message(&mut said).is_some() {}
    said.replies.drain(..2); // greeting and negotiation
    said
}

#[test]
fn qmp_commands_and_events_of_the_test_driver_and_of_clients_match_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let mut pair = start(dir.path());
    let commands = [
        "query-version",
        "stop",
        "query-status",
        "cont",
        "query-status",
        "system_reset",
        "system_powerdown",
        "quit",
    ];
    let qemu = qmp_session(&dir.path().join("qemu.qmp"), &commands, |_| {});
    // The guest boots again before the commands after system_reset.
    let serial = dir.path().join("nixvmm.serial");
    let booted_twice = || std::fs::read_to_string(&serial).is_ok_and(|s| s == "boot\nboot\n");
    let ours = qmp_session(&dir.path().join("nixvmm.qmp"), &commands, |command| {
        if command == "system_powerdown" {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !booted_twice() {
                assert!(Instant::now() < deadline, "system_reset: no second boot");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    assert_eq!(
        shape(&qemu.replies[0]),
        shape(&ours.replies[0]),
        "query-version: {} vs {}",
        qemu.replies[0],
        ours.replies[0]
    );
    for (n, command) in commands.iter().enumerate().skip(1) {
        let (theirs, mine) = (&qemu.replies[n]["return"], &ours.replies[n]["return"]);
        if command.starts_with("query-status") {
            assert_eq!(theirs["status"], mine["status"], "{command} #{n}");
            assert_eq!(theirs["running"], mine["running"], "{command} #{n}");
        } else {
            assert_eq!(theirs, mine, "{command} #{n}");
        }
    }
    // STOP, RESUME, RESET (host-qmp-system-reset), POWERDOWN, SHUTDOWN (host-qmp-quit), in
    // that order and with the same data, each before or after its command's reply as QEMU
    // sends it.
    assert_eq!(qemu.events, ours.events);
    assert_eq!(qemu.events.len(), 5, "{:?}", qemu.events);
    assert_eq!(qemu.order, ours.order);
    // quit ends nixvmm with status 0.
    let status = pair.nixvmm.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(booted_twice());
}
