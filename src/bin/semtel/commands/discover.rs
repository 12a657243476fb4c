//! `semtel discover`: resolve the flags into [`DiscoverOptions`], run, print the summary.

use crate::args::DiscoverArgs;
use crate::options::Ctx;
use anyhow::Result;
use semtel::app::discover::{self, DiscoverOptions};

pub fn run(ctx: &Ctx, a: DiscoverArgs) -> Result<()> {
    let mut o = DiscoverOptions::new(a.input.clone(), a.out.clone());
    o.input_opts = ctx.input_options(&a.cols);
    o.encoder = ctx.encoder_options();
    o.vectors = a.vectors.clone();
    o.escalated_from = a.escalated_from.clone();
    o.index = a.index.clone();
    o.llm = match &a.llm {
        Some(p) => Some(semtel::llm::LlmConfig::load_with(p, &a.send.overrides()?)?),
        None => None,
    };
    o.prompt = a.prompt.clone();
    o.min_conversations = a.min_conversations;
    o.min_cluster_size = a.min_cluster_size;
    o.min_samples = a.min_samples;
    o.selection = if a.selection == "eom" {
        semtel::cluster::Selection::Eom
    } else {
        semtel::cluster::Selection::Leaf
    };
    o.reduce = a.reduce;
    o.representatives = a.representatives.max(1);
    o.show_examples = a.show_examples;
    o.time_col = a.time_col.clone();
    o.levels = a.levels as usize;
    o.similar_above = a.similar_above;
    let progress = ctx.progress(None, "embed");
    let r = discover::run(&o, &progress)?;
    progress.finish();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    let below = r
        .clusters
        .iter()
        .filter(|c| c.status == "below_floor")
        .count();
    eprintln!(
        "{} rows clustered ({} read, {} unreadable{}; {} embedded, {} vectors reused) in {:.1} s: {} clusters ({} under the privacy floor of {} conversations), {} rows noise ({:.1} %)",
        r.rows_clustered,
        r.rows_read,
        r.unreadable,
        if r.not_escalated > 0 {
            format!(", {} not escalated", r.not_escalated)
        } else {
            String::new()
        },
        r.embedded,
        r.vectors_reused,
        r.seconds.total,
        r.clusters.len(),
        below,
        r.min_conversations,
        r.noise_rows,
        100.0 * r.noise_rows as f64 / r.rows_clustered.max(1) as f64
    );
    if r.clusters.iter().all(|c| c.status == "below_floor") {
        eprintln!(
            "nothing to report: no cluster of at least {} distinct conversations (rows clustered: {})",
            r.min_conversations, r.rows_clustered
        );
    }
    for c in r.clusters.iter().filter(|c| c.status != "below_floor") {
        eprintln!(
            "  #{:<3} {:>6} rows {:<11} {:<32} {}",
            c.cluster,
            c.rows,
            c.status,
            c.name.as_deref().unwrap_or("-"),
            c.suggestion.as_deref().unwrap_or("")
        );
    }
    for g in &r.groups {
        eprintln!(
            "  group {} {}: clusters {:?}",
            g.group,
            g.name.as_deref().unwrap_or("-"),
            g.clusters
        );
    }
    if let Some(l) = &r.llm {
        eprintln!(
            "LLM: {} calls ({} cached, {} failed), ${:.4}",
            l.calls, l.cached, l.failed, l.cost_usd
        );
    } else {
        eprintln!("no --llm: clusters are not named");
    }
    eprintln!(
        "wrote {}/{{taxonomy.toml, clusters.parquet, summary.json, report.html}}",
        o.out.display()
    );
    Ok(())
}
