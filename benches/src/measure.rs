//! One timed run of a VMM: process start → first console byte → marker line → exit, and the
//! child's peak RSS from wait4(2).

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What one run measured; times are from process start.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub first_output: Option<Duration>,
    pub marker: Option<Duration>,
    pub exit: Option<Duration>,
    pub peak_rss_kib: Option<u64>,
    pub exit_code: Option<i32>,
    pub timed_out: bool,
}

enum Event {
    Bytes(Vec<u8>, Instant),
    Closed,
}

/// Waits for `pid`, returning its exit code and peak RSS (KiB).
fn wait_with_rusage(pid: libc::pid_t) -> (Option<i32>, Option<u64>) {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; both pointers are valid for the call.
    let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if ret != pid {
        return (None, None);
    }
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    (code, Some(usage.ru_maxrss as u64))
}

/// Runs `cmd` once, watching its stdout for `marker`.
pub fn run_once(cmd: &mut Command, marker: &str, timeout: Duration) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(Event::Closed);
                    return;
                }
                Ok(n) => {
                    let _ = tx.send(Event::Bytes(buf[..n].to_vec(), Instant::now()));
                }
            }
        }
    });
    let mut sample = Sample::default();
    let mut seen = Vec::new();
    let deadline = start + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Bytes(bytes, at)) => {
                sample.first_output.get_or_insert(at - start);
                seen.extend_from_slice(&bytes);
                if sample.marker.is_none() && contains_line(&seen, marker) {
                    sample.marker = Some(at - start);
                }
            }
            Ok(Event::Closed) => break,
            Err(_) => {
                sample.timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let (code, rss) = wait_with_rusage(child.id() as libc::pid_t);
    if !sample.timed_out {
        sample.exit = Some(start.elapsed());
    }
    sample.exit_code = code;
    sample.peak_rss_kib = rss;
    Ok(sample)
}

/// Whether `output` holds `marker` followed by a line end.
pub fn contains_line(output: &[u8], marker: &str) -> bool {
    let text = String::from_utf8_lossy(output);
    text.split_inclusive('\n')
        .any(|line| line.ends_with('\n') && line.trim_end().ends_with(marker))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_needs_a_complete_line() {
        assert!(!contains_line(b"boot\nNIXVMM-KIT: in", "NIXVMM-KIT: init"));
        assert!(!contains_line(
            b"boot\nNIXVMM-KIT: init",
            "NIXVMM-KIT: init"
        ));
        assert!(contains_line(
            b"boot\nNIXVMM-KIT: init\r\n",
            "NIXVMM-KIT: init"
        ));
    }

    #[test]
    fn measures_a_real_process() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; sleep 0.05; echo MARK; exit 3"]);
        let s = run_once(&mut cmd, "MARK", Duration::from_secs(10)).unwrap();
        assert!(s.first_output.unwrap() < s.marker.unwrap());
        assert!(s.marker.unwrap() <= s.exit.unwrap());
        assert_eq!(s.exit_code, Some(3));
        assert!(s.peak_rss_kib.unwrap() > 0);
        let mut slow = Command::new("sleep");
        slow.arg("5");
        let s = run_once(&mut slow, "MARK", Duration::from_millis(100)).unwrap();
        assert!(s.timed_out && s.exit.is_none());
    }
}
