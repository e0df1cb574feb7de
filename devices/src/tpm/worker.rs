//! The run's swtpm, served by a thread of its own ([`SwtpmWorker`]), and each VM's handle on
//! it ([`SwtpmBackend`], the TIS device's backend). TPM commands run in that thread, so the
//! vCPU that writes tpmGo goes on at once and the guest polls for the response, as on a real
//! TPM. A swtpm that answers slowly or never holds only this thread (a command for at most
//! its timeout); a failure is said once, and from then on each command the swtpm cannot run
//! gets TPM_RC_FAILURE, as a broken TPM answers.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use super::swtpm::{Canceller, Swtpm, SwtpmError};
use super::{error_response, TpmBackend, TPM_RC_FAILURE, TPM_RC_RETRY};

/// What the worker thread runs first, before it serves anything: its seccomp filter.
pub type Confine = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// How long a power-on is waited for: behind a running command, and its own control
/// requests (30 s each at most).
const POWER_ON_WAIT: Duration = Duration::from_secs(40);
/// How long the shutdown at the end of a run is waited for.
const SHUT_DOWN_WAIT: Duration = Duration::from_secs(5);
/// Jobs waiting for the worker at most. A guest that gives up on commands (commandReady) and
/// sends new ones while swtpm does not answer would queue them without end; past this, a
/// command is answered TPM_RC_RETRY at once, as a busy TPM answers.
pub const MAX_QUEUED_JOBS: usize = 8;

enum Job {
    PowerOn(Sender<Result<(), SwtpmError>>),
    Execute {
        locality: u8,
        command: Vec<u8>,
        response: Sender<Vec<u8>>,
    },
    ResetEstablished(u8),
    ShutDown(Sender<Result<(), SwtpmError>>),
}

/// What the worker thread and its handles share.
struct Shared {
    path: PathBuf,
    /// The tpmEstablishment flag, read after each power-on and reset of it (the guest reads
    /// TPM_ACCESS often, and must not wait for a running command to learn it).
    established: AtomicBool,
    /// A failure was said.
    failed: AtomicBool,
    /// The queue was said to be full.
    said_full: AtomicBool,
}

impl Shared {
    fn say_failure(&self, e: &SwtpmError) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            log::error!("TPM: {e}; the guest's TPM commands fail from now on");
        }
    }
}

/// The thread serving the run's one swtpm, across guest reboots.
pub struct SwtpmWorker {
    jobs: SyncSender<Job>,
    canceller: Canceller,
    shared: Arc<Shared>,
}

impl SwtpmWorker {
    /// Starts the thread "tpm", which runs `confine` first and then serves `tpm`.
    pub fn start(tpm: Swtpm, confine: Confine) -> Result<SwtpmWorker, SwtpmError> {
        let path = tpm.path().to_path_buf();
        let shared = Arc::new(Shared {
            path: path.clone(),
            established: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            said_full: AtomicBool::new(false),
        });
        let canceller = tpm.canceller();
        let (jobs, queue) = mpsc::sync_channel(MAX_QUEUED_JOBS);
        let (ready_tx, ready) = mpsc::channel();
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || {
                let confined = confine();
                let go_on = confined.is_ok();
                let _ = ready_tx.send(confined);
                if go_on {
                    serve(tpm, queue, &thread_shared);
                }
            });
        let thread_error = |reason: String| SwtpmError::Thread {
            path: path.clone(),
            reason,
        };
        spawned.map_err(|e| thread_error(e.to_string()))?;
        match ready.recv() {
            Ok(Ok(())) => Ok(SwtpmWorker {
                jobs,
                canceller,
                shared,
            }),
            Ok(Err(reason)) => Err(thread_error(reason)),
            Err(_) => Err(thread_error("it ended at its start".into())),
        }
    }

    /// Powers the TPM on for a new boot of the guest (waits at most [`POWER_ON_WAIT`]).
    pub fn power_on(&self) -> Result<(), SwtpmError> {
        self.ask(Job::PowerOn, POWER_ON_WAIT)
    }

    /// Shuts the TPM down at the end of the run (swtpm then exits, as under QEMU).
    pub fn shut_down(&self) -> Result<(), SwtpmError> {
        self.ask(Job::ShutDown, SHUT_DOWN_WAIT)
    }

    fn ask(
        &self,
        job: impl FnOnce(Sender<Result<(), SwtpmError>>) -> Job,
        wait: Duration,
    ) -> Result<(), SwtpmError> {
        let (done, result) = mpsc::channel();
        let path = || self.shared.path.clone();
        let unanswered = || SwtpmError::Unanswered {
            path: path(),
            seconds: wait.as_secs(),
        };
        match self.jobs.try_send(job(done)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(SwtpmError::Busy { path: path() }),
            Err(TrySendError::Disconnected(_)) => return Err(SwtpmError::Broken { path: path() }),
        }
        match result.recv_timeout(wait) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(unanswered()),
            Err(RecvTimeoutError::Disconnected) => Err(SwtpmError::Broken { path: path() }),
        }
    }

    /// Whether a failure was said.
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// Says `e` unless a failure was said already.
    pub fn say_failure(&self, e: &SwtpmError) {
        self.shared.say_failure(e);
    }

    /// A TIS device's backend on this swtpm (one per VM the run builds).
    pub fn backend(&self) -> SwtpmBackend {
        SwtpmBackend {
            jobs: self.jobs.clone(),
            canceller: self.canceller.clone(),
            shared: self.shared.clone(),
            running: None,
        }
    }
}

/// The worker thread: jobs in order until every sender is gone.
fn serve(mut tpm: Swtpm, jobs: Receiver<Job>, shared: &Shared) {
    let read_established = |tpm: &mut Swtpm| {
        let flag = tpm.established().unwrap_or_else(|e| {
            shared.say_failure(&e);
            false
        });
        shared.established.store(flag, Ordering::Relaxed);
    };
    for job in jobs {
        match job {
            Job::PowerOn(done) => {
                let result = tpm.power_on();
                if result.is_ok() {
                    read_established(&mut tpm);
                }
                let _ = done.send(result);
            }
            Job::Execute {
                locality,
                command,
                response,
            } => {
                let answer = tpm.execute(locality, &command).unwrap_or_else(|e| {
                    shared.say_failure(&e);
                    error_response(TPM_RC_FAILURE)
                });
                // The guest may have given the command up (an abort, a reboot).
                let _ = response.send(answer);
            }
            Job::ResetEstablished(locality) => {
                if let Err(e) = tpm.reset_established(locality) {
                    shared.say_failure(&e);
                }
                read_established(&mut tpm);
            }
            Job::ShutDown(done) => {
                let _ = done.send(tpm.shut_down());
            }
        }
    }
}

/// One VM's TIS backend: commands go to the worker, responses come back on a channel of
/// their own, which an abort simply drops.
pub struct SwtpmBackend {
    jobs: SyncSender<Job>,
    canceller: Canceller,
    shared: Arc<Shared>,
    running: Option<Receiver<Vec<u8>>>,
}

impl TpmBackend for SwtpmBackend {
    fn start(&mut self, locality: u8, command: Vec<u8>) {
        let (response, running) = mpsc::channel();
        self.running = Some(running);
        // A worker that is gone drops `response`, and the command fails below.
        let sent = self.jobs.try_send(Job::Execute {
            locality,
            command,
            response,
        });
        if let Err(TrySendError::Full(Job::Execute { response, .. })) = sent {
            if !self.shared.said_full.swap(true, Ordering::Relaxed) {
                log::warn!(
                    "TPM: the guest has {MAX_QUEUED_JOBS} commands waiting for swtpm; \
                     further ones get TPM_RC_RETRY"
                );
            }
            let _ = response.send(error_response(TPM_RC_RETRY));
        }
    }

    fn response(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let answer = match self.running.as_ref().map(|r| r.recv_timeout(wait)) {
            Some(Err(RecvTimeoutError::Timeout)) => return None,
            Some(Ok(answer)) => answer,
            Some(Err(RecvTimeoutError::Disconnected)) | None => error_response(TPM_RC_FAILURE),
        };
        self.running = None;
        Some(answer)
    }

    fn cancel(&mut self) {
        if self.running.is_some() {
            self.canceller.cancel();
        }
    }

    fn abandon(&mut self) {
        self.running = None;
    }

    fn established(&mut self) -> bool {
        self.shared.established.load(Ordering::Relaxed)
    }

    fn reset_established(&mut self, locality: u8) {
        // Dropped when the queue is full: the flag then stays as it was.
        let _ = self.jobs.try_send(Job::ResetEstablished(locality));
    }
}
