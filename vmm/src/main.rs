//! The `nixvmm` binary: parse, run, map the outcome to an exit status. Errors are one line on
//! stderr and status 1.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use vmm::config::{Monitor, Serial};
use vmm::event::hmp::HmpMonitor;
use vmm::event::qmp::QmpServer;
use vmm::event::signals::SignalWatch;
use vmm::event::stdin::StdinWatch;
use vmm::event::ControlPlane;
use vmm::front::cli::{Cli, Command, DeviceCommand};
use vmm::front::qemu::{self, QemuCommand, QemuError};
use vmm::host::console::{ConsoleOutput, RawTerminal};
use vmm::models::Model;
use vmm::seccomp::{self, DeviceKind, Needs, Seccomp, ThreadKind};
use vmm::Control;
use vmm_sys_util::eventfd::EventFd;

/// nixvmm's log: stderr, or the file QEMU's `-D` names.
struct Logger {
    file: Option<std::sync::Mutex<std::fs::File>>,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = record.level().as_str().to_lowercase();
        match &self.file {
            Some(file) => {
                let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(file, "nixvmm: {level}: {}", record.args());
            }
            None => {
                let _ = write!(std::io::stderr(), "nixvmm: {level}: {}\r\n", record.args());
            }
        }
    }
    fn flush(&self) {}
}

/// One line on stderr. A closed stderr (`nixvmm … 2>&1 | head -1`) loses the line, never
/// the process: `eprintln!` would panic there.
fn say(line: std::fmt::Arguments) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn start_logging(verbose: u8, file: Option<std::fs::File>) {
    let logger = Box::leak(Box::new(Logger {
        file: file.map(std::sync::Mutex::new),
    }));
    let _ = log::set_logger(logger);
    log::set_max_level(match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
}

fn build(model: Model) -> Result<Box<dyn virtio::QueueDevice>, String> {
    vmm::models::build(model).map_err(|e| e.to_string())
}

/// The VM on this terminal, stopped by SIGTERM, SIGINT and SIGHUP.
fn run_vm(config: vmm::VmConfig) -> Result<vmm::Outcome, String> {
    vmm::host::raise_open_files_limit();
    // Before any thread starts, so that every thread inherits the mask.
    let signals = vmm::event::signals::block_termination_signals();
    let control = Control::default();
    let mut plane = ControlPlane::new().map_err(|e| e.to_string())?;
    match signals.and_then(|()| SignalWatch::new(control.clone())) {
        Ok(watch) => {
            plane.add(Box::new(watch));
        }
        Err(e) => log::warn!("SIGTERM and SIGINT will not stop the VM cleanly: {e}"),
    }
    let room = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("an eventfd: {e}"))?;
    let stdin_room = room.try_clone().map_err(|e| format!("an eventfd: {e}"))?;
    let console = match &config.serial {
        Serial::Stdio { escapes } => {
            let watch = StdinWatch::new(control.clone(), stdin_room, *escapes);
            plane.add(Box::new(watch));
            ConsoleOutput::stdout()
        }
        Serial::Null => ConsoleOutput::sink(),
        Serial::File(path) => {
            ConsoleOutput::file(path).map_err(|e| format!("serial file:{}: {e}", path.display()))?
        }
    };
    // Listening before connecting to the monitor: the test driver connects to QMP as soon
    // as it has accepted nixvmm's monitor and shell connections, without retrying.
    if let Some(path) = &config.qmp {
        let qmp = QmpServer::listen(path, control.clone())
            .map_err(|e| format!("-qmp unix:{}: cannot listen: {e}", path.display()))?;
        plane.add(Box::new(qmp));
    }
    match &config.monitor {
        Some(Monitor::Connect(path)) => {
            let monitor = HmpMonitor::connect(path, control.clone()).map_err(|e| {
                format!(
                    "-monitor unix:{}: cannot connect: {e} (start the monitor client \
                     listening first)",
                    path.display()
                )
            })?;
            plane.add(Box::new(monitor));
        }
        Some(Monitor::Listen { path, wait }) => {
            let monitor = HmpMonitor::listen(path, *wait, control.clone())
                .map_err(|e| format!("-monitor unix:{},server=on: {e}", path.display()))?;
            plane.add(Box::new(monitor));
        }
        Some(Monitor::Stdio) => {
            let monitor =
                HmpMonitor::stdio(control.clone()).map_err(|e| format!("-monitor stdio: {e}"))?;
            plane.add(Box::new(monitor));
        }
        None => {}
    }
    let terminal = matches!(config.serial, Serial::Stdio { .. }).then(RawTerminal::enter);
    // Every thread nixvmm starts from here on inherits this filter under its own.
    let needs = seccomp::needs(&config);
    seccomp::confine(ThreadKind::Vmm, needs, config.seccomp).map_err(|e| e.to_string())?;
    let outcome = vmm::run_with(&config, &console, &control, &mut plane, &room);
    drop(terminal);
    outcome.map_err(|e| e.to_string())
}

/// `nixvmm device …`: serve one device model until the frontend disconnects.
fn serve_device(device: DeviceCommand) -> Result<vmm::Outcome, String> {
    vmm::host::raise_open_files_limit();
    match device {
        DeviceCommand::NineP {
            listen,
            shared_dir,
            readonly,
            security_model,
            confinement,
        } => {
            let address: virtio::ninep::listen::Address = listen.parse()?;
            let config = virtio::ninep::ShareConfig {
                root: shared_dir,
                readonly,
                security_model: security_model.parse()?,
            };
            virtio::ninep::Server::new(config.clone())
                .map_err(|e| format!("--shared-dir {}: {e}", config.root.display()))?;
            confine_device(DeviceKind::NineP, confinement.seccomp)?;
            virtio::ninep::listen::listen(&address, &config)
                .map_err(|e| format!("--listen {listen}: {e}"))?;
            Ok(vmm::Outcome::Stopped)
        }
        DeviceCommand::Rng {
            socket,
            confinement,
        } => serve_model("rng", Model::Rng, &socket, confinement.seccomp),
        DeviceCommand::Fs(fs) => {
            let config = virtio::fs::FsConfig {
                shared_dir: fs.shared_dir,
                tag: None,
                readonly: fs.readonly,
                xattr: fs.xattr,
            };
            let model = Model::VirtioFs(&config);
            serve_model("fs", model, &fs.socket, fs.confinement.seccomp)
        }
        DeviceCommand::Blk {
            socket,
            disk,
            confinement,
        } => {
            let config = vmm::config::parse_disk(&disk).map_err(|e| e.to_string())?;
            serve_model("blk", Model::Block(&config), &socket, confinement.seccomp)
        }
    }
}

/// Serves `model` over vhost-user on `socket` until the frontend disconnects.
fn serve_model(
    name: &str,
    model: Model,
    socket: &Path,
    mode: Seccomp,
) -> Result<vmm::Outcome, String> {
    let kind = model.kind();
    let model = build(model)?;
    // Before the vhost-user daemon starts its threads, which inherit the filter.
    confine_device(kind, mode)?;
    vmm::serve::serve(name, model, socket)
        .map(|()| vmm::Outcome::Stopped)
        .map_err(|e| e.to_string())
}

/// `nixvmm device`'s filter on the main thread, for it and every thread it starts.
fn confine_device(kind: DeviceKind, mode: Seccomp) -> Result<(), String> {
    seccomp::confine(ThreadKind::Serve(kind), Needs::default(), mode).map_err(|e| e.to_string())
}

/// The QEMU door: `args` as qemu-system-x86_64 takes them; `program` is what QEMU is run as
/// when the boot is QEMU's.
fn qemu_main(program: &OsStr, args: &[OsString]) -> ExitCode {
    let words: Result<Vec<String>, _> = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(String::from)
                .ok_or_else(|| format!("argument {a:?} is not UTF-8"))
        })
        .collect();
    let parsed = words.and_then(|w| match qemu::parse(&w) {
        Err(QemuError::Unsupported(why)) if qemu::unknown_falls_back() => Ok(
            QemuCommand::Fallback(format!("NIXVMM_UNKNOWN=fallback: {why}")),
        ),
        other => other.map_err(|e| e.to_string()),
    });
    let run = match parsed {
        Ok(QemuCommand::Answer(text)) => {
            let _ = std::io::stdout().write_all(text.as_bytes());
            return ExitCode::SUCCESS;
        }
        Ok(QemuCommand::Fallback(reason)) => return fall_back(program, args, &reason),
        Ok(QemuCommand::Run(run)) => run,
        Err(message) => {
            say(format_args!("nixvmm: error: {message}"));
            return ExitCode::from(1);
        }
    };
    if run.tcg_allowed && !kvm_usable() {
        return fall_back(
            program,
            args,
            "no usable /dev/kvm, and the accelerators allow tcg",
        );
    }
    let log_file = match run
        .log_file
        .as_deref()
        .map(std::fs::File::create)
        .transpose()
    {
        Ok(file) => file,
        Err(e) => {
            say(format_args!(
                "nixvmm: error: -D {}: {e}",
                run.log_file.unwrap_or_default().display()
            ));
            return ExitCode::from(1);
        }
    };
    start_logging(0, log_file);
    if !run.ignored.is_empty() {
        say(format_args!(
            "nixvmm: running headless with the serial console on stdout; accepted and ignored: {}",
            run.ignored.join(", ")
        ));
    }
    if let Some(pidfile) = &run.pidfile {
        if let Err(e) = std::fs::write(pidfile, format!("{}\n", std::process::id())) {
            say(format_args!(
                "nixvmm: error: -pidfile {}: {e}",
                pidfile.display()
            ));
            return ExitCode::from(1);
        }
    }
    let result = run_vm(run.config);
    if let Some(pidfile) = &run.pidfile {
        let _ = std::fs::remove_file(pidfile);
    }
    exit_status(result)
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Runs the real QEMU in nixvmm's place, after one line saying why.
fn fall_back(program: &OsStr, args: &[OsString], reason: &str) -> ExitCode {
    say(format_args!("nixvmm: handing this boot to QEMU ({reason})"));
    let ourselves = std::env::current_exe().unwrap_or_default();
    let found = qemu::fallback::real_qemu(
        std::env::var_os(qemu::fallback::QEMU_VARIABLE),
        std::env::var_os("PATH"),
        &ourselves,
    );
    let message = match found {
        Ok(qemu) => qemu::fallback::exec(&qemu, program, args),
        Err(message) => message,
    };
    say(format_args!("nixvmm: error: {message}"));
    ExitCode::from(1)
}

fn exit_status(result: Result<vmm::Outcome, String>) -> ExitCode {
    match result {
        Ok(outcome) => {
            log::info!("guest ended: {outcome:?}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            say(format_args!("nixvmm: error: {message}"));
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let program = args.first().cloned().unwrap_or_default();
    let name = Path::new(&program).file_name().unwrap_or_default();
    if name == "qemu-system-x86_64" || name == "qemu-kvm" {
        return qemu_main(&program, args.get(1..).unwrap_or_default());
    }
    if args.get(1).is_some_and(|a| a == "qemu") {
        return qemu_main(
            OsStr::new("qemu-system-x86_64"),
            args.get(2..).unwrap_or_default(),
        );
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors end with status 1 like every other error; --help and --version with 0.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    start_logging(cli.verbose, None);
    let result = match cli.command {
        Command::Run(args) => args
            .into_config()
            .map_err(|e| e.to_string())
            .and_then(run_vm),
        Command::Device(device) => serve_device(device),
        Command::Relay {
            slots,
            exec,
            target,
        } => vmm::host::slirp::relay(&slots, exec, &target)
            .map(|()| vmm::Outcome::Stopped)
            .map_err(|e| format!("relay to {}: {e}", target.join(" "))),
    };
    exit_status(result)
}
