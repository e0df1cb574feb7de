//! Building a VM from a [`VmConfig`] and running it until it stops.

pub mod builtin_guest;
mod coalesced;
pub mod cpu;
pub mod msi;
pub mod pci_devices;
mod ram;
pub mod vcpu;

use std::sync::{Arc, Mutex};

use devices::acpi_power::AcpiPower;
use devices::bus::{lock, Bus};
use devices::cmos_rtc::CmosRtc;
use devices::i8042::I8042;
use devices::pci::{PciConfigIo, PciEcam, PciRoot};
use devices::serial::SerialConsole;
use devices::tpm::TpmTis;
use devices::{ExitReceiver, ExitSender};
use firmware::acpi::{write_acpi_tables, AcpiConfig};
use firmware::boot::{self, BootSetup, LoadedKernel};
use firmware::layout::{
    ACPI_SLEEP_PORT, CMOS_PORT, COM1_IRQ, COM1_PORT, I8042_DATA_PORT, KEYBOARD_IRQ,
    PCI_CONFIG_PORT, PCI_ECAM_SIZE, PCI_ECAM_START, POWER_BUTTON_GSI, TPM_TIS_SIZE, TPM_TIS_START,
};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Decompress, Kernel, Share, VmConfig, VsockConfig};
use crate::host::console::ConsoleOutput;
use crate::host::{kernel_unpack, HostResources};
use crate::models::{self, Model};
use crate::seccomp::{self, Seccomp, ThreadKind};
use cpu::CpuSetup;
use pci_devices::VirtioDevices;
use vcpu::{Buses, Vcpus};
use virtio::console::PortConfig;
use virtio::worker::Hosted;

/// The KVM identity-map and TSS pages, just below the IOAPIC in the MMIO hole.
const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
const KVM_TSS_START: u64 = KVM_IDENTITY_MAP_START + 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Firmware(#[from] firmware::Error),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("cannot allocate {mib} MiB of guest memory: {reason}; give less --memory")]
    Memory { mib: u64, reason: String },
    #[error("--cpus {asked}: this host's KVM allows at most {max} vCPUs")]
    TooManyCpus { asked: u8, max: usize },
    #[error("device layout: {0}")]
    Layout(#[from] devices::bus::Overlap),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("too many devices for the PCI memory window")]
    TooManyDevices,
    #[error("no connection to the vhost-user backend at {0}")]
    NoBackend(std::path::PathBuf),
    #[error("virtio-pci: {0}")]
    Transport(#[from] virtio::pci::TransportError),
    #[error("MSI-X: {0}")]
    Msi(#[from] msi::MsiError),
    #[error(transparent)]
    PciSlots(#[from] devices::pci::NoFreeSlot),
    #[error(transparent)]
    Model(#[from] models::ModelError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Device(virtio::Error),
    #[error(transparent)]
    Tpm(#[from] devices::tpm::swtpm::SwtpmError),
    #[error("NIC {0}: cannot reach its network: {1}")]
    NicBackend(usize, std::io::Error),
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// A built VM, ready to run. Field order is drop order: vCPUs and the VM file descriptor go
/// before the guest memory they point into.
pub struct Vm {
    vcpus: Vec<VcpuFd>,
    buses: Arc<Buses>,
    serial: Arc<Mutex<SerialConsole>>,
    keyboard: Arc<Mutex<I8042>>,
    /// The Generic Event Device's interrupt: a press of the ACPI power button.
    power_button: Arc<EventFd>,
    exit_tx: ExitSender,
    runtime: Arc<Runtime>,
    /// The vCPU threads' filters.
    seccomp: Seccomp,
    _vm_fd: Arc<VmFd>,
    _memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the KVM VM, its memory, boot state, devices and vCPUs.
    pub fn build(
        kvm: &Kvm,
        config: &VmConfig,
        console: &ConsoleOutput,
        backends: &HostResources,
        input_room: &EventFd,
    ) -> Result<(Vm, ExitReceiver), VmError> {
        let max = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max {
            return Err(VmError::TooManyCpus {
                asked: config.cpus,
                max,
            });
        }
        let vm_fd = Arc::new(create_vm(kvm)?);
        // Backends outside the VMM map the guest's RAM: it must be a shared memfd then.
        let shared = matches!(config.vsock, Some(VsockConfig::VhostUser { .. }))
            || config
                .shares
                .iter()
                .any(|s| matches!(s, Share::VhostUser { .. }));
        let memory = ram::guest_memory(&vm_fd, config.memory, shared)?;
        let (entry, cr3) = write_boot_state(&memory, config)?;

        let (exit_tx, exit_rx) = devices::exit_channel().map_err(VmError::EventFd)?;
        let input_room = input_room.try_clone().map_err(VmError::EventFd)?;
        let (io, serial, keyboard) = legacy_devices(&vm_fd, console, &exit_tx, input_room)?;
        let power_button = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm_fd
            .register_irqfd(&power_button, POWER_BUTTON_GSI)
            .map_err(kvm_err("power button interrupt"))?;
        let mut pci = PciRoot::new();
        let mmio = Arc::new(Bus::new());
        if let Some(tpm) = backends.tpm_powered_on()? {
            let tis = TpmTis::new(Box::new(tpm));
            mmio.insert(TPM_TIS_START, TPM_TIS_SIZE, Arc::new(Mutex::new(tis)))?;
        }
        let models = device_models(config, backends, &memory)?;
        let virtio = VirtioDevices::attach(models, &vm_fd, &memory, &mut pci, &mmio)?;
        let pci = Arc::new(pci);
        io.insert(
            u64::from(PCI_CONFIG_PORT),
            PciConfigIo::LEN,
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        )?;
        mmio.insert(
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
            Arc::new(Mutex::new(PciEcam::new(pci))),
        )?;

        let vcpus = create_vcpus(kvm, &vm_fd, config.cpus, entry, cr3)?;
        let kept_writes = vcpus
            .first()
            .and_then(|vcpu| coalesced::CoalescedWrites::for_pci_config(kvm, &vm_fd, vcpu));
        let vm = Vm {
            vcpus,
            buses: Arc::new(Buses {
                io,
                mmio,
                kept_writes,
            }),
            serial,
            keyboard,
            power_button: Arc::new(power_button),
            exit_tx,
            runtime: Arc::new(Runtime {
                vcpus: Mutex::new(None),
                virtio,
                paused: std::sync::atomic::AtomicBool::new(false),
            }),
            seccomp: config.seccomp,
            _vm_fd: vm_fd,
            _memory: memory,
        };
        Ok((vm, exit_rx))
    }

    pub fn serial(&self) -> Arc<Mutex<SerialConsole>> {
        self.serial.clone()
    }

    /// Presses the ACPI power button (QMP `system_powerdown`).
    pub fn power_button(&self) -> Arc<EventFd> {
        self.power_button.clone()
    }

    /// The i8042 and its keyboard (QMP/HMP `sendkey`).
    pub fn keyboard(&self) -> Arc<Mutex<I8042>> {
        self.keyboard.clone()
    }

    /// Pausing and resuming the running VM, from other threads.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.clone()
    }

    /// A sender that ends this VM's [`Vm::run`] with the value sent.
    pub fn exit_sender(&self) -> ExitSender {
        self.exit_tx.clone()
    }

    /// Starts the vCPUs.
    pub fn start(&mut self) -> Result<(), VmError> {
        // Held while the threads start, so a pause that comes meanwhile waits for them.
        let mut slot = lock(&self.runtime.vcpus);
        let vcpus = Vcpus::start(
            std::mem::take(&mut self.vcpus),
            &self.buses,
            &self.exit_tx,
            self.seccomp,
        )
        .map_err(VmError::Thread)?;
        *slot = Some(vcpus);
        Ok(())
    }

    /// Ends the vCPUs, then the devices and the VM.
    pub fn stop(self) {
        if let Some(vcpus) = lock(&self.runtime.vcpus).take() {
            vcpus.exit();
        }
    }
}

/// What other threads reach of a running VM: its vCPUs (once started) and its devices.
pub struct Runtime {
    vcpus: Mutex<Option<Vcpus>>,
    virtio: VirtioDevices,
    /// Paused by the host (QMP `stop`) and not resumed since: what `query-status` reports at
    /// once, while resumed vCPU threads may not have started running yet.
    paused: std::sync::atomic::AtomicBool,
}

impl Runtime {
    /// Stops the vCPUs, then the devices' queue processing; returns once all have stopped.
    pub fn pause(&self) -> Result<(), virtio::Error> {
        if let Some(vcpus) = &*lock(&self.vcpus) {
            vcpus.pause();
        }
        self.paused
            .store(true, std::sync::atomic::Ordering::Release);
        self.virtio.pause_all()
    }

    /// Starts the devices again, then the vCPUs.
    pub fn resume(&self) -> Result<(), virtio::Error> {
        self.virtio.resume_all()?;
        if let Some(vcpus) = &*lock(&self.vcpus) {
            vcpus.resume();
        }
        self.paused
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether the host paused the VM and has not resumed it.
    pub fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Where each vCPU is now (empty before the VM runs).
    pub fn vcpu_states(&self) -> Vec<vcpu::VcpuState> {
        lock(&self.vcpus)
            .as_ref()
            .map_or_else(Vec::new, |v| v.states())
    }
}

/// The virtio device models `config` asks for: disks first (vda, vdb, … in order), shares,
/// rng, NICs, then the console ports' device.
fn device_models(
    config: &VmConfig,
    backends: &HostResources,
    memory: &GuestMemoryMmap,
) -> Result<Vec<Box<dyn virtio::VirtioDevice>>, VmError> {
    let (mode, needs) = (config.seccomp, seccomp::needs(config));
    let hosted = |name: String, model: Model| -> Result<Box<dyn virtio::VirtioDevice>, VmError> {
        let kind = ThreadKind::Device(model.kind());
        let confine =
            Box::new(move || seccomp::confine(kind, needs, mode).map_err(|e| e.to_string()));
        Ok(Box::new(
            Hosted::confined(&name, models::build(model)?, confine).map_err(VmError::Device)?,
        ))
    };
    let mut devices = Vec::new();
    for (n, disk) in config.disks.iter().enumerate() {
        devices.push(hosted(format!("virtio-blk{n}"), Model::Block(disk))?);
    }
    for (n, share) in config.shares.iter().enumerate() {
        devices.push(match share {
            Share::VirtioFs(fs) => hosted(format!("virtio-fs{n}"), Model::VirtioFs(fs))?,
            Share::NineP { tag, config } => {
                hosted(format!("virtio-9p{n}"), Model::NineP { tag, config })?
            }
            Share::VhostUser { socket, .. } => Box::new(
                backends
                    .vhost_user(socket)
                    .ok_or_else(|| VmError::NoBackend(socket.clone()))?,
            ),
        });
    }
    match &config.vsock {
        Some(VsockConfig::VhostUser { socket }) => devices.push(Box::new(
            backends
                .vhost_user(socket)
                .ok_or_else(|| VmError::NoBackend(socket.clone()))?,
        )),
        Some(VsockConfig::Muxer { cid, uds }) => devices.push(hosted(
            "virtio-vsock".into(),
            Model::Vsock { cid: *cid, uds },
        )?),
        Some(VsockConfig::Kernel { cid }) => devices.push(Box::new(
            crate::host::vhost_kernel::KernelVsock::open(*cid, memory.clone())
                .map_err(VmError::Device)?,
        )),
        None => {}
    }
    if config.rng {
        devices.push(hosted("virtio-rng".into(), Model::Rng)?);
    }
    for (n, nic) in backends.nics().iter().enumerate() {
        let model = Model::Net {
            mac: nic.mac,
            backend: nic.backend().map_err(|e| VmError::NicBackend(n, e))?,
            link: nic.link.clone(),
        };
        devices.push(hosted(format!("virtio-net{n}"), model)?);
    }
    if !config.ports.is_empty() {
        devices.push(hosted(
            "virtio-console".into(),
            Model::Console(console_ports(config, backends)),
        )?);
    }
    Ok(devices)
}

/// The console ports by id, as QEMU numbers them: the first console is port 0 (/dev/hvc0),
/// every other port follows from 1 in order; without a console, port 0 stays empty.
fn console_ports(config: &VmConfig, backends: &HostResources) -> Vec<Option<PortConfig>> {
    let first_console = config.ports.iter().position(|p| p.console);
    let mut ports = vec![None];
    for (n, (spec, chardev)) in config.ports.iter().zip(backends.chardevs()).enumerate() {
        let port = PortConfig {
            console: spec.console,
            name: spec.name.clone(),
            backend: chardev.backend(),
        };
        if Some(n) == first_console {
            ports[0] = Some(port);
        } else {
            ports.push(Some(port));
        }
    }
    ports
}

/// The KVM VM with the in-kernel irqchip and PIT.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_err("creating the VM"))?;
    // Needed on Intel hosts for real-mode guest code (AP start-up); harmless elsewhere.
    vm_fd
        .set_identity_map_address(KVM_IDENTITY_MAP_START)
        .map_err(kvm_err("identity map address"))?;
    vm_fd
        .set_tss_address(KVM_TSS_START as usize)
        .map_err(kvm_err("TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("PIT"))?;
    Ok(vm_fd)
}

/// Loads the kernel and initrd and writes page tables, ACPI tables and boot parameters;
/// returns the entry point and CR3.
fn write_boot_state(memory: &GuestMemoryMmap, config: &VmConfig) -> Result<(u64, u64), VmError> {
    let kernel = load_kernel(memory, config)?;
    let cr3 = firmware::paging::write_gdt_and_page_tables(memory)?;
    firmware::reset_vector::write(memory)?;
    let rsdp = write_acpi_tables(
        memory,
        &AcpiConfig {
            cpus: config.cpus,
            tpm: config.tpm.is_some(),
        },
    )?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(memory, &kernel, path, config.memory)?),
        None => None,
    };
    boot::write_boot_params(
        memory,
        &kernel,
        &BootSetup {
            cmdline: &config.cmdline,
            initrd,
            mem_size: config.memory,
            rsdp,
        },
    )?;
    Ok((kernel.entry.0, cr3))
}

/// The I/O bus with the legacy devices, and those other threads reach (console input, keys).
type LegacyDevices = (Bus, Arc<Mutex<SerialConsole>>, Arc<Mutex<I8042>>);

/// COM1, the i8042 with its keyboard, the CMOS RTC and the ACPI power register on a new I/O
/// bus.
fn legacy_devices(
    vm_fd: &VmFd,
    console: &ConsoleOutput,
    exit_tx: &ExitSender,
    input_room: EventFd,
) -> Result<LegacyDevices, VmError> {
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("serial interrupt"))?;
    let serial = Arc::new(Mutex::new(SerialConsole::new(
        serial_irq,
        Box::new(console.clone()),
        input_room,
    )));
    let io = Bus::new();
    io.insert(u64::from(COM1_PORT), 8, serial.clone())?;
    let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&keyboard_irq, KEYBOARD_IRQ)
        .map_err(kvm_err("keyboard interrupt"))?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        exit_tx.clone(),
        Box::new(keyboard_irq),
    )));
    io.insert(u64::from(I8042_DATA_PORT), 5, i8042.clone())?;
    io.insert(
        u64::from(CMOS_PORT),
        2,
        Arc::new(Mutex::new(CmosRtc::new())),
    )?;
    io.insert(
        u64::from(ACPI_SLEEP_PORT),
        1,
        Arc::new(Mutex::new(AcpiPower::new(exit_tx.clone()))),
    )?;
    Ok((io, serial, i8042))
}

/// The vCPUs, configured; the boot CPU enters at `entry` with page tables at `cr3`.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    count: u8,
    entry: u64,
    cr3: u64,
) -> Result<Vec<VcpuFd>, VmError> {
    let supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("supported CPUID"))?;
    let supported_msrs = kvm
        .get_msr_index_list()
        .map_err(kvm_err("MSR index list"))?;
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for id in 0..count {
        let vcpu = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("creating a vCPU"))?;
        cpu::configure(
            &vcpu,
            &CpuSetup {
                id,
                count,
                supported_cpuid: &supported_cpuid,
                supported_msrs: supported_msrs.as_slice(),
                entry: (id == 0).then_some((entry, cr3)),
            },
        )?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

fn load_kernel(memory: &GuestMemoryMmap, config: &VmConfig) -> Result<LoadedKernel, VmError> {
    Ok(match &config.kernel {
        Kernel::File(path) => match config.decompress {
            Decompress::Host => kernel_unpack::load_kernel(memory, path)?,
            Decompress::Guest => boot::load_kernel(memory, path)?,
        },
        Kernel::BuiltinGreeting => boot::load_raw(memory, &builtin_guest::code())?,
    })
}
