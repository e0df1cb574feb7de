//! The Linux guest kit: Debian's stock kernel (from Debian's package archive, cached outside
//! the repository), a busybox initrd with the kernel modules a test names and the test's script
//! as its /init, and boots of both under QEMU's software CPU (tier 3) or nixvmm (tier 4).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cpio::Cpio;

/// The marker /init prints once modules are loaded, before the test's script runs.
pub const INIT_MARKER: &str = "NIXVMM-KIT: init";
const DONE_MARKER: &str = "NIXVMM-KIT: done rc=";

/// Debian's kernel package, unpacked.
pub struct KernelKit {
    pub version: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("NIXVMM_KIT_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".cache/nixvmm-kit"),
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

impl KernelKit {
    /// The cached kernel, or Debian's current `linux-image-amd64` kernel downloaded and
    /// unpacked into the cache (safe when several tests obtain it at once: each unpacks into
    /// its own folder and the first rename wins).
    pub fn obtain() -> Result<KernelKit, String> {
        // Tests run as threads of one process: one of them downloads, the others wait.
        static OBTAINING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = OBTAINING.lock().unwrap_or_else(|p| p.into_inner());
        let cache = cache_dir();
        prune_old_initrds(&cache);
        if let Some(kit) = Self::find_in(&cache) {
            return Ok(kit);
        }
        std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
        let package = match Self::package_name() {
            Some(package) => package,
            None => {
                run(Command::new("apt-get").arg("update"))?;
                Self::package_name()
                    .ok_or("apt-cache knows no linux-image-amd64 after apt-get update")?
            }
        };
        let work = cache.join(format!("unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let download = || {
            run(Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&work))
        };
        if download().is_err() {
            run(Command::new("apt-get").arg("update"))?;
            download()?;
        }
        let deb = std::fs::read_dir(&work)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| format!("apt-get download {package} produced no .deb"))?;
        let root = work.join("root");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let target = cache.join(&package);
        if std::fs::rename(&root, &target).is_err() && !target.exists() {
            return Err(format!("cannot move the kernel into {}", target.display()));
        }
        let _ = std::fs::remove_dir_all(&work);
        Self::find_in(&cache).ok_or_else(|| format!("{package} has no boot/vmlinuz-*"))
    }

    /// The kernel as an uncompressed ELF vmlinux: the bzImage's payload (found through its
    /// setup header's `payload_offset` and `payload_length`) decompressed once into the cache.
    pub fn vmlinux(&self) -> Result<PathBuf, String> {
        let target = cache_dir().join(format!("vmlinux-{}", self.version));
        if target.exists() {
            return Ok(target);
        }
        let image =
            std::fs::read(&self.vmlinuz).map_err(|e| format!("{}: {e}", self.vmlinuz.display()))?;
        let payload = bzimage_payload(&image)
            .ok_or_else(|| format!("{} has no bzImage payload", self.vmlinuz.display()))?;
        let tool: &[&str] = match payload {
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc", "--single-stream"],
            [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
            [0x1f, 0x8b, ..] => &["gzip", "-dc"],
            _ => {
                return Err(format!(
                    "{}: unknown payload compression",
                    self.vmlinuz.display()
                ))
            }
        };
        let mut child = Command::new(tool[0])
            .args(&tool[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", tool[0]))?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        let input = payload.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let _ = writer.join();
        if !out.stdout.starts_with(b"\x7fELF") {
            return Err(format!(
                "{:?} did not give an ELF: {}",
                tool,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let tmp = target.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &out.stdout).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &target).map_err(|e| format!("{}: {e}", target.display()))?;
        Ok(target)
    }

    /// The concrete package behind `linux-image-amd64`, if apt knows it.
    fn package_name() -> Option<String> {
        let depends = run(Command::new("apt-cache").args(["depends", "linux-image-amd64"])).ok()?;
        depends
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(|p| format!("linux-image-{p}"))
    }

    fn find_in(cache: &Path) -> Option<KernelKit> {
        let entries = std::fs::read_dir(cache).ok()?;
        for entry in entries.filter_map(Result::ok) {
            let boot = entry.path().join("boot");
            let Ok(files) = std::fs::read_dir(&boot) else {
                continue;
            };
            for file in files.filter_map(Result::ok) {
                let name = file.file_name().to_string_lossy().to_string();
                if let Some(version) = name.strip_prefix("vmlinuz-") {
                    let modules_dir = entry.path().join("lib/modules").join(version);
                    if modules_dir.is_dir() {
                        return Some(KernelKit {
                            version: version.to_string(),
                            vmlinuz: file.path(),
                            modules_dir,
                        });
                    }
                }
            }
        }
        None
    }

    /// Every loadable module by name (`-` and `_` are the same to the kernel).
    fn module_files(&self) -> HashMap<String, PathBuf> {
        let mut found = HashMap::new();
        let mut dirs = vec![self.modules_dir.join("kernel")];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()) {
                    if let Some(name) = stem.strip_suffix(".ko") {
                        found.insert(name.replace('-', "_"), path);
                    }
                }
            }
        }
        found
    }

    fn builtin(&self) -> Vec<String> {
        std::fs::read_to_string(self.modules_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
            .map(|n| n.replace('-', "_"))
            .collect()
    }

    /// `modules` and their dependencies (from each module's `depends=` modinfo), in load order.
    pub fn load_order(&self, modules: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
        let files = self.module_files();
        let builtin = self.builtin();
        let mut order = Vec::new();
        let mut stack: Vec<(String, bool)> = modules
            .iter()
            .rev()
            .map(|m| (m.replace('-', "_"), false))
            .collect();
        while let Some((name, deps_done)) = stack.pop() {
            if order.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let Some(path) = files.get(&name) else {
                if builtin.contains(&name) {
                    continue;
                }
                return Err(format!("kernel {} has no module {name}", self.version));
            };
            if deps_done {
                order.push((name, path.clone()));
                continue;
            }
            stack.push((name, true));
            for dep in module_depends(path)? {
                stack.push((dep, false));
            }
        }
        Ok(order)
    }

    /// Builds an initrd (uncompressed newc cpio): busybox, `modules` with their dependencies,
    /// and an /init that loads them, prints [`INIT_MARKER`], runs `script`, prints its status
    /// and powers off.
    pub fn initrd(&self, modules: &[&str], script: &str) -> Result<PathBuf, String> {
        self.initrd_with_files(modules, script, &[])
    }

    /// [`KernelKit::initrd`] with further `files` (path in the initrd, mode, contents).
    pub fn initrd_with_files(
        &self,
        modules: &[&str],
        script: &str,
        files: &[(&str, u32, &[u8])],
    ) -> Result<PathBuf, String> {
        self.build_initrd(modules, &test_script(script), files)
    }

    /// Builds an initrd (uncompressed newc cpio): busybox, `modules` with their dependencies,
    /// and an /init that mounts /proc, /sys and /dev, loads the modules and goes on with `rest`
    /// (busybox shell).
    pub fn initrd_with_init(&self, modules: &[&str], rest: &str) -> Result<PathBuf, String> {
        self.build_initrd(modules, rest, &[])
    }

    fn build_initrd(
        &self,
        modules: &[&str],
        rest: &str,
        files: &[(&str, u32, &[u8])],
    ) -> Result<PathBuf, String> {
        let busybox = std::fs::read("/bin/busybox")
            .map_err(|e| format!("/bin/busybox: {e}; install Debian's busybox-static"))?;
        let mut cpio = Cpio::new();
        let mut dirs = std::collections::BTreeSet::new();
        for dir in [
            "bin",
            "dev",
            "proc",
            "sys",
            "mnt",
            "tmp",
            "lib",
            "lib/modules",
        ] {
            cpio.dir(dir);
            dirs.insert(dir.to_string());
        }
        cpio.file("bin/busybox", 0o755, &busybox);
        let mut init = String::from(
            "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nexport PATH=/bin\n\
             mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n",
        );
        for (name, path) in self.load_order(modules)? {
            let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            cpio.file(&format!("lib/modules/{name}.ko"), 0o644, &data);
            init.push_str(&format!(
                "insmod /lib/modules/{name}.ko || echo 'NIXVMM-KIT: insmod {name} failed'\n"
            ));
        }
        init.push_str(rest);
        cpio.file("init", 0o755, init.as_bytes());
        for (path, mode, data) in files {
            // The kernel's unpacker makes no missing folders.
            let ancestors: Vec<&Path> = Path::new(path).ancestors().skip(1).collect();
            for dir in ancestors.into_iter().rev() {
                let dir = dir.to_string_lossy().into_owned();
                if !dir.is_empty() && dirs.insert(dir.clone()) {
                    cpio.dir(&dir);
                }
            }
            cpio.file(path, *mode, data);
        }
        let bytes = cpio.finish();
        let hash = fnv1a(&bytes);
        let path = cache_dir().join(format!("initrd-{hash:016x}.cpio"));
        if !path.exists() {
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &bytes).map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(path)
    }
}

/// FNV-1a of `bytes`: the content key of cached initrds and guest programs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Files that put the host's `programs` (absolute paths) into a kit initrd at the same
/// paths, with the shared libraries `ldd` names for them, for
/// [`KernelKit::initrd_with_files`].
pub fn host_programs(programs: &[&str]) -> Result<Vec<(String, u32, Vec<u8>)>, String> {
    let mut paths = std::collections::BTreeSet::new();
    for program in programs {
        paths.insert(program.to_string());
        let out = Command::new("ldd")
            .arg(program)
            .output()
            .map_err(|e| format!("ldd {program}: {e}"))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "libc.so.6 => /lib/…/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let target = line.split("=>").nth(1).unwrap_or(line).trim();
            if let Some(library) = target
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                paths.insert(library.to_string());
            }
        }
    }
    paths
        .into_iter()
        .map(|path| {
            let data = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
            Ok((path.trim_start_matches('/').to_string(), 0o755, data))
        })
        .collect()
}

/// A guest program from `tests/guest/NAME.c`, linked static with gcc so that it runs in the
/// kit's busybox initrd; built once per source (cached by content).
pub fn guest_program(name: &str) -> Result<Vec<u8>, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("guest/{name}.c"));
    let text = std::fs::read(&source).map_err(|e| format!("{}: {e}", source.display()))?;
    let hash = fnv1a(&text);
    let binary = cache_dir().join(format!("{name}-{hash:016x}"));
    if !binary.exists() {
        std::fs::create_dir_all(cache_dir()).map_err(|e| e.to_string())?;
        let tmp = binary.with_extension(format!("tmp{}", std::process::id()));
        run(Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&tmp)
            .arg(&source))?;
        std::fs::rename(&tmp, &binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    }
    std::fs::read(&binary).map_err(|e| format!("{}: {e}", binary.display()))
}

/// Initrds are cached by content, and tests that embed ports or paths make new ones each run:
/// drop those not used for a day.
fn prune_old_initrds(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let is_initrd = entry.file_name().to_string_lossy().starts_with("initrd-");
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(24 * 3600));
        if is_initrd && old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The compressed kernel inside a bzImage (boot protocol 2.08+).
fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    let head = image.get(..firmware::boot::BZIMAGE_HEAD_LEN)?;
    let range = firmware::boot::bzimage_payload(head)?;
    image.get(usize::try_from(range.start).ok()?..usize::try_from(range.end).ok()?)
}

/// The `depends=` list of a kernel module's modinfo.
fn module_depends(path: &Path) -> Result<Vec<String>, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let key = b"\0depends=";
    let Some(at) = data.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let rest = &data[at + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.replace('-', "_"))
        .collect())
}

/// What a boot printed on its console and how it ended.
#[derive(Debug)]
pub struct BootLog {
    pub console: String,
    pub exit_ok: bool,
    pub timed_out: bool,
    /// The exit status, if the process exited rather than died of a signal.
    pub status: Option<i32>,
}

impl BootLog {
    pub fn has(&self, needle: &str) -> bool {
        self.console.contains(needle)
    }

    /// The value of a `KEY=value` line the script printed.
    pub fn value_of(&self, key: &str) -> Option<&str> {
        self.console.lines().find_map(|l| {
            without_kernel_message(l.trim_end_matches('\r'))
                .strip_prefix(key)?
                .strip_prefix('=')
        })
    }

    /// The exit status of the test's script.
    pub fn script_rc(&self) -> Option<i32> {
        self.console.lines().find_map(|l| {
            without_kernel_message(l.trim_end_matches('\r'))
                .strip_prefix(DONE_MARKER)?
                .parse()
                .ok()
        })
    }

    /// The last lines of the console, for failure messages.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        let how = match (self.timed_out, self.status) {
            (true, _) => "timed out".to_string(),
            (false, Some(status)) => format!("exit status {status}"),
            (false, None) => "killed by a signal".to_string(),
        };
        format!(
            "{}\n[{how}]",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

/// Runs `cmd`, collecting stdout and stderr, killing it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<BootLog, String> {
    let shown = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    let output = Arc::new(Mutex::new(Vec::new()));
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut pipe| {
        let output = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut out) = output.lock() {
                    out.extend_from_slice(&buf[..n]);
                }
            }
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let (exit_ok, timed_out, status) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status.success(), false, status.code()),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break (false, true, None);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    for reader in readers {
        let _ = reader.join();
    }
    let console = output
        .lock()
        .map(|o| String::from_utf8_lossy(&o).to_string())
        .unwrap_or_default();
    Ok(BootLog {
        console,
        exit_ok,
        timed_out,
        status,
    })
}

/// Options of one boot.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    /// Appended to `console=ttyS0 panic=-1`.
    pub cmdline: &'a str,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
}

/// Boots under `qemu-system-x86_64 -accel tcg` (software CPU: this host's KVM cannot run a
/// stock kernel) with `extra` device arguments.
pub fn boot_qemu_tcg(boot: &Boot, extra: &[String]) -> Result<BootLog, String> {
    boot_qemu(boot, "tcg", extra)
}

/// Boots under `qemu-system-x86_64 -accel ACCEL` with `extra` device arguments.
pub fn boot_qemu(boot: &Boot, accel: &str, extra: &[String]) -> Result<BootLog, String> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accel, "-M", "pc", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        .args([
            "-append",
            &format!("console=ttyS0 panic=-1 {}", boot.cmdline),
        ])
        .args(["-m", &format!("{}M", boot.memory_mib)])
        .args(["-smp", &boot.cpus.to_string()])
        .args(extra);
    run_with_timeout(&mut cmd, boot.timeout).map_err(|e| {
        format!("{e} (qemu-system-x86_64 comes with Debian's package qemu-system-x86)")
    })
}

/// Boots under nixvmm itself.
pub fn boot_nixvmm(nixvmm: &Path, boot: &Boot, extra: &[String]) -> Result<BootLog, String> {
    let mut cmd = Command::new(nixvmm);
    cmd.args(["run", "--no-reboot", "--kernel"])
        .arg(boot.kernel)
        .arg("--initrd")
        .arg(boot.initrd)
        .args([
            "--cmdline",
            &format!("console=ttyS0 panic=-1 {}", boot.cmdline),
        ])
        .args(["--memory", &format!("{}M", boot.memory_mib)])
        .args(["--cpus", &boot.cpus.to_string()])
        .args(extra);
    run_with_timeout(&mut cmd, boot.timeout)
}

/// The kernel tier-4 tests boot under nixvmm: `$NIXVMM_TEST_KERNEL`, else Debian's kernel on
/// a host whose CPU has VMX or SVM.
pub fn tier4_kernel() -> Result<PathBuf, String> {
    if let Some(kernel) = std::env::var_os("NIXVMM_TEST_KERNEL") {
        return Ok(PathBuf::from(kernel));
    }
    if crate::tier4::has_vmx_or_svm() {
        return Ok(KernelKit::obtain()?.vmlinuz);
    }
    Err(
        "tier 4 needs NIXVMM_TEST_KERNEL or a CPU with VMX/SVM: this host's KVM (PVM) runs \
         only PVM-built guest kernels at speed"
            .into(),
    )
}

/// Writes `text` to a new file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &[u8]) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

/// A console line without a kernel message that the guest's printk wrote into the middle of
/// it (`RNG=ok[    7.05] IPv6: …`: the kernel and the script share ttyS0).
fn without_kernel_message(line: &str) -> &str {
    let mut from = 0;
    while let Some(at) = line[from..].find('[').map(|i| from + i) {
        let rest = line[at + 1..].trim_start_matches(' ');
        let (seconds, after) = rest.split_at(
            rest.find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len()),
        );
        if let Some(after) = after.strip_prefix('.') {
            let fraction =
                after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if !seconds.is_empty() && fraction > 0 && after[fraction..].starts_with(']') {
                return &line[..at];
            }
        }
        from = at + 1;
    }
    line
}

/// The part of /init that runs a test's `script` between the kit's markers and powers off.
fn test_script(script: &str) -> String {
    // An empty subshell is a syntax error in sh: the guest would panic instead of powering off.
    let script = if script.trim().is_empty() {
        ":"
    } else {
        script
    };
    format!("echo '{INIT_MARKER}'\n(\n{script}\n)\necho \"{DONE_MARKER}$?\"\npoweroff -f\n")
}

#[cfg(test)]
mod tests {
    use super::{test_script, without_kernel_message};

    #[test]
    fn an_empty_test_script_still_makes_a_valid_init() {
        for script in ["", "  \n", "echo hi"] {
            let checked = std::process::Command::new("sh")
                .args(["-n", "-c", &test_script(script)])
                .status()
                .unwrap();
            assert!(checked.success(), "{script:?}");
        }
    }

    #[test]
    fn a_kernel_message_inside_a_line_is_cut_off() {
        assert_eq!(
            without_kernel_message("RNG=ok[    7.055723] IPv6: ADDRCONF(NETDEV_CHANGE): eth0"),
            "RNG=ok"
        );
        assert_eq!(without_kernel_message("[    7.1] whole"), "");
        assert_eq!(without_kernel_message("HOSTFWD_ADD=[]"), "HOSTFWD_ADD=[]");
        assert_eq!(without_kernel_message("A=[1.x] b"), "A=[1.x] b");
        assert_eq!(without_kernel_message("plain"), "plain");
    }
}
