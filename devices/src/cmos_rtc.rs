//! An MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data): what gives a Linux
//! guest `/dev/rtc0` (rtc_cmos, found through the DSDT's `PNP0B00` device) and lets
//! `hwclock -r` read the host's time.
//!
//! The clock is the host's wall clock (UTC) plus an offset the guest sets by writing the time;
//! the offset is whole seconds, so the guest's seconds tick with the host's and register A's
//! update-in-progress bit can follow the host's second. The 128 bytes of CMOS keep whatever
//! the guest writes outside the time and status registers (the alarm registers included).
//!
//! No interrupts: IRQ 8 is never raised, so neither alarms, nor update-ended or periodic
//! interrupts reach the guest, and register C always reads 0. The DSDT gives the device no
//! IRQ, and on hardware-reduced ACPI (no legacy PIC) Linux's rtc_cmos then runs without alarms.

use std::time::{SystemTime, UNIX_EPOCH};

use firmware::layout::CMOS_CENTURY_REGISTER;

use crate::bus::BusDevice;

/// Dates computed by hand (Howard Hinnant's algorithms), no date crate.
mod civil;
use civil::{civil_from_days, days_from_civil};

/// Where the device reads the host's wall-clock time; tests inject their own.
pub type Clock = Box<dyn Fn() -> SystemTime + Send>;

const INDEX_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
/// Bit 7 of an index write masks NMIs on a PC; the other bits select the register.
const NMI_DISABLE: u8 = 0x80;
const CMOS_SIZE: usize = 128;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
/// 1 = Sunday … 7 = Saturday.
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
/// The last two digits; the century is in [`CENTURY`].
const YEAR: u8 = 0x09;
const CENTURY: u8 = CMOS_CENTURY_REGISTER;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

/// Register A: update in progress (read-only); the rest is the divider and rate, as written.
const A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: what a BIOS leaves.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates stopped while the guest sets the time.
const B_SET: u8 = 0x80;
/// Register B: binary time registers (BCD when clear).
const B_BINARY: u8 = 0x04;
/// Register B: 24-hour mode (12-hour with [`HOUR_PM`] when clear).
const B_24_HOUR: u8 = 0x02;
const B_DEFAULT: u8 = B_24_HOUR;
/// Register D: valid RAM and time (the battery is fine).
const D_VALID: u8 = 0x80;
/// In 12-hour mode, bit 7 of the hours register is PM.
const HOUR_PM: u8 = 0x80;
/// A real chip raises UIP this long before each update, which happens at the end of a second.
const UIP_MICROS: u32 = 244;

const SECONDS_PER_DAY: i64 = 86_400;

/// The time registers' values, binary and 24-hour, whatever the guest's register B says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Time {
    second: u8,
    minute: u8,
    hour: u8,
    weekday: u8,
    day: u8,
    month: u8,
    year: u8,
    century: u8,
}

impl Time {
    /// The civil time (UTC) of `secs` seconds since 1970; years beyond 9999 read as 99xx.
    fn from_unix(secs: i64) -> Time {
        let days = secs.div_euclid(SECONDS_PER_DAY);
        let of_day = secs.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        let year = year.clamp(0, 9999);
        Time {
            second: (of_day % 60) as u8,
            minute: (of_day / 60 % 60) as u8,
            hour: (of_day / 3600) as u8,
            // 1970-01-01 was a Thursday (weekday 5).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
            day,
            month,
            year: (year % 100) as u8,
            century: (year / 100) as u8,
        }
    }

    /// Seconds since 1970 of whatever the guest wrote; out-of-range fields carry over (a 61st
    /// minute is the next hour), a month outside 1..=12 counts as the nearest valid one, and
    /// the weekday is ignored (it follows from the date).
    fn to_unix(self) -> i64 {
        let year = i64::from(self.century) * 100 + i64::from(self.year);
        let days = days_from_civil(year, self.month.clamp(1, 12), self.day);
        days * SECONDS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    fn field(&mut self, register: u8) -> Option<&mut u8> {
        Some(match register {
            SECONDS => &mut self.second,
            MINUTES => &mut self.minute,
            HOURS => &mut self.hour,
            WEEKDAY => &mut self.weekday,
            DAY => &mut self.day,
            MONTH => &mut self.month,
            YEAR => &mut self.year,
            CENTURY => &mut self.century,
            _ => return None,
        })
    }
}

fn to_bcd(value: u8) -> u8 {
    ((value / 10 % 10) << 4) | (value % 10)
}

/// Decodes BCD digits as they are, even invalid ones (0x1f is 25), as a real chip counts on.
fn from_bcd(value: u8) -> u8 {
    (value >> 4) * 10 + (value & 0x0f)
}

pub struct CmosRtc {
    clock: Clock,
    index: u8,
    nmi_disabled: bool,
    /// NVRAM, alarms, and registers A (without UIP) and B; the time registers, C and D are
    /// computed.
    cmos: [u8; CMOS_SIZE],
    /// Guest time minus host time, in whole seconds.
    offset: i64,
    /// While register B's SET bit is set: the time the guest writes, which reads return.
    staged: Option<Time>,
}

impl Default for CmosRtc {
    fn default() -> CmosRtc {
        CmosRtc::new()
    }
}

impl CmosRtc {
    /// A clock that starts at the host's time.
    pub fn new() -> CmosRtc {
        CmosRtc::with_clock(Box::new(SystemTime::now))
    }

    /// A clock that starts at, and then follows, `clock`'s time.
    pub fn with_clock(clock: Clock) -> CmosRtc {
        let mut cmos = [0; CMOS_SIZE];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_DEFAULT;
        CmosRtc {
            clock,
            index: 0,
            nmi_disabled: false,
            cmos,
            offset: 0,
            staged: None,
        }
    }

    /// Whether the guest's last index write had bit 7 (NMI disable) set.
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// Host time as whole seconds since 1970 (negative before) and microseconds into that
    /// second.
    fn host_now(&self) -> (i64, u32) {
        match (self.clock)().duration_since(UNIX_EPOCH) {
            Ok(after) => (
                i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
                after.subsec_micros(),
            ),
            Err(before) => {
                let before = before.duration();
                let secs = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
                match before.subsec_micros() {
                    0 => (-secs, 0),
                    micros => (-secs - 1, 1_000_000 - micros),
                }
            }
        }
    }

    fn register_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    /// The guest's time now: the staged copy while SET is set, else host time plus offset.
    fn now(&self) -> Time {
        self.staged
            .unwrap_or_else(|| Time::from_unix(self.host_now().0.saturating_add(self.offset)))
    }

    /// Makes `time` the guest's time as of this host second.
    fn set_time(&mut self, time: Time) {
        self.offset = time.to_unix().saturating_sub(self.host_now().0);
    }

    /// A time register's value in the guest's format (register B's DM and 24/12 bits).
    fn encode(&self, register: u8, value: u8) -> u8 {
        let b = self.register_b();
        let (value, pm) = match register {
            HOURS if b & B_24_HOUR == 0 => match value % 12 {
                0 => (12, value >= 12),
                hour => (hour, value >= 12),
            },
            _ => (value, false),
        };
        let value = if b & B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        };
        if pm {
            value | HOUR_PM
        } else {
            value
        }
    }

    /// A time register's value written by the guest, made binary and 24-hour.
    fn decode(&self, register: u8, value: u8) -> u8 {
        let b = self.register_b();
        let twelve_hour = register == HOURS && b & B_24_HOUR == 0;
        let pm = twelve_hour && value & HOUR_PM != 0;
        let digits = if twelve_hour { value & !HOUR_PM } else { value };
        let value = if b & B_BINARY != 0 {
            digits
        } else {
            from_bcd(digits)
        };
        match (twelve_hour, pm) {
            (true, false) => value % 12,
            (true, true) => value % 12 + 12,
            (false, _) => value,
        }
    }

    /// UIP: the last [`UIP_MICROS`] of every second, unless SET holds updates.
    fn update_in_progress(&self) -> bool {
        self.staged.is_none() && self.host_now().1 >= 1_000_000 - UIP_MICROS
    }

    fn read_register(&mut self, register: u8) -> u8 {
        let mut time = self.now();
        if let Some(value) = time.field(register) {
            let value = *value;
            return self.encode(register, value);
        }
        match register {
            REG_A if self.update_in_progress() => self.cmos[usize::from(REG_A)] | A_UIP,
            // No interrupt flags are ever raised, so reading C has nothing to clear.
            REG_C => 0,
            REG_D => D_VALID,
            _ => self.cmos[usize::from(register)],
        }
    }

    fn write_register(&mut self, register: u8, value: u8) {
        let decoded = self.decode(register, value);
        if let Some(staged) = &mut self.staged {
            if let Some(field) = staged.field(register) {
                *field = decoded;
                return;
            }
        } else {
            // A time write while the clock runs takes effect at once.
            let mut time = self.now();
            if let Some(field) = time.field(register) {
                *field = decoded;
                self.set_time(time);
                return;
            }
        }
        match register {
            REG_A => self.cmos[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                let setting = value & B_SET != 0;
                match (self.staged.take(), setting) {
                    (None, true) => self.staged = Some(self.now()),
                    (Some(staged), true) => self.staged = Some(staged),
                    (Some(staged), false) => self.set_time(staged),
                    (None, false) => {}
                }
                self.cmos[usize::from(REG_B)] = value;
            }
            REG_C | REG_D => {}
            _ => self.cmos[usize::from(register)] = value,
        }
    }
}

impl BusDevice for CmosRtc {
    /// The index port reads as 0xff (it is write-only); the data port reads the selected
    /// register. Only the first byte of a wider access means anything.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == DATA_OFFSET {
            if let Some(first) = data.first_mut() {
                *first = self.read_register(self.index);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            INDEX_OFFSET => {
                self.nmi_disabled = value & NMI_DISABLE != 0;
                self.index = value & !NMI_DISABLE;
            }
            DATA_OFFSET => self.write_register(self.index, value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    /// A clock the test moves by hand.
    #[derive(Clone)]
    struct FakeClock(Arc<Mutex<SystemTime>>);

    impl FakeClock {
        /// At `year-month-day hour:minute:second` UTC plus `micros`.
        fn at(date: (i64, u8, u8), time: (u8, u8, u8), micros: u64) -> FakeClock {
            let clock = FakeClock(Arc::new(Mutex::new(UNIX_EPOCH)));
            clock.set(date, time, micros);
            clock
        }

        fn set(&self, (year, month, day): (i64, u8, u8), (h, m, s): (u8, u8, u8), micros: u64) {
            let secs = days_from_civil(year, month, day) * SECONDS_PER_DAY
                + i64::from(h) * 3600
                + i64::from(m) * 60
                + i64::from(s);
            *self.0.lock().unwrap() = UNIX_EPOCH
                + Duration::from_secs(u64::try_from(secs).unwrap())
                + Duration::from_micros(micros);
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }

        fn rtc(&self) -> CmosRtc {
            let clock = self.clone();
            CmosRtc::with_clock(Box::new(move || *clock.0.lock().unwrap()))
        }
    }

    fn read(rtc: &mut CmosRtc, register: u8) -> u8 {
        rtc.write(INDEX_OFFSET, &[register]);
        let mut data = [0];
        rtc.read(DATA_OFFSET, &mut data);
        data[0]
    }

    fn write(rtc: &mut CmosRtc, register: u8, value: u8) {
        rtc.write(INDEX_OFFSET, &[register]);
        rtc.write(DATA_OFFSET, &[value]);
    }

    /// Seconds, minutes, hours, weekday, day, month, year, century as the guest reads them.
    fn read_time(rtc: &mut CmosRtc) -> [u8; 8] {
        [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY].map(|r| read(rtc, r))
    }

    const WEDNESDAY: ((i64, u8, u8), (u8, u8, u8)) = ((2026, 12, 2), (13, 5, 9));

    #[test]
    fn reads_the_time_in_bcd_24_hour_by_default() {
        let mut rtc = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 500_000).rtc();
        assert_eq!(read(&mut rtc, REG_A), A_DEFAULT);
        assert_eq!(read(&mut rtc, REG_B), B_24_HOUR);
        assert_eq!(read(&mut rtc, REG_D), D_VALID);
        assert_eq!(
            read_time(&mut rtc),
            [0x09, 0x05, 0x13, 4, 0x02, 0x12, 0x26, 0x20]
        );
    }

    #[test]
    fn reads_the_time_in_binary() {
        let mut rtc = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0).rtc();
        write(&mut rtc, REG_B, B_24_HOUR | B_BINARY);
        assert_eq!(read_time(&mut rtc), [9, 5, 13, 4, 2, 12, 26, 20]);
    }

    #[test]
    fn reads_hours_in_12_hour_mode() {
        let clock = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0);
        let mut rtc = clock.rtc();
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, HOURS), 0x01 | HOUR_PM);
        write(&mut rtc, REG_B, B_BINARY);
        assert_eq!(read(&mut rtc, HOURS), 1 | HOUR_PM);
        for (hour, bcd) in [(0, 0x12), (11, 0x11), (12, 0x12 | HOUR_PM), (23, 0x91)] {
            clock.set(WEDNESDAY.0, (hour, 30, 0), 0);
            write(&mut rtc, REG_B, 0);
            assert_eq!(read(&mut rtc, HOURS), bcd, "{hour}:30");
            write(&mut rtc, REG_B, B_24_HOUR);
            assert_eq!(read(&mut rtc, HOURS), to_bcd(hour), "{hour}:30");
        }
    }

    #[test]
    fn uip_is_set_only_in_the_last_244_us_of_a_second() {
        let clock = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0);
        let mut rtc = clock.rtc();
        for (micros, uip) in [
            (0, false),
            (500_000, false),
            (999_700, false),
            (999_756, true),
            (999_999, true),
        ] {
            clock.set(WEDNESDAY.0, WEDNESDAY.1, micros);
            let expected = if uip { A_DEFAULT | A_UIP } else { A_DEFAULT };
            assert_eq!(read(&mut rtc, REG_A), expected, "at .{micros:06}");
            // The time registers still hold the second before the update.
            assert_eq!(read(&mut rtc, SECONDS), 0x09);
        }
        // SET stops updates, and with them UIP.
        write(&mut rtc, REG_B, B_24_HOUR | B_SET);
        assert_eq!(read(&mut rtc, REG_A), A_DEFAULT);
        // The other bits of A are kept as written, UIP is not.
        write(&mut rtc, REG_A, 0xff);
        assert_eq!(read(&mut rtc, REG_A), 0x7f);
    }

    #[test]
    fn setting_the_time_moves_the_clock() {
        let clock = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 500_000);
        let mut rtc = clock.rtc();
        write(&mut rtc, REG_B, B_24_HOUR | B_SET);
        for (register, value) in [
            (SECONDS, 0x58),
            (MINUTES, 0x59),
            (HOURS, 0x23),
            (DAY, 0x31),
            (MONTH, 0x01),
            (YEAR, 0x30),
            (CENTURY, 0x20),
        ] {
            write(&mut rtc, register, value);
        }
        // While SET holds, the staged time reads back and does not run.
        clock.advance(Duration::from_secs(5));
        assert_eq!(read(&mut rtc, SECONDS), 0x58);
        assert_eq!(read(&mut rtc, YEAR), 0x30);
        write(&mut rtc, REG_B, B_24_HOUR);
        clock.advance(Duration::from_secs(3));
        // 2030-01-31 23:59:58 + 3 s is Friday 2030-02-01 00:00:01.
        assert_eq!(
            read_time(&mut rtc),
            [0x01, 0x00, 0x00, 6, 0x01, 0x02, 0x30, 0x20]
        );
        // Less than a second later it is still the same second: the offset is whole seconds.
        clock.advance(Duration::from_millis(499));
        assert_eq!(read(&mut rtc, SECONDS), 0x01);
        clock.advance(Duration::from_millis(1));
        assert_eq!(read(&mut rtc, SECONDS), 0x02);
    }

    #[test]
    fn sets_the_time_in_binary_12_hour_mode() {
        let clock = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0);
        let mut rtc = clock.rtc();
        write(&mut rtc, REG_B, B_BINARY | B_SET);
        write(&mut rtc, HOURS, 11 | HOUR_PM);
        write(&mut rtc, MINUTES, 45);
        write(&mut rtc, REG_B, B_BINARY);
        assert_eq!(read(&mut rtc, HOURS), 11 | HOUR_PM);
        write(&mut rtc, REG_B, B_24_HOUR);
        assert_eq!(read(&mut rtc, HOURS), 0x23);
        assert_eq!(read(&mut rtc, MINUTES), 0x45);
        // A time write while the clock runs also sets it (the date is untouched).
        write(&mut rtc, HOURS, 0x07);
        clock.advance(Duration::from_secs(60));
        assert_eq!(read_time(&mut rtc)[..3], [0x09, 0x46, 0x07]);
        assert_eq!(read(&mut rtc, DAY), 0x02);
    }

    #[test]
    fn index_is_masked_and_nmi_bit_remembered() {
        let mut rtc = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0).rtc();
        assert!(!rtc.nmi_disabled());
        rtc.write(INDEX_OFFSET, &[NMI_DISABLE | 0x40]);
        assert!(rtc.nmi_disabled());
        rtc.write(DATA_OFFSET, &[0x5a]);
        let mut index = [0];
        rtc.read(INDEX_OFFSET, &mut index);
        assert_eq!(index, [0xff]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        assert!(!rtc.nmi_disabled());
        // Seconds through the NMI-masked index.
        rtc.write(INDEX_OFFSET, &[NMI_DISABLE | SECONDS]);
        let mut seconds = [0; 2];
        rtc.read(DATA_OFFSET, &mut seconds);
        assert_eq!(seconds, [0x09, 0xff]);
    }

    #[test]
    fn other_registers_keep_nvram_bytes() {
        let mut rtc = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0).rtc();
        let registers = [0x01u8, 0x03, 0x05, 0x0e, 0x0f, 0x31, 0x33, 0x7f];
        for (i, register) in registers.into_iter().enumerate() {
            write(&mut rtc, register, 0xa0 + i as u8);
        }
        for (i, register) in registers.into_iter().enumerate() {
            assert_eq!(read(&mut rtc, register), 0xa0 + i as u8, "{register:#x}");
        }
        // C and D are read-only; C has no interrupt flags to show.
        write(&mut rtc, REG_C, 0xff);
        write(&mut rtc, REG_D, 0x00);
        assert_eq!(read(&mut rtc, REG_C), 0);
        assert_eq!(read(&mut rtc, REG_D), D_VALID);
        // The time is untouched.
        assert_eq!(read(&mut rtc, SECONDS), 0x09);
    }

    #[test]
    fn leap_day_and_year_end_roll_over() {
        let clock = FakeClock::at((2024, 2, 29), (23, 59, 59), 0);
        let mut rtc = clock.rtc();
        assert_eq!(
            read_time(&mut rtc),
            [0x59, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20]
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            read_time(&mut rtc),
            [0x00, 0x00, 0x00, 6, 0x01, 0x03, 0x24, 0x20]
        );
        clock.set((2026, 12, 31), (23, 59, 59), 0);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            read_time(&mut rtc),
            [0x00, 0x00, 0x00, 6, 0x01, 0x01, 0x27, 0x20]
        );
        clock.set((2099, 12, 31), (23, 59, 59), 0);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            read_time(&mut rtc),
            [0x00, 0x00, 0x00, 6, 0x01, 0x01, 0x00, 0x21]
        );
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let clock = FakeClock::at(WEDNESDAY.0, WEDNESDAY.1, 0);
        let mut rtc = clock.rtc();
        for b in [0x00, B_BINARY, B_SET, 0xff, B_24_HOUR] {
            for register in 0..=0xffu8 {
                for value in [0x00, 0x7f, 0x80, 0x99, 0xfa, 0xff] {
                    write(&mut rtc, REG_B, b);
                    write(&mut rtc, register, value);
                    read_time(&mut rtc);
                    read(&mut rtc, register);
                }
            }
        }
        rtc.write(7, &[1, 2, 3]);
        rtc.write(DATA_OFFSET, &[]);
        rtc.read(DATA_OFFSET, &mut []);
        let mut wide = [0; 4];
        rtc.read(9, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        // Host clocks far from now.
        for host in [
            UNIX_EPOCH - Duration::from_micros(1_500_000),
            UNIX_EPOCH + Duration::from_secs(1 << 60),
        ] {
            let mut rtc = CmosRtc::with_clock(Box::new(move || host));
            write(&mut rtc, REG_B, B_SET);
            write(&mut rtc, CENTURY, 0x99);
            write(&mut rtc, REG_B, B_24_HOUR);
            read_time(&mut rtc);
            read(&mut rtc, REG_A);
        }
        let mut rtc = CmosRtc::with_clock(Box::new(|| UNIX_EPOCH - Duration::from_micros(1)));
        // 1969-12-31 23:59:59.999999: inside the update window.
        assert_eq!(read(&mut rtc, REG_A), A_DEFAULT | A_UIP);
        assert_eq!(read_time(&mut rtc)[..3], [0x59, 0x59, 0x23]);
    }
}
