//! Token prices and the spend ledger behind `--max-cost`.
//!
//! Before a request is sent its worst case (estimated prompt tokens + `max_tokens` of output) is
//! reserved against the budget; when the answer arrives the reservation is replaced by the real
//! `usage`. A request whose worst case does not fit is never sent, so the budget cannot be exceeded.

use std::sync::Mutex;

use serde::Serialize;

/// USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Price {
    pub input_per_m: f64,
    pub output_per_m: f64,
}

impl Price {
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_per_m + completion_tokens as f64 * self.output_per_m)
            / 1e6
    }
}

/// Standard-tier list prices (USD / 1M tokens, input / output) of common models, as published by
/// OpenAI; the README lists them with the date they were taken. Matched by longest prefix, so dated
/// snapshots (`gpt-4o-mini-2024-07-18`) get their family's price. Override with `--price-input` /
/// `--price-output`.
pub const DEFAULT_PRICES: &[(&str, f64, f64)] = &[
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("gpt-4", 30.00, 60.00),
    ("gpt-4-turbo", 10.00, 30.00),
    ("gpt-4o", 2.50, 10.00),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4.1", 2.00, 8.00),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-5", 1.25, 10.00),
    ("gpt-5-mini", 0.25, 2.00),
    ("gpt-5-nano", 0.05, 0.40),
    ("o3", 2.00, 8.00),
    ("o4-mini", 1.10, 4.40),
];

/// The default price of `model`, if it is a known one.
pub fn default_price(model: &str) -> Option<Price> {
    let name = model.rsplit('/').next().unwrap_or(model);
    DEFAULT_PRICES
        .iter()
        .filter(|(prefix, _, _)| name.starts_with(prefix))
        .max_by_key(|(prefix, _, _)| prefix.len())
        .map(|&(_, input_per_m, output_per_m)| Price {
            input_per_m,
            output_per_m,
        })
}

/// Tokens and dollars spent by a run, with the budget check.
pub struct Ledger {
    price: Option<Price>,
    max_cost: Option<f64>,
    state: Mutex<LedgerState>,
}

#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct LedgerState {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// USD spent, when the price is known.
    pub spent: f64,
    /// USD reserved by requests in flight.
    pub reserved: f64,
    /// Requests holding a reservation.
    pub in_flight: u64,
}

/// Budget set aside for one request in flight.
#[derive(Debug)]
pub struct Reservation {
    amount: f64,
}

impl Ledger {
    pub fn new(price: Option<Price>, max_cost: Option<f64>) -> Self {
        Ledger {
            price,
            max_cost,
            state: Mutex::new(LedgerState::default()),
        }
    }

    pub fn price(&self) -> Option<Price> {
        self.price
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets aside the worst-case cost of a request, or `None` when it would break the budget.
    ///
    /// With a budget, the check fails closed: a cost or a limit that is NaN or negative (prices
    /// the CLI refuses, but a library caller could pass) stops the run instead of letting every
    /// request through, as a plain `>` comparison with NaN would.
    pub fn reserve(&self, prompt_tokens: u64, max_completion_tokens: u64) -> Option<Reservation> {
        let amount = self
            .price
            .map_or(0.0, |p| p.cost(prompt_tokens, max_completion_tokens));
        let mut s = self.lock();
        if let Some(max) = self.max_cost {
            let within = amount >= 0.0 && s.spent + s.reserved + amount <= max;
            if !within {
                return None;
            }
        }
        s.reserved += amount;
        s.in_flight += 1;
        Some(Reservation { amount })
    }

    /// Replaces a reservation with what the request really used.
    pub fn settle(&self, reservation: Reservation, prompt_tokens: u64, completion_tokens: u64) {
        let mut s = self.lock();
        s.reserved = (s.reserved - reservation.amount).max(0.0);
        s.in_flight -= 1;
        s.prompt_tokens += prompt_tokens;
        s.completion_tokens += completion_tokens;
        if let Some(p) = self.price {
            s.spent += p.cost(prompt_tokens, completion_tokens);
        }
    }

    /// Frees a reservation whose request produced no usage (it failed before an answer).
    pub fn release(&self, reservation: Reservation) {
        self.settle(reservation, 0, 0);
    }

    pub fn snapshot(&self) -> LedgerState {
        *self.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dated_snapshots_get_their_family_price() {
        // Expected values are the table rows above: the longest matching prefix wins.
        assert_eq!(
            default_price("gpt-4o-mini-2024-07-18").unwrap().input_per_m,
            0.15
        );
        assert_eq!(
            default_price("gpt-4o-2024-08-06").unwrap().input_per_m,
            2.50
        );
        assert_eq!(
            default_price("openai/gpt-4.1-nano").unwrap().output_per_m,
            0.40
        );
        assert_eq!(default_price("llama3.1:8b"), None);
    }

    #[test]
    fn the_budget_is_never_exceeded_even_with_requests_in_flight() {
        // $1/M in and out: a request of 100k prompt + 100k output tokens costs $0.20 at worst.
        let price = Price {
            input_per_m: 1.0,
            output_per_m: 1.0,
        };
        let ledger = Ledger::new(Some(price), Some(0.5));
        let a = ledger.reserve(100_000, 100_000).unwrap();
        let b = ledger.reserve(100_000, 100_000).unwrap();
        assert!(ledger.reserve(100_000, 100_000).is_none(), "0.6 > 0.5");
        ledger.settle(a, 100_000, 10_000); // really cost 0.11
        assert!(
            ledger.reserve(100_000, 100_000).is_none(),
            "0.11 + 0.2 in flight + 0.2 > 0.5"
        );
        ledger.release(b);
        let c = ledger.reserve(100_000, 100_000).unwrap(); // 0.11 + 0.2 ≤ 0.5
        ledger.release(c);
        let s = ledger.snapshot();
        assert!((s.spent - 0.11).abs() < 1e-12 && s.reserved.abs() < 1e-12);
        assert_eq!((s.prompt_tokens, s.completion_tokens), (100_000, 10_000));
    }

    /// Issue 23: `--price-input nan`, negative prices and `--max-cost nan` let every request
    /// through a `>` check. The ledger itself refuses them once a budget is set.
    #[test]
    fn nan_or_negative_numbers_never_pass_the_budget() {
        let price = |input_per_m| Price {
            input_per_m,
            output_per_m: 1.0,
        };
        for (p, max) in [
            (price(f64::NAN), 100.0),
            (price(-1.0), 100.0),
            (price(1.0), f64::NAN),
            (price(f64::INFINITY), 100.0),
        ] {
            let ledger = Ledger::new(Some(p), Some(max));
            // 1000 prompt tokens and 10 of output: negative with the negative input price.
            assert!(ledger.reserve(1000, 10).is_none(), "{p:?} with max {max}");
        }
        // Without a budget there is nothing to protect: requests go through.
        assert!(Ledger::new(Some(price(f64::NAN)), None)
            .reserve(1000, 1000)
            .is_some());
    }
}
