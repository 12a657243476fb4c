//! Guards: the kept-accuracy promise checked on the traffic itself, segment by segment.
//!
//! Audited rows (a seeded share of the rows kNN keeps, also asked of the LLM, blind) and rows a
//! guard escalated (which kNN would have kept) say, for their segment — the label kNN gave,
//! the row's language — whether kNN and the LLM agree. A segment whose agreement is
//! *confidently* below what the calibration promises (the upper end of its Wilson interval
//! under the target) trips: from then on its rows are escalated (`escalate_reason = "guard"`)
//! instead of kept. The escalated rows keep the evidence coming, and once the lower end of the
//! interval is back within `release_margin` of the target the guard is released (hysteresis: a
//! guard does not flap on the next row). Evidence is a window of each segment's most recent
//! observations, so a guard answers to what the traffic is now.
//!
//! The LLM is not always right: agreement is compared with `target × llm_accuracy` (the LLM's
//! accuracy as the user states it, or its self-agreement as `bootstrap` measures it; 1.0 by
//! default, and every report says which it was).
//!
//! Labels trip; languages tighten. Per language, once enough rows were audited, the confidence
//! that keeps the audited rows of that language at the target is learned (as `calibrate` does
//! on exemplars, leaving out rows of tripped labels, which their label explains) and applied on
//! top of the index's threshold. A language is never switched off whole: one bad label would
//! take all of its rows with it.
//!
//! Languages the exemplars do not cover start on probation. The calibration was measured on
//! the exemplars' languages; a row in another one has a confidence nobody has checked (English
//! exemplars with a multilingual encoder keep Lithuanian rows at 62 % where they promise 97 %).
//! So the first rows of such a language that kNN would keep go to the LLM instead
//! (`escalate_reason = "guard"`): all of them, whatever their confidence, which makes them an
//! unbiased sample of how kNN does in that language. Once [`GuardOptions::min_language_rows`]
//! came back, the language's own threshold is learned from them and probation ends; audits and
//! the rows under that threshold (still escalated) keep it up to date. The cost is known and
//! small: at most that many LLM calls per new language. Probation evidence speaks for the
//! language only (not for the labels kNN gave: a label is not wrong in English because
//! Lithuanian rows of it are). Which languages are covered is the caller's to say
//! ([`Guards::cover`]); the same detector reads exemplars and traffic, so its mistakes on
//! short texts fall on both sides alike.
//!
//! This module is bookkeeping: it must never classify, call the LLM or decide where its state
//! is written (callers pass paths).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

/// One-sided 95 % normal quantile, for the Wilson bounds.
const Z: f64 = 1.645;

/// What the guards are held to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct GuardOptions {
    /// The kept accuracy the index promises (its calibration target).
    pub target: f64,
    /// The LLM's accuracy (1.0: its answers are taken as right).
    pub llm_accuracy: f64,
    /// Observations each segment remembers.
    pub window: usize,
    /// Observations a segment needs before it can trip or be released.
    pub min_observations: usize,
    /// Released when the lower bound is within this of the required agreement.
    pub release_margin: f64,
    /// Audited rows of a language before its own confidence threshold is learned.
    pub min_language_rows: usize,
    /// Whether tripped guards escalate their segments (`--guards off`: only reported).
    #[serde(default = "yes")]
    pub enforce: bool,
}

fn yes() -> bool {
    true
}

impl Default for GuardOptions {
    fn default() -> Self {
        GuardOptions {
            target: 0.97,
            llm_accuracy: 1.0,
            window: 300,
            min_observations: 20,
            release_margin: 0.02,
            min_language_rows: 100,
            enforce: true,
        }
    }
}

impl GuardOptions {
    /// Agreement with the LLM expected of rows kept at the target.
    pub fn required(&self) -> f64 {
        self.target * self.llm_accuracy
    }
}

/// The Wilson score interval (one-sided 95 % bounds) of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = Z * Z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z * ((p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt()) / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One segment's evidence and state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Segment {
    /// Most recent observations, oldest first (true: kNN and the LLM agreed).
    pub recent: VecDeque<bool>,
    pub observed: u64,
    pub agreed: u64,
    pub tripped: bool,
    pub trips: u64,
    pub releases: u64,
    /// Observations since the last trip or release.
    pub since_change: u64,
}

impl Segment {
    pub fn agreement(&self) -> (usize, usize) {
        (
            self.recent.iter().filter(|&&a| a).count(),
            self.recent.len(),
        )
    }
}

/// A trip or a release, for the log, the summary and the drift report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuardEvent {
    /// `label:<name>` or `lang:<code>`.
    pub segment: String,
    /// `trip` or `release`.
    pub event: String,
    /// Rows the guards had seen (kept or not) when it happened.
    pub at_row: u64,
    pub agreed: usize,
    pub observed: usize,
    pub low: f64,
    pub high: f64,
}

/// Per-language rows for a learned threshold: (confidence, agreed, kNN label).
type LangRows = Vec<(f32, bool, String)>;

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    segments: BTreeMap<String, Segment>,
    events: Vec<GuardEvent>,
    rows_seen: u64,
    #[serde(default)]
    languages: BTreeMap<String, LangRows>,
    #[serde(default)]
    learned: BTreeMap<String, f32>,
}

/// The file format of a state file.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    semtel_guards: u32,
    options: GuardOptions,
    #[serde(flatten)]
    state: State,
}

/// The guards of one run or one service.
#[derive(Debug)]
pub struct Guards {
    pub options: GuardOptions,
    state: Mutex<State>,
    /// Languages the exemplars cover (`None`: every language is taken as covered).
    covered: Option<std::collections::BTreeSet<String>>,
}

/// The segments a row belongs to.
pub fn segments(label: Option<&str>, lang: Option<&str>) -> Vec<String> {
    let mut s = Vec::with_capacity(2);
    if let Some(l) = label {
        s.push(format!("label:{l}"));
    }
    s.push(format!("lang:{}", lang.unwrap_or("und")));
    s
}

impl Guards {
    pub fn new(options: GuardOptions) -> Guards {
        Guards {
            options,
            state: Mutex::new(State::default()),
            covered: None,
        }
    }

    /// Says which languages the exemplars cover, from how many exemplars the detector gave
    /// each (`und` included or not, it is never on probation). Others start on probation.
    ///
    /// Covered means the calibration saw at least as many rows of the language as a guard
    /// needs before it may act on a segment ([`GuardOptions::min_observations`]). Short texts
    /// make the detector stray (xSID's English queries: 31 % read as Danish, Catalan,
    /// Afrikaans…; Banking77's: 25 %), so an English index holds a few exemplars "in" many
    /// languages: a handful calibrate nothing, while a language the detector gives a fair
    /// number of exemplars (noise or not) is one the calibration did see.
    pub fn cover(mut self, exemplar_languages: &BTreeMap<String, usize>) -> Guards {
        let min = self.options.min_observations;
        self.covered = Some(
            exemplar_languages
                .iter()
                .filter(|(_, &n)| n >= min)
                .map(|(l, _)| l.clone())
                .collect(),
        );
        self
    }

    /// Whether rows of this language are on probation: a detected language the exemplars do
    /// not cover, whose own threshold has not been learned yet.
    pub fn on_probation(&self, lang: Option<&str>) -> bool {
        self.options.enforce && self.uncovered_unlearned(&self.lock(), lang)
    }

    fn uncovered_unlearned(&self, st: &State, lang: Option<&str>) -> bool {
        match (lang, &self.covered) {
            (Some(l), Some(c)) if l != "und" => !c.contains(l) && !st.learned.contains_key(l),
            _ => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts rows passing the guards (the clock events are stamped with).
    pub fn tick(&self, rows: u64) {
        self.lock().rows_seen += rows;
    }

    /// The tripped segment a row with this label and language falls in, if any.
    pub fn blocks(&self, label: Option<&str>, lang: Option<&str>) -> Option<String> {
        if !self.options.enforce {
            return None;
        }
        let st = self.lock();
        segments(label, lang)
            .into_iter()
            .find(|s| st.segments.get(s).is_some_and(|g| g.tripped))
    }

    /// Whether a row kNN would keep must be escalated instead (`escalate_reason = "guard"`):
    /// its label or language is tripped, its language is on probation, or its confidence is
    /// under the threshold learned for its language. One lock per row (this runs on every
    /// kept row).
    pub fn holds(&self, label: Option<&str>, lang: Option<&str>, confidence: f32) -> bool {
        if !self.options.enforce {
            return false;
        }
        let st = self.lock();
        segments(label, lang)
            .iter()
            .any(|s| st.segments.get(s).is_some_and(|g| g.tripped))
            || self.uncovered_unlearned(&st, lang)
            || st
                .learned
                .get(lang.unwrap_or("und"))
                .is_some_and(|&t| confidence < t)
    }

    /// The confidence threshold learned for a language, if enough of its rows were audited.
    pub fn language_threshold(&self, lang: Option<&str>) -> Option<f32> {
        if !self.options.enforce {
            return None;
        }
        self.lock().learned.get(lang.unwrap_or("und")).copied()
    }

    /// One row's evidence: kNN said `label` (with `confidence`), the LLM agreed or not.
    pub fn observe(
        &self,
        label: Option<&str>,
        lang: Option<&str>,
        confidence: Option<f32>,
        agreed: bool,
    ) -> Vec<GuardEvent> {
        let o = self.options;
        let required = o.required();
        let mut st = self.lock();
        let at = st.rows_seen;
        let mut events = Vec::new();
        // A language on probation is judged by its own rows; its labels are not.
        let seg_label = if self.uncovered_unlearned(&st, lang) {
            None
        } else {
            label
        };
        for name in segments(seg_label, lang) {
            let seg = st.segments.entry(name.clone()).or_default();
            seg.recent.push_back(agreed);
            while seg.recent.len() > o.window.max(1) {
                seg.recent.pop_front();
            }
            seg.observed += 1;
            seg.agreed += u64::from(agreed);
            seg.since_change += 1;
            let (k, n) = seg.agreement();
            // Languages are not switched off whole: their confidence threshold tightens
            // instead (below), so one bad label cannot take a language's every row with it.
            if name.starts_with("lang:")
                || n < o.min_observations
                || (seg.since_change as usize) < o.min_observations.min(n)
            {
                continue;
            }
            let (low, high) = wilson(k, n);
            let change = if !seg.tripped && high < required {
                seg.tripped = true;
                seg.trips += 1;
                Some("trip")
            } else if seg.tripped && low >= required - o.release_margin {
                seg.tripped = false;
                seg.releases += 1;
                Some("release")
            } else {
                None
            };
            if let Some(e) = change {
                seg.since_change = 0;
                // A fresh window after a change: the evidence that caused it is spent.
                seg.recent.clear();
                events.push(GuardEvent {
                    segment: name,
                    event: e.into(),
                    at_row: at,
                    agreed: k,
                    observed: n,
                    low,
                    high,
                });
            }
        }
        if let (Some(c), Some(l)) = (confidence, label) {
            let key = lang.unwrap_or("und").to_string();
            let tripped: std::collections::HashSet<String> = st
                .segments
                .iter()
                .filter(|(k, g)| g.tripped && k.starts_with("label:"))
                .map(|(k, _)| k["label:".len()..].to_string())
                .collect();
            let rows = st.languages.entry(key.clone()).or_default();
            rows.push((c, agreed, l.to_string()));
            if rows.len() > 4 * o.window {
                rows.drain(..rows.len() - 4 * o.window);
            }
            // Rows of guarded labels are explained by their label, not their language.
            let own: Vec<(f32, bool)> = rows
                .iter()
                .filter(|r| !tripped.contains(&r.2))
                .map(|r| (r.0, r.1))
                .collect();
            if own.len() >= o.min_language_rows {
                let t = learned_threshold(&own, required - o.release_margin);
                st.learned.insert(key, t);
            }
        }
        for e in &events {
            tracing::warn!(
                "guard {} {}: {} of {} audited rows agreed with the LLM (95 % bounds {:.3}–{:.3}, required {:.3})",
                e.event,
                e.segment,
                e.agreed,
                e.observed,
                e.low,
                e.high,
                required
            );
        }
        st.events.extend(events.iter().cloned());
        events
    }

    /// A finished row's evidence, if it carries any: an audited kept row (its label against
    /// the LLM's answer), or a row a guard escalated that the LLM labelled (what kNN would have
    /// kept against the LLM's label). Every other row says nothing about kept rows.
    pub fn observe_row(&self, r: &crate::row::OutputRow) -> Vec<GuardEvent> {
        use crate::row::{DecidedBy, EscalateReason};
        if let Some(Some(answer)) = r.audit.as_ref().map(|a| a.label.as_deref()) {
            let agreed = r.label.as_deref() == Some(answer);
            return self.observe(r.label.as_deref(), r.lang.as_deref(), r.confidence, agreed);
        }
        if r.escalate_reason == Some(EscalateReason::Guard) && r.decided_by == DecidedBy::Llm {
            let agreed = r.knn_label == r.label;
            return self.observe(
                r.knn_label.as_deref(),
                r.lang.as_deref(),
                r.confidence,
                agreed,
            );
        }
        Vec::new()
    }

    /// Everything so far, for summaries, metrics and reports.
    pub fn snapshot(&self) -> GuardReport {
        let st = self.lock();
        GuardReport {
            required_agreement: self.options.required(),
            target: self.options.target,
            llm_accuracy: self.options.llm_accuracy,
            llm_accuracy_source: if self.options.llm_accuracy >= 1.0 {
                "assumed 1.0 (LLM answers taken as right): pass --audit-llm-accuracy".into()
            } else {
                "given".into()
            },
            tripped: st
                .segments
                .iter()
                .filter(|(_, s)| s.tripped)
                .map(|(k, _)| k.clone())
                .collect(),
            trips: st.segments.values().map(|s| s.trips).sum(),
            releases: st.segments.values().map(|s| s.releases).sum(),
            events: st.events.clone(),
            learned_language_thresholds: st.learned.clone(),
            probation: st
                .languages
                .keys()
                .filter(|l| self.uncovered_unlearned(&st, Some(l)))
                .cloned()
                .collect(),
            segments: st
                .segments
                .iter()
                .map(|(k, s)| {
                    let (a, n) = s.agreement();
                    let (low, high) = wilson(s.agreed as usize, s.observed as usize);
                    (
                        k.clone(),
                        SegmentReport {
                            observed: s.observed,
                            agreed: s.agreed,
                            low,
                            high,
                            recent_agreed: a,
                            recent_observed: n,
                            tripped: s.tripped,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Writes the state (atomically) so that `--resume` and a restarted service carry on.
    pub fn save(&self, path: &Path) -> Result<()> {
        let st = self.lock();
        let file = StateFile {
            semtel_guards: 1,
            options: self.options,
            state: State {
                segments: st.segments.clone(),
                events: st.events.clone(),
                rows_seen: st.rows_seen,
                languages: st.languages.clone(),
                learned: st.learned.clone(),
            },
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&file).map_err(|e| Error::Internal(e.to_string()))?,
        )
        .map_err(|e| Error::io(&tmp, e))?;
        crate::fsio::commit(&tmp, path)
    }

    /// The guards of an earlier run from its state file, or new ones when there is none. A
    /// file that is not a guard state is refused, never silently replaced (tripped guards
    /// would be released without evidence).
    pub fn load_or_new(path: &Path, options: GuardOptions) -> Result<Guards> {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Guards::new(options)),
            Err(e) => return Err(Error::io(path, e)),
        };
        let file: StateFile = serde_json::from_slice(&text).map_err(|e| {
            Error::Config(format!(
                "{}: not a semtel guard state ({e}); move it away to start the guards afresh (tripped guards are released then)",
                path.display()
            ))
        })?;
        if file.semtel_guards != 1 {
            return Err(Error::Config(format!(
                "{}: guard state version {} is not one this semtel reads",
                path.display(),
                file.semtel_guards
            )));
        }
        Ok(Guards {
            options,
            state: Mutex::new(file.state),
            covered: None,
        })
    }
}

/// A learned threshold no row reaches. Finite, unlike infinity, so that the state file (JSON)
/// can hold it.
pub const KEEP_NONE: f32 = f32::MAX;

/// The lowest confidence at which the rows at or above it agreed *confidently* at `required`:
/// the lower end of their one-sided 95 % Wilson bound at or above `floor` (the bar a tripped
/// guard is released at). A point estimate would do on thousands of exemplars, but a language
/// learns from its first hundred rows, and the threshold where a hundred rows' running share
/// first touches 97 % is where luck helped: measured on xSID, such thresholds kept rows at
/// 67–91 % in half the languages. [`KEEP_NONE`] when no threshold is supported yet (its rows
/// keep going to the LLM, which brings more evidence).
fn learned_threshold(rows: &[(f32, bool)], floor: f64) -> f32 {
    let mut v = rows.to_vec();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut ok = 0usize;
    let mut best = KEEP_NONE;
    for (i, (c, a)) in v.iter().enumerate() {
        ok += usize::from(*a);
        // Ties: a threshold keeps every row at its confidence, so judge it after the last.
        if v.get(i + 1).is_some_and(|n| n.0 == *c) {
            continue;
        }
        if wilson(ok, i + 1).0 >= floor {
            best = *c;
        }
    }
    best
}

/// What the guards say, for the run summary, `/metrics` and the drift report.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct GuardReport {
    pub target: f64,
    pub llm_accuracy: f64,
    pub llm_accuracy_source: String,
    pub required_agreement: f64,
    pub tripped: Vec<String>,
    pub trips: u64,
    pub releases: u64,
    pub events: Vec<GuardEvent>,
    pub learned_language_thresholds: BTreeMap<String, f32>,
    /// Languages the exemplars do not cover whose rows are still all sent to the LLM (their
    /// threshold not learned yet). Languages with no row sent yet are not listed.
    #[serde(default)]
    pub probation: Vec<String>,
    pub segments: BTreeMap<String, SegmentReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SegmentReport {
    pub observed: u64,
    pub agreed: u64,
    /// Wilson bounds over every observation.
    pub low: f64,
    pub high: f64,
    pub recent_agreed: usize,
    pub recent_observed: usize,
    pub tripped: bool,
}

/// Rows per time window of a run's audit report (in the run's input order).
pub const AUDIT_WINDOW_ROWS: u64 = 10_000;

/// Audited rows of one segment: how many the LLM answered and how many of those it agreed on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditSegment {
    pub answered: u64,
    pub agreed: u64,
    /// Two-sided 95 % Wilson interval of the agreement.
    pub agreement: crate::index::Interval,
}

/// A run's audit: the kept rows' accuracy as the LLM sees it, globally and per segment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditReport {
    /// Kept rows picked for audit, whether the LLM answered or not.
    pub audited: u64,
    /// Of those, the LLM gave no label (the audit is missing; the rows kept their label).
    pub missing: u64,
    pub answered: u64,
    pub agreed: u64,
    /// Agreement of kNN's kept label with the LLM, with its 95 % Wilson interval.
    pub agreement: crate::index::Interval,
    /// The LLM's own accuracy the estimate is corrected by, and where it came from.
    pub llm_accuracy: f64,
    pub llm_accuracy_source: String,
    /// Realised kept-accuracy: agreement ÷ LLM accuracy (capped at 1), interval likewise.
    pub estimated_kept_accuracy: crate::index::Interval,
    pub by_label: BTreeMap<String, AuditSegment>,
    pub by_language: BTreeMap<String, AuditSegment>,
    /// `rows N–M` windows of the run's input order.
    pub by_window: BTreeMap<String, AuditSegment>,
    /// A column of the input named by `--segment-col`, by value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_segment: BTreeMap<String, AuditSegment>,
}

/// Counts audited rows as they are written.
#[derive(Debug, Clone, Default)]
pub struct AuditTally {
    report: AuditReport,
    llm_accuracy: Option<f64>,
}

impl AuditTally {
    /// `llm_accuracy`: the LLM's accuracy when known (`--audit-llm-accuracy`), else 1.0 is
    /// assumed and the report says so.
    pub fn new(llm_accuracy: Option<f64>) -> AuditTally {
        AuditTally {
            report: AuditReport::default(),
            llm_accuracy,
        }
    }

    /// One audited row: its kept label, the LLM's (`None`: no answer), its language, its
    /// position in the run and its `--segment-col` value.
    pub fn add(
        &mut self,
        kept: Option<&str>,
        llm: Option<&str>,
        lang: Option<&str>,
        row_no: u64,
        segment: Option<&str>,
    ) {
        let r = &mut self.report;
        r.audited += 1;
        let Some(llm) = llm else {
            r.missing += 1;
            return;
        };
        let agreed = kept == Some(llm);
        r.answered += 1;
        r.agreed += u64::from(agreed);
        let w = row_no / AUDIT_WINDOW_ROWS * AUDIT_WINDOW_ROWS;
        let window = format!("rows {:>9}-{}", w, w + AUDIT_WINDOW_ROWS - 1);
        let bump = |m: &mut BTreeMap<String, AuditSegment>, k: &str| {
            let s = m.entry(k.to_string()).or_default();
            s.answered += 1;
            s.agreed += u64::from(agreed);
        };
        bump(&mut r.by_label, kept.unwrap_or("(none)"));
        bump(&mut r.by_language, lang.unwrap_or("und"));
        bump(&mut r.by_window, &window);
        if let Some(s) = segment {
            bump(&mut r.by_segment, s);
        }
    }

    /// The report with its intervals filled in.
    pub fn report(&self) -> AuditReport {
        let mut r = self.report.clone();
        let a = self.llm_accuracy.unwrap_or(1.0).clamp(0.01, 1.0);
        r.llm_accuracy = a;
        r.llm_accuracy_source = match self.llm_accuracy {
            Some(_) => "given (--audit-llm-accuracy)".into(),
            None => "assumed 1.0: the LLM's answers are taken as right (pass --audit-llm-accuracy, e.g. the self-agreement `semtel bootstrap` reports)".into(),
        };
        r.agreement = crate::calibrate::wilson(r.agreed as usize, r.answered as usize);
        let fix = |x: f64| (x / a).min(1.0);
        r.estimated_kept_accuracy = crate::index::Interval {
            value: fix(r.agreement.value),
            lo: fix(r.agreement.lo),
            hi: fix(r.agreement.hi),
        };
        for m in [
            &mut r.by_label,
            &mut r.by_language,
            &mut r.by_window,
            &mut r.by_segment,
        ] {
            for s in m.values_mut() {
                s.agreement = crate::calibrate::wilson(s.agreed as usize, s.answered as usize);
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_bounds_contain_the_rate_and_narrow_with_n() {
        let (l, h) = wilson(97, 100);
        assert!(l < 0.97 && 0.97 < h);
        let (l2, h2) = wilson(970, 1000);
        assert!(h2 - l2 < h - l);
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }

    #[test]
    fn a_falling_segment_trips_and_recovers_without_flapping() {
        let g = Guards::new(GuardOptions::default());
        // 60 agreeing rows: nothing trips.
        for _ in 0..60 {
            assert!(g.observe(Some("a"), Some("en"), Some(0.9), true).is_empty());
        }
        assert!(g.blocks(Some("a"), Some("en")).is_none());
        // Then one in five disagrees on label a (another label is fine).
        let mut tripped_at = None;
        for i in 0..200 {
            let ev = g.observe(Some("a"), Some("en"), Some(0.9), i % 5 != 0);
            g.observe(Some("b"), Some("de"), Some(0.9), true);
            if ev
                .iter()
                .any(|e| e.segment == "label:a" && e.event == "trip")
            {
                tripped_at = Some(i);
                break;
            }
        }
        assert!(tripped_at.is_some_and(|i| i < 100), "{tripped_at:?}");
        assert_eq!(g.blocks(Some("a"), Some("de")).as_deref(), Some("label:a"));
        assert!(g.blocks(Some("b"), Some("de")).is_none());
        // Agreement comes back: released once, and no trip again.
        let mut released = 0;
        for _ in 0..300 {
            for e in g.observe(Some("a"), Some("de"), Some(0.9), true) {
                if e.segment == "label:a" {
                    assert_eq!(e.event, "release");
                    released += 1;
                }
            }
        }
        assert_eq!(released, 1);
        assert!(g.blocks(Some("a"), Some("de")).is_none());
        let r = g.snapshot();
        assert!(!r.segments["label:a"].tripped);
        assert!(r.trips >= 1 && r.releases >= 1);
    }

    #[test]
    fn one_bad_label_trips_alone_and_leaves_its_language_kept() {
        let g = Guards::new(GuardOptions {
            min_language_rows: 50,
            ..Default::default()
        });
        for i in 0..400 {
            let bad = i % 10 == 0;
            g.observe(
                Some(if bad { "bad" } else { "good" }),
                Some("en"),
                Some(0.9),
                !bad,
            );
        }
        assert!(g.blocks(Some("bad"), Some("en")).is_some());
        assert!(g.blocks(Some("good"), Some("en")).is_none());
        assert!(g.language_threshold(Some("en")).is_some_and(|t| t <= 0.9));
        assert!(!g.snapshot().segments["lang:en"].tripped);
    }

    #[test]
    fn state_survives_a_restart_and_foreign_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("semtel-guards-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("g.json");
        let g = Guards::new(GuardOptions::default());
        for _ in 0..40 {
            g.observe(Some("x"), None, None, false);
        }
        assert!(g.blocks(Some("x"), None).is_some());
        g.save(&p).unwrap();
        let back = Guards::load_or_new(&p, GuardOptions::default()).unwrap();
        assert!(back.blocks(Some("x"), None).is_some());
        std::fs::write(&p, b"{\"hello\": 1}").unwrap();
        assert!(Guards::load_or_new(&p, GuardOptions::default()).is_err());
        assert!(
            Guards::load_or_new(&dir.join("none.json"), GuardOptions::default())
                .unwrap()
                .blocks(Some("x"), None)
                .is_none()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_language_gets_the_threshold_its_audited_rows_support() {
        let g = Guards::new(GuardOptions {
            min_language_rows: 50,
            ..Default::default()
        });
        // Confident rows agree, unconfident ones do not (spread over labels, none of which
        // has enough rows to trip on its own).
        for i in 0..400 {
            let c = i as f32 / 400.0;
            let label = format!("l{}", i % 40);
            g.observe(Some(&label), Some("lt"), Some(c), c >= 0.5);
        }
        let t = g.language_threshold(Some("lt")).unwrap();
        assert!((0.45..=0.55).contains(&t), "{t}");
        assert!(g.language_threshold(Some("en")).is_none());
    }

    #[test]
    fn uncovered_languages_are_on_probation_until_their_own_rows_set_a_threshold() {
        let covered: BTreeMap<String, usize> = [("en".to_string(), 300), ("nl".to_string(), 10)]
            .into_iter()
            .collect();
        let g = Guards::new(GuardOptions {
            min_language_rows: 50,
            ..Default::default()
        })
        .cover(&covered);
        assert!(!g.on_probation(Some("en")));
        assert!(!g.on_probation(None) && !g.on_probation(Some("und")));
        // Ten exemplars are the detector's slips, not a language the index knows.
        assert!(g.on_probation(Some("nl")) && g.on_probation(Some("lt")));
        assert!(g.holds(Some("weather"), Some("lt"), 0.99));
        assert!(!g.holds(Some("weather"), Some("en"), 0.99));
        // Lithuanian rows disagree on one label a third of the time: the label must not trip
        // for every language (probation evidence speaks for the language alone).
        for i in 0..200 {
            let c = i as f32 / 200.0;
            g.observe(Some("weather"), Some("lt"), Some(c), c >= 0.33);
        }
        assert!(g.blocks(Some("weather"), Some("en")).is_none());
        assert!(!g.on_probation(Some("lt")));
        let t = g.language_threshold(Some("lt")).unwrap();
        assert!((0.3..=0.4).contains(&t), "{t}");
        assert!(g.holds(Some("weather"), Some("lt"), t - 0.01));
        assert!(!g.holds(Some("weather"), Some("lt"), t + 0.01));
        assert!(g.snapshot().probation.is_empty());
        g.observe(Some("weather"), Some("nl"), Some(0.9), true);
        assert_eq!(g.snapshot().probation, vec!["nl".to_string()]);
        // A language whose rows never agree keeps none, and that survives the state file.
        for _ in 0..60 {
            g.observe(Some("music"), Some("kk"), Some(0.99), false);
        }
        assert_eq!(g.language_threshold(Some("kk")), Some(KEEP_NONE));
        let dir = std::env::temp_dir().join(format!("semtel-guards-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("g.json");
        g.save(&p).unwrap();
        let back = Guards::load_or_new(&p, GuardOptions::default()).unwrap();
        assert_eq!(back.language_threshold(Some("kk")), Some(KEEP_NONE));
        let _ = std::fs::remove_dir_all(&dir);
        // --guards off: nothing is held.
        let off = Guards::new(GuardOptions {
            enforce: false,
            ..Default::default()
        })
        .cover(&covered);
        assert!(!off.on_probation(Some("lt")));
        assert!(!off.holds(Some("weather"), Some("lt"), 0.99));
    }
}
