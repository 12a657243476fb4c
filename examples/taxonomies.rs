//! Several taxonomies from one embedding pass: the topic index decides `label`, a second index
//! (the same exemplars relabelled as `technical` / `everyday`) adds `kind_label`,
//! `kind_confidence` and `kind_decided_by` — what `semtel classify --also kind=DIR` does.
//!
//!     cargo run --release --example taxonomies

use semtel::app::classify::{ClassifyJob, ClassifyOptions};
use semtel::app::index::build_index;
use semtel::embed::{Encoder, EncoderOptions};
use semtel::input::InputOptions;
use semtel::output::Existing;
use semtel::pipeline::ClassifierOptions;
use semtel::progress::Progress;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let work = std::env::temp_dir().join("semtel-example-taxonomies");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let encoder_options = EncoderOptions {
        model: Some("models/all-MiniLM-L6-v2".into()),
        ..Default::default()
    };
    // A second label set over the same exemplars.
    let technical = ["coding", "math", "tech_support", "finance"];
    let mut kinds = String::new();
    let exemplars = std::fs::read_to_string("data/exemplars.jsonl")?;
    for line in exemplars.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line)?;
        let topic = v["label"].as_str().unwrap_or_default().to_string();
        v["label"] = if technical.contains(&topic.as_str()) {
            "technical"
        } else {
            "everyday"
        }
        .into();
        kinds.push_str(&format!("{v}\n"));
    }
    let kinds_path = work.join("kinds.jsonl");
    std::fs::write(&kinds_path, kinds)?;
    let encoder = Encoder::load(&encoder_options)?;
    for (src, dir) in [
        (std::path::PathBuf::from("data/exemplars.jsonl"), "topic"),
        (kinds_path, "kind"),
    ] {
        build_index(
            &encoder,
            &[(src, InputOptions::default())],
            &work.join(dir),
            10,
            None,
            &Progress::hidden(),
        )?;
    }
    drop(encoder);
    let out = work.join("labels.jsonl");
    let report = ClassifyJob::open(ClassifyOptions {
        index: work.join("topic"),
        input: "data/conversations.jsonl".into(),
        output: out.clone(),
        classifier: ClassifierOptions {
            encoder: encoder_options,
            ..Default::default()
        },
        also: vec![("kind".into(), work.join("kind"))],
        input_options: InputOptions::default(),
        part_rows: 20_000,
        existing: Existing::Overwrite,
        llm: None,
        llm_overrides: Default::default(),
        grow_min_confidence: None,
        retry_escalated: false,
        guards: true,
        segment_col: None,
    })?
    .run(&Progress::hidden())?;
    println!("{} rows → {}", report.summary.rows_written, out.display());
    let text = std::fs::read_to_string(&out)?;
    for line in text.lines().take(6) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "  {:<10} topic {:<14} kind {:<10} ({})",
            v["id"].as_str().unwrap_or_default(),
            v["knn_label"].as_str().unwrap_or("-"),
            v["kind_label"].as_str().unwrap_or("-"),
            v["kind_decided_by"].as_str().unwrap_or("-")
        );
    }
    Ok(())
}
