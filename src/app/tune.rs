//! The tune job: fine-tune the encoder on an index's exemplars, store the tuned model in the
//! index directory, re-embed the exemplars with it, and re-train the head and re-calibrate.
//!
//! Layout it adds to an index: `encoder-<sha256 prefix>/` (an ordinary sentence-transformers
//! folder: `model.safetensors`, `config.json`, `tokenizer.json`, pooling and length settings)
//! named by `manifest.model.tuned`, and while it runs `.tune/` (the checkpoint and the scratch
//! model used to score search candidates). The manifest switches to the tuned model in the
//! index's own journaled save, so a crash leaves either the old index or the new one; an
//! unreferenced `encoder-*` folder is only disk space and the next tune removes it.
//!
//! This job must never print; progress goes through the caller's callback.

use crate::app::calibrate::{CalibrateJob, CalibrateOutcome};
use crate::calibrate::CalibrateOptions;
use crate::conversation::Content;
use crate::embed::{Encoder, EncoderOptions};
use crate::index::{ExemplarIndex, ModelInfo, TunedInfo};
use crate::input::InputOptions;
use crate::pipeline::ClassifierOptions;
use crate::tune::{StepEvent, TrainBert, TuneData, TuneOptions, TuneReport};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

const WORK_DIR: &str = ".tune";
/// Without held-out rows to calibrate on, this share of the exemplar ids stays out of the
/// final training run, so cross-validated calibration can score rows the encoder never saw.
pub const CALIBRATION_SHARE: f64 = 0.15;

/// A fine-tuning to run.
#[derive(Debug, Clone)]
pub struct TuneJob {
    pub index: PathBuf,
    /// Device and engine (the model is the index's base model unless named).
    pub encoder: EncoderOptions,
    pub options: TuneOptions,
    /// Calibrate on these held-out labelled rows afterwards (else cross-validation).
    pub labelled: Option<(PathBuf, InputOptions)>,
    pub calibrate: CalibrateOptions,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TuneOutcome {
    pub report: TuneReport,
    /// The tuned model's folder, when tuning was kept.
    pub encoder_dir: Option<PathBuf>,
    pub weights_sha256: Option<String>,
    /// Seconds spent re-embedding the exemplars with the tuned model.
    pub reembed_seconds: f64,
    #[serde(skip)]
    pub calibration: Option<CalibrateOutcome>,
    pub seconds: f64,
}

/// The model an index's tuning starts from: the base of an already tuned index (tuning again
/// starts over from it, never from tuned weights), else the index's model.
fn base_spec(m: &ModelInfo) -> (String, String) {
    match &m.tuned {
        Some(t) => {
            let spec = t
                .base_source_dir
                .clone()
                .filter(|d| Path::new(d).join("config.json").is_file())
                .unwrap_or_else(|| t.base_id.clone());
            (spec, t.base_weights_sha256.clone())
        }
        None => (crate::index::base_model(m), m.weights_sha256.clone()),
    }
}

/// Copies the files that make a model folder besides its weights.
fn copy_model_files(from: &Path, to: &Path, max_tokens: usize) -> Result<()> {
    std::fs::create_dir_all(to.join("1_Pooling")).map_err(|e| Error::io(to, e))?;
    // The prompt (config_sentence_transformers.json) and the card's languages (README.md) travel
    // with the weights: they are part of what the model expects and covers.
    for f in [
        "config.json",
        "tokenizer.json",
        "1_Pooling/config.json",
        "config_sentence_transformers.json",
        "modules.json",
        "README.md",
    ] {
        let src = from.join(f);
        if src.is_file() {
            std::fs::copy(&src, to.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    let st = serde_json::json!({ "max_seq_length": max_tokens, "do_lower_case": false });
    let p = to.join("sentence_bert_config.json");
    std::fs::write(&p, st.to_string()).map_err(|e| Error::io(&p, e))
}

/// Runs the tuning; `on_step` sees every optimizer step.
pub fn run(job: &TuneJob, on_step: &mut dyn FnMut(&StepEvent)) -> Result<TuneOutcome> {
    let t0 = std::time::Instant::now();
    let manifest = ExemplarIndex::read_manifest(&job.index)?;
    let (spec, base_sha) = base_spec(&manifest.model);
    let mut eo = job.encoder.clone();
    if eo.model.is_none() {
        eo.model = Some(spec);
    }
    eo.include_system_turns |= manifest.build.include_system_turns;
    let base = Encoder::load(&eo)?;
    if base.files.weights_sha256 != base_sha {
        return Err(Error::index(
            &job.index,
            format!(
                "tuning starts from the index's base model (sha256 {}…) but `{}` was loaded; pass --model with that model's folder",
                &base_sha[..base_sha.len().min(12)],
                base.files.id
            ),
        ));
    }
    if base.files.kind != crate::model::ModelKind::Transformer {
        return Err(Error::Model(
            "only transformer models can be fine-tuned (this index uses a static table)".into(),
        ));
    }
    let index = ExemplarIndex::open(&job.index, false)?;
    // One text per exemplar id (a multi-label row is one exemplar per label, same id), with
    // the labels it carries; rendered the way calibration renders stored exemplar text.
    let mut order: Vec<String> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut pos: std::collections::HashMap<String, usize> = Default::default();
    let mut labels: Vec<Vec<u32>> = Vec::new();
    let mut row_of: Vec<usize> = Vec::with_capacity(index.len());
    for (e, &l) in index.exemplars().iter().zip(index.label_indices()) {
        let i = *pos.entry(e.id.clone()).or_insert_with(|| {
            order.push(e.text.clone());
            ids.push(e.id.clone());
            labels.push(Vec::new());
            order.len() - 1
        });
        if !labels[i].contains(&l) {
            labels[i].push(l);
        }
        row_of.push(i);
    }
    let render = |t: &str| -> Vec<u32> {
        // A stored text that cannot be rendered (blank) still needs a vector: the special
        // tokens alone, as for an empty message.
        base.renderer
            .render(&Content::Text(t.to_string()))
            .map(|r| r.ids)
            .unwrap_or_else(|_| base.renderer.encode_head("").unwrap_or_default())
    };
    let seqs: Vec<Vec<u32>> = {
        use rayon::prelude::*;
        order.par_iter().map(|t| render(t)).collect()
    };
    let device = job.encoder.device.candle()?;
    let model = TrainBert::load(
        &base.files.weights,
        &base.files.dir.join("config.json"),
        base.files.pooling,
        &device,
    )?;
    let work = job.index.join(WORK_DIR);
    let scratch = work.join("candidate");
    copy_model_files(&base.files.dir, &scratch, base.files.max_tokens)?;
    let engine_opts = EncoderOptions {
        model: Some(scratch.display().to_string()),
        ..eo.clone()
    };
    // Candidates are scored with the fastest engine the machine has: save, load, embed.
    let mut embed = |m: &TrainBert, seqs: &[&[u32]]| -> Result<Vec<f32>> {
        m.save(&scratch.join("model.safetensors"))?;
        Encoder::load(&engine_opts)?.embed_ids(seqs)
    };
    let mut options = job.options.clone();
    options.checkpoint = Some(work.join("checkpoint"));
    let share = if job.labelled.is_some() {
        0.0
    } else {
        CALIBRATION_SHARE
    };
    let train_rows: Vec<usize> = (0..order.len())
        .filter(|&i| !crate::index::in_calibration_fold(&ids[i], share))
        .collect();
    let data = TuneData {
        seqs: train_rows.iter().map(|&i| seqs[i].clone()).collect(),
        labels: train_rows.iter().map(|&i| labels[i].clone()).collect(),
        content: train_rows
            .iter()
            .map(|&i| base.renderer.content_ids(&seqs[i]).to_vec())
            .collect(),
    };
    let report = crate::tune::tune(&model, &data, &options, &mut embed, on_step)?;
    let Some((epochs, lr)) = report.chosen else {
        if !report.resumable {
            let _ = std::fs::remove_dir_all(&work);
        }
        return Ok(TuneOutcome {
            report,
            encoder_dir: None,
            weights_sha256: None,
            reembed_seconds: 0.0,
            calibration: None,
            seconds: t0.elapsed().as_secs_f64(),
        });
    };
    // Everything below rewrites the index: it happens in a staged copy that is swapped in
    // whole once re-embedded and re-calibrated (`index::update`), so a failure or a kill at
    // any point leaves the old index (and its encoder) as they were.
    drop(index);
    let (dest_name, sha, calibration, reembed_seconds) =
        crate::index::update(&job.index, |stage| {
            let mut index = ExemplarIndex::open(stage, false)?;
            // The tuned folder under a temporary name, then named by its digest.
            let tmp = stage.join(format!("{WORK_DIR}/encoder"));
            let _ = std::fs::remove_dir_all(&tmp);
            copy_model_files(&base.files.dir, &tmp, base.files.max_tokens)?;
            model.save(&tmp.join("model.safetensors"))?;
            let sha = crate::fsio::sha256_file(&tmp.join("model.safetensors"))?;
            let name = format!("encoder-{}", &sha[..12]);
            let dest = stage.join(&name);
            let _ = std::fs::remove_dir_all(&dest);
            std::fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e))?;
            crate::fsio::sync_dir(stage);

            let t_embed = std::time::Instant::now();
            let tuned = Encoder::load(&EncoderOptions {
                model: Some(dest.display().to_string()),
                ..eo.clone()
            })?;
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let unique = tuned.embed_ids(&refs)?;
            let d = tuned.dim();
            let mut vectors = Vec::with_capacity(row_of.len() * d);
            for &i in &row_of {
                vectors.extend_from_slice(&unique[i * d..(i + 1) * d]);
            }
            let reembed_seconds = t_embed.elapsed().as_secs_f64();
            let mut info = ModelInfo::of(&tuned.files, d);
            info.id = format!("{}+tuned", base.files.id);
            info.source_dir = None;
            let best = report
                .candidates
                .iter()
                .filter(|c| c.lr == lr)
                .filter_map(|c| c.accuracy_by_epoch.get(epochs - 1).copied())
                .next();
            info.tuned = Some(TunedInfo {
                dir: name.clone(),
                base_id: base.files.id.clone(),
                base_weights_sha256: base.files.weights_sha256.clone(),
                base_source_dir: std::fs::canonicalize(&base.files.dir)
                    .ok()
                    .map(|p| p.display().to_string()),
                loss: format!("{:?}", report.loss).to_lowercase(),
                epochs,
                lr,
                steps: report.final_steps,
                frozen_accuracy: report.frozen_accuracy,
                tuned_accuracy: best,
                seconds: report.seconds,
                calibration_share: share,
            });
            index.replace_vectors(&vectors, info)?;
            // The head was trained on the old vectors: it goes, and calibration trains a new one.
            for f in [crate::head::HEAD_FILE, crate::head::HEAD_META] {
                let _ = std::fs::remove_file(stage.join(f));
            }
            index.manifest.decision.calibration = None;
            index.manifest.decision.per_label.clear();
            index.manifest.decision.label_rules.clear();
            if index.manifest.build.multi_label {
                crate::calibrate::auto_calibrate_multi(
                    &mut index,
                    crate::calibrate::DEFAULT_TARGET,
                )?;
            } else {
                crate::calibrate::auto_calibrate(&mut index, crate::calibrate::DEFAULT_TARGET)?;
            }
            index.save()?;
            drop(index);
            // Old tuned folders and the work area are no longer referenced.
            if let Ok(rd) = std::fs::read_dir(stage) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().to_string();
                    if (n.starts_with("encoder-") && n != name) || n == WORK_DIR {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let calibration = crate::app::calibrate::run_in(
                &CalibrateJob {
                    index: job.index.clone(),
                    classifier: ClassifierOptions {
                        encoder: EncoderOptions {
                            model: None,
                            ..eo.clone()
                        },
                        signal: Some(crate::decide::Signal::VoteSim),
                        ..Default::default()
                    },
                    labelled: job.labelled.clone(),
                    options: job.calibrate.clone(),
                },
                stage,
            )?;
            Ok((name, sha, calibration, reembed_seconds))
        })?;
    let dest = job.index.join(&dest_name);
    let _ = std::fs::remove_dir_all(&work);
    Ok(TuneOutcome {
        report,
        encoder_dir: Some(dest),
        weights_sha256: Some(sha),
        reembed_seconds,
        calibration: Some(calibration),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
