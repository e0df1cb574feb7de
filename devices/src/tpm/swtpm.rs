//! A client of swtpm's control channel (`swtpm socket --ctrl type=unixio,path=…`), written
//! from swtpm's documentation (`man swtpm_ioctls`, swtpm-dev's `tpm_ioctl.h`): each request is
//! a big-endian 32-bit command code and its fixed-size body, each reply a fixed-size body
//! starting with a big-endian 32-bit TPM result (0 = success). No crate speaks it.
//!
//! TPM commands go over a data channel: one end of a socketpair handed to swtpm with
//! `CMD_SET_DATAFD` (SCM_RIGHTS), as QEMU does. A swtpm started with its own `--server`
//! socket refuses that; the data channel is then that socket, found beside the control one
//! (`D/socket` for a control socket `D/socket.ctrl`, the layout of newer qemu-vm.nix).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const CMD_GET_CAPABILITY: u32 = 1;
const CMD_INIT: u32 = 2;
const CMD_SHUTDOWN: u32 = 3;
const CMD_GET_TPMESTABLISHED: u32 = 4;
const CMD_SET_LOCALITY: u32 = 5;
const CMD_CANCEL_TPM_CMD: u32 = 9;
const CMD_RESET_TPMESTABLISHED: u32 = 11;
const CMD_STOP: u32 = 14;
const CMD_SET_DATAFD: u32 = 16;
const CMD_SET_BUFFERSIZE: u32 = 17;

/// `ptm_cap` bits for the commands nixvmm sends.
const CAP_INIT: u64 = 1 << 0;
const CAP_SHUTDOWN: u64 = 1 << 1;
const CAP_GET_TPMESTABLISHED: u64 = 1 << 2;
const CAP_SET_LOCALITY: u64 = 1 << 3;
const CAP_CANCEL_TPM_CMD: u64 = 1 << 5;
const CAP_RESET_TPMESTABLISHED: u64 = 1 << 7;
const CAP_STOP: u64 = 1 << 10;
const CAP_SET_DATAFD: u64 = 1 << 12;
const CAP_SET_BUFFERSIZE: u64 = 1 << 13;

/// What nixvmm cannot do without.
const NEEDED: [(u64, &str); 5] = [
    (CAP_INIT, "INIT"),
    (CAP_SHUTDOWN, "SHUTDOWN"),
    (CAP_SET_LOCALITY, "SET_LOCALITY"),
    (CAP_STOP, "STOP"),
    (CAP_SET_BUFFERSIZE, "SET_BUFFERSIZE"),
];

/// The largest TPM command or response (the TIS FIFO's buffer).
pub const BUFFER_SIZE: u32 = 4096;
/// How long a control request may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one TPM command may take (an RSA key generation by a software TPM on a slow,
/// emulated host takes tens of seconds; Linux's longest TPM2 duration is 300 s). swtpm
/// reads its control channel only between commands, so a cancel cannot end a command that
/// never ends: one that runs out of time breaks the connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum SwtpmError {
    #[error(
        "--tpm socket={}: cannot connect ({source}); start swtpm first, e.g. `swtpm socket \
         --tpmstate dir=D --ctrl type=unixio,path=D/socket --tpm2 --daemon`",
        path.display()
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--tpm socket={}: swtpm lacks {what} on its control channel", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("--tpm socket={}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("--tpm socket={}: swtpm answered {what} with TPM result {code:#x}", path.display())]
    Refused {
        path: PathBuf,
        what: &'static str,
        code: u32,
    },
    #[error("--tpm socket={}: swtpm's buffer is {size} bytes, nixvmm needs {BUFFER_SIZE}", path.display())]
    BufferSize { path: PathBuf, size: u32 },
    #[error("--tpm socket={}: the connection to swtpm failed earlier", path.display())]
    Broken { path: PathBuf },
    #[error("--tpm socket={}: swtpm did not answer within {seconds} s", path.display())]
    Unanswered { path: PathBuf, seconds: u64 },
    #[error("--tpm socket={}: swtpm is still busy with the guest's earlier commands", path.display())]
    Busy { path: PathBuf },
    #[error("--tpm socket={}: the TPM thread: {reason}", path.display())]
    Thread { path: PathBuf, reason: String },
}

/// Turns an I/O error while doing `what` with the swtpm at `path` into a [`SwtpmError`].
fn io_error<'a>(path: &'a Path, what: &'static str) -> impl Fn(std::io::Error) -> SwtpmError + 'a {
    move |source| SwtpmError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// The sending side of the control channel, shared with a [`Canceller`] so that a cancel can
/// go out while a command runs. swtpm reads one control message per receive, so two that
/// wait in its socket together would be read as one bad message: a request holds the writer
/// from its write to its reply (a cancel meanwhile is not sent), at most one cancel is
/// unanswered, and its reply is read before the next request is written.
struct ControlWriter {
    stream: UnixStream,
    cancel_unanswered: bool,
}

/// Sends CANCEL_TPM_CMD to a [`Swtpm`] from another thread than the one running its command.
#[derive(Clone)]
pub struct Canceller {
    writer: Option<Arc<Mutex<ControlWriter>>>,
}

impl Canceller {
    /// Asks swtpm to cancel the running command. Never waits: if a request is being sent
    /// just then, or swtpm cannot cancel, nothing is sent (a cancel is only a request; swtpm
    /// reads it once the command is done, and libtpms clears it when the next one starts).
    pub fn cancel(&self) {
        let Some(Ok(mut writer)) = self.writer.as_ref().map(|w| w.try_lock()) else {
            return;
        };
        // Four bytes into a socket holding nothing else of ours: the write never waits.
        if !writer.cancel_unanswered
            && writer
                .stream
                .write_all(&CMD_CANCEL_TPM_CMD.to_be_bytes())
                .is_ok()
        {
            writer.cancel_unanswered = true;
        }
    }
}

/// A connection to one swtpm, kept for the whole run (across guest reboots).
pub struct Swtpm {
    path: PathBuf,
    control: UnixStream,
    writer: Arc<Mutex<ControlWriter>>,
    data: UnixStream,
    caps: u64,
    locality: Option<u8>,
    /// An exchange failed midway: what is left in the sockets no longer matches a request,
    /// so nothing more is sent.
    broken: bool,
}

impl Swtpm {
    /// Connects to swtpm's control socket at `path`, opens the data channel, and checks what
    /// swtpm can do. The TPM is not started yet: [`Swtpm::power_on`] does that.
    pub fn connect(path: &Path) -> Result<Swtpm, SwtpmError> {
        let control = UnixStream::connect(path).map_err(|source| SwtpmError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |what| io_error(path, what);
        control
            .set_read_timeout(Some(CONTROL_TIMEOUT))
            .map_err(io("control socket"))?;
        let caps = {
            let mut control = &control;
            control
                .write_all(&CMD_GET_CAPABILITY.to_be_bytes())
                .map_err(io("GET_CAPABILITY"))?;
            let mut reply = [0u8; 8];
            control
                .read_exact(&mut reply)
                .map_err(io("GET_CAPABILITY reply"))?;
            u64::from_be_bytes(reply)
        };
        let missing: Vec<&str> = NEEDED
            .iter()
            .filter(|(bit, _)| caps & bit == 0)
            .map(|(_, name)| *name)
            .collect();
        if !missing.is_empty() {
            return Err(SwtpmError::Missing {
                path: path.to_path_buf(),
                what: missing.join(", "),
            });
        }
        let data = Self::data_channel(path, &control, caps)?;
        data.set_read_timeout(Some(COMMAND_TIMEOUT))
            .map_err(io("data socket"))?;
        let writer = ControlWriter {
            stream: control.try_clone().map_err(io("control socket"))?,
            cancel_unanswered: false,
        };
        Ok(Swtpm {
            path: path.to_path_buf(),
            control,
            writer: Arc::new(Mutex::new(writer)),
            data,
            caps,
            locality: None,
            broken: false,
        })
    }

    /// One end of a socketpair handed over with SET_DATAFD, or swtpm's own `--server` socket.
    fn data_channel(
        path: &Path,
        control: &UnixStream,
        caps: u64,
    ) -> Result<UnixStream, SwtpmError> {
        let io = |what| io_error(path, what);
        let server = path
            .to_str()
            .and_then(|p| p.strip_suffix(".ctrl"))
            .map(PathBuf::from);
        if caps & CAP_SET_DATAFD != 0 {
            let (ours, theirs) = UnixStream::pair().map_err(io("socketpair"))?;
            control
                .send_with_fd(&CMD_SET_DATAFD.to_be_bytes()[..], theirs.as_raw_fd())
                .map_err(|e| io("SET_DATAFD")(std::io::Error::from(e)))?;
            drop(theirs);
            let mut reply = [0u8; 4];
            (&*control)
                .read_exact(&mut reply)
                .map_err(io("SET_DATAFD reply"))?;
            match u32::from_be_bytes(reply) {
                0 => return Ok(ours),
                // Refused because it serves its own data socket.
                _ if server.is_some() => {}
                code => {
                    return Err(SwtpmError::Refused {
                        path: path.to_path_buf(),
                        what: "SET_DATAFD",
                        code,
                    })
                }
            }
        }
        match server {
            Some(server) => UnixStream::connect(&server).map_err(|source| SwtpmError::Connect {
                path: server,
                source,
            }),
            None => Err(SwtpmError::Missing {
                path: path.to_path_buf(),
                what: "SET_DATAFD (and there is no data socket beside a `.ctrl` socket)".into(),
            }),
        }
    }

    /// The control socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How to cancel this swtpm's running command from another thread.
    pub fn canceller(&self) -> Canceller {
        let can = self.caps & CAP_CANCEL_TPM_CMD != 0;
        Canceller {
            writer: can.then(|| self.writer.clone()),
        }
    }

    /// Sets how long one TPM command may take (300 s unless set).
    pub fn set_command_timeout(&mut self, timeout: Duration) -> Result<(), SwtpmError> {
        let result = self.data.set_read_timeout(Some(timeout));
        result.map_err(self.io("data socket"))
    }

    fn io(&self, what: &'static str) -> impl Fn(std::io::Error) -> SwtpmError + '_ {
        io_error(&self.path, what)
    }

    /// Runs `exchange` unless an earlier one broke the connection; an I/O failure breaks it.
    fn guarded<T>(
        &mut self,
        exchange: impl FnOnce(&mut Swtpm) -> Result<T, SwtpmError>,
    ) -> Result<T, SwtpmError> {
        if self.broken {
            return Err(SwtpmError::Broken {
                path: self.path.clone(),
            });
        }
        let result = exchange(self);
        if let Err(SwtpmError::Io { .. }) = result {
            self.broken = true;
        }
        result
    }

    /// Sends a control request and reads its reply into `reply`: the TPM result (4 bytes),
    /// which must be 0, then the rest (a failing request's reply is the result alone).
    fn request(
        &mut self,
        what: &'static str,
        command: u32,
        body: &[u8],
        reply: &mut [u8],
    ) -> Result<(), SwtpmError> {
        self.guarded(|tpm| {
            let mut request = command.to_be_bytes().to_vec();
            request.extend_from_slice(body);
            let writer = tpm.writer.clone();
            let mut writer = writer.lock().unwrap_or_else(|p| p.into_inner());
            if std::mem::take(&mut writer.cancel_unanswered) {
                let mut cancel_reply = [0u8; 4];
                let read = tpm.control.read_exact(&mut cancel_reply);
                read.map_err(tpm.io("CANCEL_TPM_CMD reply"))?;
            }
            writer.stream.write_all(&request).map_err(tpm.io(what))?;
            let (result, rest) = reply.split_at_mut(4);
            tpm.control.read_exact(result).map_err(tpm.io(what))?;
            let code = u32::from_be_bytes([result[0], result[1], result[2], result[3]]);
            if code != 0 {
                return Err(SwtpmError::Refused {
                    path: tpm.path.clone(),
                    what,
                    code,
                });
            }
            tpm.control.read_exact(rest).map_err(tpm.io(what))
        })
    }

    /// Powers the TPM on as a machine (re)start does: STOP, SET_BUFFERSIZE, INIT.
    pub fn power_on(&mut self) -> Result<(), SwtpmError> {
        let mut reply = [0u8; 4];
        self.request("STOP", CMD_STOP, &[], &mut reply)?;
        let mut sizes = [0u8; 16];
        self.request(
            "SET_BUFFERSIZE",
            CMD_SET_BUFFERSIZE,
            &BUFFER_SIZE.to_be_bytes(),
            &mut sizes,
        )?;
        let size = u32::from_be_bytes([sizes[4], sizes[5], sizes[6], sizes[7]]);
        if size < BUFFER_SIZE {
            return Err(SwtpmError::BufferSize {
                path: self.path.clone(),
                size,
            });
        }
        self.request("INIT", CMD_INIT, &0u32.to_be_bytes(), &mut reply)?;
        self.locality = None;
        Ok(())
    }

    /// Shuts the TPM down, as QEMU does when it ends; swtpm then exits.
    pub fn shut_down(&mut self) -> Result<(), SwtpmError> {
        let mut reply = [0u8; 4];
        self.request("SHUTDOWN", CMD_SHUTDOWN, &[], &mut reply)
    }

    /// Runs one TPM command from `locality` and returns swtpm's response.
    pub fn execute(&mut self, locality: u8, command: &[u8]) -> Result<Vec<u8>, SwtpmError> {
        if self.locality != Some(locality) {
            let mut reply = [0u8; 4];
            self.request("SET_LOCALITY", CMD_SET_LOCALITY, &[locality], &mut reply)?;
            self.locality = Some(locality);
        }
        self.guarded(|tpm| {
            tpm.data
                .write_all(command)
                .map_err(tpm.io("a TPM command"))?;
            tpm.read_response()
        })
    }

    /// A response: its header, then as many bytes as the header says.
    fn read_response(&mut self) -> Result<Vec<u8>, SwtpmError> {
        let mut header = [0u8; 10];
        self.data
            .read_exact(&mut header)
            .map_err(self.io("a TPM response"))?;
        let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        if !(10..=BUFFER_SIZE).contains(&size) {
            return Err(SwtpmError::Io {
                path: self.path.clone(),
                what: "a TPM response",
                source: std::io::Error::other(format!("a response of {size} bytes")),
            });
        }
        let mut response = header.to_vec();
        response.resize(size as usize, 0);
        self.data
            .read_exact(&mut response[10..])
            .map_err(self.io("a TPM response"))?;
        Ok(response)
    }

    /// Whether TPM_ACCESS's tpmEstablishment bit is set (a dynamic-launch sequence ran).
    pub fn established(&mut self) -> Result<bool, SwtpmError> {
        if self.caps & CAP_GET_TPMESTABLISHED == 0 {
            return Ok(false);
        }
        let mut reply = [0u8; 8];
        self.request(
            "GET_TPMESTABLISHED",
            CMD_GET_TPMESTABLISHED,
            &[],
            &mut reply,
        )?;
        Ok(reply[4] != 0)
    }

    /// Clears the tpmEstablishment bit (allowed from localities 3 and 4).
    pub fn reset_established(&mut self, locality: u8) -> Result<(), SwtpmError> {
        if self.caps & CAP_RESET_TPMESTABLISHED == 0 {
            return Ok(());
        }
        let mut reply = [0u8; 4];
        self.request(
            "RESET_TPMESTABLISHED",
            CMD_RESET_TPMESTABLISHED,
            &[locality],
            &mut reply,
        )
    }
}
