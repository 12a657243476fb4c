//! `semtel bootstrap`: resolve the flags into [`BootstrapOptions`], run, print the report.

use crate::args::BootstrapArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::app::bootstrap::{self, BootstrapOptions, Sampling};

pub fn run(ctx: &Ctx, a: BootstrapArgs) -> Result<()> {
    let llm = semtel::llm::LlmConfig::load_with(&a.llm, &a.send.overrides()?)?;
    let mut o = BootstrapOptions::new(
        a.input.clone(),
        a.labels.clone(),
        llm,
        a.out.clone(),
        ctx.encoder_options(),
    );
    o.input_options = ctx.input_options(&a.cols);
    o.budget_rows = a.budget_rows;
    o.budget_usd = a.budget_usd;
    o.rounds = a.rounds.max(1);
    o.sampling = if a.sampling == "random" {
        Sampling::Random
    } else {
        Sampling::Representative
    };
    o.max_rows = a.max_rows.max(1);
    o.target = a.target;
    o.holdout = a.holdout;
    o.seed = a.seed;
    o.overwrite = a.overwrite;
    let progress = ctx.progress(None, "embed");
    let r = bootstrap::run(&o, &progress)?;
    progress.finish();
    let work = bootstrap::work_dir(&r.index);
    semtel::report::write_bootstrap(&work, &r)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    eprintln!(
        "read {} rows: {} embedded ({} duplicates skipped, {} unreadable); sampling: {:?}",
        r.input_rows, r.pool_rows, r.duplicates_skipped, r.unreadable_rows, r.sampling
    );
    for x in &r.rounds {
        eprintln!(
            "round {}: LLM labelled {} rows ({} in all, {} without a label), ${:.4} spent; agreement with the LLM on kept rows {:.1} % [{:.1}, {:.1}]; {:.1} % of the corpus would escalate",
            x.round,
            x.labelled,
            x.labelled_total,
            x.failed,
            x.spent_usd,
            100.0 * x.agreement.value,
            100.0 * x.agreement.lo,
            100.0 * x.agreement.hi,
            100.0 * x.escalated_share
        );
    }
    eprintln!("stopped: {}", r.stopped_because);
    if let Some(a) = r.llm_self_agreement {
        eprintln!(
            "the LLM gave the same label to {:.1} % of {} rows asked twice{}; thresholds target {:.1} % agreement with it",
            100.0 * a,
            r.llm_retest_rows,
            r.llm_self_agreement_kept.map_or(String::new(), |k| format!(
                " ({:.1} % of the {} the index keeps)",
                100.0 * k,
                r.llm_retest_kept_rows
            )),
            100.0 * r.target
        );
        if a > 0.99 {
            // At temperature 0 an LLM repeats itself whatever its accuracy.
            eprintln!(
                "note: an LLM that (almost) always repeats itself (temperature 0?) says little about its accuracy; thresholds sit at the {:.0} % cap. Give --target (the agreement you measured between this LLM and hand labels) to spend less",
                100.0 * r.target
            );
        }
    }
    eprintln!(
        "index {}: {} LLM-labelled rows, ${:.4} spent; projected LLM cost per million conversations: ${:.2} hybrid vs ${:.2} LLM-only",
        r.index.display(),
        r.labelled_rows,
        r.spent_usd,
        r.hybrid_per_million_usd,
        r.llm_only_per_million_usd
    );
    if !r.labels_unused.is_empty() {
        eprintln!(
            "labels the LLM never gave ({}): {}",
            r.labels_unused.len(),
            r.labels_unused.join(", ")
        );
    }
    if !r.labels_rare.is_empty() {
        eprintln!(
            "labels given to fewer than 3 rows (too few to calibrate): {}",
            r.labels_rare.join(", ")
        );
    }
    eprintln!(
        "report: {} (and report.json beside it)",
        work.join("report.html").display()
    );
    eprintln!(
        "next: semtel classify --index {} --input … --output … --llm … --grow",
        r.index.display()
    );
    Ok(())
}
