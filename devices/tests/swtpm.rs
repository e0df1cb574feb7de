//! The swtpm control-channel client against Debian's swtpm (scripts/setup installs it), in
//! both socket layouts qemu-vm.nix uses.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::tpm::swtpm::{Swtpm, SwtpmError};
use devices::tpm::worker::SwtpmWorker;
use devices::tpm::TpmTis;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `swtpm socket --tpm2` on state folder `dir` and returns it with the path of the
/// control socket nixvmm is given: `dir/socket` alone (older qemu-vm.nix), or with a data
/// socket of its own, `dir/socket` + `dir/socket.ctrl` (newer).
fn start_swtpm(dir: &Path, own_data_socket: bool) -> (Running, PathBuf) {
    // A killed swtpm leaves its sockets behind.
    for stale in ["socket", "socket.ctrl"] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    let mut cmd = Command::new("swtpm");
    cmd.arg("socket")
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .arg("--tpm2");
    let control = if own_data_socket {
        cmd.arg("--server")
            .arg(format!("type=unixio,path={}/socket", dir.display()))
            .args(["--flags", "not-need-init"]);
        dir.join("socket.ctrl")
    } else {
        dir.join("socket")
    };
    cmd.arg("--ctrl")
        .arg(format!("type=unixio,path={}", control.display()))
        .stdin(Stdio::null());
    let child = cmd
        .spawn()
        .expect("swtpm (Debian's swtpm package, installed by scripts/setup)");
    let running = Running(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !control.exists() || (own_data_socket && !dir.join("socket").exists()) {
        assert!(Instant::now() < deadline, "swtpm made no socket in {dir:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    (running, control)
}

const STARTUP_CLEAR: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0];
const GET_RANDOM_8: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
const NV_INDEX: u32 = 0x0150_0001;

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes(response[6..10].try_into().unwrap())
}

/// TPM2_NV_DefineSpace of an 8-byte owner index, with an empty password session.
fn nv_define() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&0x4000_0001u32.to_be_bytes()); // TPM_RH_OWNER
    body.extend_from_slice(&9u32.to_be_bytes()); // authorization area
    body.extend_from_slice(&0x4000_0009u32.to_be_bytes()); // TPM_RS_PW
    body.extend_from_slice(&[0, 0, 0, 0, 0]); // nonce, attributes, hmac
    body.extend_from_slice(&[0, 0]); // auth
    body.extend_from_slice(&14u16.to_be_bytes());
    body.extend_from_slice(&NV_INDEX.to_be_bytes());
    body.extend_from_slice(&0x000bu16.to_be_bytes()); // SHA-256
    body.extend_from_slice(&0x0206_0006u32.to_be_bytes()); // owner/auth read and write, no DA
    body.extend_from_slice(&[0, 0]); // policy
    body.extend_from_slice(&8u16.to_be_bytes());
    command(0x8002, 0x0000_012a, &body)
}

fn nv_read_public() -> Vec<u8> {
    command(0x8001, 0x0000_0169, &NV_INDEX.to_be_bytes())
}

fn command(tag: u16, code: u32, body: &[u8]) -> Vec<u8> {
    let mut c = tag.to_be_bytes().to_vec();
    c.extend_from_slice(&(10 + body.len() as u32).to_be_bytes());
    c.extend_from_slice(&code.to_be_bytes());
    c.extend_from_slice(body);
    c
}

fn random_and_state_survive_a_restart(own_data_socket: bool) {
    let tmp = tempfile::tempdir().unwrap();
    {
        let (_swtpm, control) = start_swtpm(tmp.path(), own_data_socket);
        let mut tpm = Swtpm::connect(&control).unwrap();
        tpm.power_on().unwrap();
        assert_eq!(rc(&tpm.execute(0, &STARTUP_CLEAR).unwrap()), 0);
        let random = tpm.execute(0, &GET_RANDOM_8).unwrap();
        assert_eq!(rc(&random), 0, "{random:x?}");
        assert_eq!(random.len(), 10 + 2 + 8);
        assert_eq!(rc(&tpm.execute(0, &nv_read_public()).unwrap()), 0x18b);
        assert_eq!(rc(&tpm.execute(0, &nv_define()).unwrap()), 0);
        assert!(!tpm.established().unwrap());
        tpm.shut_down().unwrap();
    }
    // A new swtpm on the same folder: the NV index is still there.
    let (_swtpm, control) = start_swtpm(tmp.path(), own_data_socket);
    let mut tpm = Swtpm::connect(&control).unwrap();
    tpm.power_on().unwrap();
    assert_eq!(rc(&tpm.execute(0, &STARTUP_CLEAR).unwrap()), 0);
    assert_eq!(rc(&tpm.execute(0, &nv_read_public()).unwrap()), 0);
    // A second power-on (a guest reboot) needs a new TPM2_Startup.
    tpm.power_on().unwrap();
    assert_eq!(
        rc(&tpm.execute(0, &GET_RANDOM_8).unwrap()),
        0x100,
        "TPM_RC_INITIALIZE"
    );
}

#[test]
fn a_control_socket_alone_gets_its_data_channel_by_set_datafd() {
    random_and_state_survive_a_restart(false);
}

#[test]
fn a_swtpm_with_its_own_data_socket_is_reached_beside_the_ctrl_socket() {
    random_and_state_survive_a_restart(true);
}

#[test]
fn localities_reach_swtpm() {
    let tmp = tempfile::tempdir().unwrap();
    let (_swtpm, control) = start_swtpm(tmp.path(), false);
    let mut tpm = Swtpm::connect(&control).unwrap();
    tpm.power_on().unwrap();
    assert_eq!(rc(&tpm.execute(0, &STARTUP_CLEAR).unwrap()), 0);
    for locality in [0, 3, 4, 0] {
        assert_eq!(rc(&tpm.execute(locality, &GET_RANDOM_8).unwrap()), 0);
    }
    // The establishment bit is reset from locality 3.
    tpm.reset_established(3).unwrap();
    assert!(!tpm.established().unwrap());
}

#[test]
fn no_swtpm_is_an_error_naming_the_option_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Swtpm::connect(&tmp.path().join("socket")).err().unwrap();
    assert!(matches!(err, SwtpmError::Connect { .. }));
    let text = err.to_string();
    assert!(text.starts_with("--tpm socket="), "{text}");
    assert!(text.contains("swtpm socket"), "{text}");
}

#[test]
fn a_swtpm_that_dies_gives_errors_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let (swtpm, control) = start_swtpm(tmp.path(), false);
    let mut tpm = Swtpm::connect(&control).unwrap();
    tpm.power_on().unwrap();
    drop(swtpm);
    let started = Instant::now();
    assert!(tpm.execute(0, &STARTUP_CLEAR).is_err());
    assert!(tpm.execute(0, &GET_RANDOM_8).is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_swtpm_lacking_a_needed_command_is_refused_by_name() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("socket");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // A control channel that can INIT and SHUTDOWN only.
    let server = std::thread::spawn(move || {
        let (mut peer, _) = listener.accept().unwrap();
        let mut command = [0u8; 4];
        peer.read_exact(&mut command).unwrap();
        assert_eq!(command, 1u32.to_be_bytes(), "GET_CAPABILITY first");
        peer.write_all(&3u64.to_be_bytes()).unwrap();
    });
    let err = Swtpm::connect(&path).err().unwrap().to_string();
    server.join().unwrap();
    assert!(err.starts_with("--tpm socket="), "{err}");
    for missing in ["SET_LOCALITY", "STOP", "SET_BUFFERSIZE"] {
        assert!(err.contains(missing), "{err}");
    }
    assert!(!err.contains("INIT,"), "{err}");
}

/// A TIS device on a worker serving `tpm`, and the worker.
fn tis_on_worker(tpm: Swtpm) -> (TpmTis, SwtpmWorker) {
    let worker = SwtpmWorker::start(tpm, Box::new(|| Ok(()))).unwrap();
    worker.power_on().unwrap();
    (TpmTis::new(Box::new(worker.backend())), worker)
}

use devices::tpm::{
    ACCESS_ACTIVE_LOCALITY, ACCESS_REQUEST_USE, LOCALITY_SIZE, REG_ACCESS, REG_DATA_FIFO as FIFO,
    REG_STS as STS, STS_DATA_AVAIL, STS_VALID,
};
/// TPM_STS command bits as one-byte writes (commandCancel is in the register's top byte).
const COMMAND_READY: u8 = devices::tpm::STS_COMMAND_READY as u8;
const GO: u8 = devices::tpm::STS_GO as u8;
const COMMAND_CANCEL: u8 = (devices::tpm::STS_COMMAND_CANCEL >> 24) as u8;
/// Locality 3's registers.
const LOCALITY_3: u64 = 3 * LOCALITY_SIZE;

fn sts(tis: &mut TpmTis) -> u32 {
    let mut b = [0u8; 4];
    tis.read(STS, &mut b);
    u32::from_le_bytes(b)
}

/// Locality 0 sends `command` up to tpmGo; returns how long the tpmGo write took.
fn send(tis: &mut TpmTis, command: &[u8]) -> Duration {
    tis.write(REG_ACCESS, &[ACCESS_REQUEST_USE]);
    tis.write(STS, &[COMMAND_READY]);
    tis.write(FIFO, command);
    let go = Instant::now();
    tis.write(STS, &[GO]);
    go.elapsed()
}

/// Polls TPM_STS as Linux's tpm_tis does until dataAvail (or `limit`), then reads the
/// response.
fn poll_response(tis: &mut TpmTis, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    while sts(tis) & (STS_VALID | STS_DATA_AVAIL) != STS_VALID | STS_DATA_AVAIL {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut response = Vec::new();
    while sts(tis) & STS_DATA_AVAIL != 0 {
        let mut b = [0u8];
        tis.read(FIFO, &mut b);
        response.push(b[0]);
    }
    Some(response)
}

#[test]
fn commands_run_off_the_vcpu_and_a_cancel_keeps_the_control_channel_in_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (_swtpm, control) = start_swtpm(tmp.path(), false);
    let (mut tis, worker) = tis_on_worker(Swtpm::connect(&control).unwrap());
    send(&mut tis, &STARTUP_CLEAR);
    let startup = poll_response(&mut tis, Duration::from_secs(30)).unwrap();
    assert_eq!(rc(&startup), 0);
    // commandCancel while GetRandom runs (or just after: swtpm reads its control channel
    // between commands), again and again: GetRandom still answers, one cancel's reply is
    // read before the next control request is written (two in swtpm's socket at once would
    // be read as one bad message), and later commands are not cancelled.
    for _ in 0..3 {
        send(&mut tis, &GET_RANDOM_8);
        for _ in 0..20 {
            tis.write(STS + 3, &[COMMAND_CANCEL]);
        }
        let random = poll_response(&mut tis, Duration::from_secs(30)).unwrap();
        assert!([0, 0x909].contains(&rc(&random)), "{random:x?}");
        tis.write(STS, &[COMMAND_READY]);
    }
    // Control requests after the cancels: a locality change and a power-on (a reboot).
    tis.write(REG_ACCESS, &[ACCESS_ACTIVE_LOCALITY]); // relinquished
    tis.write(LOCALITY_3 + REG_ACCESS, &[ACCESS_REQUEST_USE]);
    tis.write(LOCALITY_3 + STS, &[COMMAND_READY]);
    tis.write(LOCALITY_3 + FIFO, &GET_RANDOM_8);
    tis.write(LOCALITY_3 + STS, &[GO]);
    let mut b = [0u8; 4];
    let deadline = Instant::now() + Duration::from_secs(30);
    while {
        tis.read(LOCALITY_3 + STS, &mut b);
        u32::from_le_bytes(b) & STS_DATA_AVAIL == 0
    } {
        assert!(Instant::now() < deadline, "no response at locality 3");
        std::thread::sleep(Duration::from_millis(1));
    }
    worker.power_on().unwrap();
    let mut tis = TpmTis::new(Box::new(worker.backend()));
    send(&mut tis, &STARTUP_CLEAR);
    assert_eq!(
        rc(&poll_response(&mut tis, Duration::from_secs(30)).unwrap()),
        0
    );
    send(&mut tis, &GET_RANDOM_8);
    let random = poll_response(&mut tis, Duration::from_secs(30)).unwrap();
    assert_eq!(rc(&random), 0, "{random:x?}");
    worker.shut_down().unwrap();
}

/// A swtpm that answers its control channel but never a TPM command: a control socket
/// `dir/socket.ctrl` without SET_DATAFD, and a data socket `dir/socket` beside it.
fn start_mute_swtpm(dir: &Path) -> PathBuf {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    let control = dir.join("socket.ctrl");
    let control_listener = UnixListener::bind(&control).unwrap();
    let data_listener = UnixListener::bind(dir.join("socket")).unwrap();
    std::thread::spawn(move || {
        let Ok((mut peer, _)) = control_listener.accept() else {
            return;
        };
        // INIT, SHUTDOWN, SET_LOCALITY, STOP, SET_BUFFERSIZE.
        let caps: u64 = 1 | 2 | 8 | (1 << 10) | (1 << 13);
        let mut code = [0u8; 4];
        while peer.read_exact(&mut code).is_ok() {
            let (body, reply): (usize, Vec<u8>) = match u32::from_be_bytes(code) {
                1 => (0, caps.to_be_bytes().to_vec()),
                2 => (4, vec![0; 4]), // INIT
                5 => (1, vec![0; 4]), // SET_LOCALITY
                17 => (
                    4,
                    [0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0].to_vec(),
                ),
                _ => (0, vec![0; 4]), // STOP, SHUTDOWN
            };
            let mut skip = vec![0u8; body];
            if peer.read_exact(&mut skip).is_err() || peer.write_all(&reply).is_err() {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        // Takes the command and never answers.
        if let Ok((mut peer, _)) = data_listener.accept() {
            let mut sink = [0u8; 4096];
            while matches!(peer.read(&mut sink), Ok(n) if n > 0) {}
        }
    });
    control
}

/// A TIS device on a worker serving [`start_mute_swtpm`]'s swtpm in `dir`, whose commands
/// time out after `timeout`.
fn tis_on_mute_swtpm(dir: &Path, timeout: Duration) -> (TpmTis, SwtpmWorker) {
    let mut tpm = Swtpm::connect(&start_mute_swtpm(dir)).unwrap();
    tpm.set_command_timeout(timeout).unwrap();
    tis_on_worker(tpm)
}

#[test]
fn a_swtpm_that_never_answers_holds_no_vcpu_and_its_command_fails_after_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut tis, worker) = tis_on_mute_swtpm(tmp.path(), Duration::from_secs(2));
    // tpmGo returns at once; the guest polls and gives up as Linux does (commandReady).
    assert!(send(&mut tis, &STARTUP_CLEAR) < Duration::from_millis(500));
    assert_eq!(poll_response(&mut tis, Duration::from_millis(500)), None);
    tis.write(STS, &[COMMAND_READY]);
    assert_eq!(sts(&mut tis) & STS_DATA_AVAIL, 0);
    // The next command waits behind the first, which breaks the connection at its
    // timeout: it gets TPM_RC_FAILURE, as every later one.
    assert!(send(&mut tis, &GET_RANDOM_8) < Duration::from_millis(500));
    let failed = poll_response(&mut tis, Duration::from_secs(30)).unwrap();
    assert_eq!(rc(&failed), 0x101, "TPM_RC_FAILURE: {failed:x?}");
    tis.write(STS, &[COMMAND_READY]);
    send(&mut tis, &GET_RANDOM_8);
    let started = Instant::now();
    let failed = poll_response(&mut tis, Duration::from_secs(30)).unwrap();
    assert_eq!(rc(&failed), 0x101);
    assert!(started.elapsed() < Duration::from_secs(1));
    // A reboot's power-on is refused now (the caller decides what that means).
    assert!(matches!(worker.power_on(), Err(SwtpmError::Broken { .. })));
}

#[test]
fn a_guest_cannot_queue_commands_without_end_while_swtpm_hangs() {
    use devices::tpm::worker::MAX_QUEUED_JOBS;
    let tmp = tempfile::tempdir().unwrap();
    let (mut tis, _worker) = tis_on_mute_swtpm(tmp.path(), Duration::from_secs(60));
    // Commands sent and given up, one after the other: the first holds the worker, the
    // next ones wait for it, until the queue is full.
    for _ in 0..MAX_QUEUED_JOBS + 2 {
        send(&mut tis, &GET_RANDOM_8);
        tis.write(STS, &[COMMAND_READY]);
    }
    send(&mut tis, &GET_RANDOM_8);
    let busy = poll_response(&mut tis, Duration::from_secs(1)).unwrap();
    assert_eq!(rc(&busy), 0x922, "TPM_RC_RETRY: {busy:x?}");
}
