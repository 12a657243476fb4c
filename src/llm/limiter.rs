//! Per-endpoint flow control: token buckets for requests and tokens per minute, adaptive
//! concurrency (additive increase, multiplicative decrease on 429, 5xx, timeouts and latency
//! growth), and backoff windows from `Retry-After` and `x-ratelimit-*` headers.
//! Pure bookkeeping over `Instant`s: it never sleeps and never does I/O.

use super::client::RateInfo;
use std::time::{Duration, Instant};

/// A token bucket refilled continuously at `rate` per second up to `capacity`.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl Bucket {
    /// `per_minute` = 0 means unlimited. The capacity allows `burst_s` seconds of traffic at
    /// once, so a fresh run does not stampede a server whose own limiter is finer-grained.
    pub fn per_minute(per_minute: u64, burst_s: f64, now: Instant) -> Option<Bucket> {
        (per_minute > 0).then(|| {
            let rate = per_minute as f64 / 60.0;
            let capacity = (rate * burst_s).max(1.0);
            Bucket {
                capacity,
                tokens: capacity,
                rate,
                last: now,
            }
        })
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Time until `n` tokens are available (zero if now). Requests larger than the capacity
    /// wait for a full bucket.
    pub fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        let n = n.min(self.capacity);
        if self.tokens >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.tokens) / self.rate)
        }
    }

    pub fn take(&mut self, n: f64, now: Instant) {
        self.refill(now);
        self.tokens -= n.min(self.capacity);
    }

    /// Gives back the difference when the real cost turned out lower than reserved (or takes
    /// more when higher).
    pub fn adjust(&mut self, delta: f64) {
        self.tokens = (self.tokens + delta).min(self.capacity);
    }

    /// The server says only `remaining` are left: believe it.
    pub fn clamp(&mut self, remaining: f64, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(remaining);
    }
}

/// Flow state of one endpoint.
#[derive(Debug)]
pub struct Flow {
    pub requests: Option<Bucket>,
    pub tokens: Option<Bucket>,
    /// Adaptive concurrency limit (fractional; calls in flight may not exceed its floor).
    pub limit: f64,
    pub max_limit: f64,
    pub inflight: usize,
    pub blocked_until: Option<Instant>,
    last_decrease: Option<Instant>,
    latency_ewma: Option<f64>,
    latency_floor: Option<f64>,
    pub disabled: Option<String>,
    adaptive: bool,
}

impl Flow {
    /// Fixed concurrency, no buckets, no header handling: the naive baseline.
    pub fn fixed(concurrency: usize, now: Instant) -> Flow {
        let mut f = Flow::new(0, 0, concurrency, now);
        f.limit = concurrency.max(1) as f64;
        f.adaptive = false;
        f
    }

    pub fn new(rpm: u64, tpm: u64, max_concurrency: usize, now: Instant) -> Flow {
        Flow {
            requests: Bucket::per_minute(rpm, 2.0, now),
            tokens: Bucket::per_minute(tpm, 2.0, now),
            limit: (max_concurrency as f64).min(4.0),
            max_limit: max_concurrency.max(1) as f64,
            inflight: 0,
            blocked_until: None,
            last_decrease: None,
            latency_ewma: None,
            latency_floor: None,
            disabled: None,
            adaptive: true,
        }
    }

    /// How long until a call estimated at `tokens` could start here (`None`: not while
    /// calls are in flight; wait for one to finish).
    pub fn ready_in(&mut self, tokens: f64, now: Instant) -> Option<Duration> {
        if self.disabled.is_some() || self.inflight >= self.limit.floor().max(1.0) as usize {
            return None;
        }
        let mut wait = self
            .blocked_until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        if let Some(b) = &mut self.requests {
            wait = wait.max(b.wait_for(1.0, now));
        }
        if let Some(b) = &mut self.tokens {
            wait = wait.max(b.wait_for(tokens, now));
        }
        Some(wait)
    }

    pub fn start(&mut self, tokens: f64, now: Instant) {
        self.inflight += 1;
        if let Some(b) = &mut self.requests {
            b.take(1.0, now);
        }
        if let Some(b) = &mut self.tokens {
            b.take(tokens, now);
        }
    }

    /// A call ended with an answer.
    pub fn on_success(
        &mut self,
        latency: Duration,
        reserved: f64,
        used: f64,
        rate: &RateInfo,
        now: Instant,
    ) {
        self.inflight -= 1;
        if !self.adaptive {
            return;
        }
        if let Some(b) = &mut self.tokens {
            b.adjust(reserved - used);
        }
        self.apply_headers(rate, now);
        let l = latency.as_secs_f64();
        let ewma = self.latency_ewma.map_or(l, |e| 0.8 * e + 0.2 * l);
        self.latency_ewma = Some(ewma);
        let floor = self.latency_floor.map_or(ewma, |f: f64| f.min(ewma));
        self.latency_floor = Some(floor);
        // Latency well above what this endpoint does when unloaded means queueing at the
        // server: back off before it turns into errors.
        if ewma > 3.0 * floor && ewma > floor + 1.0 {
            self.decrease(now);
        } else {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max_limit);
        }
    }

    /// A call failed in a way that signals overload (429, 5xx, timeout).
    pub fn on_congestion(&mut self, rate: Option<&RateInfo>, now: Instant) {
        self.inflight -= 1;
        if !self.adaptive {
            return;
        }
        if let Some(r) = rate {
            self.apply_headers(r, now);
        }
        self.decrease(now);
    }

    /// A call failed for a reason that says nothing about load (a garbled reply).
    pub fn on_neutral_failure(&mut self) {
        self.inflight -= 1;
    }

    fn decrease(&mut self, now: Instant) {
        // At most one halving per round trip: a burst of errors from one window is one signal.
        let rtt = Duration::from_secs_f64(self.latency_ewma.unwrap_or(1.0).clamp(0.05, 10.0));
        if self
            .last_decrease
            .is_none_or(|t| now.saturating_duration_since(t) >= rtt)
        {
            self.limit = (self.limit / 2.0).max(1.0);
            self.last_decrease = Some(now);
        }
    }

    pub fn apply_headers(&mut self, r: &RateInfo, now: Instant) {
        if let Some(d) = r.retry_after {
            self.block_for(d, now);
        }
        if let (Some(0), Some(d)) = (r.remaining_requests, r.reset_requests) {
            self.block_for(d, now);
        }
        if let (Some(b), Some(rem)) = (&mut self.requests, r.remaining_requests) {
            b.clamp(rem as f64, now);
        }
        if let (Some(b), Some(rem)) = (&mut self.tokens, r.remaining_tokens) {
            b.clamp(rem as f64, now);
        }
    }

    pub fn block_for(&mut self, d: Duration, now: Instant) {
        let until = now + d;
        if self.blocked_until.is_none_or(|t| t < until) {
            self.blocked_until = Some(until);
        }
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base·2^attempt)].
pub fn backoff(attempt: u32, base_s: f64, cap_s: f64) -> Duration {
    let ceil = (base_s * 2f64.powi(attempt.min(30) as i32)).min(cap_s);
    Duration::from_secs_f64(fastrand::f64() * ceil)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_waits_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(60, 2.0, t0).unwrap(); // 1/s, capacity 2
        assert_eq!(b.wait_for(1.0, t0), Duration::ZERO);
        b.take(2.0, t0);
        let w = b.wait_for(1.0, t0);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6);
        assert_eq!(b.wait_for(1.0, t0 + Duration::from_secs(1)), Duration::ZERO);
    }

    #[test]
    fn aimd_halves_once_per_rtt_and_grows_slowly() {
        let t0 = Instant::now();
        let mut f = Flow::new(0, 0, 64, t0);
        assert_eq!(f.limit, 4.0);
        for _ in 0..3 {
            f.start(0.0, t0);
        }
        f.on_congestion(None, t0);
        f.on_congestion(None, t0);
        assert_eq!(f.limit, 2.0, "two errors in one round trip halve once");
        f.on_congestion(None, t0 + Duration::from_secs(2));
        assert_eq!(f.limit, 1.0);
        for _ in 0..10 {
            f.start(0.0, t0);
            f.on_success(
                Duration::from_millis(100),
                0.0,
                0.0,
                &RateInfo::default(),
                t0,
            );
        }
        assert!(f.limit > 3.0 && f.limit < 6.0, "{}", f.limit);
    }

    #[test]
    fn retry_after_blocks_the_endpoint() {
        let t0 = Instant::now();
        let mut f = Flow::new(0, 0, 8, t0);
        f.start(0.0, t0);
        let r = RateInfo {
            retry_after: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        f.on_congestion(Some(&r), t0);
        let w = f.ready_in(0.0, t0).unwrap();
        assert!(w >= Duration::from_secs(3) - Duration::from_millis(1));
    }
}
