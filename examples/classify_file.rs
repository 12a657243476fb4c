//! Build an index from labelled conversations, then classify a file with it — the library
//! calls behind `semtel index build` and `semtel classify`, with no CLI involved.
//!
//!     cargo run --release --example classify_file
//!
//! Run from the repository root after `scripts/fetch-model`.

use semtel::app::classify::{ClassifyJob, ClassifyOptions};
use semtel::app::index::build_index;
use semtel::embed::{Encoder, EncoderOptions};
use semtel::input::InputOptions;
use semtel::output::Existing;
use semtel::pipeline::ClassifierOptions;
use semtel::progress::Progress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = std::env::temp_dir().join("semtel-example-classify");
    let _ = std::fs::remove_dir_all(&work);
    let encoder_options = EncoderOptions {
        model: Some("models/all-MiniLM-L6-v2".into()),
        ..Default::default()
    };
    // 1. An exemplar index from the bundled labelled sample.
    let encoder = Encoder::load(&encoder_options)?;
    let (index, built) = build_index(
        &encoder,
        &[("data/exemplars.jsonl".into(), InputOptions::default())],
        &work.join("index"),
        10,
        None,
        &Progress::hidden(),
    )?;
    println!(
        "index: {} exemplars, {} labels, threshold {:.3} ({:.1}s)",
        index.len(),
        index.labels().len(),
        index.manifest.decision.threshold,
        built.seconds
    );
    drop((index, encoder));
    // 2. Classify a file into Parquet, resumable, with the index's calibrated decision.
    let job = ClassifyJob::open(ClassifyOptions {
        index: work.join("index"),
        input: "data/conversations.jsonl".into(),
        output: work.join("labels.parquet"),
        classifier: ClassifierOptions {
            encoder: encoder_options,
            ..Default::default()
        },
        also: Vec::new(),
        input_options: InputOptions::default(),
        part_rows: 20_000,
        existing: Existing::Overwrite,
        llm: None,
        llm_overrides: Default::default(),
        grow_min_confidence: None,
        retry_escalated: false,
        guards: true,
        segment_col: None,
    })?;
    let report = job.run(&Progress::hidden())?;
    let s = &report.summary;
    println!(
        "classified {} rows: {} kept by kNN, {} to escalate, {} errors → {}",
        s.rows_written,
        s.knn,
        s.escalated,
        s.errors,
        work.join("labels.parquet").display()
    );
    for (id, label, by) in semtel::output::read_ids_and_labels(&work.join("labels.parquet"))?
        .iter()
        .take(5)
    {
        println!("  {id:<10} {:<14} {by}", label.as_deref().unwrap_or("-"));
    }
    Ok(())
}
