//! Just enough of the i8042 keyboard controller for the CPU-reset command (0xFE to port 0x64),
//! which Linux uses for `reboot=k` and as a fallback reboot method.

use crate::bus::BusDevice;
use crate::{ExitSender, VmExit};

const CMD_RESET_CPU: u8 = 0xfe;
/// Offsets from the data port (0x60): the command/status port is 0x64.
const COMMAND_OFFSET: u64 = 4;

pub struct I8042 {
    exit: ExitSender,
}

impl I8042 {
    pub fn new(exit: ExitSender) -> I8042 {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    /// Status reads as 0: no data waiting, ready for a command; data reads as 0.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            // The receiver is gone only when the VM is already stopping.
            self.exit.send(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let (tx, rx) = crate::exit_channel().unwrap();
        let mut dev = I8042::new(tx);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(rx.try_recv().is_none());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(rx.try_recv(), Some(VmExit::Reset));
    }
}
