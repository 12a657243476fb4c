//! `semtel bench accuracy-cost`: the curve from kNN-only to LLM-only, with plots and a report.

use crate::args_tools::BenchAccArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::bench::{accuracy_cost, AccuracyCostOptions};
use semtel::pipeline::Classifier;

pub fn run(ctx: &Ctx, a: BenchAccArgs) -> Result<()> {
    let classifier = Classifier::open(&a.index, &ctx.classifier_options(None, None, None)?)?;
    let report = accuracy_cost(AccuracyCostOptions {
        classifier: &classifier,
        input: a.input.clone(),
        input_options: ctx.input_options(&a.cols),
        llm: a.llm.clone(),
        price_in: a.price_in,
        price_out: a.price_out,
        set: a.set.clone(),
    })?;
    semtel::report::write(&a.out, &report)?;
    eprintln!("share to LLM  accuracy  cost/1k conversations");
    for p in report.curve.iter().step_by(4) {
        eprintln!(
            "   {:>5.1}%    {:>6.2}%   ${:.4}",
            p.escalated * 100.0,
            p.accuracy * 100.0,
            p.cost_per_1k_usd
        );
    }
    eprintln!(
        "kNN only {:.2}%; LLM only {:.2}% (${:.4}/1k); calibrated thresholds: {:.1}% to the LLM, {:.2}% accuracy, ${:.4}/1k; report in {}",
        report.knn_only.accuracy * 100.0,
        report.llm_only.accuracy * 100.0,
        report.llm_only.cost_per_1k_usd,
        report.operating_point.escalated * 100.0,
        report.operating_point.accuracy * 100.0,
        report.operating_point.cost_per_1k_usd,
        a.out.join("report.html").display()
    );
    Ok(())
}
