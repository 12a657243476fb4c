//! Exemplar growth during a run (`classify --grow`): rows the LLM labelled join an overlay
//! index that later rows search together with the base index, so the share of rows that need
//! the LLM falls as the run goes. At the end the overlay is written into the index, flagged as
//! LLM-labelled with the model and prompt version.
//!
//! The base index stays read-only during the run; only the overlay changes, under a lock held
//! briefly by adds (rare) and shared by searches.

use crate::index::Exemplar;
use crate::{Error, Result};
use std::sync::RwLock;
use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

/// Overlay keys start here so they never collide with base keys.
pub const OVERLAY_KEY_BASE: u64 = 1 << 48;

pub struct Growth {
    dims: usize,
    index: RwLock<usearch::Index>,
    meta: RwLock<Vec<(Exemplar, u32, Vec<f32>)>>,
    /// Rows whose kNN confidence was below this are not added (too ambiguous to teach).
    pub min_confidence: f32,
}

/// What an overlay held when it was taken: one vector, exemplar and label index each.
#[derive(Debug, Default, Clone)]
pub struct Grown {
    pub vectors: Vec<f32>,
    pub exemplars: Vec<Exemplar>,
    pub labels: Vec<u32>,
}

fn overlay_index(dims: usize) -> Result<usearch::Index> {
    let idx = usearch::Index::new(&IndexOptions {
        dimensions: dims,
        metric: MetricKind::Cos,
        quantization: ScalarKind::F32,
        connectivity: 16,
        expansion_add: 64,
        expansion_search: 64,
        multi: false,
    })
    .map_err(|e| Error::vector_index("growth overlay", e))?;
    idx.reserve_capacity_and_threads(1024, rayon::current_num_threads() + 2)
        .map_err(|e| Error::vector_index("growth overlay", e))?;
    Ok(idx)
}

impl Growth {
    pub fn new(dims: usize, min_confidence: f32) -> Result<Growth> {
        Ok(Growth {
            dims,
            index: RwLock::new(overlay_index(dims)?),
            meta: RwLock::new(Vec::new()),
            min_confidence,
        })
    }

    pub fn len(&self) -> usize {
        self.meta.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn add(&self, vector: &[f32], ex: Exemplar, label: u32) -> Result<()> {
        if vector.len() != self.dims {
            return Err(Error::Internal("growth overlay: wrong vector size".into()));
        }
        let mut meta = self.meta.write().unwrap();
        // usearch takes `&self` even to grow its storage, but a reserve must not overlap a
        // search, so growth takes the lock exclusively.
        #[allow(clippy::readonly_write_lock)]
        let idx = self.index.write().unwrap();
        let key = meta.len();
        if key + 1 > idx.capacity() {
            idx.reserve_capacity_and_threads((key + 1) * 2, rayon::current_num_threads() + 2)
                .map_err(|e| Error::vector_index("growth overlay", e))?;
        }
        idx.add(OVERLAY_KEY_BASE + key as u64, vector)
            .map_err(|e| Error::vector_index("growth overlay", e))?;
        meta.push((ex, label, vector.to_vec()));
        Ok(())
    }

    /// The `k` nearest overlay exemplars: (key, similarity, label).
    pub fn search(&self, q: &[f32], k: usize) -> Vec<(u64, f32, u32)> {
        let meta = self.meta.read().unwrap();
        if meta.is_empty() {
            return Vec::new();
        }
        let idx = self.index.read().unwrap();
        match idx.exact_search(q, k.min(meta.len())) {
            Ok(m) => m
                .keys
                .iter()
                .zip(&m.distances)
                .map(|(&key, &d)| (key, 1.0 - d, meta[(key - OVERLAY_KEY_BASE) as usize].1))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn exemplar(&self, key: u64) -> Exemplar {
        self.meta.read().unwrap()[(key - OVERLAY_KEY_BASE) as usize]
            .0
            .clone()
    }

    /// Everything grown so far; the overlay starts empty again (its rows are about to join
    /// the index, which later searches see instead).
    pub fn take(&self) -> Result<Grown> {
        let mut meta = self.meta.write().unwrap();
        #[allow(clippy::readonly_write_lock)]
        let mut idx = self.index.write().unwrap();
        *idx = overlay_index(self.dims)?;
        let meta = std::mem::take(&mut *meta);
        let mut g = Grown {
            vectors: Vec::with_capacity(meta.len() * self.dims),
            exemplars: Vec::with_capacity(meta.len()),
            labels: Vec::with_capacity(meta.len()),
        };
        for (e, l, vec) in meta {
            g.vectors.extend(vec);
            g.exemplars.push(e);
            g.labels.push(l);
        }
        Ok(g)
    }

    /// Puts back what [`take`](Self::take) returned (its save failed): nothing learned is lost.
    pub fn restore(&self, g: Grown) {
        for ((v, e), l) in g
            .vectors
            .chunks(self.dims.max(1))
            .zip(g.exemplars)
            .zip(g.labels)
        {
            if let Err(e) = self.add(v, e, l) {
                tracing::warn!("growing the index: {e}");
            }
        }
    }
}
