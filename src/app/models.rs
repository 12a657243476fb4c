//! The encoders semtel knows (`model::KNOWN_MODELS`): what each is, whether this machine has
//! it under `models/`, its shape as its own folder says, and, when asked, how fast it runs here
//! (tokens/s on the bundled conversations, with the engine the options choose).
//!
//! This module must never print or fetch anything.

use crate::embed::{Encoder, EncoderOptions};
use crate::model::{Architecture, KNOWN_MODELS};
use crate::Result;
use std::path::Path;
use std::time::Instant;

/// One known model, as `semtel models` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub hub_id: String,
    pub languages: String,
    pub licence: String,
    pub source: String,
    /// The command that puts it under `models/`.
    pub fetch: String,
    /// Whether `models/<name>` holds its weights (their digests are checked when it loads).
    pub present: bool,
    pub family: Option<crate::model::Family>,
    pub dims: Option<usize>,
    pub layers: Option<usize>,
    /// Token budget per conversation (sentence-transformers' `max_seq_length`).
    pub max_tokens: Option<usize>,
    pub prompt: Option<String>,
    /// What the licence asks of a user beyond an open-source licence (Gemma's terms).
    pub terms: Option<String>,
    /// Measured on this machine (`measure`): tokens per second and the engine that ran.
    pub tokens_per_second: Option<f64>,
    pub engine: Option<String>,
    /// The same with the fast engine's int8 feed-forward (`Precision::Int8`), where it runs,
    /// and that engine's description (how many layers calibration kept in int8).
    pub int8_tokens_per_second: Option<f64>,
    pub int8_engine: Option<String>,
    /// Why the model could not be loaded or measured.
    pub problem: Option<String>,
}

/// Lists the known models; with `measure`, loads each one present and times it on `texts`
/// (median of three passes).
pub fn list(models_dir: &Path, measure: Option<(&EncoderOptions, &[String])>) -> Vec<ModelEntry> {
    KNOWN_MODELS
        .iter()
        .map(|k| {
            let dir = models_dir.join(k.name);
            let present = dir.join("model.safetensors").is_file();
            let arch = present.then(|| Architecture::read(&dir).ok()).flatten();
            let mut e = ModelEntry {
                name: k.name.into(),
                hub_id: k.hub_id.into(),
                languages: k.languages.into(),
                licence: k.licence.into(),
                terms: k.terms.map(str::to_string),
                source: k.source.into(),
                fetch: format!("scripts/fetch-model {}", k.name),
                present,
                family: arch.as_ref().map(|a| a.family),
                dims: arch.as_ref().map(|a| a.hidden),
                layers: arch.as_ref().map(|a| a.layers),
                max_tokens: None,
                prompt: None,
                tokens_per_second: None,
                engine: None,
                int8_tokens_per_second: None,
                int8_engine: None,
                problem: None,
            };
            if let (true, Some((opts, texts))) = (present, measure) {
                let mut o = opts.clone();
                o.model = Some(dir.display().to_string());
                match Encoder::load(&o).and_then(|enc| speed(&enc, texts).map(|s| (enc, s))) {
                    Ok((enc, tps)) => {
                        e.max_tokens = Some(enc.files.max_tokens);
                        e.prompt = enc.files.prompt.clone();
                        e.tokens_per_second = Some(tps);
                        e.engine = Some(enc.engine.describe());
                    }
                    Err(err) => e.problem = Some(err.to_string()),
                }
                // Both precisions where the fast engine runs the model with int8.
                o.precision = Some(crate::embed::Precision::Int8);
                if e.engine.as_ref().is_some_and(|d| d.contains("bf16"))
                    && crate::embed::fast::kernels::int8_supported()
                {
                    match Encoder::load(&o).and_then(|enc| speed(&enc, texts).map(|s| (enc, s))) {
                        Ok((enc, tps)) => {
                            e.int8_tokens_per_second = Some(tps);
                            e.int8_engine = Some(enc.engine.describe());
                        }
                        Err(err) => e.problem = Some(format!("int8: {err}")),
                    }
                }
            }
            e
        })
        .collect()
}

/// Tokens per second of the encoder on `texts` (rendered as the pipeline renders them).
pub fn speed(enc: &Encoder, texts: &[String]) -> Result<f64> {
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .filter_map(|t| {
            enc.renderer
                .render(&crate::conversation::Content::Text(t.clone()))
                .ok()
                .map(|r| r.ids)
        })
        .collect();
    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
    let tokens: usize = refs.iter().map(|s| s.len()).sum();
    enc.embed_ids(&refs)?; // warm-up: page in the weights, size the scratch buffers
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            enc.embed_ids(&refs).map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(tokens as f64 / times[1].max(1e-9))
}
