//! Where tier-4 commands run: on this host when its KVM runs a stock kernel at speed (a CPU
//! with VMX or SVM, or `NIXVMM_TEST_KERNEL`), and otherwise inside a first-level guest ("L1"):
//! Debian's kernel under QEMU's software CPU, which emulates AMD SVM, so that KVM inside it is
//! upstream KVM and nixvmm there boots stock Linux ("L2").
//!
//! L1 sees this host's `/` read-only over 9p and chroots into it, so it runs nixvmm, QEMU and
//! every tool straight from here; a work folder is shared writable at the same path, so a test
//! puts its files there ([`Tier4Host::tempdir`]) and both sides use the same names. Unix
//! sockets cannot be bound on 9p: commands keep theirs under /tmp, which is L1's own tmpfs.
//!
//! A test hands a bash script to [`Tier4Host::run`] and gets its output and exit status. One
//! L1 serves every test of a process, one script at a time, each under `timeout`. QEMU's
//! emulated SVM occasionally wedges L1 (a soft lockup of an L1 CPU, seen about once in 30
//! boots): a job whose L1 dies, stops answering, or keeps reporting stalled CPUs on its
//! console for a minute runs again in a new L1, up to four L1s in
//! all, and stderr says so.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::linux_kit::{run_with_timeout, BootLog, KernelKit, INIT_MARKER};

/// L1's memory: room for an L2 of 5 GiB plus the tools around it.
const L1_MEMORY: &str = "8G";
/// How long L1 may take to reach its job loop.
const L1_START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long past a job's limit L1 may take to report it before it counts as hung.
const L1_GRACE: Duration = Duration::from_secs(60);
/// What L1's kernel prints about a CPU that stopped making progress.
const STALL_MARKERS: [&str; 3] = [
    "rcu_preempt detected stalls",
    "rcu_preempt self-detected stall",
    "soft lockup",
];
/// A stall reported again this long after the first report in one job means L1 is wedged
/// (TCG's emulated SVM now and then leaves an L1 CPU stuck for good; the kernel repeats its
/// report while it lasts), and the job runs again in a new L1 rather than waiting out its
/// limit. A stall reported once and then over is not counted.
const L1_STALL_PERSISTS: Duration = Duration::from_secs(60);
/// How often the console is read for stall reports.
const STALL_SCAN_EVERY: Duration = Duration::from_secs(2);
/// How many L1s a job may take when L1 fails under it.
const L1_ATTEMPTS: u32 = 4;
/// Modules L1 loads: its 9p shares, KVM on the (emulated) SVM CPU, taps and bridges for the
/// network tests, the kernel's vhost-vsock for `-device vhost-vsock-pci`.
const L1_MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "kvm_amd",
    "tun",
    "bridge",
    "vhost_vsock",
];

/// Where tier-4 commands run.
pub enum Tier4Host {
    /// This host's KVM runs stock kernels: commands run here.
    Direct { work: PathBuf, kernel: PathBuf },
    /// Commands run in L1 (nested KVM).
    Nested(Nested),
}

/// The one tier-4 host of this process, started on first use.
pub fn host() -> Result<&'static Tier4Host, String> {
    static HOST: OnceLock<Result<Tier4Host, String>> = OnceLock::new();
    HOST.get_or_init(Tier4Host::start)
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether this host's CPU has VMX or SVM, so its KVM runs stock kernels at speed.
pub fn has_vmx_or_svm() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .any(|f| f == "vmx" || f == "svm")
}

/// A fresh work folder outside /tmp (which L1 replaces with its own tmpfs); folders of
/// processes that are gone are removed.
fn work_folder() -> Result<PathBuf, String> {
    let base = PathBuf::from("/var/tmp");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().to_string();
            let Some(pid) = name.strip_prefix("nixvmm-tier4-") else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let work = base.join(format!("nixvmm-tier4-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    Ok(work)
}

impl Tier4Host {
    fn start() -> Result<Tier4Host, String> {
        let work = work_folder()?;
        if let Some(kernel) = std::env::var_os("NIXVMM_TEST_KERNEL") {
            return Ok(Tier4Host::Direct {
                work,
                kernel: kernel.into(),
            });
        }
        let kit = KernelKit::obtain()?;
        if has_vmx_or_svm() {
            return Ok(Tier4Host::Direct {
                work,
                kernel: kit.vmlinuz,
            });
        }
        Ok(Tier4Host::Nested(Nested::start(&kit, work)?))
    }

    /// The kernel tests boot under nixvmm (Debian's, unless `NIXVMM_TEST_KERNEL` names one).
    pub fn kernel(&self) -> &Path {
        match self {
            Tier4Host::Direct { kernel, .. } => kernel,
            Tier4Host::Nested(nested) => &nested.kernel,
        }
    }

    /// A folder commands see at the same path; removed when dropped.
    pub fn tempdir(&self) -> Result<tempfile::TempDir, String> {
        let work = match self {
            Tier4Host::Direct { work, .. } => work,
            Tier4Host::Nested(nested) => &nested.work,
        };
        tempfile::tempdir_in(work).map_err(|e| format!("{}: {e}", work.display()))
    }

    /// What runs the commands, for reports: "direct KVM" or "nested KVM, L1 under TCG".
    pub fn setting(&self) -> &'static str {
        match self {
            Tier4Host::Direct { .. } => "direct KVM",
            Tier4Host::Nested(_) => "nested KVM, L1 under TCG",
        }
    }

    /// Runs `script` with bash, stopped (SIGTERM, then SIGKILL 5 s later) after `limit`;
    /// returns what it printed on stdout and stderr and how it ended (`timed_out` when it was
    /// stopped).
    pub fn run(&self, script: &str, limit: Duration) -> Result<BootLog, String> {
        match self {
            Tier4Host::Direct { .. } => {
                let mut cmd = Command::new("timeout");
                cmd.args(["-k", "5", &limit.as_secs().max(1).to_string()])
                    .args(["bash", "-c", script]);
                let mut log = run_with_timeout(&mut cmd, limit + Duration::from_secs(30))?;
                log.timed_out |= stopped_by_timeout(log.status);
                Ok(log)
            }
            Tier4Host::Nested(nested) => nested.run(script, limit),
        }
    }
}

/// The statuses `timeout -k` leaves when it stopped a job: 124 (SIGTERM), 137 (SIGKILL).
fn stopped_by_timeout(status: Option<i32>) -> bool {
    matches!(status, Some(124 | 137))
}

fn next_job() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The work folder and the L1 now serving it; a new L1 replaces one that died or hangs.
pub struct Nested {
    work: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    current: Mutex<Arc<L1>>,
}

/// One boot of L1: its own job folder, console log and QEMU process.
struct L1 {
    generation: u32,
    jobs: PathBuf,
    console: PathBuf,
    exited: Mutex<std::sync::mpsc::Receiver<String>>,
    /// How QEMU ended, once it has.
    ended: Mutex<Option<String>>,
    pid: u32,
    stalls: Mutex<StallWatch>,
}

/// Stall reports on L1's console during the current job.
#[derive(Default)]
struct StallWatch {
    /// Console bytes read so far.
    read: u64,
    scanned: Option<Instant>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl StallWatch {
    /// Reads what `console` gained (every [`STALL_SCAN_EVERY`], whole lines only: a report
    /// cut in two is read with its end next time) and says whether stall reports have come
    /// for at least [`L1_STALL_PERSISTS`].
    fn scan(&mut self, console: &Path, now: Instant) -> bool {
        if self
            .scanned
            .is_some_and(|t| now.duration_since(t) < STALL_SCAN_EVERY)
        {
            return false;
        }
        self.scanned = Some(now);
        let mut new = Vec::new();
        if let Ok(mut file) = std::fs::File::open(console) {
            use std::io::{Read, Seek, SeekFrom};
            if file.seek(SeekFrom::Start(self.read)).is_ok() {
                let _ = file.read_to_end(&mut new);
            }
        }
        let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.read += whole as u64;
        let text = String::from_utf8_lossy(&new[..whole]);
        if STALL_MARKERS.iter().any(|m| text.contains(m)) {
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
        match (self.first, self.last) {
            (Some(first), Some(last)) => last.duration_since(first) >= L1_STALL_PERSISTS,
            _ => false,
        }
    }

    /// A job ended: stalls reported during it are over.
    fn forget(&mut self) {
        self.first = None;
        self.last = None;
    }
}

/// Why a job got no result: L1 itself failed (the job may run again in a new L1), or the job
/// could not be handed over at all.
enum JobError {
    L1Failed(String),
    Other(String),
}

/// The job loop L1 runs in the chroot (host bash) in its job folder: each `N.sh` in order,
/// under `timeout`. `N.started` marks its start. Its output goes to L1's own tmpfs first and
/// only then to the share as `N.out`, so nothing the job prints depends on 9p while it runs;
/// `N.rc` holds its status and the byte count of its output, which the host checks.
const RUNNER: &str = r#"
cd "$1" || exit 1
# nixvmm's kernel cache on the work share: every L1 of this test run reuses the vmlinux the
# first one decompressed (L1's home is read-only, its /tmp is gone with it).
export NIXVMM_KERNEL_CACHE="$(dirname "$PWD")/kernel-cache"
local=/run/nixvmm-jobs
mkdir -p "$local"
# One VM stays open for L1's life, so KVM enables virtualization once rather than at every
# VM's creation and destruction: that takes an IPI to every CPU, which TCG's emulated SVM
# sometimes never answers (a soft lockup in kvm_destroy_vm).
perl -e 'sysopen(my $k, "/dev/kvm", 2) or die "/dev/kvm: $!"; ioctl($k, 0xAE01, 0) or die "KVM_CREATE_VM: $!"; sleep' &
echo "KVM=$(test -c /dev/kvm && echo yes || echo no)" > ready
while :; do
  for job in *.sh; do
    [ -e "$job" ] || break
    id=${job%.sh}
    : > "$id.started"
    timeout -k 5 "$(cat "$id.limit")" bash "$job" > "$local/$id.out" 2>&1 < /dev/null
    rc=$?
    cp "$local/$id.out" "$id.out.tmp" && mv "$id.out.tmp" "$id.out"
    echo "$rc $(stat -c %s "$local/$id.out")" > "$id.rc.tmp"
    mv "$id.rc.tmp" "$id.rc"
    rm -f "$job" "$local/$id.out"
  done
  sleep 0.1
done
"#;

/// L1's /init after the kit's common start: mount the shares over each other, load KVM,
/// chroot into the host's / and run the job loop; power off when it ends.
fn l1_init() -> String {
    let opts = "trans=virtio,version=9p2000.L,msize=512000";
    format!(
        "work=$(sed -n 's/.*nixvmm.work=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
         jobs=$(sed -n 's/.*nixvmm.jobs=\\([^ ]*\\).*/\\1/p' /proc/cmdline)\n\
         mkdir -p /host\n\
         mount -t 9p -o {opts},ro host /host || echo 'L1: cannot mount the host share'\n\
         mount -t 9p -o {opts} work \"/host$work\" || echo 'L1: cannot mount the work share'\n\
         for d in tmp run; do mount -t tmpfs tmpfs /host/$d; done\n\
         mount -t proc proc /host/proc\n\
         mount -t sysfs sys /host/sys\n\
         mount -t devtmpfs dev /host/dev\n\
         mkdir -p /host/dev/pts /host/dev/shm\n\
         mount -t devpts devpts /host/dev/pts\n\
         mount -t tmpfs tmpfs /host/dev/shm\n\
         echo 7 > /proc/sys/kernel/printk\n\
         chroot /host /bin/bash \"$work/runner.sh\" \"$jobs\"\n\
         echo \"L1: job loop ended with status $?\"\n\
         poweroff -f\n"
    )
}

impl Nested {
    fn start(kit: &KernelKit, work: PathBuf) -> Result<Nested, String> {
        let initrd = kit.initrd_with_init(L1_MODULES, &l1_init())?;
        crate::linux_kit::write_file(&work, "runner.sh", RUNNER.as_bytes())?;
        let l1 = L1::start(&work, &kit.vmlinuz, &initrd, 1)?;
        Ok(Nested {
            work,
            kernel: kit.vmlinuz.clone(),
            initrd,
            current: Mutex::new(Arc::new(l1)),
        })
    }

    fn current(&self) -> Arc<L1> {
        lock(&self.current).clone()
    }

    /// Runs `script` in L1; if L1 dies or hangs meanwhile, or the job runs out of time, again
    /// in a new L1, up to `L1_ATTEMPTS` times (a fault of the emulated machine, reported on
    /// stderr). Four: one L1 failing also fails the job queued behind in it, and a full run
    /// has lost up to four L1s ("corrupted stack end" panics in a vCPU thread of L1, see
    /// README).
    fn run(&self, script: &str, limit: Duration) -> Result<BootLog, String> {
        let mut failure = String::new();
        for attempt in 1..=L1_ATTEMPTS {
            let l1 = self.current();
            match l1.run(script, limit) {
                // TCG's emulated SVM now and then hangs an L2 guest for good (measured: about
                // one Linux boot in 40, at random points of the boot): a job that ran out of
                // time runs again in a new L1, said on stderr. A hang of nixvmm's own
                // making hangs every time.
                Ok(log) if log.timed_out && attempt < L1_ATTEMPTS => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "tier 4: a job ran out of time in L1 #{}; it runs again in a new L1 \
                         (its output so far:)\n{}",
                        l1.generation,
                        log.tail()
                    );
                    self.replace(&l1)?;
                }
                // The same emulated SVM also resets an L2 guest now and then before /init
                // (a triple fault, at random points of the boot; more often with two L2
                // vCPUs or two guests at once, which keep both of L1's CPUs in guest mode;
                // four-vCPU L2s in one L1: QEMU 3 of 8 boots, nixvmm 1 of 8): the job runs
                // again, in the same L1. A reset of nixvmm's making repeats.
                Ok(log) if reset_before_init(&log) && attempt < L1_ATTEMPTS => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "tier 4: L2 triple-faulted before /init in L1 #{} (nested SVM); the \
                         job runs again:\n{}",
                        l1.generation,
                        log.tail()
                    );
                }
                Ok(log) => return Ok(log),
                Err(JobError::Other(e)) => return Err(e),
                Err(JobError::L1Failed(e)) => {
                    // The whole of it: the console's tail says why L1 ended.
                    let _ = writeln!(
                        std::io::stderr(),
                        "tier 4: L1 #{} failed; {}:\n{e}",
                        l1.generation,
                        if attempt < L1_ATTEMPTS {
                            "the job runs again in a new L1"
                        } else {
                            "giving up"
                        }
                    );
                    failure = e;
                    self.replace(&l1)?;
                }
            }
        }
        Err(failure)
    }

    /// Replaces `failed` with a new L1, unless another job already did.
    fn replace(&self, failed: &L1) -> Result<(), String> {
        let mut current = lock(&self.current);
        if current.generation == failed.generation {
            failed.kill();
            *current = Arc::new(L1::start(
                &self.work,
                &self.kernel,
                &self.initrd,
                failed.generation + 1,
            )?);
        }
        Ok(())
    }
}

/// A guest in the job reset (nixvmm's "triple fault" warning) and none reached the Linux
/// kit's /init.
fn reset_before_init(log: &BootLog) -> bool {
    log.has("triple fault") && !log.has(INIT_MARKER)
}

/// [`reset_before_init`] as a shell test of the console log `file`, for jobs that boot
/// several guests and retry one of them themselves.
pub fn reset_before_init_in(file: &str) -> String {
    format!("{{ grep -q 'triple fault' {file} && ! grep -q '{INIT_MARKER}' {file}; }}")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl L1 {
    fn start(work: &Path, kernel: &Path, initrd: &Path, generation: u32) -> Result<L1, String> {
        let jobs = work.join(format!("l1-{generation}"));
        std::fs::create_dir_all(&jobs).map_err(|e| format!("{}: {e}", jobs.display()))?;
        let console = jobs.join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "qemu64,+svm,+npt"])
            .args(["-smp", "2", "-m", L1_MEMORY, "-nic", "none", "-nodefaults"])
            .args(["-no-reboot", "-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 quiet nixvmm.work={} nixvmm.jobs={}",
                work.display(),
                jobs.display()
            ))
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=work,security_model=none,multidevs=remap",
                work.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (exited_tx, exited_rx) = std::sync::mpsc::channel();
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel::<Result<u32, String>>();
        // The thread that starts QEMU lives as long as the process: QEMU gets SIGKILL when it
        // ends (PR_SET_PDEATHSIG follows the thread), so no L1 outlives its tests.
        std::thread::spawn(move || {
            // SAFETY: prctl in the forked child before exec, async-signal-safe, no allocation.
            let cmd = unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
            match cmd.spawn() {
                Ok(child) => {
                    let _ = spawned_tx.send(Ok(child.id()));
                    let ended = child
                        .wait_with_output()
                        .map(|o| {
                            format!(
                                "{}: {}",
                                o.status,
                                String::from_utf8_lossy(&o.stderr).trim()
                            )
                        })
                        .unwrap_or_else(|e| e.to_string());
                    let _ = exited_tx.send(ended);
                    // Keep this thread (and so QEMU's parent-death signal) alive.
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = spawned_tx.send(Err(format!(
                        "cannot start qemu-system-x86_64 (Debian's package qemu-system-x86): {e}"
                    )));
                }
            }
        });
        let pid = spawned_rx
            .recv()
            .map_err(|_| "the thread starting L1 died".to_string())??;
        let l1 = L1 {
            generation,
            jobs,
            console,
            exited: Mutex::new(exited_rx),
            ended: Mutex::new(None),
            pid,
            stalls: Mutex::new(StallWatch::default()),
        };
        if let Err(e) = l1.wait_ready() {
            l1.kill();
            return Err(e);
        }
        Ok(l1)
    }

    fn wait_ready(&self) -> Result<(), String> {
        let ready = self.jobs.join("ready");
        let deadline = Instant::now() + L1_START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if text.trim() == "KVM=yes" {
                    return Ok(());
                }
                if !text.is_empty() {
                    return Err(format!(
                        "L1 has no /dev/kvm ({text}):\n{}",
                        self.console_tail()
                    ));
                }
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(format!(
                    "L1 did not reach its job loop in {L1_START_TIMEOUT:?}:\n{}",
                    self.console_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fails, for every job that asks, once QEMU has ended.
    fn check_alive(&self) -> Result<(), String> {
        let mut ended = lock(&self.ended);
        if ended.is_none() {
            *ended = match lock(&self.exited).try_recv() {
                Ok(how) => Some(format!("L1 (QEMU) ended: {how}")),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    Some("L1 (QEMU) is gone".to_string())
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => None,
            };
        }
        match &*ended {
            Some(how) => Err(format!("{how}\n{}", self.console_tail())),
            None => Ok(()),
        }
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "L1 console ({}):\n{}",
            self.console.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// Whether L1's console has reported stalled CPUs during the current job for at least
    /// [`L1_STALL_PERSISTS`].
    fn wedged(&self) -> bool {
        lock(&self.stalls).scan(&self.console, Instant::now())
    }

    fn run(&self, script: &str, limit: Duration) -> Result<BootLog, JobError> {
        let id = format!("{:06}", next_job());
        let path = |ext: &str| self.jobs.join(format!("{id}.{ext}"));
        let write = |ext: &str, text: &str| {
            std::fs::write(path(ext), text)
                .map_err(|e| JobError::Other(format!("{}: {e}", path(ext).display())))
        };
        write("limit", &limit.as_secs().max(1).to_string())?;
        write("sh.tmp", script)?;
        std::fs::rename(path("sh.tmp"), path("sh")).map_err(|e| JobError::Other(e.to_string()))?;
        loop {
            if let Ok(rc) = std::fs::read_to_string(path("rc")) {
                lock(&self.stalls).forget();
                let console = std::fs::read(path("out")).unwrap_or_default();
                for ext in ["rc", "out", "limit", "started"] {
                    let _ = std::fs::remove_file(path(ext));
                }
                let mut words = rc.split_whitespace().map(|w| w.parse::<u64>().ok());
                let status = words.next().flatten().and_then(|s| i32::try_from(s).ok());
                let size = words.next().flatten();
                if size != Some(console.len() as u64) {
                    return Err(JobError::L1Failed(format!(
                        "the job's output reached the host incomplete over 9p ({} of {size:?} \
                         bytes)\n{}",
                        console.len(),
                        self.console_tail()
                    )));
                }
                return Ok(BootLog {
                    console: String::from_utf8_lossy(&console).to_string(),
                    exit_ok: status == Some(0),
                    timed_out: stopped_by_timeout(status),
                    status,
                });
            }
            self.check_alive().map_err(JobError::L1Failed)?;
            if self.wedged() {
                return Err(JobError::L1Failed(format!(
                    "L1's console has reported stalled CPUs for over {L1_STALL_PERSISTS:?}\n{}",
                    self.console_tail()
                )));
            }
            // L1 stops every job after its limit; one that runs far longer means L1 hangs.
            let started = std::fs::metadata(path("started")).and_then(|m| m.modified());
            if let Ok(age) = started.map(|t| t.elapsed().unwrap_or_default()) {
                if age > limit + L1_GRACE {
                    return Err(JobError::L1Failed(format!(
                        "L1 did not end a job {L1_GRACE:?} after its limit\n{}",
                        self.console_tail()
                    )));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends this L1 (every job waiting for it then fails), unless QEMU has already ended: its
    /// pid may belong to another process by then.
    fn kill(&self) {
        if self.check_alive().is_ok() {
            // SAFETY: sends a signal to the QEMU process this struct started, still running.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// `arg` quoted for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// A command line of quoted words.
pub fn shell_words<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wedged L1 keeps reporting its stall; one report, or reports in two jobs, do not
    /// count; a report cut in two is read whole.
    #[test]
    fn stall_reports_repeated_for_a_minute_mean_a_wedged_l1() {
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let append = |text: &str| {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&console)
                .unwrap();
            file.write_all(text.as_bytes()).unwrap();
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut watch = StallWatch::default();
        append("[ 1.0] booting\n");
        assert!(!watch.scan(&console, at(0)));
        append("[ 30.0] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n");
        assert!(!watch.scan(&console, at(10)), "one report");
        append("[ 95.0] rcu: INFO: rcu_preempt detec");
        assert!(!watch.scan(&console, at(75)), "half a line is not read yet");
        append("ted stalls on CPUs/tasks:\n");
        assert!(!watch.scan(&console, at(76)), "scanned at most every 2 s");
        assert!(watch.scan(&console, at(78)), "reported again 68 s later");

        watch.forget();
        append("[ 99.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s!\n");
        assert!(!watch.scan(&console, at(100)), "a new job starts afresh");
        assert!(!watch.scan(&console, at(200)), "no report since");
    }
}
