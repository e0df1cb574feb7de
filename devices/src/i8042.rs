//! The i8042 keyboard controller with a PS/2 keyboard behind it and no AUX (mouse) port, as
//! Linux's i8042 and atkbd drivers probe them: the controller's self-tests and command byte,
//! the keyboard's identity, LEDs, scancode set and typematic commands, and keys pressed from
//! the host ([`I8042::press_keys`], QEMU's `sendkey`) as set-1 scancodes (the controller
//! translates, as Linux leaves it) or set-2 ones. The CPU-reset command (0xFE to port 0x64)
//! resets the machine, which Linux uses for `reboot=k` and as a fallback.
//!
//! Ports: data at 0x60 (offset 0), command and status at 0x64 (offset 4). A byte for the
//! guest sets the status register's output-full bit and, for the keyboard with its interrupt
//! enabled in the command byte, pulses IRQ 1.

use std::collections::VecDeque;

use crate::bus::BusDevice;
use crate::{ExitSender, VmExit};

/// Offsets from the data port (0x60): the command/status port is 0x64.
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

/// Command byte (CTR) bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;

const ACK: u8 = 0xfa;
const RESEND: u8 = 0xfe;
const BAT_OK: u8 = 0xaa;
/// Bytes waiting for the guest, at most (a host that types faster loses keys, as a full
/// keyboard buffer does).
const QUEUE_LIMIT: usize = 256;

/// Raises IRQ 1 (an eventfd registered with KVM as an irqfd).
pub trait Irq: Send {
    fn pulse(&self);
}

impl Irq for vmm_sys_util::eventfd::EventFd {
    fn pulse(&self) {
        let _ = self.write(1);
    }
}

/// What a data-port write is, after a command that takes a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    /// Controller: 0x60 write the command byte, 0xD1 write the output port, 0xD2 put a
    /// byte in the output buffer as from the keyboard, 0xD3 as from the AUX port (there is
    /// none), 0xD4 send a byte to the AUX device (there is none).
    WriteCtr,
    WriteOutputPort,
    KbdOutput,
    AuxOutput,
    AuxDevice,
    /// Keyboard: the argument of 0xED (LEDs), 0xF0 (scancode set), 0xF3 (typematic).
    KbdLeds,
    KbdScancodeSet,
    KbdTypematic,
}

pub struct I8042 {
    exit: ExitSender,
    irq: Box<dyn Irq>,
    ctr: u8,
    /// Bytes for the guest, and whether each comes from the keyboard (interrupting).
    output: VecDeque<(u8, bool)>,
    pending: Pending,
    last_write_was_command: bool,
    scancode_set: u8,
    keyboard_enabled: bool,
}

impl I8042 {
    pub fn new(exit: ExitSender, irq: Box<dyn Irq>) -> I8042 {
        I8042 {
            exit,
            irq,
            ctr: CTR_KBD_INT | CTR_SYSTEM | CTR_TRANSLATE,
            output: VecDeque::new(),
            pending: Pending::None,
            last_write_was_command: false,
            scancode_set: 2,
            keyboard_enabled: true,
        }
    }

    fn translating(&self) -> bool {
        self.ctr & CTR_TRANSLATE != 0
    }

    /// Puts a byte in the output buffer; a keyboard byte interrupts when it is the first.
    fn push(&mut self, byte: u8, from_keyboard: bool) {
        if self.output.len() >= QUEUE_LIMIT {
            return;
        }
        self.output.push_back((byte, from_keyboard));
        if self.output.len() == 1 {
            self.interrupt_for_head();
        }
    }

    fn interrupt_for_head(&self) {
        if let Some((_, true)) = self.output.front() {
            if self.ctr & CTR_KBD_INT != 0 {
                self.irq.pulse();
            }
        }
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if self.last_write_was_command {
            status |= STATUS_COMMAND;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        match self.output.pop_front() {
            Some((byte, _)) => {
                self.interrupt_for_head();
                byte
            }
            None => 0,
        }
    }

    fn controller_command(&mut self, command: u8) {
        self.pending = Pending::None;
        match command {
            0x20 => self.push(self.ctr, false),
            0x60 => self.pending = Pending::WriteCtr,
            0xa7 => self.ctr |= CTR_AUX_DISABLE,
            0xa8 => self.ctr &= !CTR_AUX_DISABLE,
            // AUX interface test: "clock line stuck low", that is, no AUX port.
            0xa9 => self.push(0x01, false),
            // Controller self-test passed; keyboard interface test passed.
            0xaa => {
                self.ctr |= CTR_SYSTEM;
                self.push(0x55, false);
            }
            0xab => self.push(0x00, false),
            0xad => self.ctr |= CTR_KBD_DISABLE,
            0xae => self.ctr &= !CTR_KBD_DISABLE,
            // Output port: A20 on, no reset.
            0xd0 => self.push(0x03, false),
            0xd1 => self.pending = Pending::WriteOutputPort,
            0xd2 => self.pending = Pending::KbdOutput,
            0xd3 => self.pending = Pending::AuxOutput,
            0xd4 => self.pending = Pending::AuxDevice,
            // Pulse output lines: bit 0 low is the CPU reset.
            0xf0..=0xff if command & 1 == 0 => self.exit.send(VmExit::Reset),
            other => log::debug!("i8042: controller command {other:#x} ignored"),
        }
    }

    fn data_write(&mut self, byte: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => self.ctr = byte,
            Pending::WriteOutputPort => {
                if byte & 1 == 0 {
                    self.exit.send(VmExit::Reset);
                }
            }
            Pending::KbdOutput => self.push(byte, true),
            // There is no AUX port: what the guest loops back does not come back as written.
            Pending::AuxOutput => self.push(!byte, false),
            Pending::AuxDevice => {}
            Pending::KbdLeds | Pending::KbdTypematic => self.push(ACK, true),
            Pending::KbdScancodeSet => {
                match byte {
                    0 => {
                        self.push(ACK, true);
                        let set = self.scancode_set;
                        let reply = if self.translating() {
                            [0, 0x43, 0x41, 0x3f][usize::from(set)]
                        } else {
                            set
                        };
                        self.push(reply, true);
                        return;
                    }
                    1..=3 => self.scancode_set = byte,
                    _ => {}
                }
                self.push(ACK, true);
            }
            Pending::None => self.keyboard_command(byte),
        }
    }

    fn keyboard_command(&mut self, command: u8) {
        match command {
            0xed => {
                self.push(ACK, true);
                self.pending = Pending::KbdLeds;
            }
            0xee => self.push(0xee, true),
            0xf0 => {
                self.push(ACK, true);
                self.pending = Pending::KbdScancodeSet;
            }
            0xf2 => {
                self.push(ACK, true);
                self.push(0xab, true);
                let second = if self.translating() { 0x41 } else { 0x83 };
                self.push(second, true);
            }
            0xf3 => {
                self.push(ACK, true);
                self.pending = Pending::KbdTypematic;
            }
            0xf4 => {
                self.keyboard_enabled = true;
                self.push(ACK, true);
            }
            0xf5 => {
                self.keyboard_enabled = false;
                self.push(ACK, true);
            }
            0xf6..=0xfd => self.push(ACK, true),
            0xff => {
                self.scancode_set = 2;
                self.keyboard_enabled = true;
                self.push(ACK, true);
                self.push(BAT_OK, true);
            }
            _ => self.push(RESEND, true),
        }
    }

    /// Presses `keys` in order and releases them in reverse (a chord such as
    /// ctrl-alt-delete), as scancodes the guest reads as key events.
    pub fn press_keys(&mut self, keys: &[Key]) {
        if !self.keyboard_enabled || self.ctr & CTR_KBD_DISABLE != 0 {
            return;
        }
        let set1 = self.translating() || self.scancode_set == 1;
        for key in keys {
            for byte in key.make(set1) {
                self.push(byte, true);
            }
        }
        for key in keys.iter().rev() {
            for byte in key.break_code(set1) {
                self.push(byte, true);
            }
        }
    }
}

/// A key, by its set-1 and set-2 scancodes (`extended`: prefixed by 0xE0 in both sets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub set1: u8,
    pub set2: u8,
    pub extended: bool,
}

impl Key {
    fn make(&self, set1: bool) -> Vec<u8> {
        let code = if set1 { self.set1 } else { self.set2 };
        let mut bytes = if self.extended { vec![0xe0] } else { vec![] };
        bytes.push(code);
        bytes
    }

    fn break_code(&self, set1: bool) -> Vec<u8> {
        let mut bytes = if self.extended { vec![0xe0] } else { vec![] };
        if set1 {
            bytes.push(self.set1 | 0x80);
        } else {
            bytes.extend([0xf0, self.set2]);
        }
        bytes
    }

    /// QEMU's key names (`sendkey`): letters, digits, `ret`, `spc`, `ctrl`, `alt`,
    /// `delete`, …, or a set-1 scancode written `0xNN` (`0xE0NN` for an extended key).
    pub fn named(name: &str) -> Option<Key> {
        if let Some(hex) = name.strip_prefix("0x") {
            let code = u16::from_str_radix(hex, 16).ok()?;
            let (extended, set1) = match code {
                0..=0x7f => (false, code as u8),
                0xe000..=0xe07f => (true, (code & 0xff) as u8),
                _ => return None,
            };
            let set2 = KEYS.iter().find(|k| k.1 == set1 && k.3 == extended)?.2;
            return Some(Key {
                set1,
                set2,
                extended,
            });
        }
        KEYS.iter()
            .find(|k| k.0 == name)
            .map(|&(_, set1, set2, extended)| Key {
                set1,
                set2,
                extended,
            })
    }
}

/// QEMU's names with their set-1 and set-2 scancodes and whether they are extended.
const KEYS: &[(&str, u8, u8, bool)] = &[
    ("esc", 0x01, 0x76, false),
    ("1", 0x02, 0x16, false),
    ("2", 0x03, 0x1e, false),
    ("3", 0x04, 0x26, false),
    ("4", 0x05, 0x25, false),
    ("5", 0x06, 0x2e, false),
    ("6", 0x07, 0x36, false),
    ("7", 0x08, 0x3d, false),
    ("8", 0x09, 0x3e, false),
    ("9", 0x0a, 0x46, false),
    ("0", 0x0b, 0x45, false),
    ("minus", 0x0c, 0x4e, false),
    ("equal", 0x0d, 0x55, false),
    ("backspace", 0x0e, 0x66, false),
    ("tab", 0x0f, 0x0d, false),
    ("q", 0x10, 0x15, false),
    ("w", 0x11, 0x1d, false),
    ("e", 0x12, 0x24, false),
    ("r", 0x13, 0x2d, false),
    ("t", 0x14, 0x2c, false),
    ("y", 0x15, 0x35, false),
    ("u", 0x16, 0x3c, false),
    ("i", 0x17, 0x43, false),
    ("o", 0x18, 0x44, false),
    ("p", 0x19, 0x4d, false),
    ("bracket_left", 0x1a, 0x54, false),
    ("bracket_right", 0x1b, 0x5b, false),
    ("ret", 0x1c, 0x5a, false),
    ("ctrl", 0x1d, 0x14, false),
    ("a", 0x1e, 0x1c, false),
    ("s", 0x1f, 0x1b, false),
    ("d", 0x20, 0x23, false),
    ("f", 0x21, 0x2b, false),
    ("g", 0x22, 0x34, false),
    ("h", 0x23, 0x33, false),
    ("j", 0x24, 0x3b, false),
    ("k", 0x25, 0x42, false),
    ("l", 0x26, 0x4b, false),
    ("semicolon", 0x27, 0x4c, false),
    ("apostrophe", 0x28, 0x52, false),
    ("grave_accent", 0x29, 0x0e, false),
    ("shift", 0x2a, 0x12, false),
    ("backslash", 0x2b, 0x5d, false),
    ("z", 0x2c, 0x1a, false),
    ("x", 0x2d, 0x22, false),
    ("c", 0x2e, 0x21, false),
    ("v", 0x2f, 0x2a, false),
    ("b", 0x30, 0x32, false),
    ("n", 0x31, 0x31, false),
    ("m", 0x32, 0x3a, false),
    ("comma", 0x33, 0x41, false),
    ("dot", 0x34, 0x49, false),
    ("slash", 0x35, 0x4a, false),
    ("shift_r", 0x36, 0x59, false),
    ("asterisk", 0x37, 0x7c, false),
    ("alt", 0x38, 0x11, false),
    ("spc", 0x39, 0x29, false),
    ("caps_lock", 0x3a, 0x58, false),
    ("f1", 0x3b, 0x05, false),
    ("f2", 0x3c, 0x06, false),
    ("f3", 0x3d, 0x04, false),
    ("f4", 0x3e, 0x0c, false),
    ("f5", 0x3f, 0x03, false),
    ("f6", 0x40, 0x0b, false),
    ("f7", 0x41, 0x83, false),
    ("f8", 0x42, 0x0a, false),
    ("f9", 0x43, 0x01, false),
    ("f10", 0x44, 0x09, false),
    ("f11", 0x57, 0x78, false),
    ("f12", 0x58, 0x07, false),
    ("ctrl_r", 0x1d, 0x14, true),
    ("alt_r", 0x38, 0x11, true),
    ("home", 0x47, 0x6c, true),
    ("up", 0x48, 0x75, true),
    ("pgup", 0x49, 0x7d, true),
    ("left", 0x4b, 0x6b, true),
    ("right", 0x4d, 0x74, true),
    ("end", 0x4f, 0x69, true),
    ("down", 0x50, 0x72, true),
    ("pgdn", 0x51, 0x7a, true),
    ("insert", 0x52, 0x70, true),
    ("delete", 0x53, 0x71, true),
    ("meta_l", 0x5b, 0x1f, true),
];

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match offset {
            COMMAND_OFFSET => {
                self.last_write_was_command = true;
                self.controller_command(byte);
            }
            DATA_OFFSET => {
                self.last_write_was_command = false;
                self.data_write(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct CountingIrq(Arc<AtomicUsize>);

    impl Irq for CountingIrq {
        fn pulse(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn controller() -> (I8042, crate::ExitReceiver, CountingIrq) {
        let (tx, rx) = crate::exit_channel().unwrap();
        let irq = CountingIrq::default();
        (I8042::new(tx, Box::new(irq.clone())), rx, irq)
    }

    fn command(dev: &mut I8042, byte: u8) {
        dev.write(COMMAND_OFFSET, &[byte]);
    }

    fn data(dev: &mut I8042, byte: u8) {
        dev.write(DATA_OFFSET, &[byte]);
    }

    /// Everything the guest can read now.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut status = [0u8];
            dev.read(COMMAND_OFFSET, &mut status);
            if status[0] & STATUS_OUTPUT_FULL == 0 {
                return out;
            }
            let mut byte = [0u8];
            dev.read(DATA_OFFSET, &mut byte);
            out.push(byte[0]);
        }
    }

    #[test]
    fn reset_commands_reset() {
        let (mut dev, rx, _) = controller();
        data(&mut dev, 0xfe);
        command(&mut dev, 0xaa);
        assert!(rx.try_recv().is_none());
        command(&mut dev, 0xfe);
        assert_eq!(rx.try_recv(), Some(VmExit::Reset));
        command(&mut dev, 0xd1);
        data(&mut dev, 0xfe);
        assert_eq!(rx.try_recv(), Some(VmExit::Reset));
    }

    #[test]
    fn the_controller_probes_as_linux_expects() {
        let (mut dev, _, _) = controller();
        command(&mut dev, 0xaa);
        assert_eq!(drain(&mut dev), [0x55], "self-test passed");
        command(&mut dev, 0x20);
        let ctr = drain(&mut dev)[0];
        assert_eq!(ctr & CTR_TRANSLATE, CTR_TRANSLATE);
        command(&mut dev, 0x60);
        data(&mut dev, ctr & !CTR_KBD_INT);
        command(&mut dev, 0x20);
        assert_eq!(drain(&mut dev), [ctr & !CTR_KBD_INT]);
        // AUX: disabling and enabling show in the command byte; the loop-back does not
        // come back and the interface test says the clock is stuck: no AUX port.
        command(&mut dev, 0xa7);
        command(&mut dev, 0x20);
        assert_ne!(drain(&mut dev)[0] & CTR_AUX_DISABLE, 0);
        command(&mut dev, 0xa8);
        command(&mut dev, 0x20);
        assert_eq!(drain(&mut dev)[0] & CTR_AUX_DISABLE, 0);
        command(&mut dev, 0xd3);
        data(&mut dev, 0x5a);
        assert_ne!(drain(&mut dev), [0x5a]);
        command(&mut dev, 0xa9);
        assert_eq!(drain(&mut dev), [0x01]);
        command(&mut dev, 0xab);
        assert_eq!(drain(&mut dev), [0x00], "keyboard interface test passed");
    }

    #[test]
    fn the_keyboard_answers_atkbd_and_interrupts() {
        let (mut dev, _, irq) = controller();
        data(&mut dev, 0xf2);
        assert_eq!(drain(&mut dev), [ACK, 0xab, 0x41], "translated id");
        assert_eq!(irq.0.load(Ordering::SeqCst), 3, "one interrupt per byte");
        data(&mut dev, 0xed);
        data(&mut dev, 0x02);
        assert_eq!(drain(&mut dev), [ACK, ACK], "LEDs");
        data(&mut dev, 0xf0);
        data(&mut dev, 0x00);
        assert_eq!(drain(&mut dev), [ACK, ACK, 0x41], "set 2, translated");
        data(&mut dev, 0xff);
        assert_eq!(drain(&mut dev), [ACK, BAT_OK]);
        data(&mut dev, 0x42);
        assert_eq!(drain(&mut dev), [RESEND], "not a keyboard command");
    }

    #[test]
    fn ctrl_alt_delete_arrives_as_scancodes() {
        let (mut dev, _, _) = controller();
        let keys: Vec<Key> = ["ctrl", "alt", "delete"]
            .iter()
            .map(|k| Key::named(k).unwrap())
            .collect();
        dev.press_keys(&keys);
        assert_eq!(
            drain(&mut dev),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d],
            "set 1, as the translating controller gives them"
        );
        command(&mut dev, 0x60);
        data(&mut dev, CTR_KBD_INT | CTR_SYSTEM);
        dev.press_keys(&keys);
        assert_eq!(
            drain(&mut dev),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14],
            "set 2 without translation"
        );
        assert_eq!(Key::named("0x1c"), Key::named("ret"));
        assert_eq!(Key::named("0xe053"), Key::named("delete"));
        assert_eq!(Key::named("frobnicate"), None);
        assert_eq!(Key::named("0xzz"), None);
    }
}
