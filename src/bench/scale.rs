//! `semtel bench build`: what building and calibrating an index costs at 10k–200k exemplars,
//! single- and multi-label, next to what embedding those exemplars costs.
//!
//! The larger sets are synthesised from the shared data: a seeded sample of real rows
//! (Banking77 + CLINC150 for single-label, SGD dialogues with their `domains` for multi-label)
//! is embedded, and every further row is a near-paraphrase of one of them — the same labels,
//! the text with one word dropped, the vector moved by small Gaussian noise (cosine about 0.9
//! to its source) and re-normalised. Embedding time is measured on the real sample and
//! scaled by row count (the synthetic rows have the sample's lengths). Everything after
//! embedding runs for real on every row: `index build`'s insertion, automatic calibration and
//! save, then `semtel calibrate` (cross-validated head, thresholds). Peak memory is the
//! process's resident high-water mark, reset before each size.

use crate::app::calibrate::CalibrateJob;
use crate::calibrate::CalibrateOptions;
use crate::embed::{Encoder, EncoderOptions};
use crate::index::{BuildInfo, Exemplar, ExemplarIndex, ModelInfo};
use crate::pipeline::ClassifierOptions;
use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct ScaleOptions {
    pub shared: PathBuf,
    pub sizes: Vec<usize>,
    /// Which label kinds to run: false = single-label, true = multi-label.
    pub kinds: Vec<bool>,
    /// Real rows embedded per kind (the rest are synthesised from them).
    pub sample: usize,
    pub encoder: EncoderOptions,
    pub work: PathBuf,
    pub seed: u64,
}

/// One size of one kind.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRun {
    pub multi_label: bool,
    /// Labelled rows (a multi-label row is several exemplars).
    pub rows: usize,
    pub exemplars: usize,
    pub labels: usize,
    /// Embedding these rows at the rate measured on the real sample.
    pub embed_s: f64,
    pub embed_rows_per_s: f64,
    /// `index build` after embedding: insertion, automatic calibration, save.
    pub insert_s: f64,
    pub auto_calibrate_s: f64,
    pub save_s: f64,
    /// `semtel calibrate` (cross-validation over the exemplars, head included).
    pub calibrate_s: f64,
    /// Everything after embedding, as a share of embedding.
    pub after_embedding_share: f64,
    pub peak_rss_mb: f64,
}

struct Base {
    texts: Vec<String>,
    labels: Vec<Vec<String>>,
    vectors: Vec<f32>,
    rows_per_s: f64,
}

fn read_jsonl(p: &Path, gz: bool) -> Result<Vec<serde_json::Value>> {
    use std::io::BufRead;
    let f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let r: Box<dyn std::io::Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(std::io::BufReader::new(r)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect())
}

fn base(o: &ScaleOptions, enc: &Encoder, multi: bool) -> Result<Base> {
    let data = o.shared.join("data");
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    if multi {
        for v in read_jsonl(&data.join("sgd/sgd_dialogues.jsonl.gz"), true)? {
            let ls: Vec<String> = v["domains"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if let (Some(t), false) = (v["text"].as_str(), ls.is_empty()) {
                rows.push((t.to_string(), ls));
            }
        }
    } else {
        for (set, file) in [
            ("b77", "banking77/banking77.jsonl"),
            ("clinc", "clinc150/clinc150.jsonl"),
        ] {
            for v in read_jsonl(&data.join(file), false)? {
                if let (Some(t), Some(l)) = (v["text"].as_str(), v["label"].as_str()) {
                    rows.push((t.to_string(), vec![format!("{set}/{l}")]));
                }
            }
        }
    }
    fastrand::Rng::with_seed(o.seed).shuffle(&mut rows);
    rows.truncate(o.sample.max(1));
    let texts: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t = Instant::now();
    let vectors = enc.embed_texts(&refs)?;
    let secs = t.elapsed().as_secs_f64();
    let rows_per_s = refs.len() as f64 / secs.max(1e-9);
    drop(refs);
    Ok(Base {
        labels: rows.into_iter().map(|r| r.1).collect(),
        texts,
        vectors,
        rows_per_s,
    })
}

/// Row `i` of a synthetic set: the base row itself for the first pass, then a near-paraphrase.
fn synth(
    b: &Base,
    dim: usize,
    i: usize,
    rng: &mut fastrand::Rng,
) -> (String, Vec<String>, Vec<f32>) {
    let n = b.texts.len();
    let j = i % n;
    let src = &b.vectors[j * dim..(j + 1) * dim];
    if i < n {
        return (b.texts[j].clone(), b.labels[j].clone(), src.to_vec());
    }
    let words: Vec<&str> = b.texts[j].split_whitespace().collect();
    let drop = rng.usize(..words.len().max(1));
    let text = words
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != drop || words.len() < 3)
        .map(|(_, w)| *w)
        .collect::<Vec<_>>()
        .join(" ");
    // Box–Muller noise, σ = 0.017 per dimension: about 0.33 in norm, cosine ≈ 0.95.
    let mut v: Vec<f32> = src
        .iter()
        .map(|&x| {
            let (u1, u2) = (rng.f32().max(1e-7), rng.f32());
            x + 0.017 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect();
    crate::embed::normalize_rows(&mut v, dim);
    (format!("{text} #{}", i / n), b.labels[j].clone(), v)
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0); elsewhere the figure is cumulative.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Runs every kind at every size, smallest first, calling `each` as figures come in.
pub fn scale_benchmark(o: &ScaleOptions, each: &mut dyn FnMut(&ScaleRun)) -> Result<Vec<ScaleRun>> {
    let enc = Encoder::load(&o.encoder)?;
    let dim = enc.dim();
    let mut out = Vec::new();
    let mut sizes = o.sizes.clone();
    sizes.sort_unstable();
    for &multi in &o.kinds {
        let b = base(o, &enc, multi)?;
        for &n in &sizes {
            reset_peak_rss();
            let dir = o
                .work
                .join(format!("{}-{n}", if multi { "multi" } else { "single" }));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            let mut rng = fastrand::Rng::with_seed(o.seed ^ n as u64);
            let mut vectors = Vec::new();
            let mut ex = Vec::new();
            for i in 0..n {
                let (text, labels, v) = synth(&b, dim, i, &mut rng);
                for l in labels {
                    vectors.extend_from_slice(&v);
                    ex.push(Exemplar {
                        id: format!("r{i}"),
                        label: l,
                        source: "gold".into(),
                        llm_model: None,
                        prompt_version: None,
                        text: text.clone(),
                    });
                }
            }
            let exemplars = ex.len();
            let build = BuildInfo {
                multi_label: multi,
                ..Default::default()
            };
            let t = Instant::now();
            let mut index = ExemplarIndex::create(&dir, ModelInfo::of(&enc.files, dim), build)?;
            index.add(&vectors, ex)?;
            drop(vectors);
            let insert_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            if multi {
                crate::calibrate::auto_calibrate_multi(
                    &mut index,
                    crate::calibrate::DEFAULT_TARGET,
                )?;
            } else {
                crate::calibrate::auto_calibrate(&mut index, crate::calibrate::DEFAULT_TARGET)?;
            }
            let auto_calibrate_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            index.save()?;
            let save_s = t.elapsed().as_secs_f64();
            let labels = index.labels().len();
            drop(index);
            let t = Instant::now();
            crate::app::calibrate::run(&CalibrateJob {
                index: dir.clone(),
                classifier: ClassifierOptions {
                    encoder: o.encoder.clone(),
                    signal: Some(crate::decide::Signal::VoteSim),
                    ..Default::default()
                },
                labelled: None,
                options: CalibrateOptions::default(),
            })?;
            let calibrate_s = t.elapsed().as_secs_f64();
            let embed_s = n as f64 / b.rows_per_s;
            let after = insert_s + auto_calibrate_s + save_s + calibrate_s;
            let run = ScaleRun {
                multi_label: multi,
                rows: n,
                exemplars,
                labels,
                embed_s,
                embed_rows_per_s: b.rows_per_s,
                insert_s,
                auto_calibrate_s,
                save_s,
                calibrate_s,
                after_embedding_share: after / embed_s.max(1e-9),
                peak_rss_mb: crate::bench::peak_rss_mb(),
            };
            each(&run);
            out.push(run);
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
    }
    Ok(out)
}
