//! `semtel redact`: a file through the redaction stage (rules from `--llm`'s `[redaction]`).

use crate::args::RedactArgs;
use crate::options::Ctx;
use anyhow::{Context, Result};

pub fn run(ctx: &Ctx, a: RedactArgs) -> Result<()> {
    let cfg = a
        .llm
        .as_deref()
        .or(ctx.cfg.llm.as_deref().map(std::path::Path::new))
        .map(semtel::llm::LlmConfig::load)
        .transpose()?;
    let level = match &a.redact {
        Some(l) => l.parse().map_err(anyhow::Error::msg)?,
        None => cfg
            .as_ref()
            .map(|c| c.redact)
            .filter(|l| *l != semtel::pii::Level::Off)
            .unwrap_or_default(),
    };
    let rules = cfg.map(|c| c.redaction).unwrap_or_default();
    let red = semtel::pii::Redactor::new(level, &rules)?;
    let s = semtel::app::redact::run(
        &red,
        &a.input,
        &ctx.input_options(&a.cols),
        &a.output,
        a.overwrite,
    )
    .with_context(|| format!("redacting {}", a.input.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else if !ctx.global.quiet {
        let by: Vec<String> = s
            .redacted
            .0
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        eprintln!(
            "{} rows ({} with personal data, {} unreadable) → {} in {:.2} s; redacted: {}",
            s.rows,
            s.rows_redacted,
            s.error_rows,
            a.output.display(),
            s.seconds,
            if by.is_empty() {
                "nothing".to_string()
            } else {
                by.join(", ")
            }
        );
    }
    Ok(())
}
