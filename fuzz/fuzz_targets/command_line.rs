//! Any command line, through both front doors' parsers: QEMU's (words split at NUL bytes) and
//! the native option strings (`--disk`, `--share`, `--net`, `--port`, `--vsock`, `--tpm`,
//! `--serial`, `--memory`). Each gives a configuration or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::config::{self, console, net};
use vmm::front::qemu;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let words: Vec<String> = text.split('\0').map(String::from).collect();
    let _ = qemu::parse(&words);
    for option in words.iter().take(8) {
        let _ = config::parse_disk(option);
        let _ = config::parse_share(option);
        let _ = net::parse_net(option);
        let _ = console::parse_port(option);
        let _ = config::parse_vsock(option);
        let _ = config::parse_tpm(option);
        let _ = config::parse_serial(option);
        let _ = config::parse_size(option);
    }
});
