//! The compare job (`semtel llm compare`): two LLM configurations (two models, or two prompt
//! versions) label the same sample; the report says how often they agree (raw and Cohen's
//! kappa), where they disagree (label pairs), what each costs, and which exemplars of an index
//! the second would label differently — what a team needs to switch models without silently
//! shifting its dashboards. Both are always asked (the response cache is off here: a cached
//! answer of one would stand in for the other).

use crate::input::InputOptions;
use crate::llm::{LlmConfig, LlmStats};
use crate::pipeline::{Classified, Classifier, ClassifierOptions};
use crate::row::{DecidedBy, OutputRow};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Index whose labels are the schema (and whose neighbours narrow candidates and give
    /// few-shot examples, as in `classify`).
    pub index: PathBuf,
    pub classifier: ClassifierOptions,
    pub input: PathBuf,
    pub input_options: InputOptions,
    /// (name, configuration) of each side.
    pub a: (String, LlmConfig),
    pub b: (String, LlmConfig),
    /// Rows of the input compared (the first readable ones).
    pub rows: usize,
    /// Exemplars of the index sent to B to see which would change label (0: none).
    pub exemplars: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub name: String,
    pub labelled: usize,
    pub failed: usize,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub rows: usize,
    /// Rows both labelled.
    pub compared: usize,
    pub agreement: f64,
    pub kappa: f64,
    pub a: Side,
    pub b: Side,
    /// (A's label, B's label, rows), most frequent first.
    pub confusions: Vec<(String, String, usize)>,
    /// Per label: (rows A gave it, rows B gave it, rows both gave it).
    pub per_label: BTreeMap<String, (usize, usize, usize)>,
    pub exemplars_checked: usize,
    /// (exemplar id, its label in the index, B's label), for those that differ.
    pub exemplars_changed: Vec<(String, String, String)>,
}

fn side(name: &str, out: &[OutputRow], s: &LlmStats) -> Side {
    Side {
        name: name.to_string(),
        labelled: out
            .iter()
            .filter(|r| r.decided_by == DecidedBy::Llm)
            .count(),
        failed: out
            .iter()
            .filter(|r| r.decided_by != DecidedBy::Llm)
            .count(),
        tokens_in: s.tokens_in,
        tokens_out: s.tokens_out,
        cost_usd: s.cost_usd,
    }
}

/// Sends `rows` (already escalated) through a fresh tier for `cfg`; returns every row it
/// produced and its statistics.
pub fn label_all(
    classifier: &Classifier,
    mut cfg: LlmConfig,
    rows: Vec<Classified>,
) -> Result<(Vec<OutputRow>, LlmStats)> {
    cfg.cache = Some("off".into());
    run_tier(super::classify::llm_tier_from(classifier, cfg)?, rows)
}

/// Sends `rows` (already escalated) through `tier` and collects every row it produces, with
/// its statistics; an error that stopped the tier is returned after what it answered is
/// dropped (callers that keep partial answers stream them instead).
pub fn run_tier(
    mut tier: crate::llm::LlmTier,
    rows: Vec<Classified>,
) -> Result<(Vec<OutputRow>, LlmStats)> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<OutputRow>>(64);
    let collector = std::thread::spawn(move || rx.iter().flatten().collect::<Vec<_>>());
    let done = tier.submit_all(rows.chunks(512).map(|c| Ok(c.to_vec())), &tx);
    drop(tx);
    let out = collector
        .join()
        .map_err(|_| Error::Internal("the compare collector panicked".into()))?;
    done.map(|()| (out, tier.stats.clone()))
}

/// Cohen's kappa of two label sequences (same length).
pub fn cohen_kappa(a: &[&str], b: &[&str]) -> f64 {
    let n = a.len() as f64;
    if a.is_empty() {
        return 0.0;
    }
    let agree = a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / n;
    let mut ca: HashMap<&str, f64> = HashMap::new();
    let mut cb: HashMap<&str, f64> = HashMap::new();
    for (x, y) in a.iter().zip(b) {
        *ca.entry(x).or_default() += 1.0;
        *cb.entry(y).or_default() += 1.0;
    }
    let pe: f64 = ca
        .iter()
        .map(|(l, c)| c / n * cb.get(l).copied().unwrap_or(0.0) / n)
        .sum();
    if pe >= 1.0 {
        return 1.0;
    }
    (agree - pe) / (1.0 - pe)
}

pub fn run(o: &CompareOptions) -> Result<CompareReport> {
    let forced = Classifier::open(
        &o.index,
        &ClassifierOptions {
            threshold: Some(f32::INFINITY),
            ..o.classifier.clone()
        },
    )?;
    let mut reader = crate::input::open(&o.input, &o.input_options)?;
    let mut rows = Vec::new();
    while rows.len() < o.rows {
        let Some(batch) = reader.next_batch()? else {
            break;
        };
        rows.extend(batch.into_iter().filter(|r| r.content.is_ok()));
    }
    rows.truncate(o.rows);
    let items: Vec<Classified> = forced
        .classify(rows)?
        .into_iter()
        .filter(|c| c.content.is_some())
        .collect();
    let n = items.len();
    let (out_a, st_a) = label_all(&forced, o.a.1.clone(), items.clone())?;
    let (out_b, st_b) = label_all(&forced, o.b.1.clone(), items)?;
    let label_of = |out: &[OutputRow]| -> HashMap<String, String> {
        out.iter()
            .filter(|r| r.decided_by == DecidedBy::Llm)
            .filter_map(|r| r.label.clone().map(|l| (r.id.clone(), l)))
            .collect()
    };
    let (la, lb) = (label_of(&out_a), label_of(&out_b));
    let mut pairs: Vec<(&str, &str)> = la
        .iter()
        .filter_map(|(id, a)| lb.get(id).map(|b| (a.as_str(), b.as_str())))
        .collect();
    pairs.sort();
    let (xa, xb): (Vec<&str>, Vec<&str>) = pairs.iter().copied().unzip();
    let compared = pairs.len();
    let agreement = pairs.iter().filter(|(a, b)| a == b).count() as f64 / compared.max(1) as f64;
    let mut conf: HashMap<(&str, &str), usize> = HashMap::new();
    let mut per_label: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for &(a, b) in &pairs {
        per_label.entry(a.to_string()).or_default().0 += 1;
        per_label.entry(b.to_string()).or_default().1 += 1;
        if a == b {
            per_label.entry(a.to_string()).or_default().2 += 1;
        } else {
            *conf.entry((a, b)).or_default() += 1;
        }
    }
    let mut confusions: Vec<(String, String, usize)> = conf
        .into_iter()
        .map(|((a, b), c)| (a.to_string(), b.to_string(), c))
        .collect();
    confusions.sort_by(|x, y| y.2.cmp(&x.2).then_with(|| (&x.0, &x.1).cmp(&(&y.0, &y.1))));
    confusions.truncate(30);
    // Exemplars B would label differently from the index.
    let mut exemplars_changed = Vec::new();
    let mut checked = 0;
    if o.exemplars > 0 {
        let ex: Vec<(String, String, String)> = forced
            .index
            .exemplars()
            .iter()
            .take(o.exemplars)
            .map(|e| (e.id.clone(), e.label.clone(), e.text.clone()))
            .collect();
        let rows: Vec<crate::conversation::Row> = ex
            .iter()
            .enumerate()
            .map(|(i, (id, _, text))| crate::conversation::Row {
                index: i as u64,
                id: id.clone(),
                content: Ok(crate::conversation::Content::Text(text.clone())),
                label: None,
                passthrough: Vec::new(),
            })
            .collect();
        let items: Vec<Classified> = forced
            .classify(rows)?
            .into_iter()
            .filter(|c| c.content.is_some())
            .collect();
        checked = items.len();
        let (out, _) = label_all(&forced, o.b.1.clone(), items)?;
        let got = label_of(&out);
        for (id, stored, _) in &ex {
            if let Some(b) = got.get(id) {
                if b != stored {
                    exemplars_changed.push((id.clone(), stored.clone(), b.clone()));
                }
            }
        }
    }
    Ok(CompareReport {
        rows: n,
        compared,
        agreement,
        kappa: cohen_kappa(&xa, &xb),
        a: side(&o.a.0, &out_a, &st_a),
        b: side(&o.b.0, &out_b, &st_b),
        confusions,
        per_label,
        exemplars_checked: checked,
        exemplars_changed,
    })
}

#[cfg(test)]
mod tests {
    use super::cohen_kappa;

    #[test]
    fn kappa_matches_hand_computed_values() {
        // Perfect agreement.
        assert!((cohen_kappa(&["a", "b", "a"], &["a", "b", "a"]) - 1.0).abs() < 1e-12);
        // 2×2 table: a/a 20, a/b 5, b/a 10, b/b 15 → po 0.7, pe 0.5·0.6 + 0.5·0.4 = 0.5.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (a, b, n) in [
            ("a", "a", 20),
            ("a", "b", 5),
            ("b", "a", 10),
            ("b", "b", 15),
        ] {
            for _ in 0..n {
                x.push(a);
                y.push(b);
            }
        }
        assert!((cohen_kappa(&x, &y) - 0.4).abs() < 1e-12);
    }
}
