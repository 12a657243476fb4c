//! Decision: from the k nearest exemplars to a label, a confidence and a verdict — keep the
//! kNN label (`knn`) or hand the row to the LLM tier (`escalate`).
//!
//! The vote is similarity-weighted: each neighbour adds its cosine similarity (floored at 0) to
//! its label. Confidence signals: the winning label's share of the total weight (`vote`), the
//! gap between the two best shares (`margin`) and the nearest exemplar's similarity (`top1`).
//! This module is pure arithmetic: it must never embed, search or do I/O.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// Similarity-weighted vote share of the winning label.
    Vote,
    /// Vote share × top-1 similarity (the default: separates unanimous-but-distant votes).
    #[default]
    #[serde(rename = "vote_sim")]
    VoteSim,
    /// Winner's share minus runner-up's share.
    Margin,
    /// Cosine similarity of the nearest exemplar.
    Top1,
    /// The learned head's probability for its label (needs `semtel calibrate`).
    Head,
    /// The head's top-1 minus top-2 probability.
    HeadMargin,
    /// Mean of the head's probabilities and the kNN vote distribution.
    HeadKnn,
}

/// Every signal an index can offer, in the order reports list them.
pub const ALL_SIGNALS: [Signal; 7] = [
    Signal::VoteSim,
    Signal::Vote,
    Signal::Margin,
    Signal::Top1,
    Signal::Head,
    Signal::HeadMargin,
    Signal::HeadKnn,
];

impl Signal {
    pub fn name(&self) -> &'static str {
        match self {
            Signal::Vote => "vote",
            Signal::VoteSim => "vote_sim",
            Signal::Margin => "margin",
            Signal::Top1 => "top1",
            Signal::Head => "head",
            Signal::HeadMargin => "head_margin",
            Signal::HeadKnn => "head_knn",
        }
    }

    pub fn needs_head(&self) -> bool {
        matches!(self, Signal::Head | Signal::HeadMargin | Signal::HeadKnn)
    }
}

impl std::str::FromStr for Signal {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vote" => Ok(Signal::Vote),
            "vote_sim" => Ok(Signal::VoteSim),
            "margin" => Ok(Signal::Margin),
            "top1" => Ok(Signal::Top1),
            "head" => Ok(Signal::Head),
            "head_margin" => Ok(Signal::HeadMargin),
            "head_knn" => Ok(Signal::HeadKnn),
            _ => Err(format!(
                "unknown confidence signal `{s}` (vote_sim, vote, margin, top1, head, head_margin, head_knn)"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// Winning label (index into the index's label list); `None` with no neighbours.
    pub label: Option<u32>,
    pub share: f32,
    pub margin: f32,
    pub top1_sim: f32,
}

impl Vote {
    /// The kNN signals (head signals are not the vote's: see [`Scores`]).
    pub fn signal(&self, s: Signal) -> f32 {
        match s {
            Signal::Vote => self.share,
            Signal::VoteSim => self.share * self.top1_sim.max(0.0),
            Signal::Margin => self.margin,
            Signal::Top1 => self.top1_sim,
            Signal::Head | Signal::HeadMargin | Signal::HeadKnn => f32::NEG_INFINITY,
        }
    }
}

/// A label with a probability-like confidence and its gap to the runner-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    pub label: u32,
    pub p: f32,
    pub margin: f32,
}

impl Pick {
    pub fn of(probs: &[f32]) -> Option<Pick> {
        let mut best: Option<(usize, f32)> = None;
        let mut second = 0f32;
        for (i, &p) in probs.iter().enumerate() {
            match best {
                Some((_, bp)) if p <= bp => second = second.max(p),
                Some((_, bp)) => {
                    second = bp;
                    best = Some((i, p));
                }
                None => best = Some((i, p)),
            }
        }
        best.map(|(i, p)| Pick {
            label: i as u32,
            p,
            margin: p - second,
        })
    }
}

/// Everything known about one row's label: the kNN vote and, with a head, its probabilities
/// alone and mixed with the vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub vote: Vote,
    pub head: Option<Pick>,
    pub mix: Option<Pick>,
}

impl Scores {
    /// (label, confidence) under a signal; head signals fall back to the vote without a head.
    pub fn decision(&self, s: Signal) -> (Option<u32>, f32) {
        match (s, &self.head, &self.mix) {
            (Signal::Head, Some(h), _) => (Some(h.label), h.p),
            (Signal::HeadMargin, Some(h), _) => (Some(h.label), h.margin),
            (Signal::HeadKnn, _, Some(m)) => (Some(m.label), m.p),
            (s, _, _) if !s.needs_head() => (self.vote.label, self.vote.signal(s)),
            _ => (self.vote.label, self.vote.signal(Signal::VoteSim)),
        }
    }
}

/// The vote as a distribution over labels (weights normalised to 1).
pub fn vote_distribution(neighbors: &[(u32, f32)], n_labels: usize) -> Vec<f32> {
    let mut d = vec![0f32; n_labels];
    let mut total = 0.0;
    for &(l, sim) in neighbors {
        let w = sim.max(0.0);
        d[l as usize] += w;
        total += w;
    }
    if total > 0.0 {
        d.iter_mut().for_each(|x| *x /= total);
    }
    d
}

/// Similarity-weighted vote over `neighbors` (key, similarity), best first, with each key's
/// label from `label_of`. `scratch` must have one slot per label and be all zeros; it is left
/// all zeros.
pub fn vote(neighbors: &[(u64, f32)], label_of: &[u32], scratch: &mut [f32]) -> Vote {
    let labeled: Vec<(u32, f32)> = neighbors
        .iter()
        .map(|&(k, s)| (label_of[k as usize], s))
        .collect();
    vote_labeled(&labeled, scratch)
}

/// The vote over (label, similarity) pairs, best first.
pub fn vote_labeled(neighbors: &[(u32, f32)], scratch: &mut [f32]) -> Vote {
    let Some(&(_, top1)) = neighbors.first() else {
        return Vote {
            label: None,
            share: 0.0,
            margin: 0.0,
            top1_sim: 0.0,
        };
    };
    let mut total = 0f32;
    for &(l, sim) in neighbors {
        let w = sim.max(0.0);
        scratch[l as usize] += w;
        total += w;
    }
    // Best and runner-up; ties go to the label of the nearer neighbour (visited first).
    let mut best: Option<(u32, f32)> = None;
    let mut second = 0f32;
    for &(l, _) in neighbors {
        let w = scratch[l as usize];
        if w < 0.0 {
            continue; // already visited (marked below)
        }
        match best {
            None => best = Some((l, w)),
            Some((_, bw)) if w > bw => {
                second = bw;
                best = Some((l, w));
            }
            Some(_) => second = second.max(w),
        }
        scratch[l as usize] = -1.0;
    }
    for &(l, _) in neighbors {
        scratch[l as usize] = 0.0;
    }
    let (label, w) = best.expect("non-empty neighbours");
    let (share, margin) = if total > 0.0 {
        (w / total, (w - second) / total)
    } else {
        (0.0, 0.0)
    };
    Vote {
        label: Some(label),
        share,
        margin,
        top1_sim: top1,
    }
}

/// A multi-label decision: the labels at least half of the (distinct) neighbours' weight
/// supports, and how decisive the vote was.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiVote {
    pub labels: Vec<u32>,
    /// min over labels that got any weight of max(share, 1 − share): 1.0 when every label
    /// is unanimously in or out.
    pub confidence: f32,
    pub top1_sim: f32,
}

/// Multi-label vote: `neighbors` are (group, label, similarity) with one entry per label of a
/// neighbour (a group is one exemplar row), best first; the first `k` groups vote.
pub fn multi_vote(neighbors: &[(u64, u32, f32)], k: usize) -> MultiVote {
    let mut groups: Vec<u64> = Vec::new();
    let mut total = 0f32;
    let mut weight: std::collections::BTreeMap<u32, f32> = Default::default();
    for &(g, l, sim) in neighbors {
        let new = !groups.contains(&g);
        if new {
            if groups.len() == k {
                continue;
            }
            groups.push(g);
            total += sim.max(0.0);
        }
        *weight.entry(l).or_default() += sim.max(0.0);
    }
    let top1_sim = neighbors.first().map_or(0.0, |x| x.2);
    if total <= 0.0 {
        return MultiVote {
            labels: Vec::new(),
            confidence: 0.0,
            top1_sim,
        };
    }
    let mut labels: Vec<u32> = weight
        .iter()
        .filter(|(_, w)| **w / total >= 0.5)
        .map(|(l, _)| *l)
        .collect();
    if labels.is_empty() {
        if let Some((l, _)) = weight.iter().max_by(|a, b| a.1.partial_cmp(b.1).unwrap()) {
            labels.push(*l);
        }
    }
    let confidence = weight
        .values()
        .map(|w| {
            let s = w / total;
            s.max(1.0 - s)
        })
        .fold(1.0f32, f32::min);
    MultiVote {
        labels,
        confidence,
        top1_sim,
    }
}

/// Thresholds that turn a confidence into keep-or-escalate.
#[derive(Debug, Clone)]
pub struct Thresholds {
    pub signal: Signal,
    pub global: f32,
    /// Per-label overrides, by label index (NaN = use `global`).
    pub per_label: Vec<f32>,
}

impl Thresholds {
    pub fn global(signal: Signal, t: f32, n_labels: usize) -> Self {
        Thresholds {
            signal,
            global: t,
            per_label: vec![f32::NAN; n_labels],
        }
    }

    pub fn for_label(&self, label: u32) -> f32 {
        let t = self
            .per_label
            .get(label as usize)
            .copied()
            .unwrap_or(f32::NAN);
        if t.is_nan() {
            self.global
        } else {
            t
        }
    }

    /// True when the confidence is high enough to keep the kNN label.
    pub fn keep(&self, label: Option<u32>, confidence: f32) -> bool {
        match label {
            Some(l) => confidence >= self.for_label(l),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_vote_share_and_margin() {
        // labels: key0→A(0), key1→B(1), key2→A(0)
        let label_of = [0, 1, 0];
        let mut scratch = vec![0.0; 2];
        let v = vote(&[(0, 0.9), (1, 0.8), (2, 0.5)], &label_of, &mut scratch);
        assert_eq!(v.label, Some(0));
        assert!((v.share - 1.4 / 2.2).abs() < 1e-6);
        assert!((v.margin - 0.6 / 2.2).abs() < 1e-6);
        assert_eq!(v.top1_sim, 0.9);
        assert!(scratch.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn tie_goes_to_nearest() {
        let label_of = [1, 0];
        let mut scratch = vec![0.0; 2];
        let v = vote(&[(0, 0.7), (1, 0.7)], &label_of, &mut scratch);
        assert_eq!(v.label, Some(1));
        assert_eq!(v.margin, 0.0);
    }

    #[test]
    fn per_label_threshold_overrides_global() {
        let mut t = Thresholds::global(Signal::Vote, 0.5, 2);
        t.per_label[1] = 0.9;
        assert!(t.keep(Some(0), 0.6));
        assert!(!t.keep(Some(1), 0.6));
        assert!(!t.keep(None, 1.0));
    }
}
