//! The LLM response cache: identical conversations never cost twice, across runs.
//! Keyed by (prompt version, model, hash of the normalised conversation text); stored as an
//! append-only JSONL file, loaded at start. Only labels that passed the schema check are stored.
//! This module must never call an LLM.

use crate::{Error, Result};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

pub use crate::hash::text_hash;

pub struct Cache {
    path: Option<PathBuf>,
    map: HashMap<(String, String, String), String>,
    file: Option<std::fs::File>,
}

impl Cache {
    pub fn disabled() -> Cache {
        Cache {
            path: None,
            map: HashMap::new(),
            file: None,
        }
    }

    pub fn open(path: &Path) -> Result<Cache> {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let mut map = HashMap::new();
        if path.exists() {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            for line in std::io::BufReader::new(f).lines() {
                let Ok(line) = line else { break };
                // A torn last line (killed mid-write) is simply not a cache entry.
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if let (Some(p), Some(m), Some(t), Some(l)) = (
                        v["prompt"].as_str(),
                        v["model"].as_str(),
                        v["text"].as_str(),
                        v["label"].as_str(),
                    ) {
                        map.insert((p.into(), m.into(), t.into()), l.into());
                    }
                }
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Cache {
            path: Some(path.to_path_buf()),
            map,
            file: Some(file),
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn get(&self, prompt: &str, model: &str, text: &str) -> Option<&String> {
        self.map
            .get(&(prompt.to_string(), model.to_string(), text.to_string()))
    }

    pub fn put(&mut self, prompt: &str, model: &str, text: &str, label: &str) {
        let key = (prompt.to_string(), model.to_string(), text.to_string());
        if self.map.contains_key(&key) {
            return;
        }
        if let Some(f) = &mut self.file {
            let line =
                serde_json::json!({"prompt": prompt, "model": model, "text": text, "label": label});
            // A failed cache write costs money later, not correctness now: warn and go on.
            if let Err(e) = writeln!(f, "{line}") {
                tracing::warn!("llm cache {:?}: {e}", self.path);
            }
        }
        self.map.insert(key, label.to_string());
    }
}
