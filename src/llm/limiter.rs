//! Per-endpoint flow control, learned rather than configured.
//!
//! * **Pacing** ([`Pace`]): requests and tokens per second. A configured `rpm`/`tpm` is only a
//!   cap the user sets (a shared quota); the rate the endpoint really allows is learned from what
//!   it says: `x-ratelimit-limit-*` headers when it sends them (OpenAI), else the timing of its
//!   429s — between two 429s the server was saturated at both ends, so what it admitted in
//!   between, divided by the time, *is* its rate. Pacing holds just under that and probes
//!   upward slowly, so a limit raised mid-run is found again.
//! * **Concurrency** (`Flow::limit`): additive increase; decreased only by signs of queueing at
//!   the server (recent median latency far above the long-run level) or a 429 that carries no
//!   timing. A hang, a timeout or a 5xx says nothing about load and never shrinks it.
//! * **Latency** ([`Latency`]): recent successful latencies give the per-call deadline and the
//!   moment a slow call is hedged, instead of a fixed timeout.
//! * **Circuit breaker** ([`Breaker`]): consecutive failures open it (calls go elsewhere or
//!   wait), a cool-down later one probe call may go (half-open), success closes it.
//!
//! Pure bookkeeping over `Instant`s: it never sleeps and never does I/O.

use super::client::RateInfo;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A token bucket refilled continuously at `rate` per second up to `capacity`.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    tokens: f64,
    rate: f64,
    last: Instant,
}

/// Seconds of traffic a pacing bucket lets through at once.
const BURST_S: f64 = 2.0;

impl Bucket {
    /// A bucket for `rate` per second that allows `burst_s` seconds of traffic at once.
    pub fn new(rate: f64, burst_s: f64, now: Instant) -> Bucket {
        let capacity = (rate * burst_s).max(1.0);
        Bucket {
            capacity,
            tokens: capacity,
            rate,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Changes the rate, keeping what is in the bucket (up to the new capacity).
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1e-6);
        self.capacity = (rate * BURST_S).max(1.0);
        self.tokens = self.tokens.min(self.capacity);
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

    /// The server says this much is left, which may be more than this bucket holds (its
    /// burst allowance is larger): believe it both ways, and let the bucket hold that much.
    pub fn set_level(&mut self, level: f64, now: Instant) {
        self.refill(now);
        self.capacity = self.capacity.max(level);
        self.tokens = level.min(self.capacity);
    }
}

/// Where the admitted counters stood right after a send: what was sent after it is what a
/// `remaining` header in its reply does not know about yet.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ticket {
    requests: f64,
    tokens: f64,
}

/// Pacing of one dimension (requests or tokens): the configured cap, the learned limit and
/// the bucket that holds traffic under the lower of the two.
#[derive(Debug, Clone)]
pub struct Pace {
    /// Configured cap, per second.
    cap: Option<f64>,
    /// Learned limit of the endpoint, per second.
    learned: Option<f64>,
    /// The learned limit came from an `x-ratelimit-limit-*` header (exact: no probing).
    from_header: bool,
    bucket: Option<Bucket>,
    /// Units sent and not refused with a 429 (the server admitted them).
    admitted: f64,
    /// (time, `admitted`) at the last 429: the start of the next measuring window.
    anchor: Option<(Instant, f64)>,
    last_probe: Option<Instant>,
}

/// Share of a learned limit that pacing uses (just under: the estimate is noisy and other
/// clients may share the quota).
const HOLD: f64 = 0.97;
/// Shortest window between two 429s that yields a rate estimate.
const MIN_WINDOW_S: f64 = 2.0;
/// Longest: over a longer quiet stretch the server may have refilled (we were not saturating).
const MAX_WINDOW_S: f64 = 60.0;

impl Pace {
    fn new(per_minute: u64) -> Pace {
        Pace {
            cap: (per_minute > 0).then(|| per_minute as f64 / 60.0),
            learned: None,
            from_header: false,
            bucket: None,
            admitted: 0.0,
            anchor: None,
            last_probe: None,
        }
    }

    /// The pacing rate per second (`None`: unpaced).
    pub fn rate(&self) -> Option<f64> {
        match (self.cap, self.learned) {
            (Some(c), Some(l)) => Some(c.min(l)),
            (c, l) => c.or(l),
        }
    }

    /// The learned limit per minute, for reports.
    pub fn learned_per_minute(&self) -> Option<f64> {
        self.learned
            .map(|l| l * 60.0 / if self.from_header { 0.99 } else { HOLD })
    }

    fn sync(&mut self, now: Instant) {
        match (self.rate(), &mut self.bucket) {
            (Some(r), Some(b)) => b.set_rate(r, now),
            (Some(r), None) => self.bucket = Some(Bucket::new(r, BURST_S, now)),
            (None, _) => self.bucket = None,
        }
    }

    fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.bucket
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait_for(n, now))
    }

    fn take(&mut self, n: f64, now: Instant) {
        self.admitted += n;
        if let Some(b) = &mut self.bucket {
            b.take(n, now);
        }
    }

    /// The endpoint states its limit per minute.
    pub fn on_limit_header(&mut self, per_minute: u64, now: Instant) {
        if per_minute == 0 {
            return;
        }
        let r = per_minute as f64 / 60.0 * 0.99;
        if !self.from_header || self.learned.is_none_or(|l| (l - r).abs() > 1e-9) {
            self.learned = Some(r);
            self.from_header = true;
            self.sync(now);
        }
    }

    /// A send of `n` units was refused (429). `binding`: whether this dimension ran out
    /// (`None`: the server did not say which).
    fn on_refused(&mut self, n: f64, binding: Option<bool>, now: Instant) {
        self.admitted -= n;
        if binding == Some(false) || self.from_header {
            return;
        }
        let a = self.admitted;
        match self.anchor {
            Some((t, a0)) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                if dt > MAX_WINDOW_S {
                    self.anchor = Some((now, a));
                } else if dt >= MIN_WINDOW_S {
                    // Saturated at both ends: what got through in between is the rate.
                    let sample = ((a - a0) / dt).max(0.0);
                    if sample > 0.0 {
                        let est = HOLD * sample;
                        self.learned = Some(match self.learned {
                            Some(l) => 0.5 * l + 0.5 * est,
                            None => est,
                        });
                        self.sync(now);
                    }
                    self.anchor = Some((now, a));
                }
            }
            None => self.anchor = Some((now, a)),
        }
        self.last_probe = Some(now);
    }

    /// No 429 for a while: raise a learned (not stated) limit by 1 % a second, so a limit
    /// that grew is found again; the next 429 measures it.
    fn probe(&mut self, now: Instant) {
        if self.from_header {
            return;
        }
        let Some(l) = self.learned else { return };
        let last = *self.last_probe.get_or_insert(now);
        let dt = now.saturating_duration_since(last).as_secs_f64();
        if dt >= 1.0 {
            self.learned = Some(l * 1.01f64.powf(dt.min(10.0)));
            self.last_probe = Some(now);
            self.sync(now);
        }
    }
}

/// Recent latencies of successful calls.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    recent: VecDeque<f64>,
    long_ewma: Option<f64>,
}

/// Samples needed before deadlines and hedging follow the observed latencies.
pub const MIN_LATENCY_SAMPLES: usize = 16;

impl Latency {
    const KEEP: usize = 64;

    pub fn push(&mut self, s: f64) {
        if self.recent.len() == Self::KEEP {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
        self.long_ewma = Some(self.long_ewma.map_or(s, |e| 0.97 * e + 0.03 * s));
    }

    pub fn len(&self) -> usize {
        self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }

    /// The `q` quantile of the recent window, seconds.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile(self.recent.iter().copied().collect(), q)
    }

    /// Median of the last `n`.
    fn recent_median(&self, n: usize) -> Option<f64> {
        let k = self.recent.len();
        quantile(
            self.recent
                .iter()
                .skip(k.saturating_sub(n))
                .copied()
                .collect(),
            0.5,
        )
    }
}

fn quantile(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

/// Circuit breaker state of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum BreakerState {
    Closed,
    /// No calls until then.
    Open(Instant),
    /// One probe call may go; its outcome decides.
    HalfOpen,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    pub state: BreakerState,
    consecutive_failures: u32,
    cooldown: Duration,
    probe_inflight: bool,
    pub opened: u64,
}

/// Consecutive failures (5xx, timeouts, network) that open the breaker.
const TRIP_AFTER: u32 = 3;
const FIRST_COOLDOWN: Duration = Duration::from_secs(2);
const MAX_COOLDOWN: Duration = Duration::from_secs(10);

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            consecutive_failures: 0,
            cooldown: FIRST_COOLDOWN,
            probe_inflight: false,
            opened: 0,
        }
    }
}

impl Breaker {
    /// Whether a call may start now; `Err(d)`: not for `d`; `Err(ZERO)`: wait for the probe.
    fn admits(&mut self, now: Instant) -> std::result::Result<(), Duration> {
        match self.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open(until) if now < until => Err(until - now),
            BreakerState::Open(_) => {
                self.state = BreakerState::HalfOpen;
                self.admits(now)
            }
            BreakerState::HalfOpen if self.probe_inflight => Err(Duration::ZERO),
            BreakerState::HalfOpen => Ok(()),
        }
    }

    fn on_start(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probe_inflight = true;
        }
    }

    fn on_success(&mut self) {
        self.consecutive_failures = 0;
        self.cooldown = FIRST_COOLDOWN;
        self.probe_inflight = false;
        self.state = BreakerState::Closed;
    }

    fn on_failure(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        match self.state {
            BreakerState::HalfOpen => {
                self.probe_inflight = false;
                self.cooldown = (self.cooldown * 2).min(MAX_COOLDOWN);
                self.state = BreakerState::Open(now + self.cooldown);
                self.opened += 1;
            }
            BreakerState::Closed if self.consecutive_failures >= TRIP_AFTER => {
                self.state = BreakerState::Open(now + self.cooldown);
                self.opened += 1;
            }
            _ => {}
        }
    }

    /// The probe (or any call) ended without telling anything (a cancelled hedge, a garbled
    /// reply): let another probe go.
    fn on_neutral(&mut self) {
        self.probe_inflight = false;
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, BreakerState::Closed)
    }
}

/// What the run summary reports per endpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointStats {
    pub name: String,
    pub calls: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub server_errors: u64,
    pub timeouts: u64,
    pub hedges: u64,
    pub breaker_opened: u64,
    pub learned_rpm: Option<f64>,
    pub learned_tpm: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub disabled: Option<String>,
}

/// Flow state of one endpoint.
#[derive(Debug)]
pub struct Flow {
    pub requests: Pace,
    pub tokens: Pace,
    /// Adaptive concurrency limit (fractional; calls in flight may not exceed its floor).
    pub limit: f64,
    pub max_limit: f64,
    pub inflight: usize,
    pub blocked_until: Option<Instant>,
    last_decrease: Option<Instant>,
    pub latency: Latency,
    pub breaker: Breaker,
    /// Why this endpoint takes no more calls (a refused key, an unknown model).
    pub disabled: Option<String>,
    /// Successful calls so far (an endpoint that never answered may be misconfigured).
    pub successes: u64,
    /// Requests it refused as malformed (400/422) or answered with something that is not
    /// the API (an HTML page), since its last success.
    pub refusals_since_success: u32,
    adaptive: bool,
}

impl Flow {
    /// Fixed concurrency, no pacing, no header handling: the naive baseline.
    pub fn fixed(concurrency: usize) -> Flow {
        let mut f = Flow::new(0, 0, concurrency);
        f.limit = concurrency.max(1) as f64;
        f.adaptive = false;
        f
    }

    /// `rpm`/`tpm`: configured caps (0: none).
    pub fn new(rpm: u64, tpm: u64, max_concurrency: usize) -> Flow {
        let now = Instant::now();
        let mut requests = Pace::new(rpm);
        let mut tokens = Pace::new(tpm);
        requests.sync(now);
        tokens.sync(now);
        Flow {
            requests,
            tokens,
            limit: (max_concurrency as f64).min(4.0),
            max_limit: max_concurrency.max(1) as f64,
            inflight: 0,
            blocked_until: None,
            last_decrease: None,
            latency: Latency::default(),
            breaker: Breaker::default(),
            disabled: None,
            successes: 0,
            refusals_since_success: 0,
            adaptive: true,
        }
    }

    /// How long until a call estimated at `tokens` could start here (`None`: not while
    /// calls are in flight; wait for one to finish).
    pub fn ready_in(&mut self, tokens: f64, now: Instant) -> Option<Duration> {
        if self.disabled.is_some() || self.inflight >= self.limit.floor().max(1.0) as usize {
            return None;
        }
        let mut wait = match self.breaker.admits(now) {
            Ok(()) => Duration::ZERO,
            Err(d) if d.is_zero() => return None,
            Err(d) => d,
        };
        if let Some(t) = self.blocked_until {
            wait = wait.max(t.saturating_duration_since(now));
        }
        wait = wait.max(self.requests.wait_for(1.0, now));
        wait = wait.max(self.tokens.wait_for(tokens, now));
        Some(wait)
    }

    pub fn start(&mut self, tokens: f64, now: Instant) -> Ticket {
        self.inflight += 1;
        self.breaker.on_start();
        self.requests.take(1.0, now);
        self.tokens.take(tokens, now);
        Ticket {
            requests: self.requests.admitted,
            tokens: self.tokens.admitted,
        }
    }

    /// Learns what the endpoint states about its limits.
    fn apply_headers(&mut self, r: &RateInfo, ticket: Ticket, now: Instant) {
        if !self.adaptive {
            return;
        }
        if let Some(l) = r.limit_requests {
            self.requests.on_limit_header(l, now);
        }
        if let Some(l) = r.limit_tokens {
            self.tokens.on_limit_header(l, now);
        }
        // What the server had left when it admitted the call, less what was sent since.
        let since = (
            (self.requests.admitted - ticket.requests).max(0.0),
            (self.tokens.admitted - ticket.tokens).max(0.0),
        );
        if let (Some(b), Some(rem)) = (&mut self.requests.bucket, r.remaining_requests) {
            b.set_level(rem as f64 - since.0, now);
        }
        if let (Some(b), Some(rem)) = (&mut self.tokens.bucket, r.remaining_tokens) {
            b.set_level(rem as f64 - since.1, now);
        }
    }

    /// A call ended with an answer.
    pub fn on_success(
        &mut self,
        ticket: Ticket,
        latency: Duration,
        reserved: f64,
        used: f64,
        rate: &RateInfo,
        now: Instant,
    ) {
        self.inflight -= 1;
        self.successes += 1;
        self.refusals_since_success = 0;
        self.breaker.on_success();
        self.latency.push(latency.as_secs_f64());
        if !self.adaptive {
            return;
        }
        // What the call really cost (the reservation counted the whole answer budget).
        if let Some(b) = &mut self.tokens.bucket {
            b.adjust(reserved - used);
        }
        self.tokens.admitted += used - reserved;
        self.apply_headers(rate, ticket, now);
        self.requests.probe(now);
        self.tokens.probe(now);
        // Queueing at the server: the recent median far above the long-run level.
        let queueing = match (self.latency.recent_median(8), self.latency.long_ewma) {
            (Some(m), Some(long)) if self.latency.len() >= MIN_LATENCY_SAMPLES => {
                m > 2.0 * long && m > long + 0.5
            }
            _ => false,
        };
        if queueing {
            self.decrease(now);
        } else {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max_limit);
        }
    }

    /// A 429 for a send that reserved `tokens`.
    pub fn on_rate_limited(
        &mut self,
        ticket: Ticket,
        tokens: f64,
        r: &RateInfo,
        retry_cap: Duration,
        now: Instant,
    ) {
        self.inflight -= 1;
        self.breaker.on_neutral();
        if !self.adaptive {
            return;
        }
        self.apply_headers(r, ticket, now);
        // Which dimension ran out, when the server says.
        // When the server does not say, the tokens are taken to have run out: calls of one
        // job are of a size, so pacing tokens at the measured rate paces requests too, while
        // learning both would let the one that did not bind hold the other back.
        let (req_bind, tok_bind) = match (r.remaining_requests, r.remaining_tokens) {
            (Some(a), Some(b)) => (Some(a == 0), Some((b as f64) < tokens)),
            (Some(a), None) => (Some(a == 0), Some(a > 0)),
            (None, Some(b)) => (Some((b as f64) >= tokens), Some((b as f64) < tokens)),
            (None, None) => (Some(false), Some(true)),
        };
        self.requests.on_refused(1.0, req_bind, now);
        self.tokens.on_refused(tokens, tok_bind, now);
        // The server has no capacity left in the dimension that ran out: empty that bucket,
        // so its refill at the learned rate times the next send.
        let mut paced = false;
        for (p, bind) in [(&mut self.requests, req_bind), (&mut self.tokens, tok_bind)] {
            if let (Some(b), true) = (&mut p.bucket, bind != Some(false)) {
                b.clamp(0.0, now);
                paced = true;
            }
        }
        let stated = r.retry_after.or(r.reset_tokens.max(r.reset_requests));
        match stated {
            // A whole-seconds Retry-After is rounded up; when pacing knows the rate, the
            // bucket's refill is the better clock.
            Some(_) if r.retry_after_coarse && paced => {}
            Some(d) => self.block_for(d.min(retry_cap), now),
            // A 429 with no timing: a server limiting concurrency rather than rate.
            None => self.decrease(now),
        }
    }

    /// A call failed in a way that says the endpoint is in trouble (5xx, timeout, network).
    pub fn on_failure(&mut self, now: Instant) {
        self.inflight -= 1;
        self.breaker.on_failure(now);
    }

    /// A call ended without telling anything about the endpoint's health or load (a garbled
    /// reply, a cancelled hedge).
    pub fn on_neutral(&mut self) {
        self.inflight -= 1;
        self.breaker.on_neutral();
    }

    fn decrease(&mut self, now: Instant) {
        // At most one cut per round trip: a burst of signals from one window is one signal.
        let rtt =
            Duration::from_secs_f64(self.latency.quantile(0.5).unwrap_or(1.0).clamp(0.05, 10.0));
        if self
            .last_decrease
            .is_none_or(|t| now.saturating_duration_since(t) >= rtt)
        {
            self.limit = (self.limit * 0.75).max(1.0);
            self.last_decrease = Some(now);
        }
    }

    pub fn block_for(&mut self, d: Duration, now: Instant) {
        let until = now + d;
        if self.blocked_until.is_none_or(|t| t < until) {
            self.blocked_until = Some(until);
        }
    }

    /// Calls per second this endpoint can take (for weighted routing): the pacing rate when
    /// paced, else its concurrency over its median latency.
    pub fn capacity(&self, tokens_per_call: f64) -> Option<f64> {
        let by_req = self.requests.rate();
        let by_tok = self.tokens.rate().map(|t| t / tokens_per_call.max(1.0));
        match (by_req, by_tok) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (Some(a), None) | (None, Some(a)) => Some(a),
            (None, None) => self.latency.quantile(0.5).map(|l| self.limit / l.max(1e-3)),
        }
    }

    /// The deadline for one send: from the observed latencies once there are enough (a few
    /// times the 95th percentile), never above `ceiling` (the configured timeout).
    pub fn deadline(&self, ceiling: Duration) -> Duration {
        if self.latency.len() < MIN_LATENCY_SAMPLES {
            return ceiling;
        }
        let p95 = self.latency.quantile(0.95).unwrap_or(1.0);
        Duration::from_secs_f64((4.0 * p95 + 1.0).max(3.0)).min(ceiling)
    }

    /// How long a send may run before a second copy is sent elsewhere (`None`: too few
    /// observations to tell slow from usual).
    pub fn hedge_after(&self) -> Option<Duration> {
        if self.latency.len() < MIN_LATENCY_SAMPLES {
            return None;
        }
        let p50 = self.latency.quantile(0.5)?;
        let p95 = self.latency.quantile(0.95)?;
        Some(Duration::from_secs_f64((2.0 * p95).max(p50 + 0.5)))
    }

    pub fn stats(&self, name: &str) -> EndpointStats {
        EndpointStats {
            name: name.to_string(),
            breaker_opened: self.breaker.opened,
            learned_rpm: self.requests.learned_per_minute(),
            learned_tpm: self.tokens.learned_per_minute(),
            latency_p50_ms: self.latency.quantile(0.5).map(|s| s * 1000.0),
            latency_p95_ms: self.latency.quantile(0.95).map(|s| s * 1000.0),
            disabled: self.disabled.clone(),
            ..Default::default()
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

    fn s(x: f64) -> Duration {
        Duration::from_secs_f64(x)
    }

    #[test]
    fn bucket_waits_and_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1.0, 2.0, t0); // 1/s, capacity 2
        assert_eq!(b.wait_for(1.0, t0), Duration::ZERO);
        b.take(2.0, t0);
        let w = b.wait_for(1.0, t0);
        assert!((w.as_secs_f64() - 1.0).abs() < 1e-6);
        assert_eq!(b.wait_for(1.0, t0 + s(1.0)), Duration::ZERO);
    }

    #[test]
    fn a_stated_limit_is_used_and_a_configured_one_only_caps() {
        let t0 = Instant::now();
        // Configured 2× too high: the stated limit wins.
        let mut f = Flow::new(1200, 0, 8);
        f.start(10.0, t0);
        let r = RateInfo {
            limit_requests: Some(600),
            limit_tokens: Some(200_000),
            ..Default::default()
        };
        f.on_success(Ticket::default(), s(0.3), 10.0, 10.0, &r, t0);
        assert!((f.requests.rate().unwrap() - 9.9).abs() < 1e-6);
        assert!((f.tokens.rate().unwrap() - 200_000.0 / 60.0 * 0.99).abs() < 1e-6);
        // Configured below the stated limit: the configured cap wins.
        let mut f = Flow::new(60, 0, 8);
        f.start(10.0, t0);
        f.on_success(Ticket::default(), s(0.3), 10.0, 10.0, &r, t0);
        assert!((f.requests.rate().unwrap() - 1.0).abs() < 1e-6);
    }

    /// A 429, 10 s of 5 admitted calls of 100 tokens a second, another 429 (both with `r`).
    fn two_429s(f: &mut Flow, r: &RateInfo, t0: Instant) -> Instant {
        f.start(100.0, t0);
        f.on_rate_limited(Ticket::default(), 100.0, r, s(60.0), t0);
        for k in 0..50 {
            let t = t0 + s(0.2 * k as f64);
            f.start(100.0, t);
            f.on_success(
                Ticket::default(),
                s(0.05),
                100.0,
                100.0,
                &RateInfo::default(),
                t,
            );
        }
        let t1 = t0 + s(10.0);
        f.start(100.0, t1);
        f.on_rate_limited(Ticket::default(), 100.0, r, s(60.0), t1);
        t1
    }

    #[test]
    fn the_rate_between_two_429s_is_learned_for_the_dimension_that_ran_out() {
        let t0 = Instant::now();
        // The server says the requests ran out.
        let mut f = Flow::new(0, 0, 64);
        let r = RateInfo {
            retry_after: Some(s(0.1)),
            remaining_requests: Some(0),
            remaining_tokens: Some(10_000),
            ..Default::default()
        };
        let t1 = two_429s(&mut f, &r, t0);
        let rps = f.requests.rate().unwrap();
        assert!((rps - 5.0 * HOLD).abs() < 0.2, "{rps}");
        assert!(f.tokens.rate().is_none());
        assert!((f.requests.learned_per_minute().unwrap() - 300.0).abs() < 12.0);
        // No 429 for 10 s: pacing probes about 10 % higher.
        let t2 = t1 + s(10.0);
        f.start(100.0, t2);
        f.on_success(
            Ticket::default(),
            s(0.05),
            100.0,
            100.0,
            &RateInfo::default(),
            t2,
        );
        let up = f.requests.rate().unwrap() / rps;
        assert!(up > 1.05 && up < 1.15, "{up}");
        // Nothing said: the tokens are paced (which paces calls of one size too).
        let mut f = Flow::new(0, 0, 64);
        let r = RateInfo {
            retry_after: Some(s(1.0)),
            retry_after_coarse: true,
            ..Default::default()
        };
        two_429s(&mut f, &r, t0);
        assert!(f.requests.rate().is_none());
        let tps = f.tokens.rate().unwrap();
        assert!((tps - 500.0 * HOLD).abs() < 20.0, "{tps}");
        // A whole-seconds Retry-After does not block once the rate is known: the emptied
        // bucket times the next call (100 tokens at ~485/s).
        let w = f.ready_in(100.0, t0 + s(10.0)).unwrap().as_secs_f64();
        assert!(w > 0.15 && w < 0.3, "{w}");
    }

    #[test]
    fn hangs_and_errors_do_not_shrink_concurrency_but_open_the_breaker() {
        let t0 = Instant::now();
        let mut f = Flow::new(0, 0, 64);
        let before = f.limit;
        for k in 0..3 {
            f.start(0.0, t0);
            f.on_failure(t0 + s(k as f64 * 0.01));
        }
        assert_eq!(f.limit, before);
        assert!(f.breaker.is_open());
        let w = f.ready_in(0.0, t0).unwrap();
        assert!(w > Duration::ZERO, "open breaker holds calls back");
        // After the cool-down one probe goes; while it runs nothing else.
        let later = t0 + s(5.0);
        assert_eq!(f.ready_in(0.0, later), Some(Duration::ZERO));
        f.start(0.0, later);
        assert_eq!(f.ready_in(0.0, later), None);
        f.on_success(
            Ticket::default(),
            s(0.1),
            0.0,
            0.0,
            &RateInfo::default(),
            later,
        );
        assert!(!f.breaker.is_open());
    }

    #[test]
    fn deadlines_and_hedges_follow_observed_latency() {
        let t0 = Instant::now();
        let mut f = Flow::new(0, 0, 64);
        let ceiling = s(20.0);
        assert_eq!(f.deadline(ceiling), ceiling);
        assert!(f.hedge_after().is_none());
        for k in 0..40 {
            f.start(0.0, t0);
            let l = 0.3 + 0.002 * k as f64;
            f.on_success(Ticket::default(), s(l), 0.0, 0.0, &RateInfo::default(), t0);
        }
        let d = f.deadline(ceiling).as_secs_f64();
        assert!(d > 2.5 && d < 5.0, "{d}");
        let h = f.hedge_after().unwrap().as_secs_f64();
        assert!(h > 0.7 && h < 1.0, "{h}");
    }

    #[test]
    fn retry_after_blocks_the_endpoint_up_to_the_cap() {
        let t0 = Instant::now();
        let mut f = Flow::new(0, 0, 8);
        f.start(0.0, t0);
        let r = RateInfo {
            retry_after: Some(s(120.0)),
            ..Default::default()
        };
        f.on_rate_limited(Ticket::default(), 0.0, &r, s(30.0), t0);
        let w = f.ready_in(0.0, t0).unwrap();
        assert!(w >= s(29.9) && w <= s(30.0), "{w:?}");
    }
}
