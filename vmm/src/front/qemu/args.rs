//! QEMU's command-line grammar: `-opt value` or `--opt value`, flags without a value, and
//! bare arguments. Which options take a value is QEMU's table, for the options nixvmm knows
//! and those it hands to QEMU; an unknown option is kept as such, and takes the next word as
//! its value unless that starts with `-`.

/// Options that take a value.
const WITH_VALUE: &[&str] = &[
    "m",
    "smp",
    "cpu",
    "name",
    "machine",
    "M",
    "accel",
    "kernel",
    "initrd",
    "append",
    "dtb",
    "serial",
    "display",
    "vga",
    "device",
    "drive",
    "netdev",
    "net",
    "nic",
    "virtfs",
    "fsdev",
    "chardev",
    "object",
    "pidfile",
    "D",
    "d",
    "sandbox",
    "readconfig",
    "writeconfig",
    "bios",
    "pflash",
    "qmp",
    "qmp-pretty",
    "monitor",
    "mon",
    "tpmdev",
    "boot",
    "L",
    "k",
    "global",
    "rtc",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "cdrom",
    "fda",
    "usbdevice",
    "smbios",
    "fw_cfg",
    "incoming",
    "loadvm",
    "parallel",
    "trace",
    "numa",
    "mem-path",
    "overcommit",
    "msg",
    "run-with",
    "action",
    "add-fd",
    "iscsi",
    "blockdev",
    "audiodev",
    "audio",
    "spice",
    "vnc",
    "icount",
    "gdb",
    "watchdog-action",
    "semihosting-config",
    "plugin",
    "compat",
    "uuid",
    "option-rom",
    "acpitable",
    "set",
    "chroot",
    "runas",
    "portrait",
    "rotate",
    "g",
    "echr",
    "virtioconsole",
];

/// One option of the command line as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arg {
    /// Without its dashes; empty for a bare argument.
    pub name: String,
    pub value: Option<String>,
    /// Whether QEMU's table knows it (a bare argument counts as known: it is `-hda`).
    pub known: bool,
}

/// Splits `words` (the arguments after the program name) into options.
pub fn tokenize(words: &[String]) -> Vec<Arg> {
    let mut args = Vec::new();
    let mut words = words.iter().peekable();
    while let Some(word) = words.next() {
        let Some(name) = word
            .strip_prefix("--")
            .or_else(|| word.strip_prefix('-'))
            .filter(|n| !n.is_empty())
        else {
            args.push(Arg {
                name: String::new(),
                value: Some(word.clone()),
                known: true,
            });
            continue;
        };
        // `-opt=value` is not QEMU's grammar, but `--opt=value` style mistakes are named
        // as the option they are, not as an unknown one.
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        let takes_value = WITH_VALUE.contains(&name);
        let known = takes_value || FLAGS.contains(&name);
        let value = if inline.is_some() {
            inline
        } else if takes_value || (!known && words.peek().is_some_and(|w| !w.starts_with('-'))) {
            words.next().cloned()
        } else {
            None
        };
        args.push(Arg {
            name: name.to_string(),
            value,
            known,
        });
    }
    args
}

/// Options without a value.
const FLAGS: &[&str] = &[
    "nographic",
    "no-reboot",
    "no-shutdown",
    "enable-kvm",
    "usb",
    "nodefaults",
    "no-user-config",
    "nodefconfig",
    "daemonize",
    "version",
    "help",
    "h",
    "S",
    "s",
    "snapshot",
    "no-hpet",
    "no-acpi",
    "full-screen",
    "win2k-hack",
    "no-fd-bootchk",
    "only-migratable",
    "enable-sync-profile",
    "preconfig",
    "no-graphic",
    "alt-grab",
    "ctrl-grab",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn values_flags_and_double_dashes() {
        let args = tokenize(&words(
            "-m 1024 --smp 2 -nographic -kernel /k bare -bogus x -y",
        ));
        let got: Vec<(&str, Option<&str>, bool)> = args
            .iter()
            .map(|a| (a.name.as_str(), a.value.as_deref(), a.known))
            .collect();
        assert_eq!(
            got,
            [
                ("m", Some("1024"), true),
                ("smp", Some("2"), true),
                ("nographic", None, true),
                ("kernel", Some("/k"), true),
                ("", Some("bare"), true),
                ("bogus", Some("x"), false),
                ("y", None, false),
            ]
        );
    }

    #[test]
    fn a_value_may_start_with_a_dash() {
        let args = tokenize(&words("-append -v -m"));
        assert_eq!(args[0].value.as_deref(), Some("-v"));
        assert_eq!(
            (args[1].name.as_str(), args[1].value.as_deref()),
            ("m", None)
        );
    }
}
