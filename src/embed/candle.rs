//! The candle BERT engine: candle-transformers' BERT encoder layers, padded per batch.
//! It is the portable engine (any CPU, f32) and the CUDA engine (`--features cuda`, f16 by
//! default there, f32 with `--gpu-f32`).
//! It must stay numerically faithful to the reference (cosine ≥ 0.999): the CPU path is f32
//! only. candle's `BertModel` gives NaN in f16 because its attention mask multiplies 0 by
//! `f32::MIN` cast to f16 (= -inf); this engine builds the embeddings and a finite mask itself
//! and runs candle's `BertEncoder` on them, so half precision works on the GPU.

use super::{normalize_rows, BatchOptions, Device, Embedder};
use crate::model::{Architecture, Family, ModelFiles, Pooling};
use crate::{Error, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use candle_transformers::models::bert::{BertEncoder, Config};

/// Word + token-type + position embeddings and their LayerNorm (BERT's input layer).
struct Embeddings {
    word: Embedding,
    token_type: Embedding,
    position: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, c: &Config) -> candle_core::Result<Self> {
        Ok(Embeddings {
            word: candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("word_embeddings"))?,
            token_type: candle_nn::embedding(
                c.type_vocab_size,
                c.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            position: candle_nn::embedding(
                c.max_position_embeddings,
                c.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            norm: candle_nn::layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let types = ids.zeros_like()?;
        let x = (self.word.forward(ids)? + self.token_type.forward(&types)?)?;
        let pos = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = x.broadcast_add(&self.position.forward(&pos)?)?;
        self.norm.forward(&x)
    }
}

pub struct CandleBert {
    embeddings: Embeddings,
    encoder: BertEncoder,
    device: candle_core::Device,
    dtype: DType,
    pooling: Pooling,
    dim: usize,
}

/// The candle engine for a model folder: candle-transformers' BERT for the BERT family, and
/// semtel's own candle forward (`tune::TrainBert`, the same ops fine-tuning differentiates) for
/// families candle-transformers lacks (MPNet).
pub fn load_candle(files: &ModelFiles, device: Device, half: bool) -> Result<Box<dyn Embedder>> {
    match Architecture::read(&files.dir)?.family {
        Family::Bert => Ok(Box::new(CandleBert::load(files, device, half)?)),
        Family::Mpnet => Ok(Box::new(CandleOwn::load(files, device)?)),
        // f32 even where half precision was asked for: upstream publishes Gemma for f32 or
        // bf16, never f16.
        Family::Gemma => Ok(Box::new(super::gemma::CandleGemma::load(files, device)?)),
        Family::Nomic => Ok(Box::new(super::nomic::CandleNomic::load(files, device)?)),
    }
}

/// semtel's candle forward in f32 (CPU or CUDA), padded per batch.
pub struct CandleOwn {
    model: crate::tune::TrainBert,
}

impl CandleOwn {
    pub fn load(files: &ModelFiles, device: Device) -> Result<Self> {
        let device = device.candle()?;
        let model = crate::tune::TrainBert::load_frozen(
            &files.weights,
            &files.dir.join("config.json"),
            files.pooling,
            &device,
        )?;
        Ok(CandleOwn { model })
    }
}

impl Embedder for CandleOwn {
    fn dim(&self) -> usize {
        self.model.shape.hidden
    }

    fn pads(&self) -> bool {
        true
    }

    fn on_gpu(&self) -> bool {
        self.model.device().is_cuda()
    }

    fn describe(&self) -> String {
        let on = if self.on_gpu() { "CUDA" } else { "CPU" };
        format!("candle (semtel forward) f32 on {on}")
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        if cu.len() < 2 {
            return Ok(Vec::new());
        }
        let seqs: Vec<&[u32]> = cu.windows(2).map(|w| &ids[w[0]..w[1]]).collect();
        let (ids, mask) = self.model.batch(&seqs)?;
        Ok(self
            .model
            .forward(&ids, &mask)?
            .detach()
            .flatten_all()?
            .to_vec1()?)
    }
}

impl CandleBert {
    /// `half`: run in f16 (CUDA only; the CPU path is always f32).
    pub fn load(files: &ModelFiles, device: Device, half: bool) -> Result<Self> {
        let device = device.candle()?;
        let cfg_path = files.dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: Config = serde_json::from_str(&cfg_text).map_err(|e| {
            Error::Model(format!(
                "{}: not a BERT-family config ({e}); semtel loads BERT, MiniLM, BGE and E5 models",
                cfg_path.display()
            ))
        })?;
        let dtype = if half && device.is_cuda() {
            DType::F16
        } else {
            DType::F32
        };
        // SAFETY: the weights file is memory-mapped read-only; semtel never writes to it and
        // verified its digest just before.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&files.weights),
                dtype,
                &device,
            )?
        };
        // sentence-transformers folders name tensors `embeddings.…`; full checkpoints prefix
        // them with the model type (`bert.embeddings.…`).
        let vb = match &config.model_type {
            Some(t) if vb.contains_tensor(&format!("{t}.embeddings.word_embeddings.weight")) => {
                vb.pp(t)
            }
            _ if vb.contains_tensor("bert.embeddings.word_embeddings.weight") => vb.pp("bert"),
            _ => vb,
        };
        let loaded = Embeddings::load(vb.pp("embeddings"), &config)
            .and_then(|e| Ok((e, BertEncoder::load(vb.pp("encoder"), &config)?)));
        let (embeddings, encoder) = loaded.map_err(|e| {
            Error::Model(format!(
                "{}: cannot load BERT weights ({e})",
                files.weights.display()
            ))
        })?;
        Ok(CandleBert {
            embeddings,
            encoder,
            device,
            dtype,
            pooling: files.pooling,
            dim: config.hidden_size,
        })
    }
}

impl Embedder for CandleBert {
    fn dim(&self) -> usize {
        self.dim
    }

    fn pads(&self) -> bool {
        true
    }

    fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    fn batch_options(&self) -> BatchOptions {
        if self.on_gpu() {
            // A GPU needs far larger batches than a CPU core to be busy; 16k padded tokens
            // (a few MB of activations per layer) measured best on an H100 (benches/NOTES.md).
            BatchOptions {
                max_batch_tokens: 16_384,
                max_batch_rows: 512,
            }
        } else {
            BatchOptions::default()
        }
    }

    fn describe(&self) -> String {
        let on = if self.on_gpu() { "CUDA" } else { "CPU" };
        let dt = if self.dtype == DType::F16 {
            "f16"
        } else {
            "f32"
        };
        format!("candle-bert {dt} on {on}")
    }

    fn embed(&self, ids: &[u32], cu: &[usize]) -> Result<Vec<f32>> {
        let n = cu.len() - 1;
        if n == 0 {
            return Ok(Vec::new());
        }
        let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let mut padded = vec![0u32; n * max_len];
        let mut mask = vec![0f32; n * max_len];
        for i in 0..n {
            let s = &ids[cu[i]..cu[i + 1]];
            padded[i * max_len..i * max_len + s.len()].copy_from_slice(s);
            mask[i * max_len..i * max_len + s.len()].fill(1.0);
        }
        // Additive attention mask: 0 for real keys, a large negative for padding. f32 uses
        // f32::MIN like the reference; half precision a finite -1e4 (exp underflows to 0 all
        // the same, and 0 · -inf can no longer make NaN).
        let neg = if self.dtype == DType::F32 {
            f32::MIN
        } else {
            -1.0e4
        };
        let additive: Vec<f32> = mask
            .iter()
            .map(|&m| if m > 0.0 { 0.0 } else { neg })
            .collect();
        let input = Tensor::from_vec(padded, (n, max_len), &self.device)?;
        let mask_t = Tensor::from_vec(mask, (n, max_len), &self.device)?;
        let additive =
            Tensor::from_vec(additive, (n, 1, 1, max_len), &self.device)?.to_dtype(self.dtype)?;
        let x = self.embeddings.forward(&input)?;
        // Pooling in f32 whatever the compute precision.
        let hidden = self.encoder.forward(&x, &additive)?.to_dtype(DType::F32)?; // (n, L, H)
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let m = mask_t.unsqueeze(2)?; // (n, L, 1)
                let sum = hidden.broadcast_mul(&m)?.sum(1)?; // (n, H)
                let count = m.sum(1)?; // (n, 1)
                sum.broadcast_div(&count)?
            }
        };
        let mut v: Vec<f32> = pooled.flatten_all()?.to_vec1()?;
        normalize_rows(&mut v, self.dim);
        Ok(v)
    }
}
