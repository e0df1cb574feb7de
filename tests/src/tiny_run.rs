//! Running tiny guests from tests: write one to a file, boot it in-process with a watchdog, and
//! read back the `KEY=value` lines it reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm::host::console::ConsoleOutput;
use vmm::{Control, Kernel, Outcome, VmConfig};

use crate::tiny::Guest;

/// Writes `guest` as an ELF vmlinux into `dir`.
pub fn write_guest(dir: &Path, guest: Guest) -> PathBuf {
    let path = dir.join("guest.elf");
    std::fs::write(&path, guest.build_elf().expect("guest assembles")).expect("write the guest");
    path
}

/// Writes `guest` as a bzImage into `dir`.
pub fn write_bzimage(dir: &Path, guest: Guest) -> PathBuf {
    let path = dir.join("bzImage");
    std::fs::write(&path, guest.build_bzimage().expect("guest assembles"))
        .expect("write the guest");
    path
}

/// A small VM booting `kernel`.
pub fn config(kernel: &Path) -> VmConfig {
    VmConfig {
        kernel: Kernel::File(kernel.to_path_buf()),
        memory: 64 << 20,
        ..VmConfig::default()
    }
}

/// Runs `config` in-process and returns the outcome and everything the guest printed. A guest
/// still running after a minute is stopped and the test fails with what it printed.
pub fn run(config: &VmConfig) -> (Outcome, String) {
    let (output, buffer) = ConsoleOutput::buffer();
    let control = Control::default();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let runner = {
        let (config, control) = (config.clone(), control.clone());
        std::thread::spawn(move || {
            let result = vmm::run(&config, &output, &control);
            let _ = done_tx.send(());
            result
        })
    };
    let timed_out = done_rx.recv_timeout(Duration::from_secs(60)).is_err();
    control.stop();
    let outcome = runner
        .join()
        .expect("the VM thread panicked")
        .expect("VM runs");
    let text = String::from_utf8_lossy(&buffer.lock().expect("console buffer")).to_string();
    assert!(
        !timed_out,
        "guest still running after 60 s; it printed:\n{text}"
    );
    (outcome, text)
}

/// The value of a `KEY=value` line the guest printed.
pub fn value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("guest did not report {key}:\n{text}"))
}

/// The same, read as hexadecimal.
pub fn hex(text: &str, key: &str) -> u64 {
    u64::from_str_radix(value(text, key), 16).expect("a hex number")
}
