//! Tier 2: tiny guests under KVM through nixvmm's real `Vm` and its binary: the console,
//! poweroff, reset and reboot, the terminal. Here KVM is PVM and runs these guests through its
//! instruction emulator; they are small enough for that.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nixvmm_tests::nixvmm_bin;
use vmm::host::console::ConsoleOutput;
use vmm::{Control, Outcome, VmConfig};

use nixvmm_tests::tiny::Guest;
use nixvmm_tests::tiny_run::{config, run, write_guest};

#[test]
fn guest_output_reaches_the_console_and_poweroff_ends_nixvmm_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    g.text("hello from a tiny guest\n").unwrap();
    g.poweroff().unwrap();
    let kernel = write_guest(dir.path(), g);
    let out = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from a tiny guest\n"
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn builtin_guest_greets_and_powers_off() {
    let out = Command::new(nixvmm_bin()).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        vmm::machine::builtin_guest::GREETING
    );
}

#[test]
fn the_serial_console_goes_to_a_file_or_nowhere_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ttyS0.log");
    std::fs::write(&file, "old contents\n").unwrap();
    let serial = format!("file:{}", file.display());
    let out = Command::new(nixvmm_bin())
        .args(["run", "--serial", &serial])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        vmm::machine::builtin_guest::GREETING
    );
    let out = Command::new(nixvmm_bin())
        .args(["run", "--serial", "null"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    // Through the QEMU door: -serial file: and -serial chardev: naming a file chardev.
    let again = dir.path().join("again.log");
    let kernel = write_guest(dir.path(), {
        let mut g = Guest::new();
        g.text("door serial\n").unwrap();
        g.poweroff().unwrap();
        g
    });
    let chardev = format!("file,id=con,path={}", again.display());
    let out = Command::new(nixvmm_bin())
        .args(["qemu", "-m", "64", "-kernel", kernel.to_str().unwrap()])
        .args(["-chardev", &chardev, "-serial", "chardev:con"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&again).unwrap(), "door serial\n");
}

fn resetting_guest(dir: &Path) -> std::path::PathBuf {
    let mut g = Guest::new();
    g.text("boot\n").unwrap();
    g.i8042_reset().unwrap();
    write_guest(dir, g)
}

#[test]
fn i8042_reset_with_no_reboot_ends_with_status_0() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = resetting_guest(dir.path());
    let (outcome, text) = run(&VmConfig {
        no_reboot: true,
        ..config(&kernel)
    });
    assert_eq!(outcome, Outcome::Rebooted);
    assert_eq!(text, "boot\n");
    let out = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--no-reboot", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "boot\n");
}

#[test]
fn i8042_reset_without_no_reboot_boots_again() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = resetting_guest(dir.path());
    let (output, buffer) = ConsoleOutput::buffer();
    let control = Control::default();
    let config = config(&kernel);
    let runner = {
        let control = control.clone();
        std::thread::spawn(move || vmm::run(&config, &output, &control))
    };
    let boots = |buffer: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&buffer.lock().unwrap())
            .matches("boot\n")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while boots(&buffer) < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    control.stop();
    let outcome = runner.join().unwrap().expect("VM runs");
    assert_eq!(outcome, Outcome::Stopped);
    assert!(
        boots(&buffer) >= 3,
        "the guest booted {} times",
        boots(&buffer)
    );
}

/// A guest that echoes what it reads from the UART until a newline, then powers off.
fn echo_guest() -> Result<Guest, IcedError> {
    let mut g = Guest::new();
    let mut wait = g.a.create_label();
    let mut done = g.a.create_label();
    g.text("ready\n")?;
    g.a.set_label(&mut wait)?;
    g.a.mov(dx, 0x3fdu32)?; // line status: bit 0 = data ready
    g.a.in_(al, dx)?;
    g.a.test(al, 1u32)?;
    g.a.jz(wait)?;
    g.a.mov(dx, 0x3f8u32)?;
    g.a.in_(al, dx)?;
    g.a.cmp(al, b'\n' as u32)?;
    g.a.je(done)?;
    g.a.xor(al, 0x20u32)?; // swap case, so the test sees the guest's work
    g.a.out(dx, al)?;
    g.a.jmp(wait)?;
    g.a.set_label(&mut done)?;
    g.text("\n")?;
    g.poweroff()?;
    Ok(g)
}

#[test]
fn stdin_reaches_the_guest_uart() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), echo_guest().expect("guest assembles"));
    let mut child = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello, Guest\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ready\nhELLO\x0c\x00gUEST\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

/// The terminal's settings are the same after nixvmm as before (run under a pseudo-terminal
/// by util-linux's `script`), whether the guest powers off or nixvmm is killed.
#[test]
fn terminal_is_restored_on_exit_and_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    g.text("hi\n").unwrap();
    g.poweroff().unwrap();
    let poweroff = write_guest(dir.path(), g);
    let spinning = dir.path().join("spin.elf");
    let mut g = Guest::new();
    g.halt_forever().unwrap();
    std::fs::write(&spinning, g.build_elf().unwrap()).unwrap();
    let bin = nixvmm_bin();
    let during = dir.path().join("during");
    let kill = format!(
        "< /dev/tty & sleep 1; stty -g > {}; kill -TERM $!; wait",
        during.display()
    );
    for (kernel, how) in [(&poweroff, ""), (&spinning, kill.as_str())] {
        let before = dir.path().join("before");
        let after = dir.path().join("after");
        let shell = format!(
            "stty -g > {b}; {bin} run --memory 64M --kernel {k} {how}; stty -g > {a}",
            b = before.display(),
            a = after.display(),
            bin = bin.display(),
            k = kernel.display(),
        );
        let out = Command::new("script")
            .args(["-qec", &shell, "/dev/null"])
            .output()
            .expect("util-linux's script runs");
        let before = std::fs::read_to_string(&before).unwrap();
        let after = std::fs::read_to_string(&after).unwrap();
        assert!(
            !before.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(before, after, "terminal settings changed ({how:?})");
    }
    let during = std::fs::read_to_string(&during).unwrap();
    let after = std::fs::read_to_string(dir.path().join("after")).unwrap();
    assert_ne!(
        during, after,
        "the terminal was in raw mode while the guest ran"
    );
}

/// A guest that prints "tick" forever.
fn ticking_guest(dir: &Path) -> std::path::PathBuf {
    let mut g = Guest::new();
    let mut again = g.a.create_label();
    g.a.set_label(&mut again).unwrap();
    g.text("tick\n").unwrap();
    g.a.jmp(again).unwrap();
    write_guest(dir, g)
}

#[test]
fn a_paused_vm_runs_no_guest_code_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&ticking_guest(dir.path()));
    let (output, buffer) = ConsoleOutput::buffer();
    let control = Control::default();
    let runner = {
        let control = control.clone();
        std::thread::spawn(move || vmm::run(&config, &output, &control))
    };
    let printed = || buffer.lock().unwrap().len();
    let wait_for_more = |than: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while printed() <= than + 50 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(printed() > than + 50, "the guest does not print");
    };
    wait_for_more(0);
    for _ in 0..3 {
        control.pause().unwrap();
        let states = control.vcpu_states();
        assert!(!states.is_empty(), "the pause reached the running VM");
        assert!(states
            .iter()
            .all(|s| *s == vmm::machine::vcpu::VcpuState::Paused));
        let at_pause = printed();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(printed(), at_pause, "guest output while paused");
        control.resume().unwrap();
        wait_for_more(at_pause);
    }
    // A paused VM still stops.
    control.pause().unwrap();
    control.stop();
    let outcome = runner.join().unwrap().expect("VM runs");
    assert_eq!(outcome, Outcome::Stopped);
}

/// A reader of nixvmm's output that goes away (`nixvmm … | head -1`, a log collector that
/// died) costs the console, not the VM: output is dropped and poweroff still ends nixvmm
/// with status 0.
#[test]
fn a_closed_stdout_and_stderr_do_not_stop_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    for _ in 0..64 {
        g.text("line after line of console output nobody reads any more\n")
            .unwrap();
    }
    g.poweroff().unwrap();
    let kernel = write_guest(dir.path(), g);
    let mut child = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Both read ends closed before the guest writes a byte.
    drop(child.stdout.take());
    drop(child.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nixvmm still running 60 s after its output was closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

/// Guest RAM is advised for transparent huge pages (`hg` in its mapping's VmFlags), as QEMU
/// advises it: on hosts in THP `madvise` mode, NixOS's default among them, it would
/// otherwise stay on 4 KiB pages.
#[test]
fn guest_ram_is_advised_for_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(nixvmm_bin())
        .args(["run", "--memory", "96M", "--kernel"])
        .arg(ticking_guest(dir.path()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 5];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    // Each mapping: a header line, then fields ending in VmFlags; RAM is the one of 96 MiB.
    let mut size_kib = 0;
    let mut ram = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Size:") => size_kib = words.next().unwrap_or("0").parse().unwrap_or(0),
            Some("VmFlags:") if size_kib == 96 * 1024 => ram = Some(words.collect::<Vec<_>>()),
            _ => {}
        }
    }
    let flags = ram.unwrap_or_else(|| panic!("no 96 MiB mapping in:\n{smaps}"));
    assert!(flags.contains(&"hg"), "VmFlags: {flags:?}");
}

/// nixvmm raises its soft limit of open files to the hard one (a CI host's soft 1024 would
/// be below what its shares, NICs and vsock connections may hold).
#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new("prlimit")
        .arg("--nofile=256:4096")
        .arg(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(ticking_guest(dir.path()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("util-linux's prlimit runs");
    let mut first = [0u8; 5];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[3..5], ["4096", "4096"], "{line}");
}

/// Ctrl-A c switches the terminal from the guest's console to QEMU's monitor, as in QEMU's
/// `-nographic`: typed lines are monitor commands, echoed, and `quit` ends nixvmm.
#[test]
fn ctrl_a_c_opens_the_monitor_on_the_terminal() {
    use std::io::Write;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), echo_guest().expect("guest assembles"));
    let mut child = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut ready).unwrap();
    assert_eq!(&ready, b"ready\n", "the guest runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"\x01cinfo status\rfrob\rquit\r").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("monitor (nixvmm)"), "the banner: {text}");
    assert!(
        text.contains("(qemu) info status\r\nVM status: running\r\n(qemu) "),
        "echoed and answered: {text:?}"
    );
    assert!(text.contains("unknown command: 'frob'"), "{text:?}");
    assert_eq!(out.status.code(), Some(0), "quit ends nixvmm: {text:?}");
}

/// Ctrl-A x leaves the console and ends nixvmm with status 0, as QEMU's `mon:stdio` (and
/// nixvmm's own `--serial stdio`); what was typed before it reached the guest, the Ctrl-A
/// did not.
#[test]
fn ctrl_a_x_ends_nixvmm_with_status_0() {
    for args in [
        &["run", "--memory", "64M"][..],
        &["qemu", "-m", "64", "-serial", "mon:stdio"],
    ] {
        let (echoed, out, status) = type_at_echo_guest(args, b"ab", b"\x01x");
        assert_eq!(echoed, "AB", "{args:?}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(status.code(), Some(0), "{args:?}");
    }
}

/// QEMU's plain `-serial stdio` (the NixOS test driver's) has no Ctrl-A commands: every byte
/// typed reaches the guest, Ctrl-A x too.
#[test]
fn plain_serial_stdio_hands_ctrl_a_to_the_guest() {
    let args = ["qemu", "-m", "64", "-serial", "stdio", "-monitor", "none"];
    let (echoed, out, status) = type_at_echo_guest(&args, b"a\x01x\x01cb", b"\n");
    // The echo guest swaps case (bit 5): Ctrl-A comes back as `!`; \n powers it off.
    assert_eq!(echoed, "A!X!CB");
    assert_eq!(out, "\n");
    assert_eq!(status.code(), Some(0));
}

/// Starts nixvmm with `args` (native or QEMU door; the kernel is added) on the echo guest,
/// types `first` once it is ready and `then` once the guest echoed as many bytes; returns
/// the echo, the output after it, and the status.
fn type_at_echo_guest(
    args: &[&str],
    first: &[u8],
    then: &[u8],
) -> (String, String, std::process::ExitStatus) {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_guest(dir.path(), echo_guest().expect("guest assembles"));
    let kernel_option = if args[0] == "qemu" {
        "-kernel"
    } else {
        "--kernel"
    };
    let mut child = Command::new(nixvmm_bin())
        .args(args)
        .arg(kernel_option)
        .arg(&kernel)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    stdout.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"ready\n", "the guest runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(first).unwrap();
    let mut echoed = vec![0u8; first.len()];
    stdout.read_exact(&mut echoed).unwrap();
    stdin.write_all(then).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?}: nixvmm still runs 30 s after {then:?} was typed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stdin);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    (String::from_utf8_lossy(&echoed).into_owned(), rest, status)
}

/// `--monitor-listen` (QEMU's `-monitor unix:PATH,server=on,wait=off`): nixvmm listens, serves
/// one client, takes the next once it leaves, and `quit` from a client ends nixvmm.
#[test]
fn a_listening_monitor_serves_one_client_after_another_and_quit_ends_nixvmm() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    g.text("up\n").unwrap();
    g.halt_forever().unwrap();
    let kernel = write_guest(dir.path(), g);
    let socket = dir.path().join("monitor");
    let mut child = Command::new(nixvmm_bin())
        .args(["run", "--memory", "64M", "--kernel"])
        .arg(&kernel)
        .arg("--monitor-listen")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut up).unwrap();
    assert_eq!(&up, b"up\n");
    // Reads up to and including the next prompt.
    let until_prompt = |reader: &mut BufReader<UnixStream>| {
        let mut text = Vec::new();
        while !text.ends_with(b"(qemu) ") {
            let mut byte = [0u8; 1];
            std::io::Read::read_exact(reader, &mut byte).unwrap();
            text.push(byte[0]);
        }
        String::from_utf8(text).unwrap()
    };
    for client in 0..2 {
        let stream = UnixStream::connect(&socket).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        assert!(until_prompt(&mut reader).contains("QEMU"), "banner");
        (&stream).write_all(b"info status\n").unwrap();
        assert_eq!(
            until_prompt(&mut reader),
            "VM status: running\r\n(qemu) ",
            "client {client}"
        );
        if client == 1 {
            (&stream).write_all(b"quit\n").unwrap();
            let mut rest = String::new();
            let _ = reader.read_line(&mut rest);
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "quit ends nixvmm with status 0");
}

/// `-monitor stdio` with the serial console elsewhere: monitor commands on stdin, answers on
/// stdout; stdio cannot hold both the serial console and the monitor.
#[test]
fn the_monitor_on_stdio_answers_and_quits() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guest::new();
    g.halt_forever().unwrap();
    let kernel = write_guest(dir.path(), g);
    let kernel = kernel.to_str().unwrap();
    let mut child = Command::new(nixvmm_bin())
        .args(["qemu", "-m", "64", "-kernel", kernel, "-serial", "none"])
        .args(["-monitor", "stdio"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"info status\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("QEMU") && text.contains("(qemu) "),
        "banner: {text:?}"
    );
    assert!(text.contains("VM status: running\r\n(qemu) "), "{text:?}");
    assert_eq!(out.status.code(), Some(0), "quit ends nixvmm: {text:?}");

    let out = Command::new(nixvmm_bin())
        .args(["qemu", "-m", "64", "-kernel", kernel, "-serial", "stdio"])
        .args(["-monitor", "stdio"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stdio is taken twice"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// nixvmm's open descriptors and resident memory, from /proc.
fn fds_and_rss_kib(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap();
    (fds, rss)
}

/// `nixvmm qemu` on a guest that prints "up" and halts, with a listening QMP socket at
/// `dir/qmp` (and with `hmp`, a listening monitor at `dir/monitor`), its stderr in
/// `dir/stderr`; returns once the guest runs.
fn halted_guest_with_monitors(dir: &Path, hmp: bool) -> std::process::Child {
    let mut g = Guest::new();
    g.text("up\n").unwrap();
    g.halt_forever().unwrap();
    let kernel = write_guest(dir, g);
    let listening = |name: &str| format!("unix:{},server=on,wait=off", dir.join(name).display());
    let mut command = Command::new(nixvmm_bin());
    command
        .args(["qemu", "-m", "64", "-kernel"])
        .arg(&kernel)
        .args(["-qmp", &listening("qmp")]);
    if hmp {
        command.args(["-monitor", &listening("monitor")]);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let mut up = [0u8; 3];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut up).unwrap();
    assert_eq!(&up, b"up\n");
    child
}

/// Peers that try to make the monitors hold without end: more QMP clients than the cap, a
/// QMP client that never ends its JSON, an HMP line that never ends. Each is refused or
/// answered with an error, said once on stderr, and nixvmm's descriptors and memory stay
/// bounded; the monitors still answer afterwards.
#[test]
fn qmp_and_hmp_caps_hold_against_peers_that_push_without_end() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let (qmp, monitor) = (dir.path().join("qmp"), dir.path().join("monitor"));
    let mut child = halted_guest_with_monitors(dir.path(), true);
    let (fds_before, rss_before) = fds_and_rss_kib(child.id());
    let connect = |path: &Path| {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    // 64 QMP clients, all kept: 16 are greeted, the others closed at once.
    let clients: Vec<UnixStream> = (0..64).map(|_| connect(&qmp)).collect();
    let mut greeted = Vec::new();
    for client in clients {
        let mut line = String::new();
        let _ = BufReader::new(client.try_clone().unwrap()).read_line(&mut line);
        if line.contains("QMP") {
            greeted.push(client);
        }
    }
    assert_eq!(greeted.len(), 16, "QMP's MAX_CLIENTS");
    // One of them sends 8 MiB of a string that never ends.
    let mut pusher = BufReader::new(greeted[0].try_clone().unwrap());
    greeted[0]
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    let mut line = String::new();
    pusher.read_line(&mut line).unwrap();
    // Its answers are read meanwhile (a client that leaves them unread is dropped).
    let answers = std::thread::spawn(move || {
        let mut too_long = 0usize;
        let mut line = String::new();
        while !line.contains("\"return\"") {
            line.clear();
            if pusher.read_line(&mut line).unwrap_or(0) == 0 {
                panic!("the QMP client was dropped");
            }
            too_long += usize::from(line.contains("QMP input too long"));
        }
        too_long
    });
    let endless = vec![b'a'; 1 << 20];
    greeted[0].write_all(b"{\"execute\": \"").unwrap();
    for _ in 0..8 {
        greeted[0].write_all(&endless).unwrap();
    }
    // The rest of the string is bad JSON; then a command that is answered (sent again until
    // it is: one that comes in the same read as the bad JSON goes with it).
    greeted[0].write_all(b"\"}\n").unwrap();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if answers.is_finished() {
            break;
        }
        greeted[0]
            .write_all(b"{\"execute\": \"query-status\"}\n")
            .unwrap();
    }
    let too_long = answers.join().unwrap();
    assert!(too_long >= 1, "no error for 8 MiB");
    // The monitor: a line of 8 MiB, then a command that is answered.
    let mut hmp = connect(&monitor);
    let mut hmp_reader = BufReader::new(hmp.try_clone().unwrap());
    let until_prompt = |reader: &mut BufReader<UnixStream>| {
        let mut text = Vec::new();
        while !text.ends_with(b"(qemu) ") {
            let mut byte = [0u8; 1];
            reader.read_exact(&mut byte).unwrap();
            text.push(byte[0]);
        }
        String::from_utf8_lossy(&text).into_owned()
    };
    until_prompt(&mut hmp_reader);
    for _ in 0..8 {
        hmp.write_all(&endless).unwrap();
    }
    hmp.write_all(b"\ninfo status\n").unwrap();
    let mut answers = String::new();
    while !answers.contains("VM status: running") {
        answers.push_str(&until_prompt(&mut hmp_reader));
    }
    assert!(
        answers.contains("Error: a line longer than 4096 bytes"),
        "{answers}"
    );
    let (fds_after, rss_after) = fds_and_rss_kib(child.id());
    // A greeted QMP client holds two descriptors (its stream and its event sink), the
    // monitor's client one.
    assert!(
        fds_after <= fds_before + 2 * 16 + 1,
        "{fds_before} descriptors before, {fds_after} after"
    );
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{rss_before} KiB before, {rss_after} KiB after 16 MiB pushed"
    );
    hmp.write_all(b"quit\n").unwrap();
    assert!(child.wait().unwrap().success());
    let said = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    for cap in [
        "QMP: 16 clients at once",
        "QMP: a client sent 1048576 bytes",
        "monitor: a line longer than 4096",
    ] {
        assert_eq!(said.matches(cap).count(), 1, "{cap} said once:\n{said}");
    }
}

/// nixvmm's CPU time so far, in clock ticks (user + system, /proc/PID/stat).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Out of file descriptors, the sockets the control plane listens on (QMP, the monitor)
/// refuse (close) new clients instead of waking it without end, say so once, and the
/// clients they have go on being served. (Listening chardevs and the vsock muxer share the
/// code, SpareFd, and are polled only once the guest's driver is up: tier 1 tries them, in
/// tests/out_of_descriptors.rs.)
#[test]
fn listeners_out_of_descriptors_refuse_clients_without_spinning() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let socket = |name: &str| dir.path().join(name);
    let mut child = halted_guest_with_monitors(dir.path(), true);
    let first = UnixStream::connect(socket("qmp")).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(first.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    // No room for one more descriptor: the limit is on descriptor numbers, and a new one
    // takes the lowest free number.
    let open: std::collections::BTreeSet<usize> =
        std::fs::read_dir(format!("/proc/{}/fd", child.id()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
            .collect();
    let lowest_free = (0..).find(|n| !open.contains(n)).unwrap();
    let status = Command::new("prlimit")
        .arg(format!("--pid={}", child.id()))
        .arg(format!("--nofile={lowest_free}:{lowest_free}"))
        .status()
        .unwrap();
    assert!(status.success());
    let listeners = ["qmp", "monitor"];
    let waiting: Vec<(&str, UnixStream)> = listeners
        .iter()
        .flat_map(|name| (0..3).map(move |_| (*name, UnixStream::connect(socket(name)).unwrap())))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(child.id()) - before;
    assert!(
        spent < 30,
        "{spent} ticks of CPU in a second while out of descriptors"
    );
    for (name, mut client) in waiting {
        client
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut rest = Vec::new();
        let read = std::io::Read::read_to_end(&mut client, &mut rest);
        assert!(
            read.is_ok() && rest.is_empty(),
            "a {name} client was not refused: {read:?}\n{}",
            std::fs::read_to_string(socket("stderr")).unwrap()
        );
    }
    (&first)
        .write_all(b"{\"execute\": \"qmp_capabilities\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "{\"return\":{}}",
        "the first client is still served"
    );
    let _ = child.kill();
    let _ = child.wait();
    let said = std::fs::read_to_string(socket("stderr")).unwrap();
    for what in ["QMP", "monitor"] {
        let lines = said
            .lines()
            .filter(|l| l.contains(what) && l.contains("out of file descriptors"));
        assert_eq!(lines.count(), 1, "{what} said once:\n{said}");
    }
}
