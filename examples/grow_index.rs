//! Grow an index from LLM answers during a run: a loopback LLM simulator (answering from the
//! sample's gold labels) labels what kNN escalates, and those rows join the index, so later
//! runs escalate less — `semtel classify --llm CONFIG --grow`.
//!
//!     cargo run --release --example grow_index

use semtel::app::classify::{ClassifyJob, ClassifyOptions};
use semtel::app::index::build_index;
use semtel::embed::{Encoder, EncoderOptions};
use semtel::index::ExemplarIndex;
use semtel::input::{self, InputOptions};
use semtel::llm::simulator::{self, SimConfig};
use semtel::output::Existing;
use semtel::pipeline::ClassifierOptions;
use semtel::progress::Progress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = std::env::temp_dir().join("semtel-example-grow");
    let _ = std::fs::remove_dir_all(&work);
    let encoder_options = EncoderOptions {
        model: Some("models/all-MiniLM-L6-v2".into()),
        ..Default::default()
    };
    // A small index: the first 30 exemplars only.
    let few = work.join("few.jsonl");
    std::fs::create_dir_all(&work)?;
    let all = std::fs::read_to_string("data/exemplars.jsonl")?;
    let first: Vec<&str> = all.lines().step_by(3).collect();
    std::fs::write(&few, first.join("\n") + "\n")?;
    let encoder = Encoder::load(&encoder_options)?;
    build_index(
        &encoder,
        &[(few, InputOptions::default())],
        &work.join("index"),
        10,
        None,
        &Progress::hidden(),
    )?;
    drop(encoder);
    // The simulated LLM knows the sample's labels.
    let mut truth = std::collections::HashMap::new();
    for r in input::read_all(
        "data/conversations.jsonl".as_ref(),
        &InputOptions::default(),
    )? {
        if let (Ok(c), Some(l)) = (r.content, r.label) {
            truth.insert(simulator::truth_key(&c.flatten()), l);
        }
    }
    let sim = simulator::start(
        SimConfig {
            truth,
            ..Default::default()
        },
        0,
    )?;
    let cfg = work.join("llm.toml");
    std::fs::write(
        &cfg,
        format!(
            "cache = \"off\"\n[[endpoints]]\nname = \"sim\"\nurl = \"{}\"\nmodel = \"sim-1\"\n",
            sim.url()
        ),
    )?;
    let before = ExemplarIndex::open(&work.join("index"), true)?.len();
    let report = ClassifyJob::open(ClassifyOptions {
        index: work.join("index"),
        input: "data/conversations.jsonl".into(),
        output: work.join("labels.jsonl"),
        classifier: ClassifierOptions {
            encoder: encoder_options,
            ..Default::default()
        },
        also: Vec::new(),
        input_options: InputOptions::default(),
        part_rows: 20_000,
        existing: Existing::Overwrite,
        llm: Some(cfg),
        llm_overrides: Default::default(),
        grow_min_confidence: Some(0.0),
        retry_escalated: false,
        guards: true,
        segment_col: None,
    })?
    .run(&Progress::hidden())?;
    let after = ExemplarIndex::open(&work.join("index"), true)?.len();
    let s = &report.summary;
    println!(
        "kNN kept {}, the LLM labelled {}; the index grew from {before} to {after} exemplars",
        s.knn, s.llm
    );
    Ok(())
}
