//! Flags for the examples, on `pico-args`: `--flag value` or `--flag=value`, numbers
//! checked against a range.

use std::{fmt::Display, str::FromStr};

/// The value of `flag`, or `default` when it is absent; an error names the flag and the
/// range when the value does not parse or falls outside `lo..=hi`.
pub fn in_range<T>(
    args: &mut pico_args::Arguments,
    flag: &'static str,
    default: T,
    lo: T,
    hi: T,
) -> Result<T, String>
where
    T: FromStr + PartialOrd + Display + Copy,
{
    let value: Option<String> = args
        .opt_value_from_str(flag)
        .map_err(|e| format!("{flag}: {e}"))?;
    let Some(value) = value else {
        return Ok(default);
    };
    match value.parse::<T>() {
        Ok(n) if lo <= n && n <= hi => Ok(n),
        _ => Err(format!(
            "{flag}: expected a number from {lo} to {hi}, got {value:?}"
        )),
    }
}

/// Fails on anything left over once every known flag was taken.
pub fn no_more(args: pico_args::Arguments) -> Result<(), String> {
    match args.finish().first() {
        Some(arg) => Err(format!("unknown argument {arg:?} (try --help)")),
        None => Ok(()),
    }
}
