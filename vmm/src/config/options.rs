//! `key=value,key=value` option strings, as `--disk` and `--share` take them (and QEMU's
//! `-drive`, `-device`, `-netdev`). A value may contain commas when doubled (`,,`), as in QEMU.

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("{option}: `{item}` is not key=value")]
    NotKeyValue { option: String, item: String },
    #[error("{option}: unknown key `{key}`; known keys: {known}")]
    UnknownKey {
        option: String,
        key: String,
        known: String,
    },
    #[error("{option}: `{key}` is given twice")]
    Repeated { option: String, key: String },
    #[error("{option}: `{key}` is required")]
    Missing { option: String, key: String },
    #[error("{option}: {key}={value}: {expected}")]
    BadValue {
        option: String,
        key: String,
        value: String,
        expected: String,
    },
}

/// Parsed options, checked against the keys an option accepts.
#[derive(Debug)]
pub struct Options {
    option: String,
    values: BTreeMap<String, Vec<String>>,
}

/// Splits at single commas; `,,` stands for a literal comma.
pub fn split_items(text: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            (',', Some(',')) => {
                chars.next();
                current.push(',');
            }
            (',', _) => items.push(std::mem::take(&mut current)),
            (c, _) => current.push(c),
        }
    }
    items.push(current);
    items.into_iter().filter(|s| !s.is_empty()).collect()
}

impl Options {
    /// Parses `text` given to `option` (e.g. "--disk"), accepting only `known` keys, each
    /// at most once.
    pub fn parse(option: &str, text: &str, known: &[&str]) -> Result<Options, OptionError> {
        Options::parse_items(option, split_items(text), known, &[])
    }

    /// Parses items already split at commas; the keys in `repeatable` may come any number of
    /// times (`hostfwd=` in `-netdev user`), and [`Options::all`] gives them in order.
    pub fn parse_items(
        option: &str,
        items: Vec<String>,
        known: &[&str],
        repeatable: &[&str],
    ) -> Result<Options, OptionError> {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for item in items {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| OptionError::NotKeyValue {
                    option: option.into(),
                    item: item.clone(),
                })?;
            if !known.contains(&key) {
                return Err(OptionError::UnknownKey {
                    option: option.into(),
                    key: key.into(),
                    known: known.join(", "),
                });
            }
            let entry = values.entry(key.to_string()).or_default();
            if !entry.is_empty() && !repeatable.contains(&key) {
                return Err(OptionError::Repeated {
                    option: option.into(),
                    key: key.into(),
                });
            }
            entry.push(value.to_string());
        }
        Ok(Options {
            option: option.into(),
            values,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(|v| v.first())
            .map(String::as_str)
    }

    /// Every value of a repeatable key, in the order given.
    pub fn all(&self, key: &str) -> &[String] {
        self.values.get(key).map_or(&[], Vec::as_slice)
    }

    pub fn required(&self, key: &str) -> Result<&str, OptionError> {
        self.get(key).ok_or_else(|| OptionError::Missing {
            option: self.option.clone(),
            key: key.into(),
        })
    }

    /// An on/off flag (`on`, `off`, `true`, `false`, `yes`, `no`); absent is `default`.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, OptionError> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true" | "yes") => Ok(true),
            Some("off" | "false" | "no") => Ok(false),
            Some(other) => Err(self.bad(key, other, "expected on or off")),
        }
    }

    /// One of `choices`.
    pub fn choice(&self, key: &str, choices: &[&str]) -> Result<Option<String>, OptionError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if choices.contains(&v) => Ok(Some(v.to_string())),
            Some(other) => Err(self.bad(
                key,
                other,
                &format!("expected one of {}", choices.join(", ")),
            )),
        }
    }

    pub fn bad(&self, key: &str, value: &str, expected: &str) -> OptionError {
        OptionError::BadValue {
            option: self.option.clone(),
            key: key.into(),
            value: value.into(),
            expected: expected.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_values_and_doubled_commas() {
        let o = Options::parse(
            "--disk",
            "path=/a,,b.img,readonly=on",
            &["path", "readonly"],
        )
        .unwrap();
        assert_eq!(o.get("path"), Some("/a,b.img"));
        assert_eq!(o.flag("readonly", false), Ok(true));
        assert_eq!(o.flag("other", false), Ok(false));
    }

    #[test]
    fn errors_name_the_option_and_the_key() {
        let e = Options::parse("--disk", "path=/a,bogus=1", &["path"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--disk: unknown key `bogus`; known keys: path"
        );
        let e = Options::parse("--disk", "/a.img", &["path"]).unwrap_err();
        assert!(e.to_string().contains("not key=value"), "{e}");
        let e = Options::parse("--disk", "path=a,path=b", &["path"]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let o = Options::parse("--disk", "readonly=maybe", &["path", "readonly"]).unwrap();
        assert!(o
            .flag("readonly", false)
            .unwrap_err()
            .to_string()
            .contains("on or off"));
        assert!(o
            .required("path")
            .unwrap_err()
            .to_string()
            .contains("`path` is required"));
    }
}
