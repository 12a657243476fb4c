//! sentence-transformers `Dense` modules after pooling (EmbeddingGemma: 768 → 3072 → 768): the
//! folder's `modules.json` says which run, in order; each is `y = act(W·x + b)` on the pooled
//! vector. A model without them (MiniLM, MPNet, E5) gets an empty stack that changes nothing.
//! Every engine applies the same stack in f32 to its pooled rows, so the projection never
//! differs between engines. It must never read anything but the folder's module files.

use crate::{Error, Result};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Identity,
    Tanh,
}

#[derive(Debug, Clone)]
struct Dense {
    inp: usize,
    out: usize,
    /// (out, inp), f32 on the CPU.
    weight: candle_core::Tensor,
    bias: Option<candle_core::Tensor>,
    act: Activation,
}

/// The `Dense` modules of a sentence-transformers folder, in the order they run.
#[derive(Debug, Clone, Default)]
pub struct DenseStack {
    layers: Vec<Dense>,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::Model(format!("{}: {e}", path.display())))
}

impl DenseStack {
    /// Reads `modules.json` (absent: no Dense modules).
    pub fn load(dir: &Path) -> Result<Self> {
        let modules = dir.join("modules.json");
        if !modules.is_file() {
            return Ok(DenseStack::default());
        }
        let list = read_json(&modules)?;
        let mut layers = Vec::new();
        for m in list.as_array().into_iter().flatten() {
            let kind = m.get("type").and_then(|t| t.as_str()).unwrap_or("");
            if !kind.ends_with(".Dense") {
                continue;
            }
            let sub = dir.join(m.get("path").and_then(|p| p.as_str()).unwrap_or(""));
            layers.push(Dense::load(&sub)?);
        }
        for w in layers.windows(2) {
            if w[0].out != w[1].inp {
                return Err(Error::Model(format!(
                    "{}: Dense modules do not chain ({} outputs into {} inputs)",
                    modules.display(),
                    w[0].out,
                    w[1].inp
                )));
            }
        }
        Ok(DenseStack { layers })
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// The output size, when there is any Dense module.
    pub fn out_dim(&self) -> Option<usize> {
        self.layers.last().map(|l| l.out)
    }

    /// Runs the stack over `rows` pooled vectors of size `dim`, back to back.
    pub fn apply(&self, rows: &[f32], dim: usize) -> Result<Vec<f32>> {
        let mut cur = rows.to_vec();
        let mut width = dim;
        for l in &self.layers {
            if l.inp != width {
                return Err(Error::Embed(format!(
                    "Dense module expects {} inputs, the encoder gives {width}",
                    l.inp
                )));
            }
            let n = cur.len() / width;
            let cpu = &candle_core::Device::Cpu;
            let x = candle_core::Tensor::from_vec(cur, (n, width), cpu)?;
            let mut y = x.matmul(&l.weight.t()?)?;
            if let Some(b) = &l.bias {
                y = y.broadcast_add(b)?;
            }
            if l.act == Activation::Tanh {
                y = y.tanh()?;
            }
            let next: Vec<f32> = y.flatten_all()?.to_vec1()?;
            cur = next;
            width = l.out;
        }
        Ok(cur)
    }
}

impl Dense {
    fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = read_json(&cfg_path)?;
        let num = |k: &str| {
            cfg.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| Error::Model(format!("{}: `{k}` missing", cfg_path.display())))
        };
        let (inp, out) = (num("in_features")?, num("out_features")?);
        let act = match cfg
            .get("activation_function")
            .and_then(|v| v.as_str())
            .unwrap_or("torch.nn.modules.linear.Identity")
        {
            a if a.ends_with("Identity") => Activation::Identity,
            a if a.ends_with("Tanh") => Activation::Tanh,
            other => {
                return Err(Error::Model(format!(
                    "{}: Dense activation `{other}` is not supported (Identity or Tanh)",
                    cfg_path.display()
                )))
            }
        };
        let wpath = dir.join("model.safetensors");
        if !wpath.is_file() {
            return Err(Error::Model(format!(
                "{}: a Dense module needs model.safetensors",
                dir.display()
            )));
        }
        let tensors = candle_core::safetensors::load(&wpath, &candle_core::Device::Cpu)
            .map_err(|e| Error::Model(format!("{}: {e}", wpath.display())))?;
        let get = |name: &str| -> Result<Option<candle_core::Tensor>> {
            match tensors.get(name) {
                None => Ok(None),
                Some(t) => Ok(Some(t.to_dtype(candle_core::DType::F32)?)),
            }
        };
        let weight = get("linear.weight")?
            .ok_or_else(|| Error::Model(format!("{}: no `linear.weight`", wpath.display())))?;
        if weight.dims() != [out, inp] {
            return Err(Error::Model(format!(
                "{}: linear.weight is {:?}, expected [{out}, {inp}]",
                wpath.display(),
                weight.dims()
            )));
        }
        let bias = get("linear.bias")?;
        if bias.as_ref().is_some_and(|b| b.dims() != [out]) {
            return Err(Error::Model(format!(
                "{}: linear.bias is not {out} long",
                wpath.display()
            )));
        }
        Ok(Dense {
            inp,
            out,
            weight,
            bias,
            act,
        })
    }
}
