#![allow(clippy::unwrap_used)]
use super::*;
use std::sync::{Arc, Mutex};

/// A command as the backend got it: its locality and bytes.
type Sent = (u8, Vec<u8>);

/// Records each command with its locality and answers with a fixed response, at once or,
/// while `held`, only once released.
#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Vec<Sent>>>,
    established: Arc<Mutex<bool>>,
    held: Arc<Mutex<bool>>,
    cancels: Arc<Mutex<usize>>,
    running: bool,
}

const RESPONSE: [u8; 14] = [0x80, 0x01, 0, 0, 0, 14, 0, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef];

impl TpmBackend for Fake {
    fn start(&mut self, locality: u8, command: Vec<u8>) {
        assert!(!self.running, "a command started while one runs");
        self.seen.lock().unwrap().push((locality, command));
        self.running = true;
    }
    fn response(&mut self, _wait: std::time::Duration) -> Option<Vec<u8>> {
        assert!(self.running, "a response asked for while none runs");
        if *self.held.lock().unwrap() {
            return None;
        }
        self.running = false;
        Some(RESPONSE.to_vec())
    }
    fn cancel(&mut self) {
        *self.cancels.lock().unwrap() += 1;
    }
    fn abandon(&mut self) {
        self.running = false;
    }
    fn established(&mut self) -> bool {
        *self.established.lock().unwrap()
    }
    fn reset_established(&mut self, _locality: u8) {
        *self.established.lock().unwrap() = false;
    }
}

fn tis() -> (TpmTis, Fake) {
    let fake = Fake::default();
    (TpmTis::new(Box::new(fake.clone())), fake)
}

fn at(locality: u8, reg: u64) -> u64 {
    u64::from(locality) * LOCALITY_SIZE + reg
}

fn read8(tis: &mut TpmTis, offset: u64) -> u8 {
    let mut b = [0u8];
    tis.read(offset, &mut b);
    b[0]
}

fn read32(tis: &mut TpmTis, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    tis.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn sts(tis: &mut TpmTis, locality: u8) -> u32 {
    read32(tis, at(locality, REG_STS))
}

fn burst(status: u32) -> usize {
    ((status >> 8) & 0xffff) as usize
}

/// TPM2_GetRandom(8): the command Linux's tpm2_get_random sends.
const GET_RANDOM: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];

/// What Linux's tpm_tis_core does for one command: request the locality, commandReady, the
/// command byte by byte within the burst count checking Expect, tpmGo, then the response
/// while dataAvail, commandReady and relinquish.
fn transmit_like_linux(tis: &mut TpmTis, locality: u8, command: &[u8]) -> Vec<u8> {
    tis.write(at(locality, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    let access = read8(tis, at(locality, REG_ACCESS));
    assert_eq!(
        access & (ACCESS_ACTIVE_LOCALITY | ACCESS_REG_VALID),
        ACCESS_ACTIVE_LOCALITY | ACCESS_REG_VALID
    );
    tis.write(at(locality, REG_STS), &[STS_COMMAND_READY as u8]);
    assert_ne!(sts(tis, locality) & STS_COMMAND_READY, 0);
    let mut sent = 0;
    while sent < command.len() - 1 {
        let n = burst(sts(tis, locality)).min(command.len() - 1 - sent);
        assert!(n > 0, "a zero burst count while receiving");
        for b in &command[sent..sent + n] {
            tis.write(at(locality, REG_DATA_FIFO), &[*b]);
        }
        sent += n;
        let status = sts(tis, locality);
        assert_ne!(status & STS_VALID, 0);
        assert_ne!(status & STS_EXPECT, 0, "Expect set before the last byte");
    }
    tis.write(at(locality, REG_DATA_FIFO), &command[command.len() - 1..]);
    assert_eq!(sts(tis, locality) & (STS_VALID | STS_EXPECT), STS_VALID);
    tis.write(at(locality, REG_STS), &[STS_GO as u8]);
    let mut response = Vec::new();
    loop {
        let status = sts(tis, locality);
        if status & STS_DATA_AVAIL == 0 {
            break;
        }
        for _ in 0..burst(status) {
            response.push(read8(tis, at(locality, REG_DATA_FIFO)));
        }
    }
    tis.write(at(locality, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(locality, REG_ACCESS), &[ACCESS_ACTIVE_LOCALITY]);
    response
}

#[test]
fn a_command_goes_through_the_fifo_as_linux_sends_it() {
    let (mut tis, fake) = tis();
    assert_eq!(transmit_like_linux(&mut tis, 0, &GET_RANDOM), RESPONSE);
    assert_eq!(*fake.seen.lock().unwrap(), vec![(0, GET_RANDOM.to_vec())]);
    // Relinquished: no locality is active and its STS reads as all ones.
    assert_eq!(
        read8(&mut tis, at(0, REG_ACCESS)) & ACCESS_ACTIVE_LOCALITY,
        0
    );
    assert_eq!(sts(&mut tis, 0), u32::MAX);
}

#[test]
fn the_command_runs_at_the_locality_that_sent_it() {
    let (mut tis, fake) = tis();
    transmit_like_linux(&mut tis, 2, &GET_RANDOM);
    assert_eq!(fake.seen.lock().unwrap()[0].0, 2);
}

#[test]
fn identification_registers_read_as_a_tpm2_tis() {
    let (mut tis, _) = tis();
    assert_eq!(read32(&mut tis, at(0, REG_DID_VID)), DID_VID);
    assert_eq!(read32(&mut tis, at(0, REG_INTERFACE_ID)) & 0xf, 0, "FIFO");
    assert_eq!(read32(&mut tis, at(0, REG_INTF_CAPABILITY)) >> 28, 3);
    // The family bits of TPM_STS say TPM 2.0 once the locality is active.
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    assert_eq!((sts(&mut tis, 0) >> 26) & 3, 1);
    // 16-bit read of the burst count bytes, as some drivers do.
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    let mut two = [0u8; 2];
    tis.read(at(0, REG_STS + 1), &mut two);
    assert_eq!(usize::from(u16::from_le_bytes(two)), BUFFER_MAX);
}

#[test]
fn a_second_locality_waits_until_the_first_relinquishes() {
    let (mut tis, _) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(1, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    assert_eq!(
        read8(&mut tis, at(1, REG_ACCESS)) & ACCESS_ACTIVE_LOCALITY,
        0
    );
    assert_ne!(
        read8(&mut tis, at(0, REG_ACCESS)) & ACCESS_PENDING_REQUEST,
        0
    );
    tis.write(at(0, REG_ACCESS), &[ACCESS_ACTIVE_LOCALITY]);
    assert_ne!(
        read8(&mut tis, at(1, REG_ACCESS)) & ACCESS_ACTIVE_LOCALITY,
        0
    );
}

#[test]
fn a_higher_locality_seizes_and_the_lower_one_is_told() {
    let (mut tis, _) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM[..4]);
    tis.write(at(3, REG_ACCESS), &[ACCESS_SEIZE]);
    assert_ne!(
        read8(&mut tis, at(3, REG_ACCESS)) & ACCESS_ACTIVE_LOCALITY,
        0
    );
    assert_ne!(read8(&mut tis, at(0, REG_ACCESS)) & ACCESS_BEEN_SEIZED, 0);
    // A lower locality cannot seize back.
    tis.write(at(1, REG_ACCESS), &[ACCESS_SEIZE]);
    assert_ne!(
        read8(&mut tis, at(3, REG_ACCESS)) & ACCESS_ACTIVE_LOCALITY,
        0
    );
}

#[test]
fn an_inactive_locality_cannot_send_or_read() {
    let (mut tis, fake) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(1, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(1, REG_DATA_FIFO), &GET_RANDOM);
    tis.write(at(1, REG_STS), &[STS_GO as u8]);
    assert!(fake.seen.lock().unwrap().is_empty());
    assert_eq!(read8(&mut tis, at(1, REG_DATA_FIFO)), 0xff);
}

#[test]
fn go_before_the_command_is_complete_does_nothing() {
    let (mut tis, fake) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM[..8]);
    tis.write(at(0, REG_STS), &[STS_GO as u8]);
    assert!(fake.seen.lock().unwrap().is_empty());
    assert_ne!(sts(&mut tis, 0) & STS_EXPECT, 0);
}

#[test]
fn a_header_with_a_wrong_size_is_answered_without_the_backend() {
    let (mut tis, fake) = tis();
    for size in [3u32, 0xffff_ffff] {
        tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
        tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
        let mut command = vec![0x80, 0x01];
        command.extend_from_slice(&size.to_be_bytes());
        command.resize(BUFFER_MAX + 100, 0);
        tis.write(at(0, REG_DATA_FIFO), &command);
        // Expect is clear once the size is reached or the buffer is full.
        assert_eq!(sts(&mut tis, 0) & STS_EXPECT, 0);
        tis.write(at(0, REG_STS), &[STS_GO as u8]);
        let mut response = [0u8; 10];
        for b in response.iter_mut() {
            *b = read8(&mut tis, at(0, REG_DATA_FIFO));
        }
        assert_eq!(response.to_vec(), error_response(TPM_RC_COMMAND_SIZE));
        assert_eq!(sts(&mut tis, 0) & STS_DATA_AVAIL, 0);
        tis.write(at(0, REG_ACCESS), &[ACCESS_ACTIVE_LOCALITY]);
    }
    assert!(fake.seen.lock().unwrap().is_empty());
}

#[test]
fn response_retry_reads_the_response_again_and_command_ready_aborts() {
    let (mut tis, fake) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM);
    tis.write(at(0, REG_STS), &[STS_GO as u8]);
    let mut first = [0u8; 4];
    tis.read(at(0, REG_DATA_FIFO), &mut first);
    tis.write(at(0, REG_STS), &[STS_RESPONSE_RETRY as u8]);
    let mut again = [0u8; 4];
    tis.read(at(0, REG_DATA_FIFO), &mut again);
    assert_eq!(first, again);
    assert_eq!(first, RESPONSE[..4]);
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    assert_eq!(sts(&mut tis, 0) & STS_DATA_AVAIL, 0);
    assert_eq!(read8(&mut tis, at(0, REG_DATA_FIFO)), 0xff);
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
}

#[test]
fn the_establishment_bit_follows_the_backend_and_resets_from_locality_3() {
    let (mut tis, fake) = tis();
    *fake.established.lock().unwrap() = true;
    assert_eq!(read8(&mut tis, at(0, REG_ACCESS)) & ACCESS_ESTABLISHMENT, 0);
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS + 3), &[(STS_RESET_ESTABLISHMENT >> 24) as u8]);
    assert!(
        *fake.established.lock().unwrap(),
        "locality 0 may not reset it"
    );
    tis.write(at(0, REG_ACCESS), &[ACCESS_ACTIVE_LOCALITY]);
    tis.write(at(3, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(3, REG_STS + 3), &[(STS_RESET_ESTABLISHMENT >> 24) as u8]);
    assert_ne!(read8(&mut tis, at(0, REG_ACCESS)) & ACCESS_ESTABLISHMENT, 0);
}

#[test]
fn accesses_outside_the_five_localities_read_ones_and_are_ignored() {
    let (mut tis, _) = tis();
    tis.write(firmware::layout::TPM_TIS_SIZE + 8, &[1, 2, 3, 4]);
    assert_eq!(
        read32(&mut tis, firmware::layout::TPM_TIS_SIZE + 8),
        u32::MAX
    );
    assert_eq!(read32(&mut tis, at(0, 0x40)), u32::MAX);
}

#[test]
fn unaligned_and_wide_writes_past_a_register_do_not_spill() {
    let (mut tis, _) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    // Every width at every byte of the first registers: no panic, nothing runs.
    for offset in 0..0x40u64 {
        for len in [1usize, 2, 3, 4, 8] {
            if is_fifo(offset) {
                continue;
            }
            tis.write(at(0, offset), &vec![0u8; len]);
            let mut out = vec![0u8; len];
            tis.read(at(0, offset), &mut out);
        }
    }
    // A 4-byte write at STS + 1 whose last byte would be commandReady at STS + 0 if it
    // wrapped: STS stays as it was.
    let before = sts(&mut tis, 0);
    tis.write(at(0, REG_STS + 1), &[0, 0, 0, STS_COMMAND_READY as u8]);
    assert_eq!(sts(&mut tis, 0), before);
}

#[test]
fn locality_4_is_the_cpus_and_the_guest_cannot_use_it() {
    let (mut tis, fake) = tis();
    tis.write(at(4, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(4, REG_ACCESS), &[ACCESS_SEIZE]);
    assert_eq!(
        read8(&mut tis, at(4, REG_ACCESS)) & ACCESS_ACTIVE_LOCALITY,
        0
    );
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    transmit_like_linux(&mut tis, 0, &GET_RANDOM);
    assert!(fake.seen.lock().unwrap().iter().all(|(l, _)| *l == 0));
}

#[test]
fn a_status_write_naming_two_commands_does_nothing() {
    let (mut tis, fake) = tis();
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM);
    tis.write(at(0, REG_STS), &[(STS_GO | STS_COMMAND_READY) as u8]);
    assert!(fake.seen.lock().unwrap().is_empty());
    tis.write(at(0, REG_STS), &[STS_GO as u8]);
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
}

/// Sends GET_RANDOM from locality 0 up to tpmGo.
fn send_up_to_go(tis: &mut TpmTis) {
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM);
    tis.write(at(0, REG_STS), &[STS_GO as u8]);
}

#[test]
fn while_the_backend_runs_the_command_the_guest_polls_without_data() {
    let (mut tis, fake) = tis();
    *fake.held.lock().unwrap() = true;
    send_up_to_go(&mut tis);
    for _ in 0..3 {
        let status = sts(&mut tis, 0);
        assert_eq!(
            status & (STS_VALID | STS_DATA_AVAIL | STS_EXPECT),
            STS_VALID
        );
        assert_eq!(burst(status), 0);
        assert_eq!(read8(&mut tis, at(0, REG_DATA_FIFO)), 0xff);
    }
    // FIFO writes meanwhile are not a new command.
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM);
    *fake.held.lock().unwrap() = false;
    let status = sts(&mut tis, 0);
    assert_ne!(status & STS_DATA_AVAIL, 0);
    assert_eq!(burst(status), RESPONSE.len());
    let response: Vec<u8> = (0..RESPONSE.len())
        .map(|_| read8(&mut tis, at(0, REG_DATA_FIFO)))
        .collect();
    assert_eq!(response, RESPONSE);
    assert_eq!(fake.seen.lock().unwrap().len(), 1);
}

#[test]
fn command_cancel_reaches_the_backend_only_while_a_command_runs() {
    let (mut tis, fake) = tis();
    let cancel = [(STS_COMMAND_CANCEL >> 24) as u8];
    tis.write(at(0, REG_ACCESS), &[ACCESS_REQUEST_USE]);
    tis.write(at(0, REG_STS + 3), &cancel);
    assert_eq!(*fake.cancels.lock().unwrap(), 0, "nothing runs yet");
    *fake.held.lock().unwrap() = true;
    send_up_to_go(&mut tis);
    tis.write(at(0, REG_STS + 3), &cancel);
    assert_eq!(*fake.cancels.lock().unwrap(), 1);
    // The TPM answers anyway (a cancelled command's response is TPM_RC_CANCELED).
    *fake.held.lock().unwrap() = false;
    assert_ne!(sts(&mut tis, 0) & STS_DATA_AVAIL, 0);
}

#[test]
fn command_ready_or_a_seize_during_execution_abandons_the_command() {
    let (mut tis, fake) = tis();
    *fake.held.lock().unwrap() = true;
    send_up_to_go(&mut tis);
    // Linux gives up on a command that ran out of time with commandReady.
    tis.write(at(0, REG_STS), &[STS_COMMAND_READY as u8]);
    assert_ne!(sts(&mut tis, 0) & STS_COMMAND_READY, 0);
    assert_eq!(read8(&mut tis, at(0, REG_DATA_FIFO)), 0xff);
    // The next command runs (the fake asserts the first was given up).
    tis.write(at(0, REG_DATA_FIFO), &GET_RANDOM);
    tis.write(at(0, REG_STS), &[STS_GO as u8]);
    assert_eq!(fake.seen.lock().unwrap().len(), 2);
    tis.write(at(3, REG_ACCESS), &[ACCESS_SEIZE]);
    *fake.held.lock().unwrap() = false;
    assert_eq!(
        sts(&mut tis, 0),
        u32::MAX,
        "locality 0 is not active any more"
    );
    assert_eq!(sts(&mut tis, 3) & STS_DATA_AVAIL, 0);
}
