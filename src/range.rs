//! The allowed ranges of numeric settings, stated once: the CLI's value parsers
//! (`cli/numbers.rs`) refuse a flag outside its range, and the library's config checks (e.g.
//! `teacher::factory::TeacherConfig::validate`, for settings read from a recipe) use the same
//! ranges and say them the same way.

use std::fmt::{self, Display};

/// Longest wall-clock limit a timeout setting takes: one day. Beyond it a "timeout" is a typo, and
/// `Duration::from_secs_f64` panics on values it cannot hold.
pub const MAX_SECONDS: f64 = 86_400.0;

/// The interval a float setting must lie in; `Display` writes it as the errors show it.
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
/// A repetition penalty: above 0 (1 = off; above 1 discourages repeats), at most 10.
pub const REPETITION_PENALTY: Range = above(0.0, 10.0);
/// A nucleus top-p: above 0 (nothing would be left to sample), at most 1 (off).
pub const TOP_P: Range = above(0.0, 1.0);
/// A timeout in seconds: above 0, at most a day.
pub const SECONDS: Range = above(0.0, MAX_SECONDS);

impl Range {
    /// Whether `x` lies in the range (NaN never does; an infinity only below an infinite bound,
    /// which is why callers also check `is_finite`).
    pub fn contains(self, x: f64) -> bool {
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

    /// `Ok` for a finite `x` in the range, else the message the CLI shows for a bad flag value,
    /// e.g. `must be a finite number in [0, 10]`.
    pub fn check(self, x: f64) -> Result<f64, String> {
        if x.is_finite() && self.contains(x) {
            Ok(x)
        } else {
            Err(format!("must be a finite number {self}"))
        }
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

/// The closed interval `[min, max]` an integer setting must lie in.
#[derive(Debug, Clone, Copy)]
pub struct Ints<T> {
    pub min: T,
    pub max: T,
}

impl<T: PartialOrd + Display + Copy> Ints<T> {
    /// `Ok` for `x` in `[min, max]`, else the message the CLI shows for a bad flag value.
    pub fn check(self, x: T) -> Result<T, String> {
        if x >= self.min && x <= self.max {
            Ok(x)
        } else {
            Err(format!(
                "must be an integer in [{}, {}]",
                self.min, self.max
            ))
        }
    }
}
