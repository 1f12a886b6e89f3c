//! Value parsers for numeric flags: each flag states its range once, in its `#[arg]`, and clap
//! refuses anything outside it (NaN, infinities, negatives, zero where zero means nothing, sizes
//! no run could hold) before any work starts, as a usage error that names the flag, the value
//! found and the range expected, e.g.
//! `invalid value 'nan' for '--temperature <TEMPERATURE>': must be a finite number in [0, 10]`.

use std::fmt::Display;
use std::str::FromStr;

// The ranges live in the library, which checks settings read from recipes against the same ones.
pub use crate::range::{
    above, below, closed, Ints, Range, MAX_SECONDS, NON_NEGATIVE, PRICE, REPETITION_PENALTY,
    SECONDS, TEMPERATURE, TOP_P, UNIT,
};

/// A finite `f64` in `range`.
pub fn f64_in(
    range: Range,
) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let x: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("must be a finite number {range}"))?;
        range.check(x)
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

/// An integer in `range` (a range the library also checks, e.g. `teacher::factory::RETRIES`).
pub fn ints<T>(range: Ints<T>) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + PartialOrd + Display + Copy + Send + Sync + 'static,
{
    int_in(range.min, range.max)
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
