//! Embedding: token ids in, L2-normalised f32 vectors out.
//!
//! An [`Embedder`] takes a *flat* batch — every sequence's ids back to back plus cumulative
//! sequence lengths — the way text-embeddings-inference's backends do, so an engine that can
//! work without padding never pays for it, and one that needs padding pads per batch.
//! Batching lives in exactly one place, [`embed_sequences`]: length-sorted batches bounded by a
//! padded-token budget, run a few at a time in parallel.
//!
//! This module must never tokenize or read files beyond the model weights.

mod candle;
pub mod dense;
pub mod fast;
pub(crate) mod gemma;
mod nomic;
pub mod static_model;

pub use self::candle::{load_candle, CandleBert, CandleOwn};
pub use self::fast::FastBert;
pub use self::gemma::{CandleGemma, GemmaConfig};
pub use self::nomic::{CandleNomic, NomicConfig};
pub use self::static_model::{StaticEmbedder, STATIC_META, STATIC_TABLE};

use crate::model::{ModelFiles, Pooling};
use crate::render::Renderer;
use crate::{Error, Result};
use rayon::prelude::*;

/// A sentence encoder over token ids.
pub trait Embedder: Send + Sync {
    /// Output dimensionality.
    fn dim(&self) -> usize;
    /// Embeds `cu_seqlens.len() - 1` sequences; sequence `i` is
    /// `ids[cu_seqlens[i]..cu_seqlens[i + 1]]`, special tokens included. Returns
    /// `n * dim` values, each row L2-normalised.
    fn embed(&self, ids: &[u32], cu_seqlens: &[usize]) -> Result<Vec<f32>>;
    /// [`Embedder::embed`] for a batch that may use up to `ways` threads of the current rayon
    /// pool (the caller runs fewer batches than it has threads), calling `pause`, when given,
    /// between layers of a long batch (see [`Pause`]). The result must equal `embed`'s;
    /// engines without intra-batch parallelism or layer boundaries ignore both.
    fn embed_split(
        &self,
        ids: &[u32],
        cu_seqlens: &[usize],
        ways: usize,
        pause: Option<&(dyn Fn() + Sync)>,
    ) -> Result<Vec<f32>> {
        let _ = (ways, pause);
        self.embed(ids, cu_seqlens)
    }
    /// A short description of the engine (for logs and benchmarks).
    fn describe(&self) -> String;
    /// Whether batches are padded to their longest row (the cost `BatchOptions` bounds).
    fn pads(&self) -> bool {
        false
    }
    /// Whether the engine runs on a GPU.
    fn on_gpu(&self) -> bool {
        false
    }
    /// The batch sizes this engine wants (a GPU wants far larger ones than a CPU core).
    fn batch_options(&self) -> BatchOptions {
        BatchOptions::default()
    }
}

/// How sequences are grouped into batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Upper bound on `rows × longest row` per batch (what a padded engine computes).
    pub max_batch_tokens: usize,
    /// Upper bound on rows per batch.
    pub max_batch_rows: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        // 4k padded tokens keep a MiniLM batch's activations (~4k × 1536 floats for the FFN)
        // inside L2/L3, and give each of two parallel workers enough rows to amortise a call.
        BatchOptions {
            max_batch_tokens: 4096,
            max_batch_rows: 128,
        }
    }
}

/// Groups sequence indices into length-sorted batches (longest first, so the costliest work
/// starts early and the padded budget is respected exactly).
pub fn plan_batches(lens: &[usize], opts: BatchOptions) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_max = 0;
    for i in order {
        let l = lens[i].max(1);
        let new_max = cur_max.max(l);
        if !cur.is_empty()
            && ((cur.len() + 1) * new_max > opts.max_batch_tokens
                || cur.len() >= opts.max_batch_rows)
        {
            batches.push(std::mem::take(&mut cur));
            cur_max = 0;
        }
        cur_max = cur_max.max(l);
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// Embeds many sequences with `engine`, batching as above and running batches in parallel on
/// the current rayon pool. Returns `seqs.len() * dim` values in input order.
pub fn embed_sequences(
    engine: &dyn Embedder,
    seqs: &[&[u32]],
    opts: BatchOptions,
    pause: Option<&(dyn Fn() + Sync)>,
) -> Result<Vec<f32>> {
    let dim = engine.dim();
    let lens: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
    // A CPU engine runs one batch per thread: a small call (a live request, a small Arrow
    // batch) that fits one batch would leave every other core idle, so it is split into at
    // least one batch per worker. (Measured: 64-row chunks of short queries ran at 0.62 × the
    // rate of 1,024-row chunks on 2 threads with the same CPU work, the other core waiting.)
    let opts = if engine.on_gpu() {
        opts
    } else {
        let per_thread = seqs.len().div_ceil(rayon::current_num_threads().max(1));
        BatchOptions {
            max_batch_rows: opts.max_batch_rows.min(per_thread.max(1)),
            ..opts
        }
    };
    let batches = plan_batches(&lens, opts);
    // Fewer batches than threads (one long conversation, say): each batch may split itself.
    let threads = rayon::current_num_threads().max(1);
    let ways = if engine.on_gpu() || batches.is_empty() {
        1
    } else {
        (threads / batches.len()).max(1)
    };
    let results: Vec<Result<(Vec<usize>, Vec<f32>)>> = batches
        .into_par_iter()
        .map(|batch| {
            let mut ids = Vec::new();
            let mut cu = Vec::with_capacity(batch.len() + 1);
            cu.push(0);
            for &i in &batch {
                ids.extend_from_slice(seqs[i]);
                cu.push(ids.len());
            }
            let v = engine.embed_split(&ids, &cu, ways, pause)?;
            Ok((batch, v))
        })
        .collect();
    let mut out = vec![0f32; seqs.len() * dim];
    for r in results {
        let (batch, v) = r?;
        if v.len() != batch.len() * dim {
            return Err(Error::Embed(format!(
                "engine returned {} values for {} rows of dim {dim}",
                v.len(),
                batch.len()
            )));
        }
        for (j, &i) in batch.iter().enumerate() {
            out[i * dim..(i + 1) * dim].copy_from_slice(&v[j * dim..(j + 1) * dim]);
        }
    }
    Ok(out)
}

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when built with the `cuda` feature and a GPU is present, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl Device {
    /// The candle device this choice runs on (the one place CUDA availability is decided).
    pub fn candle(self) -> Result<candle_core::Device> {
        Ok(match self {
            Device::Cpu => candle_core::Device::Cpu,
            Device::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
                Error::Embed(format!(
                    "CUDA device unavailable ({e}); build with `--features cuda` on a machine with a GPU, or use --device cpu"
                ))
            })?,
            Device::Auto => candle_core::Device::cuda_if_available(0)?,
        })
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda),
            _ => Err(format!("unknown device `{s}` (use auto, cpu or cuda)")),
        }
    }
}

/// Everything needed to go from a conversation to a vector: the verified model files, the
/// renderer (tokenizer + truncation policy) and the engine.
pub struct Encoder {
    pub files: ModelFiles,
    pub renderer: Renderer,
    pub engine: Box<dyn Embedder>,
    pub batch: BatchOptions,
    /// Called between layers of long batches, once set (see [`Pause`]).
    pub pause: std::sync::OnceLock<Pause>,
    /// The arithmetic that runs (`Int8` only where the fast engine runs it).
    pub precision: Precision,
}

/// A pause point an owner of the encoder may install: engines that can call it between the
/// layers of a long batch, on the thread running that batch. The live service runs waiting
/// one-row requests there, so they do not wait for a long conversation's whole forward pass.
/// It must return promptly and must not embed through the same call (re-entry is the
/// installer's to refuse).
pub type Pause = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Which implementation runs the model on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The bf16 kernels when the CPU has AVX512-BF16 and the model is a BERT they cover,
    /// else candle.
    #[default]
    Auto,
    /// Require the bf16 kernels (an error where they cannot run).
    Fast,
    /// candle's f32 BERT (the reference; also the CUDA path).
    Candle,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Engine::Auto),
            "fast" => Ok(Engine::Fast),
            "candle" => Ok(Engine::Candle),
            _ => Err(format!("unknown engine `{s}` (auto, fast, candle)")),
        }
    }
}

/// Texts the int8 calibration runs at load: short and long, several scripts, chat-shaped, and
/// degenerate (one word repeated, a run of digits, punctuation): repetition drives a few
/// activations far past the rest, exactly what a per-row `u8` resolves worst, and real
/// traffic has such rows (MPNet moved one to cosine 0.990 when none was here).
const INT8_CALIBRATION: &[&str] = &[
    "thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks thanks",
    "0123456789012345678901234567890123456789 !!!!!!!!!!!!!!!!!!!! ????????????????????",
    "I still have not received my new card, when will it arrive?",
    "user: can you help me write a cover letter for a nursing job?\nassistant: Of course. Tell me about your experience and the position.",
    "Why was I charged a fee when I withdrew cash abroad last Tuesday?",
    "user: explain the difference between a process and a thread\nassistant: A process has its own address space; threads share one.\nuser: and which is cheaper to create?",
    "¿Cómo puedo cambiar la contraseña de mi cuenta bancaria?",
    "Wie lange dauert eine Überweisung ins Ausland normalerweise?",
    "Как отменить подписку и вернуть деньги?",
    "我的银行卡被冻结了，怎么解冻？",
    "パスワードを忘れてしまいました。どうすればいいですか？",
    "كيف يمكنني تحديث عنوان بريدي الإلكتروني؟",
    "set an alarm for 7 am tomorrow and remind me to call mom",
    "user: my python script raises KeyError: 'id' when reading the json file, here is the code: data = json.load(f); print(data['id'])\nassistant: The file's top level is probably a list; index it first.",
    "what's the weather like in Paris this weekend? 🌧️☀️",
    "Tell me a joke about cats.",
    "The quarterly report shows revenue growth of 12% year over year, driven mainly by subscriptions in the enterprise segment, while hardware sales declined slightly and operating costs rose with the expansion into two new markets.",
    "user: I feel anxious before every exam, even when I have studied a lot. Is that normal?\nassistant: Yes, it is very common. Some techniques can help: breathing exercises, practice tests under timed conditions, and enough sleep the night before.\nuser: what breathing exercises exactly?",
];

/// The fast engine's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// bf16 products, f32 accumulation and everything else f32.
    #[default]
    Bf16,
    /// The feed-forward's products in int8 (`vpdpbusd`: per-column weight scales, per-row
    /// asymmetric activations), the rest as `Bf16`. Needs AVX512-VNNI; elsewhere `Bf16`.
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bf16" => Ok(Precision::Bf16),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("unknown precision `{s}` (bf16, int8)")),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EncoderOptions {
    pub model: Option<String>,
    pub device: Device,
    pub engine: Engine,
    pub include_system_turns: bool,
    /// Keep the CUDA engine in f32 (default: f16 on the GPU; CPUs always use their own path).
    pub gpu_f32: bool,
    /// The fast engine's arithmetic (other engines ignore it); `None`: an index's recorded
    /// one when an index is opened, else bf16.
    pub precision: Option<Precision>,
}

fn cuda_wanted(device: Device) -> bool {
    match device {
        Device::Cuda => true,
        Device::Cpu => false,
        Device::Auto => candle_core::utils::cuda_is_available(),
    }
}

/// A row's embedding and the token ids it was computed from.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vector: Vec<f32>,
    /// Rendered ids, special tokens included.
    pub ids: Vec<u32>,
}

/// Counts the model's tokens in a text (LLM prompt sizing, rate limits, cost estimates).
pub type TokenCounter = std::sync::Arc<dyn Fn(&str) -> usize + Send + Sync>;

impl Encoder {
    /// The one token counter: this model's tokenizer, shared by every caller that sizes text
    /// (a length estimate only if the tokenizer refuses a text).
    pub fn token_counter(&self) -> TokenCounter {
        let tok = std::sync::Arc::new(self.renderer.tokenizer().clone());
        std::sync::Arc::new(move |t: &str| {
            tok.encode_fast(t, false)
                .map(|e| e.len())
                .unwrap_or(t.len() / 4)
        })
    }

    /// Whether system turns are embedded (and shown to the LLM) for this run.
    pub fn include_system_turns(&self) -> bool {
        self.renderer.includes_system_turns()
    }

    pub fn load(opts: &EncoderOptions) -> Result<Self> {
        let files = crate::model::resolve(opts.model.as_deref())?;
        Self::from_files(files, opts)
    }

    pub fn from_files(files: ModelFiles, opts: &EncoderOptions) -> Result<Self> {
        let renderer = Renderer::from_file(&files.dir.join("tokenizer.json"), files.max_tokens)?
            .with_prompt(files.prompt.as_deref())?
            .with_system_turns(opts.include_system_turns);
        let precision = opts.precision.unwrap_or_default();
        // What actually runs: int8 only on the fast engine of a CPU with VNNI.
        let mut effective = Precision::Bf16;
        let engine: Box<dyn Embedder> = if files.kind == crate::model::ModelKind::Static {
            Box::new(StaticEmbedder::load(&files.dir)?)
        } else if cuda_wanted(opts.device) || opts.engine == Engine::Candle {
            load_candle(&files, opts.device, !opts.gpu_f32)?
        } else {
            if precision == Precision::Int8 && !fast::kernels::int8_supported() {
                tracing::warn!(
                    "--precision int8 needs AVX512-VNNI, which this CPU lacks: running bf16"
                );
            }
            let int8 = precision == Precision::Int8 && fast::kernels::int8_supported();
            let seqs: Vec<Vec<u32>> = if int8 {
                INT8_CALIBRATION
                    .iter()
                    .filter_map(|t| renderer.encode_head(t).ok())
                    .collect()
            } else {
                Vec::new()
            };
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let gemma =
                crate::model::Architecture::read(&files.dir)?.family == crate::model::Family::Gemma;
            let fast: Option<Box<dyn Embedder>> = if gemma {
                fast::FastGemma::try_load(&files)?.map(|f| Box::new(f) as Box<dyn Embedder>)
            } else {
                FastBert::try_load(&files, int8.then_some(refs.as_slice()))?.map(|f| {
                    if f.is_int8() {
                        effective = Precision::Int8;
                    }
                    Box::new(f) as Box<dyn Embedder>
                })
            };
            if fast.is_some() && int8 && effective != Precision::Int8 {
                tracing::warn!(
                    "--precision int8 covers GELU feed-forwards (BERT, MPNet); this model runs bf16"
                );
            }
            match (fast, opts.engine) {
                (Some(f), _) => f,
                (None, Engine::Fast) => {
                    return Err(Error::Embed(
                        "--engine fast needs a CPU with AVX512-BF16 and a BERT, MPNet, NomicBERT or Gemma model whose head size is a multiple of 32; use --engine auto".into(),
                    ))
                }
                (None, _) => load_candle(&files, Device::Cpu, false)?,
            }
        };
        let batch = engine.batch_options();
        Ok(Encoder {
            files,
            renderer,
            engine,
            batch,
            pause: std::sync::OnceLock::new(),
            precision: effective,
        })
    }

    pub fn dim(&self) -> usize {
        self.engine.dim()
    }

    pub fn pooling(&self) -> Pooling {
        self.files.pooling
    }

    /// The one render → embed step every job uses: renders each row's content in parallel and
    /// embeds the rows that rendered in one flat batch. Per row: its vector and rendered ids, or
    /// why there are none (the row's own read error, or the render error).
    pub fn embed_rows(
        &self,
        rows: &[crate::conversation::Row],
    ) -> Result<Vec<std::result::Result<Embedded, String>>> {
        use rayon::prelude::*;
        let rendered: Vec<std::result::Result<crate::render::Rendered, String>> = rows
            .par_iter()
            .map(|r| match &r.content {
                Ok(c) => {
                    crate::failpoint::panic_on_row(&r.id);
                    self.renderer.render(c)
                }
                Err(e) => Err(e.clone()),
            })
            .collect();
        let ok: Vec<&[u32]> = rendered
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.ids.as_slice()))
            .collect();
        let flat = self.embed_ids(&ok)?;
        let mut vectors = flat.chunks(self.dim());
        Ok(rendered
            .into_iter()
            .map(|r| {
                r.map(|rd| Embedded {
                    vector: vectors
                        .next()
                        .expect("one vector per rendered row")
                        .to_vec(),
                    ids: rd.ids,
                })
            })
            .collect())
    }

    /// The content ids (without the model's special tokens) of rendered ids: what the learned
    /// head's word-piece features are computed from.
    pub fn content_ids<'a>(&self, ids: &'a [u32]) -> &'a [u32] {
        self.renderer.content_ids(ids)
    }

    /// Embeds already-rendered id sequences.
    pub fn embed_ids(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let pause = self.pause.get().map(|p| p.as_ref() as &(dyn Fn() + Sync));
        embed_sequences(self.engine.as_ref(), seqs, self.batch, pause)
    }

    /// Embeds raw texts the way sentence-transformers does (head truncation), for reference
    /// comparisons and simple callers.
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let ids: Vec<Vec<u32>> = texts
            .par_iter()
            .map(|t| self.renderer.encode_head(t).map_err(Error::Tokenizer))
            .collect::<Result<_>>()?;
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        self.embed_ids(&refs)
    }
}

/// L2-normalises each `dim`-long row in place (a zero row stays zero).
pub fn normalize_rows(v: &mut [f32], dim: usize) {
    for row in v.chunks_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            let inv = 1.0 / n;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_and_cover_all() {
        let lens = vec![5, 200, 17, 17, 3, 256, 90, 1];
        let opts = BatchOptions {
            max_batch_tokens: 300,
            max_batch_rows: 3,
        };
        let b = plan_batches(&lens, opts);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for batch in &b {
            let max = batch.iter().map(|&i| lens[i]).max().unwrap();
            assert!(batch.len() == 1 || batch.len() * max <= 300, "{batch:?}");
            assert!(batch.len() <= 3);
        }
        assert_eq!(b[0], vec![5]);
    }
}
