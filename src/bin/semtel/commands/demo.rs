//! `semtel demo`: the bundled end-to-end run, printed.

use crate::args::DemoArgs;
use crate::options::Ctx;
use anyhow::Result;

pub fn run(ctx: &Ctx, a: DemoArgs) -> Result<()> {
    let r = semtel::app::demo::run(std::path::Path::new(""), &a.out, &ctx.encoder_options())?;
    println!("model {}", r.model);
    println!(
        "index  {}: {} exemplars, {} labels ({:.2}s)",
        r.index.display(),
        r.exemplars,
        r.labels,
        r.index_seconds
    );
    println!(
        "classify {} → {}: {} rows in {:.2}s ({:.0} rows/s); kNN kept {}, escalated {}, errors {}",
        r.conversations.display(),
        r.output.display(),
        r.run.rows_written,
        r.run.seconds,
        r.run.rows_per_second,
        r.run.knn,
        r.run.escalated,
        r.run.errors
    );
    println!(
        "gold labels of the sample: kNN accuracy {:.1}% on all rows; at the calibrated threshold {:.3} kNN keeps {:.0}% of rows at {} accuracy",
        r.accuracy * 100.0,
        r.threshold,
        r.kept.0 * 100.0,
        r.kept.1.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
    );
    println!("\nfirst rows of {}:", r.output.display());
    for (id, label, by) in &r.first_rows {
        println!("  {id:<10} {:<22} {by}", label.as_deref().unwrap_or("-"));
    }
    Ok(())
}
