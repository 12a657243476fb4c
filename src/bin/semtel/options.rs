//! Low → high: raw flags ([`crate::args`]) and the configuration file become the library's
//! typed options here, once. Commands never merge settings themselves.

use crate::args::{ColumnArgs, Global};
use anyhow::Result;
use semtel::config::Config;
use semtel::decide::Signal;
use semtel::embed::EncoderOptions;
use semtel::input::{Columns, InputOptions};
use semtel::pipeline::ClassifierOptions;
use semtel::progress::Progress;

/// The resolved settings of one invocation: the configuration file and the global flags,
/// merged once (flags win over the file, the file over built-in defaults). Every command asks
/// it for typed library options instead of reading flags itself.
pub struct Ctx {
    pub cfg: Config,
    pub global: Global,
}

impl Ctx {
    pub fn encoder_options(&self) -> EncoderOptions {
        EncoderOptions {
            model: self.global.model.clone().or(self.cfg.model.clone()),
            device: self
                .global
                .device
                .or_else(|| self.cfg.device.as_deref().and_then(|d| d.parse().ok()))
                .unwrap_or_default(),
            engine: self.global.engine.unwrap_or_default(),
            precision: self.global.precision,
            include_system_turns: self.global.include_system_turns
                || self.cfg.include_system_turns.unwrap_or(false),
            gpu_f32: self.global.gpu_f32,
        }
    }

    pub fn input_options(&self, a: &ColumnArgs) -> InputOptions {
        let mut c: Columns = self.cfg.columns.clone().unwrap_or_default();
        if let Some(v) = &a.id_col {
            c.id = v.clone();
        }
        if let Some(v) = &a.text_col {
            c.text = v.clone();
        }
        if let Some(v) = &a.turns_col {
            c.turns = Some(v.clone());
        }
        if let Some(v) = &a.label_col {
            c.label = v.clone();
        }
        if let Some(v) = &a.split_col {
            c.split = v.clone();
        }
        let defaults = InputOptions::default();
        InputOptions {
            columns: c,
            split: a.split.clone(),
            max_line_bytes: a
                .max_line_bytes
                .or(self.cfg.max_line_bytes)
                .unwrap_or(defaults.max_line_bytes)
                .max(1),
            ..defaults
        }
    }

    pub fn progress(&self, total: Option<u64>, what: &str) -> Progress {
        Progress::new(total, what, self.global.quiet)
    }

    pub fn classifier_options(
        &self,
        k: Option<usize>,
        threshold: Option<f32>,
        signal: Option<Signal>,
    ) -> Result<ClassifierOptions> {
        let c = &self.cfg.classify;
        Ok(ClassifierOptions {
            encoder: self.encoder_options(),
            k: k.or(c.k),
            threshold: threshold.or(c.threshold),
            signal: match signal {
                Some(s) => Some(s),
                None => c
                    .signal
                    .as_deref()
                    .map(str::parse)
                    .transpose()
                    .map_err(anyhow::Error::msg)?,
            },
            writable: false,
            ..Default::default()
        })
    }
}
