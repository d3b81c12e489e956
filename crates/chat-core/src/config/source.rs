//! Where settings come from: the process environment, command-line flags
//! with the same names, or a `HashMap` in tests; and the reader that
//! parses and validates each value, naming the variable when it is wrong.

use std::collections::HashMap;
use std::time::Duration;

pub use crate::error::ConfigError;
use crate::secrets::{ApiKeySource, Secret};

/// Where configuration values come from.
pub trait ConfigSource {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSource;

impl ConfigSource for EnvSource {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl ConfigSource for HashMap<String, String> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).cloned()
    }
}

impl ConfigSource for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| (*v).to_owned())
    }
}

/// Looks in `first`, then in `second`: e.g. command-line flags over the
/// environment.
pub struct Layered<A, B>(pub A, pub B);

impl<A: ConfigSource, B: ConfigSource> ConfigSource for Layered<A, B> {
    fn get(&self, key: &str) -> Option<String> {
        self.0.get(key).or_else(|| self.1.get(key))
    }
}

/// Turns `--bind-addr 1.2.3.4:5` / `--bind-addr=..` flags into config keys
/// (`BIND_ADDR`), so flags and env vars share one set of names and one parser.
pub fn flags_to_source(
    args: impl IntoIterator<Item = String>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut out = HashMap::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(ConfigError::new(
                "arguments",
                format!("unexpected argument {arg:?}; flags look like --bind-addr=127.0.0.1:3000"),
            ));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| ConfigError::new(flag, "flag needs a value"))?;
                (flag.to_owned(), v)
            }
        };
        out.insert(name.replace('-', "_").to_ascii_uppercase(), value);
    }
    Ok(out)
}

pub(crate) struct Reader<'a, S: ConfigSource + ?Sized>(pub(crate) &'a S);

impl<S: ConfigSource + ?Sized> Reader<'_, S> {
    pub(crate) fn string(&self, key: &str) -> Option<String> {
        self.0
            .get(key)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    pub(crate) fn parse<T: std::str::FromStr>(
        &self,
        key: &str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.string(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ConfigError::new(key, format!("{v:?} is not {what}"))),
        }
    }

    pub(crate) fn ms(&self, key: &str, default_ms: u64) -> Result<Duration, ConfigError> {
        let v: u64 = self.parse(key, default_ms, "a whole number of milliseconds")?;
        if v == 0 {
            return Err(ConfigError::new(key, "must be greater than 0"));
        }
        Ok(Duration::from_millis(v))
    }

    pub(crate) fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.string(key).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "1" | "true" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "0" | "false" | "no" | "off") => Ok(false),
            Some(v) => Err(ConfigError::new(key, format!("{v:?} is not true or false"))),
        }
    }

    pub(crate) fn ranged<T>(&self, key: &str, default: T, min: T, max: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
    {
        let v = self.parse(key, default, "a whole number")?;
        if v < min || v > max {
            return Err(ConfigError::new(
                key,
                format!("{v} is outside {min}..={max}"),
            ));
        }
        Ok(v)
    }
}

/// `NAME` (a value) or `NAME_SECRET_ARN` (Secrets Manager), if either is set.
pub(crate) fn key_source<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    name: &str,
) -> Result<Option<ApiKeySource>, ConfigError> {
    let arn_var = format!("{name}_SECRET_ARN");
    match (r.string(name), r.string(&arn_var)) {
        (Some(k), _) => Ok(Some(ApiKeySource::Value(Secret::new(k)))),
        (None, Some(arn)) if arn.starts_with("arn:") => {
            Ok(Some(ApiKeySource::SecretsManager { arn, var: arn_var }))
        }
        (None, Some(arn)) => Err(ConfigError::new(arn_var, format!("{arn:?} is not an ARN"))),
        (None, None) => Ok(None),
    }
}

pub(crate) fn url<S: ConfigSource + ?Sized>(
    r: &Reader<'_, S>,
    var: &str,
    default: &str,
) -> Result<String, ConfigError> {
    let v = r.string(var).unwrap_or_else(|| default.to_owned());
    let v = v.trim_end_matches('/').to_owned();
    if !(v.starts_with("https://") || v.starts_with("http://")) {
        return Err(ConfigError::new(
            var,
            format!("{v:?} must start with http:// or https://"),
        ));
    }
    Ok(v)
}

pub(crate) fn valid_table_name(table: &str) -> bool {
    (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
