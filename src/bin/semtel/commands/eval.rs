//! `semtel eval`: score an index's decisions on a labelled split and print the tables.

use crate::args::EvalArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::embed::Encoder;
use semtel::index::ExemplarIndex;
use semtel::input;
use semtel::pipeline::Classifier;

pub fn run(ctx: &Ctx, a: EvalArgs) -> Result<()> {
    let manifest = ExemplarIndex::read_manifest(&a.index)?;
    if manifest.build.multi_label {
        let mut eo = ctx.encoder_options();
        if eo.model.is_none() {
            eo.model = Some(semtel::index::default_model(&a.index, &manifest.model));
        }
        let encoder = Encoder::load(&eo)?;
        let tax = semtel::pipeline::Taxonomy::open("eval", &a.index, &encoder)?;
        let opts = ctx.input_options(&a.cols);
        let progress = ctx.progress(input::open(&a.input, &opts)?.total_rows(), "eval");
        let r = semtel::app::eval::evaluate_multi(&encoder, &tax, &a.input, &opts, &progress)?;
        progress.finish();
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        println!(
            "multi-label: rows {}  exact-set accuracy {:.4}  micro-F1 {:.4}  macro-F1 {:.4}",
            r.rows, r.subset_accuracy, r.micro_f1, r.macro_f1
        );
        if let Some(k) = &r.kept {
            println!("{}", semtel::multilabel::describe_kept(k));
            return Ok(());
        }
        let p = &r.at_index_threshold;
        println!(
            "index threshold {:.3}: keep {:.1}% at {} exact-set accuracy",
            p.threshold,
            p.coverage * 100.0,
            p.kept_accuracy
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
        );
        for t in &r.at_target {
            println!(
                "  {:>5.1}% exact-set accuracy → keep {:>5.1}%",
                t.target * 100.0,
                t.coverage * 100.0
            );
        }
        return Ok(());
    }
    let classifier = Classifier::open(&a.index, &ctx.classifier_options(a.k, None, a.signal)?)?;
    let opts = ctx.input_options(&a.cols);
    let progress = ctx.progress(input::open(&a.input, &opts)?.total_rows(), "eval");
    let ev = semtel::app::eval::evaluate(&classifier, &a.input, &opts, &progress)?;
    progress.finish();
    let r = &ev.report;
    let picked: Vec<(String, [usize; 4])> = a
        .report_label
        .iter()
        .map(|l| (l.clone(), ev.by_gold.get(l).copied().unwrap_or_default()))
        .collect();
    if a.json {
        let mut v = serde_json::to_value(r)?;
        v["by_signal"] = serde_json::to_value(
            ev.by_signal
                .iter()
                .map(|(s, r)| (s.name(), r))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )?;
        for (l, c) in &picked {
            v["report_labels"][l] = serde_json::json!({"rows": c[0], "escalated": c[1], "kept_right": c[2], "kept_wrong": c[3]});
        }
        if let Some(n) = &ev.novelty {
            v["novelty"] = serde_json::to_value(n)?;
        }
        println!("{v}");
        return Ok(());
    }
    for (l, c) in &picked {
        let n = c[0].max(1) as f64;
        println!(
            "gold `{l}`: {} rows — {:.1}% escalated, {:.1}% kept and right, {:.1}% kept and wrong",
            c[0],
            100.0 * c[1] as f64 / n,
            100.0 * c[2] as f64 / n,
            100.0 * c[3] as f64 / n
        );
    }
    println!(
        "rows {}  accuracy {:.4}  macro-F1 {:.4}  errors {}  (k={}, signal {})",
        r.rows, r.accuracy, r.macro_f1, r.errors, classifier.k, r.signal
    );
    if !r.unseen_gold_labels.is_empty() {
        println!(
            "gold labels missing from the index (always wrong): {}",
            r.unseen_gold_labels.join(", ")
        );
    }
    if let Some(p) = &r.at_index_thresholds {
        println!(
            "index thresholds ({}): keep {:.1}% of rows at {} accuracy",
            if classifier.index.manifest.decision.per_label.is_empty() {
                "global"
            } else {
                "per label"
            },
            p.coverage * 100.0,
            p.kept_accuracy
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
        );
    }
    if let Some(n) = &ev.novelty {
        let pct = |x: Option<f64>| x.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x));
        println!(
            "novelty: {} rows escalated as novel ({} would have been right, {} wrong, {} of a label the index lacks); kept {:.1}% at {} without it, {:.1}% at {} with it",
            n.novel,
            n.novel_would_be_right,
            n.novel_would_be_wrong,
            n.novel_unseen_gold,
            100.0 * n.kept_without,
            pct(n.kept_accuracy_without),
            100.0 * n.kept_with,
            pct(n.kept_accuracy_with)
        );
        if n.unseen_gold_rows > 0 {
            println!(
                "  rows of labels the index lacks: {} — {} kept (always wrong)",
                n.unseen_gold_rows, n.unseen_gold_kept
            );
        }
    }
    println!("\nsignal      AURC    kept@95  kept@97  kept@98   (best thresholds on this split)");
    for (s, rep) in &ev.by_signal {
        println!(
            "{:<11} {:.4}  {:>6.1}%  {:>6.1}%  {:>6.1}%",
            s.name(),
            rep.aurc,
            rep.at_target[1].coverage * 100.0,
            rep.at_target[2].coverage * 100.0,
            rep.at_target[3].coverage * 100.0
        );
    }
    println!("\nkept-accuracy target → share kNN can keep (threshold)");
    for t in &r.at_target {
        println!(
            "  {:>5.1}%  →  {:>5.1}%  ({})",
            t.target * 100.0,
            t.coverage * 100.0,
            t.threshold.map_or("-".into(), |x| format!("{x:.3}"))
        );
    }
    println!("\nthreshold  coverage  kept-accuracy");
    for p in &r.coverage {
        println!(
            "  {:>5.2}    {:>6.1}%   {}",
            p.threshold,
            p.coverage * 100.0,
            p.kept_accuracy
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
        );
    }
    Ok(())
}
