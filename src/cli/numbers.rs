//! Value parsers for numeric flags: each flag states its range once, in its `#[arg]`, and clap
//! refuses anything outside it (NaN, infinities, negatives, zero where zero means nothing, sizes
//! no run could hold) before any work starts, as a usage error that names the flag, the value
//! found and the range expected, e.g.
//! `invalid value 'nan' for '--temperature <TEMPERATURE>': must be a finite number in [0, 10]`.

use std::fmt::{self, Display};
use std::str::FromStr;

/// Longest wall-clock limit a timeout flag takes: one day. Beyond it a "timeout" is a typo, and
/// `Duration::from_secs_f64` panics on values it cannot hold.
pub const MAX_SECONDS: f64 = 86_400.0;

/// The interval a float flag must lie in; `Display` writes it as the error shows it.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    min: f64,
    min_open: bool,
    max: f64,
    max_open: bool,
}

/// `[min, max]`; an infinite `max` means no upper bound (the value must still be finite).
pub const fn closed(min: f64, max: f64) -> Range {
    Range {
        min,
        min_open: false,
        max,
        max_open: false,
    }
}

/// `(min, max]`: strictly above `min`, e.g. a top-p or a timeout.
pub const fn above(min: f64, max: f64) -> Range {
    Range {
        min,
        min_open: true,
        max,
        max_open: false,
    }
}

/// `[min, max)`: strictly below `max`, e.g. a share that must leave something over.
pub const fn below(min: f64, max: f64) -> Range {
    Range {
        min,
        min_open: false,
        max,
        max_open: true,
    }
}

/// Finite and at least 0: prices, budgets.
pub const NON_NEGATIVE: Range = closed(0.0, f64::INFINITY);
/// USD per 1M tokens: finite, at least 0, and at most $1M (today's dearest models cost under $600),
/// so that any token count times the price stays a finite cost.
pub const PRICE: Range = closed(0.0, 1_000_000.0);
/// A probability or a share: `[0, 1]`.
pub const UNIT: Range = closed(0.0, 1.0);
/// A sampling temperature: 0 (greedy) to 10 (far beyond any useful randomness).
pub const TEMPERATURE: Range = closed(0.0, 10.0);
/// A nucleus top-p: above 0 (nothing would be left to sample), at most 1 (off).
pub const TOP_P: Range = above(0.0, 1.0);
/// A timeout in seconds: above 0, at most a day.
pub const SECONDS: Range = above(0.0, MAX_SECONDS);

impl Range {
    fn contains(self, x: f64) -> bool {
        let low = if self.min_open {
            x > self.min
        } else {
            x >= self.min
        };
        let high = if self.max_open {
            x < self.max
        } else {
            x <= self.max
        };
        low && high
    }
}

impl Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let low = if self.min_open { ">" } else { ">=" };
        if self.max.is_infinite() {
            return write!(f, "{low} {}", self.min);
        }
        let (open, close) = (
            if self.min_open { '(' } else { '[' },
            if self.max_open { ')' } else { ']' },
        );
        write!(f, "in {open}{}, {}{close}", self.min, self.max)
    }
}

/// A finite `f64` in `range`.
pub fn f64_in(
    range: Range,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let x: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("must be a finite number {range}"))?;
        if x.is_finite() && range.contains(x) {
            Ok(x)
        } else {
            Err(format!("must be a finite number {range}"))
        }
    }
}

/// A finite `f32` in `range` (checked as `f64`, so a value beyond `f32` is refused, not rounded
/// to infinity; every range used with it lies well inside `f32`).
pub fn f32_in(
    range: Range,
) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
    let parse = f64_in(range);
    move |s: &str| parse(s).map(|x| x as f32)
}

/// An integer in `[min, max]`.
pub fn int_in<T>(
    min: T,
    max: T,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(x) if x >= min && x <= max => Ok(x),
        _ => Err(format!("must be an integer in [{min}, {max}]")),
    }
}

/// An integer of at least `min`, with no upper bound but its type's.
pub fn int_at_least<T>(min: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    move |s: &str| match s.trim().parse::<T>() {
        Ok(x) if x >= min => Ok(x),
        _ => Err(format!("must be an integer >= {min}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attack values of issue 23 (NaN, infinities, negatives, huge numbers) are refused with
    /// the range in the message; values on the bounds are accepted exactly as written.
    #[test]
    fn floats_are_finite_and_in_range() {
        let price = f64_in(NON_NEGATIVE);
        for bad in [
            "nan", "NaN", "inf", "-inf", "infinity", "-0.01", "1e999", "", "abc",
        ] {
            assert_eq!(
                price(bad).unwrap_err(),
                "must be a finite number >= 0",
                "{bad}"
            );
        }
        assert_eq!(price("0"), Ok(0.0));
        assert_eq!(price("1e300"), Ok(1e300));

        let top_p = f32_in(TOP_P);
        assert_eq!(top_p("0").unwrap_err(), "must be a finite number in (0, 1]");
        assert_eq!(top_p("1"), Ok(1.0));
        assert!(top_p("1.0001").is_err());

        let timeout = f64_in(SECONDS);
        for bad in ["0", "-1", "1e20", "inf", "86400.5"] {
            assert_eq!(
                timeout(bad).unwrap_err(),
                "must be a finite number in (0, 86400]",
                "{bad}"
            );
        }
        assert_eq!(timeout("86400"), Ok(86_400.0));

        let share = f64_in(below(0.0, 1.0));
        assert_eq!(share("1").unwrap_err(), "must be a finite number in [0, 1)");
        assert_eq!(share("0"), Ok(0.0));

        let temperature = f32_in(TEMPERATURE);
        assert!(temperature("nan").is_err() && temperature("10.5").is_err());
        assert_eq!(temperature(" 0.7 "), Ok(0.7));
    }

    /// A default outside its own flag's range would only fail when the flag is left out: every
    /// subcommand parses with nothing but its required arguments.
    #[test]
    fn every_default_is_in_its_range() {
        use clap::Parser;
        for args in [
            &["stories"][..],
            &["textbooks", "--topics", "t"],
            &["exercises"],
            &["serve", "--checkpoint", "c"],
            &["sample", "--checkpoint", "c", "--prompt", "p"],
            &["tokenize", "--input", "i", "--out", "o"],
            &["shards", "inspect", "d"],
            &["shards", "decode", "d"],
            &["train", "--recipe", "r"],
            &["dedup", "--input", "i", "--out", "o"],
            &[
                "decontaminate",
                "--input",
                "i",
                "--out",
                "o",
                "--bench",
                "b",
            ],
            &["annotate", "--input", "i"],
            &["classify", "train", "--labels", "l", "--input", "i"],
            &["classify", "embed", "--input", "i", "--out", "o"],
            &["filter", "--input", "i"],
            &[
                "eval",
                "humaneval",
                "--problems",
                "p",
                "--samples",
                "s",
                "--out",
                "o",
            ],
            &["eval", "loss", "--checkpoint", "c", "--shards", "s"],
            &["eval", "stories", "--checkpoint", "c", "--out", "o"],
        ] {
            let argv = std::iter::once("phigen").chain(args.iter().copied());
            if let Err(e) = crate::cli::Cli::try_parse_from(argv) {
                panic!("{args:?}: {e}");
            }
        }
    }

    #[test]
    fn integers_are_in_range() {
        let retries = int_in(0u32, 100);
        assert_eq!(retries("100"), Ok(100));
        for bad in ["101", "4294967295", "4294967296", "-1", "1.5", "x"] {
            assert_eq!(
                retries(bad).unwrap_err(),
                "must be an integer in [0, 100]",
                "{bad}"
            );
        }
        let len = int_in(1usize, 1 << 30);
        assert!(len("0").is_err() && len("18446744073709551615").is_err());
        assert_eq!(len("1"), Ok(1));
        let steps = int_at_least(1usize);
        assert_eq!(steps("0").unwrap_err(), "must be an integer >= 1");
        assert!(steps("18446744073709551616").is_err());
        assert_eq!(steps("18446744073709551615"), Ok(usize::MAX));
    }
}
