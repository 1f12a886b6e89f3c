//! Retry policy, `Retry-After` parsing and the pool-wide throttle.
//!
//! Retries are only for failures that can succeed later (429, 5xx, timeouts, dropped
//! connections, malformed bodies). When the server signals overload (429/503) the whole pool
//! pauses until its `Retry-After` and the number of requests in flight is halved; it then grows
//! back by one per `limit` successes (additive increase, multiplicative decrease).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rand::Rng;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Requests per prompt, the first one included.
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Upper bound on a server's `Retry-After`, so one bad header cannot stall a run for hours.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with "equal jitter": half the capped delay plus a random half, so
    /// workers that failed together do not retry together.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << failed_attempts.saturating_sub(1).min(20));
        let capped = exp.min(self.max_delay);
        let half = capped / 2;
        half + half.mul_f64(rand::rng().random::<f64>())
    }
}

/// Parses a `Retry-After` value: delta-seconds (`"7"`, `"1.5"`) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`, RFC 9110 §10.2.3). A date in the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What the HTTP backend did, shared with the progress bar and `stats.json`.
#[derive(Debug, Default)]
pub struct RequestCounters {
    pub sent: AtomicU64,
    pub retries: AtomicU64,
    pub throttled: AtomicU64,
    pub server_errors: AtomicU64,
    pub timeouts: AtomicU64,
    pub connection_errors: AtomicU64,
    pub malformed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct RequestCountsSnapshot {
    pub sent: u64,
    pub retries: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub timeouts: u64,
    pub connection_errors: u64,
    pub malformed: u64,
}

impl RequestCounters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RequestCountsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RequestCountsSnapshot {
            sent: get(&self.sent),
            retries: get(&self.retries),
            throttled: get(&self.throttled),
            server_errors: get(&self.server_errors),
            timeouts: get(&self.timeouts),
            connection_errors: get(&self.connection_errors),
            malformed: get(&self.malformed),
        }
    }
}

/// Limits requests in flight across all workers and pauses them all when the server is overloaded.
pub struct Throttle {
    max: usize,
    state: Mutex<ThrottleState>,
    wake: Notify,
}

struct ThrottleState {
    limit: usize,
    in_flight: usize,
    successes_since_change: usize,
    paused_until: Option<Instant>,
}

/// A slot in the throttle; dropping it frees the slot.
pub struct ThrottlePermit<'a> {
    throttle: &'a Throttle,
}

impl Drop for ThrottlePermit<'_> {
    fn drop(&mut self) {
        self.throttle.lock().in_flight -= 1;
        self.throttle.wake.notify_one();
    }
}

impl Throttle {
    pub fn new(max_in_flight: usize) -> Self {
        let max = max_in_flight.max(1);
        Throttle {
            max,
            state: Mutex::new(ThrottleState {
                limit: max,
                in_flight: 0,
                successes_since_change: 0,
                paused_until: None,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        // A panic while holding this lock leaves plain counters behind; they stay usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of requests currently allowed in flight.
    pub fn limit(&self) -> usize {
        self.lock().limit
    }

    pub async fn acquire(&self) -> ThrottlePermit<'_> {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let pause = {
                let mut s = self.lock();
                match s.paused_until {
                    Some(until) if until > Instant::now() => Some(until),
                    _ => {
                        s.paused_until = None;
                        if s.in_flight < s.limit {
                            s.in_flight += 1;
                            return ThrottlePermit { throttle: self };
                        }
                        None
                    }
                }
            };
            match pause {
                Some(until) => tokio::time::sleep_until(until).await,
                None => notified.await,
            }
        }
    }

    pub fn on_success(&self) {
        let mut s = self.lock();
        s.successes_since_change += 1;
        if s.limit < self.max && s.successes_since_change >= s.limit {
            s.limit += 1;
            s.successes_since_change = 0;
            drop(s);
            self.wake.notify_one();
        }
    }

    /// The server said it is overloaded: pause everyone for `pause` and halve the concurrency.
    pub fn on_overload(&self, pause: Duration) {
        let mut s = self.lock();
        let until = Instant::now() + pause;
        s.paused_until = Some(s.paused_until.map_or(until, |p| p.max(until)));
        s.limit = (s.limit / 2).max(1);
        s.successes_since_change = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_http_date() {
        // Both forms are defined in RFC 9110 §10.2.3; the date is the RFC's own example.
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:27:50 GMT").unwrap();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(" 1.5 ", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for (attempt, full) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (30, 1000),
        ] {
            let d = p.backoff(attempt).as_millis() as u64;
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d} ms not in [{}, {full}]",
                full / 2
            );
        }
    }

    #[tokio::test]
    async fn overload_halves_the_limit_and_successes_grow_it_back() {
        let t = Throttle::new(8);
        t.on_overload(Duration::ZERO);
        assert_eq!(t.limit(), 4);
        t.on_overload(Duration::ZERO);
        t.on_overload(Duration::ZERO);
        t.on_overload(Duration::ZERO);
        assert_eq!(t.limit(), 1, "never below one request in flight");
        for _ in 0..1 + 2 + 3 {
            t.on_success();
        }
        assert_eq!(
            t.limit(),
            4,
            "additive increase: one more after `limit` successes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_back_every_new_request() {
        let t = Throttle::new(4);
        t.on_overload(Duration::from_secs(5));
        let start = Instant::now();
        let _permit = t.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn in_flight_never_exceeds_the_limit() {
        let t = std::sync::Arc::new(Throttle::new(3));
        let p1 = t.acquire().await;
        let _p2 = t.acquire().await;
        let _p3 = t.acquire().await;
        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            let _p = t2.acquire().await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "a fourth request must wait for a free slot"
        );
        drop(p1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
