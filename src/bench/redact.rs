//! `semtel bench redact`: the redaction stage on a labelled PII set (per-type precision and
//! recall, values that would still leave, throughput), side by side with Microsoft Presidio
//! on the same set in the same run (its runner is `benches/pii/presidio_run.py`, in a venv of
//! its own: `benches/pii/setup-presidio.sh`).
//!
//! One matcher scores both: a gold span is found when the predictions of its type cover at
//! least 80 % of its characters (half a name still leaks); a prediction is right when it covers
//! 80 % of a gold span of its type, or lies (80 %) inside one that is found in pieces. This
//! module never prints.

use crate::pii::{Level, Redactor, Rules};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct RedactBenchOptions {
    /// The labelled set: `{"text", "spans": [{"start", "end", "type"}]}` per line, offsets in
    /// characters (`benches/pii/make_pii_set.py` writes it).
    pub set: PathBuf,
    pub level: Level,
    pub rules: Rules,
    /// Timed passes over the set (the median is reported).
    pub repeats: usize,
    /// A Python with Presidio installed: its runs are added when given.
    pub presidio: Option<PathBuf>,
    /// Presidio modes to run: `patterns`, `full`.
    pub presidio_modes: Vec<String>,
    /// Also embed the same texts with this encoder (what redaction is compared against: the
    /// cost every row pays anyway).
    pub encoder: Option<crate::embed::EncoderOptions>,
    pub work: PathBuf,
}

/// Precision and recall of one type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeScore {
    pub gold: usize,
    pub predicted: usize,
    pub true_positives: usize,
    pub found: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// One category of rows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CategoryScore {
    pub rows: usize,
    pub gold: usize,
    pub found: usize,
    pub recall: f64,
    /// Predictions on the category's rows that hold no gold span.
    pub false_alarms: usize,
}

/// One tool on the set.
#[derive(Debug, Clone, Serialize)]
pub struct ToolRun {
    pub tool: String,
    pub by_type: BTreeMap<String, TypeScore>,
    /// Recall by the rows' `category` (sets that have one: `benches/pii/make_typed_set.py`);
    /// for a category of rows without spans (`near_miss`), its false alarms.
    pub by_category: BTreeMap<String, CategoryScore>,
    /// Predictions of types outside semtel's (Presidio's DATE_TIME, NRP, …): counted apart.
    pub other_predictions: usize,
    /// Predictions on the near-miss rows (rows without any gold span).
    pub false_alarms_on_clean_rows: usize,
    pub seconds: f64,
    pub chars_per_s: f64,
    pub texts_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedactBench {
    pub rows: usize,
    pub chars: usize,
    pub runs: Vec<ToolRun>,
    /// Gold values that semtel's redacted text still contains verbatim, by type.
    pub semtel_leaked: BTreeMap<String, usize>,
    /// Embedding the same texts on the same threads: (encoder, seconds, chars/s).
    pub embedding: Option<(String, f64, f64)>,
    /// Redaction time over embedding time for the same texts (single-threaded redaction
    /// against the encoder on every thread).
    pub redaction_vs_embedding: Option<f64>,
}

struct Row {
    text: String,
    gold: Vec<(usize, usize, String)>,
    category: Option<String>,
}

/// `[{"start", "end", "type"}, …]` (character offsets) as spans; malformed entries are skipped.
fn spans(v: &serde_json::Value) -> Vec<(usize, usize, String)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    Some((
                        s["start"].as_u64()? as usize,
                        s["end"].as_u64()? as usize,
                        s["type"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn read_set(p: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::Config(format!("{}:{}: {e}", p.display(), i + 1)))?;
        let t = v["text"].as_str().unwrap_or_default().to_string();
        let gold = spans(&v["spans"]);
        let category = v["category"].as_str().map(str::to_string);
        rows.push(Row {
            text: t,
            gold,
            category,
        });
    }
    Ok(rows)
}

/// Byte offset → character offset, for each span end.
fn char_offsets(text: &str, spans: &[crate::pii::Span]) -> Vec<(usize, usize, String)> {
    spans
        .iter()
        .map(|s| {
            (
                text[..s.start].chars().count(),
                text[..s.end].chars().count(),
                s.kind.name().to_string(),
            )
        })
        .collect()
}

fn score(
    tool: &str,
    rows: &[Row],
    predicted: &[Vec<(usize, usize, String)>],
    seconds: f64,
) -> ToolRun {
    let mut by: BTreeMap<String, TypeScore> = BTreeMap::new();
    let mut cats: BTreeMap<String, CategoryScore> = BTreeMap::new();
    let mut other = 0;
    let mut clean_alarms = 0;
    for (row, pred) in rows.iter().zip(predicted) {
        let cat = row.category.as_ref().map(|c| {
            let e = cats.entry(c.clone()).or_default();
            e.rows += 1;
            e.gold += row.gold.len();
            c.clone()
        });
        for (_, _, t) in &row.gold {
            by.entry(t.clone()).or_default().gold += 1;
        }
        let ov =
            |(s, e): (usize, usize), (gs, ge): (usize, usize)| e.min(ge).saturating_sub(s.max(gs));
        // A gold span is found when the predictions of its type cover ≥ 80 % of its characters
        // (a name cut in half still leaks).
        let mut found = vec![false; row.gold.len()];
        for (i, (gs, ge, gt)) in row.gold.iter().enumerate() {
            let mut covered = vec![false; ge - gs];
            for (s, e, t) in pred {
                if t == gt {
                    for c in (*s).max(*gs)..(*e).min(*ge) {
                        covered[c - gs] = true;
                    }
                }
            }
            found[i] = covered.iter().filter(|&&c| c).count() * 5 >= (ge - gs) * 4;
            if found[i] {
                by.entry(gt.clone()).or_default().found += 1;
                if let Some(c) = &cat {
                    cats.entry(c.clone()).or_default().found += 1;
                }
            }
        }
        for (s, e, t) in pred {
            if t == "OTHER" {
                other += 1;
                continue;
            }
            if row.gold.is_empty() {
                clean_alarms += 1;
                if let Some(c) = &cat {
                    cats.entry(c.clone()).or_default().false_alarms += 1;
                }
            }
            let entry = by.entry(t.clone()).or_default();
            entry.predicted += 1;
            // Right: it covers most of a gold span of its type, or lies inside one that the
            // predictions cover (a value found in pieces).
            let right = row.gold.iter().enumerate().any(|(i, (gs, ge, gt))| {
                let o = ov((*s, *e), (*gs, *ge));
                gt == t && o > 0 && (o * 5 >= (ge - gs) * 4 || (o * 5 >= (e - s) * 4 && found[i]))
            });
            if right {
                entry.true_positives += 1;
            }
        }
    }
    for s in by.values_mut() {
        s.precision = if s.predicted > 0 {
            s.true_positives as f64 / s.predicted as f64
        } else {
            f64::NAN
        };
        s.recall = if s.gold > 0 {
            s.found as f64 / s.gold as f64
        } else {
            f64::NAN
        };
        s.f1 = if s.precision + s.recall > 0.0 {
            2.0 * s.precision * s.recall / (s.precision + s.recall)
        } else {
            0.0
        };
    }
    for c in cats.values_mut() {
        c.recall = if c.gold > 0 {
            c.found as f64 / c.gold as f64
        } else {
            f64::NAN
        };
    }
    let chars: usize = rows.iter().map(|r| r.text.chars().count()).sum();
    ToolRun {
        tool: tool.to_string(),
        by_type: by,
        by_category: cats,
        other_predictions: other,
        false_alarms_on_clean_rows: clean_alarms,
        seconds,
        chars_per_s: chars as f64 / seconds.max(1e-9),
        texts_per_s: rows.len() as f64 / seconds.max(1e-9),
    }
}

pub fn redact_benchmark(
    o: &RedactBenchOptions,
    report: &mut dyn FnMut(&str),
) -> Result<RedactBench> {
    let rows = read_set(&o.set)?;
    let red = Redactor::new(o.level, &o.rules)?;
    let mut times = Vec::new();
    let mut predicted = Vec::new();
    for _ in 0..o.repeats.max(1) {
        let t = Instant::now();
        let p: Vec<Vec<crate::pii::Span>> = rows.iter().map(|r| red.find(&r.text)).collect();
        times.push(t.elapsed().as_secs_f64());
        predicted = p;
    }
    let preds: Vec<_> = rows
        .iter()
        .zip(&predicted)
        .map(|(r, p)| char_offsets(&r.text, p))
        .collect();
    let secs = super::median(&times);
    let mut runs = vec![score(
        &format!("semtel ({})", o.level.as_str()),
        &rows,
        &preds,
        secs,
    )];
    report(&format!(
        "semtel {}: {} texts in {:.4} s",
        o.level.as_str(),
        rows.len(),
        secs
    ));
    // Values that would still leave: each gold value's text, looked for in the redacted text.
    let mut leaked = BTreeMap::new();
    for r in &rows {
        let out = red.redact(&r.text).text;
        for (s, e, t) in &r.gold {
            let v: String = r.text.chars().skip(*s).take(e - s).collect();
            if out.contains(v.trim()) {
                *leaked.entry(t.clone()).or_insert(0) += 1;
            }
        }
    }
    if let Some(py) = &o.presidio {
        std::fs::create_dir_all(&o.work).map_err(|e| Error::io(&o.work, e))?;
        let script = [
            PathBuf::from("benches/pii/presidio_run.py"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pii/presidio_run.py"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Config("benches/pii/presidio_run.py not found: run from the repository".into())
        })?;
        for mode in &o.presidio_modes {
            let out = o.work.join(format!("presidio-{mode}.json"));
            let st = std::process::Command::new(py)
                .arg(&script)
                .arg(&o.set)
                .arg(&out)
                .args([
                    "--mode",
                    mode,
                    "--repeats",
                    &o.repeats.clamp(1, 3).to_string(),
                ])
                .status()
                .map_err(|e| Error::io(py, e))?;
            if !st.success() {
                return Err(Error::Internal(format!(
                    "presidio_run.py --mode {mode} failed"
                )));
            }
            let v: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(&out).map_err(|e| Error::io(&out, e))?,
            )
            .map_err(|e| Error::Internal(format!("{}: {e}", out.display())))?;
            let preds: Vec<Vec<(usize, usize, String)>> = v["rows"]
                .as_array()
                .map(|a| a.iter().map(spans).collect())
                .unwrap_or_default();
            let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
            report(&format!(
                "presidio {mode}: {} texts in {secs:.3} s",
                rows.len()
            ));
            runs.push(score(&format!("presidio ({mode})"), &rows, &preds, secs));
        }
    }
    let chars: usize = rows.iter().map(|r| r.text.chars().count()).sum();
    let mut embedding = None;
    let mut ratio = None;
    if let Some(eo) = &o.encoder {
        let enc = crate::embed::Encoder::load(eo)?;
        let texts: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
        let _ = enc.embed_texts(&texts[..texts.len().min(64)])?; // warm-up
        let mut times = Vec::new();
        for _ in 0..o.repeats.clamp(1, 3) {
            let t = Instant::now();
            enc.embed_texts(&texts)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let e = super::median(&times);
        report(&format!(
            "embedding the same texts ({}): {e:.3} s",
            enc.engine.describe()
        ));
        embedding = Some((enc.engine.describe(), e, chars as f64 / e));
        ratio = Some(secs / e);
    }
    Ok(RedactBench {
        rows: rows.len(),
        chars,
        runs,
        semtel_leaked: leaked,
        embedding,
        redaction_vs_embedding: ratio,
    })
}
