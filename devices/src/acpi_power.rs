//! The ACPI hardware-reduced sleep control/status and reset register (one I/O byte, named by
//! the FADT): Linux's `poweroff` writes `SLP_TYP(5) << 2 | SLP_EN` here, its ACPI reboot the
//! reset value.

use firmware::layout::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLP_EN};

use crate::bus::BusDevice;
use crate::{ExitSender, VmExit};

const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;

pub struct AcpiPower {
    exit: ExitSender,
}

impl AcpiPower {
    pub fn new(exit: ExitSender) -> AcpiPower {
        AcpiPower { exit }
    }
}

impl BusDevice for AcpiPower {
    /// Sleep status: never asleep, nothing to report.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let event = if value == ACPI_RESET_VALUE {
            VmExit::Reset
        } else if value & ACPI_SLP_EN != 0
            && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == ACPI_S5_SLEEP_TYPE
        {
            VmExit::Shutdown
        } else {
            log::debug!("ACPI sleep register: ignored write {value:#x}");
            return;
        };
        // The receiver is gone only when the VM is already stopping.
        self.exit.send(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let (tx, rx) = crate::exit_channel().unwrap();
        let mut dev = AcpiPower::new(tx);
        dev.write(0, &[ACPI_S5_SLEEP_TYPE << 2]); // SLP_EN missing: nothing
        dev.write(0, &[3 << 2 | ACPI_SLP_EN]); // S3: not supported, ignored
        assert!(rx.try_recv().is_none());
        dev.write(0, &[ACPI_S5_SLEEP_TYPE << 2 | ACPI_SLP_EN]);
        assert_eq!(rx.try_recv(), Some(VmExit::Shutdown));
        dev.write(0, &[ACPI_RESET_VALUE]);
        assert_eq!(rx.try_recv(), Some(VmExit::Reset));
    }
}
