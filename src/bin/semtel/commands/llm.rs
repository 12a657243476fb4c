//! `semtel llm simulate|export-batch|run-batch|import-batch`: the loopback simulator and the
//! OpenAI Batch API path.

use crate::args_tools::LlmCmd;
use crate::options::Ctx;
use anyhow::Result;

pub fn run(ctx: &Ctx, c: LlmCmd) -> Result<()> {
    use semtel::llm::{simulator, LlmConfig};
    match c {
        LlmCmd::Simulate(a) => {
            let truth = simulator::truth_from_file(&a.truth, &ctx.input_options(&a.cols))?;
            let errors = match a.error_model.as_str() {
                "confusable" => {
                    let items: Vec<(String, String)> =
                        semtel::input::read_all(&a.truth, &ctx.input_options(&a.cols))?
                            .into_iter()
                            .filter_map(|r| Some((r.content.ok()?.flatten(), r.label?)))
                            .collect();
                    let encoder = semtel::embed::Encoder::load(&ctx.encoder_options())?;
                    simulator::confusable_from_file(&items, &encoder, a.error_rate)?
                }
                _ => simulator::ErrorModel::Uniform,
            };
            let cfg = simulator::SimConfig {
                rpm: a.rpm,
                tpm: a.tpm,
                latency_ms: a.latency_ms,
                jitter_ms: a.jitter_ms,
                error_rate: a.error_rate,
                errors,
                faults: simulator::Faults::spread(a.fault_rate, &a.faults)
                    .map_err(anyhow::Error::msg)?,
                hang_s: a.hang_s,
                api_key: a.api_key,
                truth,
                seed: a.seed,
                burst_s: a.burst_s,
                headers: a.headers,
                outages: a.outage,
                outage_mode: a.outage_mode,
                drift_to_ms: a.drift_to_ms,
                drift_s: a.drift_s,
                faults_after: a.faults_after,
                ..Default::default()
            };
            let n = cfg.truth.len();
            let h = simulator::start(cfg, a.port)?;
            println!("listening on {} ({} true labels); Ctrl-C stops", h.url(), n);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        LlmCmd::Compare {
            send,
            index,
            input,
            cols,
            a,
            b,
            rows,
            exemplars,
            json,
        } => {
            let name = |p: &std::path::Path| p.display().to_string();
            let r = semtel::app::compare::run(&semtel::app::compare::CompareOptions {
                index,
                classifier: ctx.classifier_options(None, None, None)?,
                input,
                input_options: ctx.input_options(&cols),
                a: (name(&a), LlmConfig::load_with(&a, &send.overrides()?)?),
                b: (name(&b), LlmConfig::load_with(&b, &send.overrides()?)?),
                rows,
                exemplars,
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            }
            eprintln!(
                "{} rows, {} labelled by both: agreement {:.1} %, Cohen's kappa {:.3}",
                r.rows,
                r.compared,
                100.0 * r.agreement,
                r.kappa
            );
            for s in [&r.a, &r.b] {
                eprintln!(
                    "  {}: {} labelled, {} without a label; tokens in {} / out {}; ${:.4}",
                    s.name, s.labelled, s.failed, s.tokens_in, s.tokens_out, s.cost_usd
                );
            }
            if !r.confusions.is_empty() {
                eprintln!("  most frequent disagreements (A → B):");
                for (x, y, n) in r.confusions.iter().take(10) {
                    eprintln!("    {x} → {y}: {n}");
                }
            }
            if r.exemplars_checked > 0 {
                eprintln!(
                    "  {} of {} index exemplars would change label under B{}",
                    r.exemplars_changed.len(),
                    r.exemplars_checked,
                    if r.exemplars_changed.is_empty() {
                        ""
                    } else {
                        ", e.g.:"
                    }
                );
                for (id, old, new) in r.exemplars_changed.iter().take(10) {
                    eprintln!("    {id}: {old} → {new}");
                }
            }
            Ok(())
        }
        LlmCmd::ExportBatch {
            send,
            index,
            input: inp,
            labels,
            llm,
            out,
            cols,
        } => {
            let (idx, pb) = semtel::llm::batch::prompt_builder(&index, &llm, &send.overrides()?)?;
            let s = semtel::llm::batch::export(
                &pb,
                &idx,
                &inp,
                &ctx.input_options(&cols),
                &labels,
                &out,
                ctx.encoder_options().include_system_turns,
            )?;
            eprintln!(
                "wrote {} Batch API requests to {} ({} escalated rows; {} not found in the input){}",
                s.requests,
                out.display(),
                s.escalated_rows,
                s.missing_from_input,
                crate::commands::redacted_note(&s.redacted)
            );
            Ok(())
        }
        LlmCmd::RunBatch {
            send,
            requests,
            llm,
            out,
            concurrency,
        } => {
            let cfg = LlmConfig::load_with(&llm, &send.overrides()?)?;
            let s = semtel::llm::batch::run(&cfg, &requests, &out, concurrency)?;
            eprintln!(
                "ran {} requests against {}: {} ok, {} failed, {} retries; results in {}",
                s.requests,
                cfg.endpoints[0].name,
                s.ok,
                s.failed,
                s.retries,
                out.display()
            );
            Ok(())
        }
        LlmCmd::ImportBatch {
            index,
            results,
            labels,
            llm,
            output,
            price_factor,
        } => {
            let (_, pb) = semtel::llm::batch::prompt_builder(&index, &llm, &Default::default())?;
            let s = semtel::llm::batch::import(&pb, &results, &labels, &output, price_factor)?;
            eprintln!(
                "merged {} results into {}: {} labelled, {} rejected (kept as escalate with the reason), {} ids not escalated in the output; {} rows written",
                s.results,
                output.display(),
                s.labelled,
                s.rejected,
                s.unknown_ids,
                s.rows_written
            );
            Ok(())
        }
    }
}
