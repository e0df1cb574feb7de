//! The `nixvmm` binary: parse, run, map the outcome to an exit status. Errors are one line on
//! stderr and status 1.

use std::process::ExitCode;

use clap::Parser;
use vmm::event::signals::SignalWatch;
use vmm::event::stdin::StdinWatch;
use vmm::event::ControlPlane;
use vmm::front::cli::{Cli, Command, DeviceCommand};
use vmm::host::console::{ConsoleOutput, RawTerminal};
use vmm::models::Model;
use vmm::Control;
use vmm_sys_util::eventfd::EventFd;

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprint!(
                "nixvmm: {}: {}\r\n",
                record.level().as_str().to_lowercase(),
                record.args()
            );
        }
    }
    fn flush(&self) {}
}

fn build(model: Model) -> Result<Box<dyn virtio::QueueDevice>, String> {
    vmm::models::build(model).map_err(|e| e.to_string())
}

/// `nixvmm run`: the VM on this terminal, stopped by SIGTERM, SIGINT and SIGHUP.
fn run(config: vmm::VmConfig) -> Result<vmm::Outcome, String> {
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
    plane.add(Box::new(StdinWatch::new(control.clone(), stdin_room)));
    let terminal = RawTerminal::enter();
    let outcome = vmm::run_with(
        &config,
        &ConsoleOutput::stdout(),
        &control,
        &mut plane,
        &room,
    );
    drop(terminal);
    outcome.map_err(|e| e.to_string())
}

/// `nixvmm device …`: serve one device model until the frontend disconnects.
fn serve_device(device: DeviceCommand) -> Result<vmm::Outcome, String> {
    let (name, model, socket): (_, Box<dyn virtio::QueueDevice>, _) = match device {
        DeviceCommand::NineP {
            listen,
            shared_dir,
            readonly,
            security_model,
        } => {
            let address: virtio::ninep::listen::Address = listen.parse()?;
            let config = virtio::ninep::ShareConfig {
                root: shared_dir,
                readonly,
                security_model: security_model.parse()?,
            };
            virtio::ninep::Server::new(config.clone())
                .map_err(|e| format!("--shared-dir {}: {e}", config.root.display()))?;
            virtio::ninep::listen::listen(&address, &config)
                .map_err(|e| format!("--listen {listen}: {e}"))?;
            return Ok(vmm::Outcome::Stopped);
        }
        DeviceCommand::Rng { socket } => ("rng", build(Model::Rng)?, socket),
        DeviceCommand::Fs(fs) => {
            let config = virtio::fs::FsConfig {
                shared_dir: fs.shared_dir,
                tag: None,
                readonly: fs.readonly,
                xattr: fs.xattr,
            };
            ("fs", build(Model::VirtioFs(&config))?, fs.socket)
        }
        DeviceCommand::Blk { socket, disk } => {
            let config = vmm::config::parse_disk(&disk).map_err(|e| e.to_string())?;
            ("blk", build(Model::Block(&config))?, socket)
        }
    };
    vmm::serve::serve(name, model, &socket)
        .map(|()| vmm::Outcome::Stopped)
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
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
    let _ = log::set_logger(&StderrLogger);
    log::set_max_level(match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
    let result = match cli.command {
        Command::Run(args) => args.into_config().map_err(|e| e.to_string()).and_then(run),
        Command::Device(device) => serve_device(device),
        Command::Relay { address } => vmm::host::slirp::relay(&address)
            .map(|()| vmm::Outcome::Stopped)
            .map_err(|e| format!("relay to {address}: {e}")),
    };
    match result {
        Ok(outcome) => {
            log::info!("guest ended: {outcome:?}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("nixvmm: error: {message}");
            ExitCode::from(1)
        }
    }
}
