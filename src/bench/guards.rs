//! `semtel bench guards`: how fast the guard rule notices a segment whose kept-accuracy fell,
//! and how often it trips on a segment that did not — the real [`Guards`] fed simulated
//! audits, many seeded runs.
//!
//! Per run, one segment's kept rows stream by: right with probability `base` for
//! `before` rows, then with `base − fall`. A share `audit_rate` of them is audited; the LLM
//! answers right with probability `llm_accuracy`, so kNN and the LLM agree when both are right
//! (two wrong answers are taken to differ: with dozens of labels they rarely coincide). The
//! guards are told the LLM's accuracy, as `--audit-llm-accuracy` would. Measured: rows of the
//! segment after the fall until its guard trips (the detection delay), audited rows that took,
//! and trips before the fall (false alarms per 10,000 rows). What the statistics allow, for
//! reading the figures: telling 97 % from 92 % at the guards' one-sided 95 % needs on the
//! order of a hundred audited rows of the segment, whatever the rule.
//!
//! This module simulates agreement; it must never call an LLM or read data.

use crate::guard::{GuardOptions, Guards};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct GuardBenchOptions {
    pub audit_rates: Vec<f64>,
    pub base: f64,
    pub fall: f64,
    pub llm_accuracy: f64,
    pub before: u64,
    /// Rows after the fall a run gives up at (counted as not detected).
    pub max_after: u64,
    pub runs: usize,
    pub seed: u64,
}

impl Default for GuardBenchOptions {
    fn default() -> Self {
        GuardBenchOptions {
            audit_rates: vec![0.01, 0.02, 0.05],
            base: 0.97,
            fall: 0.05,
            llm_accuracy: 0.95,
            before: 20_000,
            max_after: 50_000,
            runs: 200,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GuardBenchResult {
    pub audit_rate: f64,
    pub base: f64,
    pub fall: f64,
    pub llm_accuracy: f64,
    pub runs: usize,
    /// Runs whose guard tripped within `max_after` rows of the fall.
    pub detected: usize,
    /// Rows of the segment after the fall until the trip: median and 90th percentile of the
    /// detected runs.
    pub delay_rows_p50: f64,
    pub delay_rows_p90: f64,
    /// Share of runs detected within 3,000 rows of the fall.
    pub detected_within_3000: f64,
    /// Audited rows (LLM calls) the median detection took.
    pub audited_rows_p50: f64,
    /// Trips while the segment was still at `base`, per 10,000 of its rows.
    pub false_trips_per_10k: f64,
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Runs the benchmark, one result per audit rate (the guards' trip log is silenced: thousands
/// of simulated trips are the point here, not news).
pub fn guard_benchmark(o: &GuardBenchOptions) -> Vec<GuardBenchResult> {
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || run_all(o))
}

fn run_all(o: &GuardBenchOptions) -> Vec<GuardBenchResult> {
    let mut out = Vec::new();
    for &rate in &o.audit_rates {
        let mut rng = fastrand::Rng::with_seed(o.seed);
        let (mut delays, mut audited) = (Vec::new(), Vec::new());
        let mut false_trips = 0u64;
        let mut within = 0usize;
        for _ in 0..o.runs {
            let fresh = || {
                Guards::new(GuardOptions {
                    target: o.base,
                    llm_accuracy: o.llm_accuracy,
                    ..Default::default()
                })
            };
            let mut g = fresh();
            let mut audits_after = 0u64;
            for row in 0..o.before + o.max_after {
                let after = row >= o.before;
                if rng.f64() >= rate {
                    continue;
                }
                let acc = if after { o.base - o.fall } else { o.base };
                let agreed = rng.f64() < acc && rng.f64() < o.llm_accuracy;
                audits_after += u64::from(after);
                let tripped = g
                    .observe(Some("segment"), Some("en"), None, agreed)
                    .iter()
                    .any(|e| e.event == "trip" && e.segment == "label:segment");
                if !tripped {
                    continue;
                }
                if after {
                    let d = (row - o.before + 1) as f64;
                    delays.push(d);
                    audited.push(audits_after as f64);
                    within += usize::from(d <= 3000.0);
                    break;
                }
                // A false alarm: counted, and the run goes on with fresh guards (as if an
                // operator released it).
                false_trips += 1;
                g = fresh();
            }
        }
        let detected = delays.len();
        out.push(GuardBenchResult {
            audit_rate: rate,
            base: o.base,
            fall: o.fall,
            llm_accuracy: o.llm_accuracy,
            runs: o.runs,
            detected,
            delay_rows_p50: quantile(&mut delays.clone(), 0.5),
            delay_rows_p90: quantile(&mut delays, 0.9),
            detected_within_3000: within as f64 / o.runs.max(1) as f64,
            audited_rows_p50: quantile(&mut audited, 0.5),
            false_trips_per_10k: false_trips as f64 * 10_000.0
                / (o.before as f64 * o.runs.max(1) as f64),
        });
    }
    out
}
