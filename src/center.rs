//! Per-language centring: the index's vector space, made closer to language-neutral.
//!
//! A multilingual encoder places the same request in two languages near each other, but every
//! language also carries its own offset: Danish questions about flights sit, as a cloud, a
//! constant vector away from English questions about flights. With English exemplars, that
//! offset drowns the topic signal of a Danish query. Subtracting each language's mean vector
//! (and re-normalising) removes most of it; on xSID this lifts multilingual-e5-small from 1 to
//! 8 of 12 languages within 10 points of English (README, Encoders).
//!
//! - Exemplars are centred with their language's mean over the index's exemplars when the
//!   language has at least [`MIN_LANGUAGE_ROWS`] of them, else with the mean of all exemplars.
//! - Queries in such a language are centred with the same stored mean. Queries in a language
//!   the index has (almost) no exemplars of are centred with a running mean over the traffic
//!   seen so far in that language, shrunk towards the mean of all exemplars by
//!   [`PRIOR_ROWS`] pseudo-rows so that the first few rows are not centred on themselves.
//!   The running means live in the classifier ([`QuerySpace`]) for the run or the service's
//!   life and are never written to the index: the same index and input give the same labels.
//!
//! Languages are the detector's (`crate::lang`), including its guesses on short text: grouping
//! only on confident detections was measured and loses most of the gain on short foreign
//! queries (README, Encoders).
//!
//! Whether an index is centred is recorded in its manifest (`centering`); the index holds
//! centred vectors then, and everything that searches it goes through [`QuerySpace::place`].
//! This module must never detect languages, read files or search: it is arithmetic on vectors.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Exemplars a language needs before its own mean is trusted (below that, the mean of 30
/// unit vectors of 384 dims is still mostly noise on each axis).
pub const MIN_LANGUAGE_ROWS: u64 = 30;

/// Pseudo-rows of the all-exemplar mean behind a traffic estimate. On xSID, 8 and 32 gave the
/// same accuracy within a point; 16 sits between them.
pub const PRIOR_ROWS: f32 = 16.0;

/// Whether to centre an index's vectors per language (`index build --center-languages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CenterChoice {
    /// On for encoders trained on several languages, off for single-language ones (there is no
    /// second language to align, and the default model's figures stay as they were).
    #[default]
    Auto,
    On,
    Off,
}

impl CenterChoice {
    pub fn parse(s: &str) -> Option<CenterChoice> {
        match s {
            "auto" => Some(CenterChoice::Auto),
            "on" | "true" | "yes" => Some(CenterChoice::On),
            "off" | "false" | "no" => Some(CenterChoice::Off),
            _ => None,
        }
    }

    /// The choice for an encoder trained on `languages`.
    pub fn wanted(self, languages: &crate::model::Languages) -> bool {
        match self {
            CenterChoice::On => true,
            CenterChoice::Off => false,
            CenterChoice::Auto => match languages {
                crate::model::Languages::Multilingual => true,
                crate::model::Languages::Only(l) => l.len() > 1,
                crate::model::Languages::Unknown => false,
            },
        }
    }
}

/// A language's mean over the index's exemplars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LanguageMean {
    pub rows: u64,
    pub mean: Vec<f32>,
}

/// The centring an index was built with (stored in its manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Centering {
    /// Mean of every exemplar's model vector.
    pub all: Vec<f32>,
    /// Languages with at least [`MIN_LANGUAGE_ROWS`] exemplars.
    pub languages: BTreeMap<String, LanguageMean>,
    /// Pseudo-rows behind a traffic estimate ([`PRIOR_ROWS`] when built).
    pub prior_rows: f32,
}

impl Centering {
    /// Fits the means from the exemplars' model vectors (`vectors.len() == langs.len() * dims`).
    pub fn fit(vectors: &[f32], dims: usize, langs: &[Option<&str>]) -> Centering {
        let mut all = vec![0f64; dims];
        let mut per: BTreeMap<&str, (Vec<f64>, u64)> = BTreeMap::new();
        let mut n = 0u64;
        for (v, l) in vectors.chunks_exact(dims).zip(langs) {
            if !v.iter().all(|x| x.is_finite()) {
                continue;
            }
            add(&mut all, v);
            n += 1;
            if let Some(l) = l {
                let e = per.entry(l).or_insert_with(|| (vec![0f64; dims], 0));
                add(&mut e.0, v);
                e.1 += 1;
            }
        }
        let languages = per
            .into_iter()
            .filter(|(_, (_, c))| *c >= MIN_LANGUAGE_ROWS)
            .map(|(l, (s, c))| {
                (
                    l.to_string(),
                    LanguageMean {
                        rows: c,
                        mean: s.iter().map(|x| (x / c as f64) as f32).collect(),
                    },
                )
            })
            .collect();
        Centering {
            all: all.iter().map(|x| (x / n.max(1) as f64) as f32).collect(),
            languages,
            prior_rows: PRIOR_ROWS,
        }
    }

    pub fn dims(&self) -> usize {
        self.all.len()
    }

    /// The mean an exemplar in `lang` is centred with.
    pub fn exemplar_mean(&self, lang: Option<&str>) -> &[f32] {
        lang.and_then(|l| self.languages.get(l))
            .map_or(&self.all[..], |m| &m.mean[..])
    }

    /// Centres exemplar vectors in place (`vectors.len() == langs.len() * dims`).
    pub fn place_exemplars(&self, vectors: &mut [f32], langs: &[Option<&str>]) {
        let d = self.dims();
        for (v, l) in vectors.chunks_exact_mut(d).zip(langs) {
            center(v, self.exemplar_mean(*l));
        }
    }
}

fn add(sum: &mut [f64], v: &[f32]) {
    for (s, x) in sum.iter_mut().zip(v) {
        *s += *x as f64;
    }
}

/// `v - mean`, re-normalised. A vector that (nearly) equals the mean has no direction left; it
/// keeps its own normalised direction instead of becoming zero or NaN.
pub fn center(v: &mut [f32], mean: &[f32]) {
    if mean.len() != v.len() {
        return;
    }
    let mut norm = 0f64;
    for (x, m) in v.iter().zip(mean) {
        let y = (*x - *m) as f64;
        norm += y * y;
    }
    let norm = norm.sqrt();
    if norm.is_finite() && norm > 1e-6 {
        for (x, m) in v.iter_mut().zip(mean) {
            *x = ((*x - *m) as f64 / norm) as f32;
        }
    } else {
        let own = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        if own.is_finite() && own > 0.0 {
            for x in v.iter_mut() {
                *x = (*x as f64 / own) as f32;
            }
        }
    }
}

/// An index's centring plus the running means of the traffic in languages it has no mean for.
/// Shared by the threads of a run or a service (the running sums sit behind a mutex, touched
/// once per chunk).
pub struct QuerySpace {
    centering: Centering,
    traffic: Mutex<HashMap<String, (Vec<f64>, u64)>>,
}

impl QuerySpace {
    pub fn new(centering: Centering) -> QuerySpace {
        QuerySpace {
            centering,
            traffic: Mutex::new(HashMap::new()),
        }
    }

    pub fn centering(&self) -> &Centering {
        &self.centering
    }

    /// Model vectors of a chunk of queries (`raw.len() == langs.len() * dims`) moved into the
    /// index's space. The chunk's rows join the running means before any of them is centred,
    /// so rows of one chunk are treated alike whatever their order within it.
    pub fn place(&self, raw: &[f32], langs: &[Option<&str>]) -> Vec<f32> {
        let d = self.centering.dims();
        let mut out = raw.to_vec();
        let mut means: HashMap<&str, Vec<f32>> = HashMap::new();
        {
            let mut traffic = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
            for (v, l) in raw.chunks_exact(d).zip(langs) {
                let Some(l) = l else { continue };
                if self.centering.languages.contains_key(*l) || !v.iter().all(|x| x.is_finite()) {
                    continue;
                }
                let e = traffic
                    .entry(l.to_string())
                    .or_insert_with(|| (vec![0f64; d], 0));
                add(&mut e.0, v);
                e.1 += 1;
            }
            let k = self.centering.prior_rows.max(0.0) as f64;
            for l in langs.iter().flatten() {
                if means.contains_key(l) || self.centering.languages.contains_key(*l) {
                    continue;
                }
                if let Some((sum, n)) = traffic.get(*l) {
                    let m = sum
                        .iter()
                        .zip(&self.centering.all)
                        .map(|(s, a)| ((s + k * *a as f64) / (*n as f64 + k).max(1e-9)) as f32)
                        .collect();
                    means.insert(l, m);
                }
            }
        }
        for (v, l) in out.chunks_exact_mut(d).zip(langs) {
            let mean = match l {
                Some(l) => means
                    .get(l)
                    .map(|m| &m[..])
                    .unwrap_or_else(|| self.centering.exemplar_mean(Some(l))),
                None => &self.centering.all[..],
            };
            center(v, mean);
        }
        out
    }

    /// Traffic rows seen per language without an exemplar mean.
    #[cfg(test)]
    fn traffic_rows(&self) -> BTreeMap<String, u64> {
        let t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|(l, (_, n))| (l.clone(), *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn a_constant_language_offset_is_removed() {
        // Two "topics" along axes 0 and 1; language B adds an offset along axis 2 that is larger
        // than the topic signal, so before centring every B row is nearer to B rows than to its
        // topic's A rows.
        let dims = 4;
        // `n` unit rows alternating between the two topics, shifted by `offset` on axis 2.
        let two_topics = |n: usize, offset: f32| -> Vec<f32> {
            (0..n)
                .flat_map(|i| {
                    let (a, b, c) = if i % 2 == 0 {
                        (1.0, 0.1, 0.05)
                    } else {
                        (0.1, 1.0, -0.05)
                    };
                    unit(&[a, b, offset, c])
                })
                .collect()
        };
        let ex = two_topics(40, 0.0);
        let langs = vec![Some("en"); 40];
        let c = Centering::fit(&ex, dims, &langs);
        assert_eq!(c.languages["en"].rows, 40);
        let mut placed = ex.clone();
        c.place_exemplars(&mut placed, &langs);
        let q = QuerySpace::new(c);
        let queries = two_topics(64, 3.0);
        let qlangs = vec![Some("xx"); 64];
        let out = q.place(&queries, &qlangs);
        assert_eq!(q.traffic_rows()["xx"], 64);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for (i, v) in out.chunks(dims).enumerate() {
            let same = &placed[(i % 2) * dims..(i % 2 + 1) * dims];
            let other = &placed[((i + 1) % 2) * dims..((i + 1) % 2 + 1) * dims];
            assert!(dot(v, same) > dot(v, other) + 0.5, "row {i}: {v:?}");
        }
    }

    #[test]
    fn few_rows_lean_on_the_prior_and_small_languages_use_all() {
        let dims = 3;
        let ex: Vec<f32> = (0..10).flat_map(|_| unit(&[1.0, 1.0, 0.0])).collect();
        let langs = vec![Some("en"); 10];
        let c = Centering::fit(&ex, dims, &langs);
        // Ten rows are too few for a language mean of its own.
        assert!(c.languages.is_empty());
        assert_eq!(c.exemplar_mean(Some("en")), &c.all[..]);
        // One query alone is not centred on itself (which would leave nothing).
        let q = QuerySpace::new(c);
        let v = unit(&[0.0, 0.0, 1.0]);
        let out = q.place(&v, &[Some("de")]);
        assert!(out.iter().all(|x| x.is_finite()));
        let n: f32 = out.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
        assert!(out[2] > 0.6, "{out:?}");
    }

    #[test]
    fn a_vector_equal_to_the_mean_keeps_its_direction() {
        let mut v = vec![0.6, 0.8];
        center(&mut v, &[0.6, 0.8]);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0, 0.0];
        center(&mut z, &[0.6, 0.8]);
        assert!(z.iter().all(|x| x.is_finite()));
    }

    proptest! {
        #[test]
        fn placing_never_yields_nan(
            rows in proptest::collection::vec(proptest::collection::vec(-1e3f32..1e3, 3), 1..20),
            langs in proptest::collection::vec(proptest::option::of(0u8..3), 1..20),
        ) {
            let n = rows.len().min(langs.len());
            let flat: Vec<f32> = rows[..n].iter().flatten().copied().collect();
            let names = ["en", "de", "zh"];
            let ls: Vec<Option<&str>> = langs[..n].iter().map(|l| l.map(|i| names[i as usize])).collect();
            let c = Centering::fit(&flat, 3, &ls);
            let mut ex = flat.clone();
            c.place_exemplars(&mut ex, &ls);
            prop_assert!(ex.iter().all(|x| x.is_finite()));
            let out = QuerySpace::new(c).place(&flat, &ls);
            prop_assert_eq!(out.len(), flat.len());
            prop_assert!(out.iter().all(|x| x.is_finite()));
        }
    }
}
