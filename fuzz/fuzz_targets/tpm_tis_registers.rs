//! Any sequence of register reads and writes on the TPM TIS device, of every size, at any
//! offset of its five localities (and past them), with a backend that answers anything with
//! any response: the device never panics, never sends a command of more than its buffer and
//! never reads or writes past the access's bytes.

#![no_main]

use devices::bus::BusDevice;
use devices::tpm::{TpmBackend, TpmTis};
use libfuzzer_sys::fuzz_target;

/// Answers each command with bytes taken from the fuzzer's input, on the second poll.
struct Echo {
    response: Vec<u8>,
    polls: Option<u8>,
}

impl TpmBackend for Echo {
    fn start(&mut self, _locality: u8, command: Vec<u8>) {
        assert!(command.len() <= 4096, "a {}-byte command", command.len());
        assert!(self.polls.is_none(), "a command started while one runs");
        self.polls = Some(0);
    }
    fn response(&mut self, _wait: std::time::Duration) -> Option<Vec<u8>> {
        let polls = self.polls.as_mut().expect("polled while no command runs");
        *polls += 1;
        if *polls < 2 {
            return None;
        }
        self.polls = None;
        Some(self.response.clone())
    }
    fn cancel(&mut self) {}
    fn abandon(&mut self) {
        self.polls = None;
    }
    fn established(&mut self) -> bool {
        true
    }
    fn reset_established(&mut self, _locality: u8) {}
}

fuzz_target!(|data: &[u8]| {
    let (response, ops) = data.split_at(data.len().min(64));
    let mut tis = TpmTis::new(Box::new(Echo {
        response: response.to_vec(),
        polls: None,
    }));
    // Each access: kind and size (1 byte), offset (2 bytes), value (4 bytes).
    for op in ops.chunks_exact(7) {
        let size = [1, 2, 4, 8][usize::from(op[0] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x6000;
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&op[3..7]);
        if op[0] & 0x80 != 0 {
            tis.write(offset, &bytes[..size]);
        } else {
            tis.read(offset, &mut bytes[..size]);
        }
    }
});
