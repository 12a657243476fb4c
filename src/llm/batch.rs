//! The OpenAI Batch API path for offline runs: export the escalated rows of a finished
//! `classify` output as a Batch API request file (`custom_id` = row id, one conversation per
//! request), and merge the provider's results file back through the same strict parser.
//! Rows not answered (or answered outside the schema) stay `escalate` with the reason.

use super::parse::{parse_reply, Answer};
use super::tier::{head_tail_chars, PromptBuilder};
use crate::conversation::{Content, Role};
use crate::index::ExemplarIndex;
use crate::input::{self, InputOptions};
use crate::output::Patch;
use crate::row::LlmInfo;
use crate::{Error, Result};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Default, serde::Serialize)]
pub struct ExportSummary {
    pub requests: usize,
    pub escalated_rows: usize,
    pub missing_from_input: usize,
    /// Personal data replaced in the exported conversations, by type.
    pub redacted: crate::pii::Counts,
}

/// Writes one Batch API request per escalated row of `labels` to `out`.
pub fn export(
    pb: &PromptBuilder,
    index: &ExemplarIndex,
    input_path: &Path,
    input_opts: &InputOptions,
    labels: &Path,
    out: &Path,
    include_system_turns: bool,
) -> Result<ExportSummary> {
    let rows = crate::output::read_stored_rows(labels)?;
    let escalated: HashSet<&String> = rows
        .iter()
        .filter(|(_, r)| r.decided_by == "escalate")
        .map(|(id, _)| id)
        .collect();
    let texts: HashMap<&str, &str> = index
        .exemplars()
        .iter()
        .map(|e| (e.id.as_str(), e.text.as_str()))
        .collect();
    let model = pb
        .cfg
        .endpoints
        .first()
        .map(|e| e.model.clone())
        .unwrap_or_default();
    let f = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let mut w = std::io::BufWriter::new(f);
    let mut s = ExportSummary {
        escalated_rows: escalated.len(),
        ..Default::default()
    };
    let mut reader = input::open(input_path, input_opts)?;
    let mut seen = HashSet::new();
    while let Some(batch) = reader.next_batch()? {
        for r in batch {
            if !escalated.contains(&r.id) || !seen.insert(r.id.clone()) {
                continue;
            }
            let Ok(content) = &r.content else { continue };
            let o = &rows[&r.id];
            let text = match content {
                Content::Text(t) => t.clone(),
                Content::Turns(ts) => {
                    let kept: Vec<_> = ts
                        .iter()
                        .filter(|t| include_system_turns || t.role != Role::System)
                        .cloned()
                        .collect();
                    Content::Turns(kept).flatten()
                }
            };
            let candidates = pb.candidates(o.neighbor_labels.iter().map(String::as_str));
            let examples: Vec<(String, String)> = o
                .neighbor_ids
                .iter()
                .zip(&o.neighbor_labels)
                .filter_map(|(id, l)| texts.get(id.as_str()).map(|t| (l.clone(), t.to_string())))
                .collect();
            let full = candidates.is_empty();
            let (item, counts) = pb.item(
                &head_tail_chars(&text, pb.cfg.max_item_chars),
                candidates,
                &examples,
                full,
            );
            s.redacted.add(&counts);
            let (req, _) = pb.request(&[&item]);
            let mut body = serde_json::Map::new();
            body.insert("model".into(), model.clone().into());
            body.insert(
                "messages".into(),
                serde_json::to_value(&req.messages).expect("json"),
            );
            for (k, v) in &req.parameters {
                body.insert(k.clone(), v.clone());
            }
            body.insert("max_tokens".into(), req.max_tokens.into());
            let line = json!({"custom_id": r.id, "method": "POST", "url": "/v1/chat/completions", "body": body});
            writeln!(w, "{line}").map_err(|e| Error::io(out, e))?;
            s.requests += 1;
        }
    }
    w.flush().map_err(|e| Error::io(out, e))?;
    s.missing_from_input = s.escalated_rows - s.requests;
    Ok(s)
}

#[derive(Debug, Default, serde::Serialize)]
pub struct ImportSummary {
    pub results: usize,
    pub labelled: usize,
    pub rejected: usize,
    pub unknown_ids: usize,
    pub rows_written: usize,
}

/// A parsed Batch API result for one row.
enum Outcome {
    Label {
        label: String,
        tokens_in: u32,
        tokens_out: u32,
        model: String,
    },
    Problem(String),
}

/// Merges a Batch API results file into a classify output, writing `merged`.
pub fn import(
    pb: &PromptBuilder,
    results: &Path,
    labels: &Path,
    merged: &Path,
    price_factor: f64,
) -> Result<ImportSummary> {
    let mut s = ImportSummary::default();
    let mut outcomes: HashMap<String, Outcome> = HashMap::new();
    let f = std::fs::File::open(results).map_err(|e| Error::io(results, e))?;
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(results, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| {
            Error::input(
                results,
                format!(
                    "line {}: not JSON ({e}); is this a Batch API output file?",
                    n + 1
                ),
            )
        })?;
        s.results += 1;
        let id = v["custom_id"].as_str().unwrap_or_default().to_string();
        let body = &v["response"]["body"];
        let status = v["response"]["status_code"].as_u64().unwrap_or(0);
        let outcome = if !v["error"].is_null() || status != 200 {
            Outcome::Problem(format!(
                "batch request failed (status {status}): {}",
                v["error"]
            ))
        } else {
            let content = body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or("");
            let other = Some(pb.other.as_str());
            match parse_reply(content, 1, &pb.schema, other).pop().flatten() {
                Some(Answer::Label(l)) => Outcome::Label {
                    label: pb.schema.labels[l].clone(),
                    tokens_in: body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
                    tokens_out: body["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32,
                    model: body["model"].as_str().unwrap_or_default().to_string(),
                },
                Some(Answer::Other) => Outcome::Problem(
                    "the LLM found none of the candidate labels fitting; rerun it through `classify --llm`".into(),
                ),
                _ => Outcome::Problem(format!(
                    "no label of the schema in the reply: {}",
                    content.chars().take(300).collect::<String>()
                )),
            }
        };
        match &outcome {
            Outcome::Label { .. } => s.labelled += 1,
            Outcome::Problem(_) => s.rejected += 1,
        }
        outcomes.insert(id, outcome);
    }
    let (pin, pout) = pb
        .cfg
        .endpoints
        .first()
        .map(|e| (e.price_in_per_1k, e.price_out_per_1k))
        .unwrap_or((0.0, 0.0));
    let cost =
        |ti: u32, to: u32| (ti as f64 / 1000.0 * pin + to as f64 / 1000.0 * pout) * price_factor;
    let (rows_written, matched) = crate::output::patch_escalated(labels, merged, |id| {
        outcomes.get(id).map(|o| match o {
            Outcome::Label {
                label,
                tokens_in,
                tokens_out,
                model,
            } => Patch::Llm {
                label: label.clone(),
                llm: LlmInfo {
                    model: model.clone(),
                    tokens_in: *tokens_in,
                    tokens_out: *tokens_out,
                    cost_usd: cost(*tokens_in, *tokens_out),
                },
            },
            Outcome::Problem(p) => Patch::Error(p.clone()),
        })
    })?;
    s.rows_written = rows_written;
    s.unknown_ids = s.results - matched;
    Ok(s)
}

#[derive(Debug, Default, serde::Serialize)]
pub struct RunSummary {
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    pub retries: usize,
}

/// Executes a Batch API request file against the first configured endpoint (any
/// OpenAI-compatible server: useful where no Batch API exists), writing a results file in the
/// Batch API's output format. Retries 429 and 5xx with backoff; never loses a line.
pub fn run(
    cfg: &super::LlmConfig,
    requests: &Path,
    out: &Path,
    concurrency: usize,
) -> Result<RunSummary> {
    use super::client::HttpClient;
    let ep = cfg
        .endpoints
        .first()
        .ok_or_else(|| Error::Config("no endpoint configured".into()))?;
    let sent = match &cfg.show_sent {
        Some(p) => Some(Arc::new(super::client::SentLog::open(p)?)),
        None => None,
    };
    let client = Arc::new(HttpClient::new(ep)?.with_sent_log(sent));
    let f = std::fs::File::open(requests).map_err(|e| Error::io(requests, e))?;
    let mut lines: Vec<Value> = Vec::new();
    for (n, l) in std::io::BufReader::new(f).lines().enumerate() {
        let l = l.map_err(|e| Error::io(requests, e))?;
        if l.trim().is_empty() {
            continue;
        }
        lines.push(
            serde_json::from_str(&l)
                .map_err(|e| Error::input(requests, format!("line {}: {e}", n + 1)))?,
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Llm(e.to_string()))?;
    let timeout =
        std::time::Duration::from_secs_f64(cfg.timeout_base_s + cfg.timeout_per_1k_tokens_s);
    let (base, cap, attempts) = (cfg.backoff_base_s, cfg.backoff_max_s, cfg.max_attempts);
    let retry_cap = std::time::Duration::from_secs_f64(cfg.max_retry_after_s);
    let results: Vec<(Value, usize)> = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for (i, line) in lines.into_iter().enumerate() {
            let (client, sem) = (client.clone(), sem.clone());
            set.spawn(async move {
                let _permit = sem.acquire_owned().await.expect("semaphore");
                let id = line["custom_id"].clone();
                let mut retries = 0;
                loop {
                    let r = client.post_raw(line["body"].clone(), timeout).await;
                    let retryable = match &r {
                        Ok((s, _, _)) => *s == 429 || *s >= 500,
                        Err(e) => e.retryable(),
                    };
                    if retryable && (retries as u32) < attempts {
                        retries += 1;
                        let wait = match &r {
                            Ok((_, _, rate)) => rate.retry_after.unwrap_or_default().min(retry_cap),
                            _ => std::time::Duration::ZERO,
                        }
                        .max(super::limiter::backoff(
                            retries as u32,
                            base,
                            cap,
                        ));
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    let v = match r {
                        Ok((status, body, _)) => json!({"id": format!("req-{i}"), "custom_id": id,
                            "response": {"status_code": status, "body": body}, "error": null}),
                        Err(e) => {
                            json!({"id": format!("req-{i}"), "custom_id": id, "response": null,
                            "error": {"message": e.to_string()}})
                        }
                    };
                    return (i, v, retries);
                }
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            let (i, v, retries) = r.expect("batch task");
            out.push((i, v, retries));
        }
        out.sort_by_key(|x| x.0);
        out.into_iter().map(|(_, v, r)| (v, r)).collect()
    });
    let mut s = RunSummary::default();
    let tmp = out.with_extension("tmp");
    let mut w =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
    for (v, retries) in results {
        s.requests += 1;
        s.retries += retries;
        if v["response"]["status_code"] == 200 {
            s.ok += 1;
        } else {
            s.failed += 1;
        }
        writeln!(w, "{v}").map_err(|e| Error::io(&tmp, e))?;
    }
    w.flush().map_err(|e| Error::io(&tmp, e))?;
    drop(w);
    crate::fsio::commit(&tmp, out)?;
    Ok(s)
}

/// The index and prompt builder of a Batch API export or import. Token counts only size
/// requests here (nothing is rate-limited), so a length estimate stands in for the tokenizer.
pub fn prompt_builder(
    index: &Path,
    llm: &Path,
    overrides: &super::config::Overrides,
) -> Result<(ExemplarIndex, PromptBuilder)> {
    let idx = ExemplarIndex::open(index, true)?;
    let pb = PromptBuilder::new(
        super::LlmConfig::load_with(llm, overrides)?,
        idx.labels().to_vec(),
        std::sync::Arc::new(|t: &str| t.len() / 4),
    )?;
    Ok((idx, pb))
}
