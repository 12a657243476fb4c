//! The candle BERT engine: candle-transformers' `BertModel` in f32, padded per batch.
//! It is the portable engine (any CPU) and the CUDA engine (`--features cuda`).
//! It must stay numerically faithful to the reference: f32 only (candle's BERT gives NaN in
//! f16/bf16 as shipped).

use super::{normalize_rows, Device, Embedder};
use crate::model::{ModelFiles, Pooling};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

pub struct CandleBert {
    model: BertModel,
    device: candle_core::Device,
    pooling: Pooling,
    dim: usize,
}

impl CandleBert {
    pub fn load(files: &ModelFiles, device: Device) -> Result<Self> {
        let device = match device {
            Device::Cpu => candle_core::Device::Cpu,
            Device::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
                Error::Embed(format!(
                    "CUDA device unavailable ({e}); build with `--features cuda` on a machine with a GPU, or use --device cpu"
                ))
            })?,
            Device::Auto => candle_core::Device::cuda_if_available(0)?,
        };
        let cfg_path = files.dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: Config = serde_json::from_str(&cfg_text).map_err(|e| {
            Error::Model(format!(
                "{}: not a BERT-family config ({e}); semtel loads BERT, MiniLM, BGE and E5 models",
                cfg_path.display()
            ))
        })?;
        // SAFETY: the weights file is memory-mapped read-only; semtel never writes to it and
        // verified its digest just before.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                std::slice::from_ref(&files.weights),
                DType::F32,
                &device,
            )?
        };
        let model = BertModel::load(vb, &config).map_err(|e| {
            Error::Model(format!(
                "{}: cannot load BERT weights ({e})",
                files.weights.display()
            ))
        })?;
        Ok(CandleBert {
            model,
            device,
            pooling: files.pooling,
            dim: config.hidden_size,
        })
    }
}

impl Embedder for CandleBert {
    fn dim(&self) -> usize {
        self.dim
    }

    fn describe(&self) -> String {
        format!("candle-bert f32 on {:?}", self.device)
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
        let input = Tensor::from_vec(padded, (n, max_len), &self.device)?;
        let mask_t = Tensor::from_vec(mask, (n, max_len), &self.device)?;
        let types = input.zeros_like()?;
        let hidden = self.model.forward(&input, &types, Some(&mask_t))?; // (n, L, H)
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
