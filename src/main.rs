//! The `semtel` command line: argument parsing, configuration merging and human-readable
//! summaries. All work happens in the library; errors become `anyhow` reports here and exit 1.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use semtel::config::Config;
use semtel::decide::Signal;
use semtel::embed::{Device, Encoder, EncoderOptions};
use semtel::index::ExemplarIndex;
use semtel::input::{self, Columns, InputOptions};
use semtel::output::{Existing, OutputSpec, OutputWriter};
use semtel::pipeline::{self, Classifier, ClassifierOptions, NoEscalation};
use semtel::progress::Progress;
use std::path::{Path, PathBuf};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "semtel",
    version,
    about = "Label human–AI conversations embedding-first: kNN over labelled exemplars decides the confident rows, an LLM only the uncertain rest.",
    after_help = "Start with `semtel demo`, then `semtel index build`, `semtel classify`, `semtel eval`."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Global {
    /// TOML configuration file (flags override it).
    #[arg(long, global = true, env = "SEMTEL_CONFIG")]
    config: Option<PathBuf>,
    /// Embedding model: a folder, or a Hugging Face id found in the local hf-hub cache.
    /// Default: the model the index was built with, else all-MiniLM-L6-v2 from models/.
    #[arg(long, global = true)]
    model: Option<String>,
    /// Where the model runs: auto, cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, global = true)]
    device: Option<Device>,
    /// CPU engine: auto (bf16 kernels where the CPU has AVX512-BF16, else candle), fast, candle.
    #[arg(long, global = true)]
    engine: Option<semtel::embed::Engine>,
    /// Run the CUDA engine in f32 instead of f16.
    #[arg(long, global = true)]
    gpu_f32: bool,
    /// Worker threads (default: all cores; also honours RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Keep system turns when embedding (by default they are dropped as boilerplate).
    #[arg(long, global = true)]
    include_system_turns: bool,
    /// No progress bar.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Args, Clone, Default)]
struct ColumnArgs {
    /// Column holding a conversation id (generated as `<file>:<row>` when absent).
    #[arg(long)]
    id_col: Option<String>,
    /// Column holding plain text.
    #[arg(long)]
    text_col: Option<String>,
    /// Column holding `[{role, content}]` turns (default: `turns` or `messages` when present).
    #[arg(long)]
    turns_col: Option<String>,
    /// Column holding the gold label.
    #[arg(long)]
    label_col: Option<String>,
    /// Column holding the split name (used with --split).
    #[arg(long)]
    split_col: Option<String>,
    /// Keep only rows of this split.
    #[arg(long)]
    split: Option<String>,
    /// Longest JSONL line read (bytes); a longer line becomes an error row without being held
    /// in memory. Default 64 MiB.
    #[arg(long)]
    max_line_bytes: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, extend or inspect an exemplar index.
    #[command(subcommand)]
    Index(IndexCmd),
    /// Label conversations (JSONL or Parquet) into JSONL or Parquet, streaming and resumable.
    Classify(ClassifyArgs),
    /// Score kNN decisions on a labelled split: accuracy, macro-F1, coverage at kept-accuracy.
    Eval(EvalArgs),
    /// Choose the confidence signal and escalation thresholds (global and per label) from
    /// labelled data, train the learned head, and store them in the index.
    Calibrate(CalibrateArgs),
    /// Write embeddings (id, label, vector) of a file's conversations to Parquet.
    Embed {
        #[arg(long)]
        input: PathBuf,
        /// Parquet file to write.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        cols: ColumnArgs,
    },
    /// Benchmarks that print figures (speed goals live here, not in tests).
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The static-embedding tier: distil a token table from the transformer.
    #[command(subcommand)]
    Static(StaticCmd),
    /// The LLM tier's tools: a loopback simulator, and the OpenAI Batch API path.
    #[command(subcommand)]
    Llm(LlmCmd),
    /// Run the whole job on the bundled sample (builds an index from data/, classifies, reports).
    Demo(DemoArgs),
}

#[derive(Subcommand)]
enum IndexCmd {
    /// Embed a labelled set into a new index directory.
    Build {
        /// Labelled JSONL/Parquet file(s).
        #[arg(long, required = true, num_args = 1..)]
        exemplars: Vec<PathBuf>,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        cols: ColumnArgs,
        /// Neighbours per vote.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Global confidence threshold below which rows escalate. Default: chosen by
        /// leave-one-out over the exemplars for 95% kept-accuracy (see `semtel calibrate`).
        #[arg(long)]
        threshold: Option<f32>,
        /// Replace an existing index at --out.
        #[arg(long)]
        overwrite: bool,
        /// The label column holds a set of labels per row (a JSON list or `a|b`).
        #[arg(long)]
        multi_label: bool,
    },
    /// Add labelled rows to an existing index.
    Add {
        #[arg(long)]
        index: PathBuf,
        #[arg(long, required = true, num_args = 1..)]
        exemplars: Vec<PathBuf>,
        #[command(flatten)]
        cols: ColumnArgs,
    },
    /// Print an index's manifest.
    Info {
        #[arg(long)]
        index: PathBuf,
    },
}

#[derive(Args)]
struct ClassifyArgs {
    #[arg(long)]
    index: PathBuf,
    /// Conversations: JSONL or Parquet.
    #[arg(long)]
    input: PathBuf,
    /// Results: *.jsonl, *.parquet, or a directory for a Parquet dataset.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    cols: ColumnArgs,
    /// Input columns to copy into the output (comma-separated).
    #[arg(long, value_delimiter = ',')]
    passthrough: Vec<String>,
    /// Apply another taxonomy from the same embeddings: NAME=INDEX_DIR (repeatable). Adds
    /// NAME_label (NAME_labels for multi-label indexes), NAME_confidence, NAME_decided_by.
    #[arg(long, value_name = "NAME=DIR")]
    also: Vec<String>,
    /// Continue a previous run into the same output, skipping ids already written.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace an existing output.
    #[arg(long)]
    overwrite: bool,
    /// Neighbours per vote (default: the index's).
    #[arg(long)]
    k: Option<usize>,
    /// Confidence threshold (default: the index's calibrated thresholds).
    #[arg(long)]
    threshold: Option<f32>,
    /// Confidence signal: vote_sim (default), vote, margin or top1.
    #[arg(long)]
    signal: Option<Signal>,
    /// Rows per pipeline chunk.
    #[arg(long, default_value_t = 1024)]
    chunk_rows: usize,
    /// Parquet outputs: close a part file (durable on disk) after this many rows.
    #[arg(long, default_value_t = 20_000)]
    part_rows: usize,
    /// Print the run summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// LLM tier configuration (TOML): escalated rows are labelled by these endpoints.
    #[arg(long)]
    llm: Option<PathBuf>,
    /// Add LLM-labelled rows to the exemplar index as the run goes (and save them into the
    /// index at the end), so fewer later rows need the LLM.
    #[arg(long, requires = "llm")]
    grow: bool,
    /// With --grow: only rows whose kNN confidence was at least this are added.
    #[arg(long, default_value_t = 0.0)]
    grow_min_confidence: f32,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    index: PathBuf,
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    cols: ColumnArgs,
    #[arg(long)]
    k: Option<usize>,
    #[arg(long)]
    signal: Option<Signal>,
    /// Also report what happened to rows of these gold labels (e.g. `oos`): escalated, kept
    /// right, kept wrong.
    #[arg(long, value_delimiter = ',')]
    report_label: Vec<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum StaticCmd {
    /// Distil a static token table (model2vec-style) from the model into a new model folder,
    /// usable anywhere --model is (embedding becomes a lookup and a mean).
    Distill {
        #[arg(long)]
        out: PathBuf,
        /// Output dimensions (PCA).
        #[arg(long, default_value_t = 256)]
        dims: usize,
        /// Texts (JSONL/Parquet) to count token frequencies on, for SIF weights.
        #[arg(long)]
        corpus: Vec<PathBuf>,
        #[command(flatten)]
        cols: ColumnArgs,
    },
}

#[derive(Subcommand)]
enum LlmCmd {
    /// Serve an OpenAI-compatible simulator on 127.0.0.1 that answers from true labels.
    Simulate(SimulateArgs),
    /// Write the escalated rows of a classify output as an OpenAI Batch API request file.
    ExportBatch {
        #[arg(long)]
        index: PathBuf,
        /// The conversations that were classified.
        #[arg(long)]
        input: PathBuf,
        /// The classify output holding `escalate` rows.
        #[arg(long)]
        labels: PathBuf,
        #[arg(long)]
        llm: PathBuf,
        /// Batch API request file (JSONL) to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        cols: ColumnArgs,
    },
    /// Execute a Batch API request file against the configured endpoint (any OpenAI-compatible
    /// server), writing a results file in the Batch API's format.
    RunBatch {
        #[arg(long)]
        requests: PathBuf,
        #[arg(long)]
        llm: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Merge a Batch API results file into a classify output (through the strict parser).
    ImportBatch {
        #[arg(long)]
        index: PathBuf,
        #[arg(long)]
        results: PathBuf,
        #[arg(long)]
        labels: PathBuf,
        #[arg(long)]
        llm: PathBuf,
        /// Where to write the merged output (may equal --labels).
        #[arg(long)]
        output: PathBuf,
        /// Price multiplier for batch calls (OpenAI's Batch API costs half).
        #[arg(long, default_value_t = 0.5)]
        price_factor: f64,
    },
}

#[derive(Args)]
struct SimulateArgs {
    /// Labelled file (JSONL/Parquet) the simulator takes true labels from.
    #[arg(long)]
    truth: PathBuf,
    #[command(flatten)]
    cols: ColumnArgs,
    /// Port on 127.0.0.1 (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, default_value_t = 0)]
    rpm: u64,
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    #[arg(long, default_value_t = 300.0)]
    latency_ms: f64,
    #[arg(long, default_value_t = 50.0)]
    jitter_ms: f64,
    /// Probability of a wrong (but valid) label per item.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Probability of an injected fault per request.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Fault kinds: all, or a list of 5xx, hang, malformed, out_of_schema, truncated, drop.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    faults: Vec<String>,
    #[arg(long, default_value_t = 30.0)]
    hang_s: f64,
    /// Require this API key (as Bearer or api-key header).
    #[arg(long)]
    api_key: Option<String>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Embedding throughput of each engine on a fixed realistic text set, optionally against
    /// sentence-transformers on the same texts in the same run.
    Embed(BenchEmbedArgs),
    /// The LLM tier against the loopback simulator: throughput at fixed limits (adaptive vs
    /// fixed concurrency), tokens per item for 1/4/8/16 items per call with and without
    /// candidate narrowing, and 30 % injected faults.
    Llm(BenchLlmArgs),
    /// Accuracy versus cost: from kNN-only to LLM-only, escalating the least confident rows
    /// first; JSON, CSV, PNG and SVG plots and an HTML report.
    AccuracyCost(BenchAccArgs),
}

#[derive(Args)]
struct BenchAccArgs {
    #[arg(long)]
    index: PathBuf,
    /// Labelled conversations to score.
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    cols: ColumnArgs,
    /// `oracle:<accuracy>` (the gold label, replaced by a wrong one at 1 − accuracy; a
    /// simulated LLM) or an LLM configuration file (every row is sent to its endpoints).
    #[arg(long)]
    llm: String,
    /// Output folder for accuracy_cost.{json,csv,png,svg} and report.html.
    #[arg(long)]
    out: PathBuf,
    /// Name shown in the report (default: the input's file name and split).
    #[arg(long)]
    set: Option<String>,
    /// Prices for the oracle's cost estimate, USD per 1M input / output tokens.
    #[arg(long, default_value_t = 0.15)]
    price_in: f64,
    #[arg(long, default_value_t = 0.60)]
    price_out: f64,
}

#[derive(Args)]
struct BenchLlmArgs {
    /// Index whose neighbours feed candidate narrowing and few-shot examples.
    #[arg(long)]
    index: PathBuf,
    /// Labelled file: the items and the simulator's truth.
    #[arg(long)]
    truth: PathBuf,
    #[arg(long, default_value = "test")]
    split: String,
    #[arg(long, default_value_t = 2000)]
    items: usize,
    /// Scenarios: throughput, tokens, faults.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,tokens,faults"
    )]
    scenarios: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchEmbedArgs {
    /// Folder with the shared data sets (the text set is drawn from it).
    #[arg(long, default_value = "../shared")]
    shared: PathBuf,
    #[arg(long, default_value_t = 2000)]
    texts: usize,
    /// Embed the texts of this JSONL file (`{"text": ...}` per line) instead of the set drawn
    /// from --shared (for machines without the data sets, e.g. a GPU box).
    #[arg(long)]
    texts_file: Option<PathBuf>,
    /// Write the text set used to this JSONL file (to rerun the same texts elsewhere).
    #[arg(long)]
    save_texts: Option<PathBuf>,
    /// Timed passes per engine (medians are reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Engines to run, comma-separated: fast, candle.
    #[arg(long, value_delimiter = ',', default_value = "fast,candle")]
    engines: Vec<semtel::embed::Engine>,
    /// Python interpreter with sentence-transformers (see benches/setup-st.sh) to compare with.
    #[arg(long)]
    st: Option<PathBuf>,
    /// sentence-transformers dtypes to run (f32, bf16, f16).
    #[arg(long, default_value = "f32,bf16")]
    st_dtypes: String,
    /// sentence-transformers batch size (its default is 32; GPUs want more).
    #[arg(long, default_value_t = 32)]
    st_batch_size: usize,
    /// Padded-token budget per batch.
    #[arg(long)]
    batch_tokens: Option<usize>,
    /// Most rows per batch.
    #[arg(long)]
    batch_rows: Option<usize>,
    /// Print all results as JSON lines.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CalibrateArgs {
    #[arg(long)]
    index: PathBuf,
    /// Wanted accuracy on the rows kNN keeps.
    #[arg(long, default_value_t = 0.97, conflicts_with = "budget")]
    target: f64,
    /// Share of rows that may go to the LLM (instead of --target).
    #[arg(long)]
    budget: Option<f64>,
    /// Confidence signal (default: the lowest risk–coverage area among all).
    #[arg(long)]
    signal: Option<Signal>,
    /// Calibrate on this labelled file (e.g. a validation split) instead of cross-validating
    /// over the exemplars.
    #[arg(long)]
    labelled: Option<PathBuf>,
    #[command(flatten)]
    cols: ColumnArgs,
    /// Do not train the learned head (kNN signals only).
    #[arg(long)]
    no_head: bool,
    /// One global threshold instead of per-label ones.
    #[arg(long)]
    no_per_label: bool,
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Head training: epochs, L2 penalty, learning rate.
    #[arg(long)]
    head_epochs: Option<usize>,
    #[arg(long)]
    head_l2: Option<f64>,
    #[arg(long)]
    head_lr: Option<f64>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo writes its index and labels.
    #[arg(long, default_value = "out/demo")]
    out: PathBuf,
}

struct Ctx {
    cfg: Config,
    global: Global,
}

impl Ctx {
    fn encoder_options(&self) -> EncoderOptions {
        EncoderOptions {
            model: self.global.model.clone().or(self.cfg.model.clone()),
            device: self
                .global
                .device
                .or_else(|| self.cfg.device.as_deref().and_then(|d| d.parse().ok()))
                .unwrap_or_default(),
            engine: self.global.engine.unwrap_or_default(),
            include_system_turns: self.global.include_system_turns
                || self.cfg.include_system_turns.unwrap_or(false),
            gpu_f32: self.global.gpu_f32,
        }
    }

    fn input_options(&self, a: &ColumnArgs) -> InputOptions {
        let mut c: Columns = self.cfg.columns.clone().unwrap_or_default();
        if let Some(v) = &a.id_col {
            c.id = v.clone();
        }
        if let Some(v) = &a.text_col {
            c.text = v.clone();
        }
        if let Some(v) = &a.turns_col {
            c.turns = Some(v.clone());
        }
        if let Some(v) = &a.label_col {
            c.label = v.clone();
        }
        if let Some(v) = &a.split_col {
            c.split = v.clone();
        }
        let defaults = InputOptions::default();
        InputOptions {
            columns: c,
            split: a.split.clone(),
            max_line_bytes: a
                .max_line_bytes
                .or(self.cfg.max_line_bytes)
                .unwrap_or(defaults.max_line_bytes)
                .max(1),
            ..defaults
        }
    }

    fn progress(&self, total: Option<u64>, what: &str) -> Progress {
        Progress::new(total, what, self.global.quiet)
    }
}

fn main() {
    semtel::error::quiet_expected_panics();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEMTEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        let code = if e.downcast_ref::<RunHadErrors>().is_some() {
            3
        } else {
            1
        };
        std::process::exit(code);
    }
}

fn run(cli: Cli) -> Result<()> {
    let cfg = match &cli.global.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let threads = cli.global.threads.or(cfg.threads);
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle reads RAYON_NUM_THREADS for its own matmul parallelism.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build_global();
    let ctx = Ctx {
        cfg,
        global: cli.global.clone(),
    };
    match cli.cmd {
        Cmd::Index(IndexCmd::Build {
            exemplars,
            out,
            cols,
            k,
            threshold,
            overwrite,
            multi_label,
        }) => index_build(
            &ctx,
            &exemplars,
            &out,
            &cols,
            k,
            threshold,
            overwrite,
            multi_label,
        ),
        Cmd::Index(IndexCmd::Add {
            index,
            exemplars,
            cols,
        }) => index_add(&ctx, &index, &exemplars, &cols),
        Cmd::Index(IndexCmd::Info { index }) => {
            let idx = ExemplarIndex::open(&index, true)?;
            println!("{}", serde_json::to_string_pretty(&idx.manifest)?);
            Ok(())
        }
        Cmd::Classify(a) => classify(&ctx, a),
        Cmd::Eval(a) => eval(&ctx, a),
        Cmd::Calibrate(a) => calibrate(&ctx, a),
        Cmd::Demo(a) => demo(&ctx, a),
        Cmd::Bench(BenchCmd::Embed(a)) => bench_embed(&ctx, a),
        Cmd::Bench(BenchCmd::Llm(a)) => bench_llm(&ctx, a),
        Cmd::Bench(BenchCmd::AccuracyCost(a)) => bench_accuracy_cost(&ctx, a),
        Cmd::Llm(c) => llm_cmd(&ctx, c),
        Cmd::Static(StaticCmd::Distill {
            out,
            dims,
            corpus,
            cols,
        }) => {
            let encoder = Encoder::load(&ctx.encoder_options())?;
            let opts = ctx.input_options(&cols);
            let mut docs = Vec::new();
            for c in &corpus {
                for r in input::read_all(c, &opts)? {
                    if let Ok(content) = r.content {
                        if let Ok(rd) = encoder.renderer.render(&content) {
                            docs.push(encoder.renderer.content_ids(&rd.ids).to_vec());
                        }
                    }
                }
            }
            let s = semtel::embed::static_model::distill(&encoder, &out, dims, &docs)?;
            eprintln!(
                "distilled {} tokens × {} dims into {} ({:.0}% of the variance kept; weights: {}; {:.1}s)",
                s.vocab,
                s.dims,
                out.display(),
                s.explained_variance * 100.0,
                s.weighting,
                s.seconds
            );
            Ok(())
        }
        Cmd::Embed {
            input,
            output,
            cols,
        } => {
            let encoder = Encoder::load(&ctx.encoder_options())?;
            let opts = ctx.input_options(&cols);
            let progress = ctx.progress(input::open(&input, &opts)?.total_rows(), "embed");
            let s = semtel::ops::embed_file(&encoder, &input, &opts, &output, &progress)?;
            progress.finish();
            eprintln!(
                "embedded {} rows into {} ({:.1}s, {:.0} rows/s)",
                s.added,
                output.display(),
                s.seconds,
                s.added as f64 / s.seconds.max(1e-9)
            );
            report_skips(&s);
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)] // mirrors the CLI flags one to one
fn index_build(
    ctx: &Ctx,
    files: &[PathBuf],
    out: &Path,
    cols: &ColumnArgs,
    k: usize,
    threshold: Option<f32>,
    overwrite: bool,
    multi_label: bool,
) -> Result<()> {
    if out.join(semtel::index::MANIFEST).exists() {
        if overwrite {
            std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
        } else {
            bail!(
                "{} already holds an index; pass --overwrite to replace it or use `semtel index add`",
                out.display()
            );
        }
    }
    let encoder = Encoder::load(&ctx.encoder_options())?;
    let opts = ctx.input_options(cols);
    let sources: Vec<(PathBuf, InputOptions)> =
        files.iter().map(|f| (f.clone(), opts.clone())).collect();
    let total = files
        .iter()
        .filter_map(|f| input::open(f, &opts).ok().and_then(|r| r.total_rows()))
        .sum();
    let progress = ctx.progress(Some(total), "index");
    let (index, s) = semtel::ops::build_index_with(
        &encoder,
        &sources,
        out,
        k,
        threshold,
        multi_label,
        &progress,
    )?;
    progress.finish();
    eprintln!(
        "built {}: {} exemplars, {} labels, model {} ({:.1}s, {:.0} exemplars/s); threshold {:.3} ({})",
        out.display(),
        index.len(),
        index.labels().len(),
        index.manifest.model.id,
        s.seconds,
        s.added as f64 / s.seconds.max(1e-9),
        index.manifest.decision.threshold,
        if threshold.is_some() { "given" } else { "leave-one-out, 95% kept-accuracy" }
    );
    report_skips(&s);
    Ok(())
}

fn report_skips(s: &semtel::ops::AddSummary) {
    if s.skipped_errors + s.skipped_unlabelled > 0 {
        eprintln!(
            "skipped {} unreadable and {} unlabelled rows; first problems:",
            s.skipped_errors, s.skipped_unlabelled
        );
        for p in s.problems.iter().take(5) {
            eprintln!("  {p}");
        }
    }
}

fn index_add(ctx: &Ctx, dir: &Path, files: &[PathBuf], cols: &ColumnArgs) -> Result<()> {
    let mut index = ExemplarIndex::open(dir, false)?;
    let mut eo = ctx.encoder_options();
    if eo.model.is_none() {
        eo.model = Some(index.manifest.model.id.clone());
    }
    let encoder = Encoder::load(&eo)?;
    index.check_model(&encoder.files, encoder.dim())?;
    let opts = ctx.input_options(cols);
    let mut added = 0;
    for f in files {
        let progress = ctx.progress(input::open(f, &opts)?.total_rows(), "add");
        let s = semtel::ops::add_exemplars(&encoder, &mut index, f, &opts, &progress)?;
        progress.finish();
        report_skips(&s);
        added += s.added;
    }
    if index
        .manifest
        .decision
        .calibration
        .as_ref()
        .is_some_and(|c| c["method"] == "leave-one-out over exemplars")
    {
        semtel::calibrate::auto_calibrate(&mut index, semtel::calibrate::DEFAULT_TARGET)?;
    }
    index.save()?;
    eprintln!(
        "added {added} exemplars to {}: now {} exemplars, {} labels",
        dir.display(),
        index.len(),
        index.labels().len()
    );
    Ok(())
}

fn classifier_options(
    ctx: &Ctx,
    k: Option<usize>,
    threshold: Option<f32>,
    signal: Option<Signal>,
) -> Result<ClassifierOptions> {
    let c = &ctx.cfg.classify;
    Ok(ClassifierOptions {
        encoder: ctx.encoder_options(),
        k: k.or(c.k),
        threshold: threshold.or(c.threshold),
        signal: match signal {
            Some(s) => Some(s),
            None => c
                .signal
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?,
        },
        writable: false,
    })
}

fn classify(ctx: &Ctx, a: ClassifyArgs) -> Result<()> {
    let mut classifier = Classifier::open(
        &a.index,
        &classifier_options(ctx, a.k, a.threshold, a.signal)?,
    )?;
    for spec in &a.also {
        let (name, dir) = spec
            .split_once('=')
            .with_context(|| format!("--also {spec}: expected NAME=INDEX_DIR"))?;
        let t = semtel::pipeline::Taxonomy::open(name, Path::new(dir), &classifier.encoder)?;
        classifier.extra.push(t);
    }
    let growth = if a.grow {
        let g = std::sync::Arc::new(semtel::grow::Growth::new(
            classifier.encoder.dim(),
            a.grow_min_confidence,
        )?);
        classifier.growth = Some(g.clone());
        Some(g)
    } else {
        None
    };
    let mut opts = ctx.input_options(&a.cols);
    opts.batch_rows = a.chunk_rows.max(1);
    let mut passthrough = a.passthrough.clone();
    if passthrough.is_empty() {
        passthrough = ctx.cfg.classify.passthrough.clone().unwrap_or_default();
    }
    opts.columns.passthrough = passthrough.clone();
    let reader = input::open(&a.input, &opts)?;
    let mut spec = OutputSpec::new(
        passthrough
            .into_iter()
            .zip(reader.passthrough_types())
            .collect(),
    );
    spec.part_rows = a.part_rows.max(1);
    spec.taxonomies = classifier.taxonomy_columns();
    let existing = if a.resume {
        Existing::Resume
    } else if a.overwrite {
        Existing::Overwrite
    } else {
        Existing::Refuse
    };
    let (writer, done) = OutputWriter::open(&a.output, spec, existing)?;
    if a.resume && !done.is_empty() {
        eprintln!(
            "resuming: {} rows already in {}",
            done.len(),
            a.output.display()
        );
    }
    let progress = ctx.progress(reader.total_rows(), "classify");
    let llm_path = a.llm.clone().or(ctx.cfg.llm.clone().map(PathBuf::from));
    let mut tier = match &llm_path {
        Some(p) => Some(make_tier(ctx, &classifier, p)?),
        None => None,
    };
    if let (Some(t), Some(g)) = (tier.as_mut(), &growth) {
        let g = g.clone();
        let labels = classifier.index.labels().to_vec();
        let version = t.prompt_version().to_string();
        t.on_label(Box::new(move |row, v, text| {
            if row.confidence.unwrap_or(0.0) < g.min_confidence {
                return;
            }
            let (Some(label), Some(llm)) = (&row.label, &row.llm) else {
                return;
            };
            let Ok(l) = labels.binary_search(label) else {
                return;
            };
            let ex = semtel::index::Exemplar {
                id: row.id.clone(),
                label: label.clone(),
                source: "llm".into(),
                llm_model: Some(llm.model.clone()),
                prompt_version: Some(version.clone()),
                text: text.to_string(),
            };
            if let Err(e) = g.add(v, ex, l as u32) {
                tracing::warn!("growing the index: {e}");
            }
        }));
    }
    let summary = match tier.as_mut() {
        Some(t) => pipeline::run(&classifier, reader, writer, done, t, &progress)?,
        None => pipeline::run(
            &classifier,
            reader,
            writer,
            done,
            &mut NoEscalation,
            &progress,
        )?,
    };
    progress.finish();
    let llm_stats = tier.as_ref().map(|t| t.stats.clone());
    if a.json {
        let mut v = serde_json::to_value(&summary)?;
        if let Some(s) = &llm_stats {
            v["llm"] = serde_json::to_value(s)?;
        }
        println!("{v}");
    }
    eprintln!(
        "wrote {} rows to {} in {:.1}s ({:.0} rows/s): knn {}, escalate {}, llm {}, errors {}{}",
        summary.rows_written,
        a.output.display(),
        summary.seconds,
        summary.rows_per_second,
        summary.knn,
        summary.escalated,
        summary.llm,
        summary.errors,
        if summary.rows_skipped_resume > 0 {
            format!(", {} skipped (already done)", summary.rows_skipped_resume)
        } else {
            String::new()
        }
    );
    if let Some(s) = &llm_stats {
        print_llm_summary(s, &summary);
    }
    if let Some(g) = &growth {
        let (vectors, ex) = g.take();
        let n = ex.len();
        drop(classifier);
        if n > 0 {
            let mut index = ExemplarIndex::open(&a.index, false)?;
            index.add(&vectors, ex)?;
            index.save()?;
        }
        eprintln!("grew {} by {n} LLM-labelled exemplars", a.index.display());
    }
    if summary.errors > 0 {
        eprintln!("rows with decided_by=error carry the reason in their `error` column");
    }
    if summary.duplicate_ids > 0 {
        eprintln!(
            "warning: {} rows repeat an id of an earlier row; each was classified and written as its own row (check --id-col if ids should be unique)",
            summary.duplicate_ids
        );
    }
    if summary.internal_errors > 0 {
        return Err(RunHadErrors(format!(
            "{} rows hit an internal error (a semtel bug) and were written as error rows; every other row was classified",
            summary.internal_errors
        ))
        .into());
    }
    Ok(())
}

/// A run that finished and wrote every row, but some rows hit internal failures: exit code 3,
/// so scripts can tell it from a run that stopped (exit 1).
#[derive(Debug)]
struct RunHadErrors(String);

impl std::fmt::Display for RunHadErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RunHadErrors {}

fn make_tier(ctx: &Ctx, classifier: &Classifier, path: &Path) -> Result<semtel::llm::LlmTier> {
    let cfg = semtel::llm::LlmConfig::load(path)?;
    let tok = std::sync::Arc::new(classifier.encoder.renderer.tokenizer().clone());
    let counter: semtel::llm::tier::TokenCounter = std::sync::Arc::new(move |t: &str| {
        tok.encode_fast(t, false)
            .map(|e| e.len())
            .unwrap_or(t.len() / 4)
    });
    let tier = semtel::llm::LlmTier::new(cfg, classifier.index.labels().to_vec(), counter)?;
    Ok(tier.with_system_turns(ctx.encoder_options().include_system_turns))
}

fn print_llm_summary(s: &semtel::llm::LlmStats, run: &pipeline::RunSummary) {
    eprintln!(
        "LLM tier: {} rows escalated → {} labelled, {} still escalated after retries; {} calls ({} items sent), {} cache hits, {} duplicates shared",
        s.rows_in, s.rows_labelled, s.rows_failed, s.calls, s.items_sent, s.cache_hits, s.deduplicated
    );
    eprintln!(
        "          tokens in {} / out {}, cost ${:.4}; 429s {}, server errors {}, timeouts {}, flawed replies {}, items retried {}",
        s.tokens_in, s.tokens_out, s.cost_usd, s.rate_limited, s.server_errors, s.timeouts, s.bad_replies, s.retried_items
    );
    let paid_items = s
        .rows_labelled
        .saturating_sub(s.cache_hits + s.deduplicated)
        .max(1);
    if s.cost_usd > 0.0 {
        let per_item = s.cost_usd / paid_items as f64;
        let classified = run.rows_written.saturating_sub(run.errors);
        let llm_only = per_item * classified as f64;
        eprintln!(
            "          cost per LLM-labelled row ${:.6}; LLM-only for all {} rows ≈ ${:.4}; saved ≈ ${:.4} ({:.0}%)",
            per_item,
            classified,
            llm_only,
            llm_only - s.cost_usd,
            100.0 * (1.0 - s.cost_usd / llm_only.max(1e-12))
        );
    }
}

fn llm_cmd(ctx: &Ctx, c: LlmCmd) -> Result<()> {
    use semtel::llm::{simulator, LlmConfig};
    match c {
        LlmCmd::Simulate(a) => {
            let opts = ctx.input_options(&a.cols);
            let rows = input::read_all(&a.truth, &opts)?;
            let mut truth = std::collections::HashMap::new();
            for r in rows {
                if let (Ok(c), Some(l)) = (r.content, r.label) {
                    truth.insert(simulator::truth_key(&c.flatten()), l);
                }
            }
            let cfg = simulator::SimConfig {
                rpm: a.rpm,
                tpm: a.tpm,
                latency_ms: a.latency_ms,
                jitter_ms: a.jitter_ms,
                error_rate: a.error_rate,
                faults: simulator::Faults::spread(a.fault_rate, &a.faults)
                    .map_err(anyhow::Error::msg)?,
                hang_s: a.hang_s,
                api_key: a.api_key,
                truth,
                ..Default::default()
            };
            let n = cfg.truth.len();
            let h = simulator::start(cfg, a.port)?;
            println!("listening on {} ({} true labels); Ctrl-C stops", h.url(), n);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        LlmCmd::ExportBatch {
            index,
            input: inp,
            labels,
            llm,
            out,
            cols,
        } => {
            let (idx, pb) = batch_prompts(&index, &llm)?;
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
                "wrote {} Batch API requests to {} ({} escalated rows; {} not found in the input)",
                s.requests,
                out.display(),
                s.escalated_rows,
                s.missing_from_input
            );
            Ok(())
        }
        LlmCmd::RunBatch {
            requests,
            llm,
            out,
            concurrency,
        } => {
            let cfg = LlmConfig::load(&llm)?;
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
            let (_, pb) = batch_prompts(&index, &llm)?;
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

fn eval(ctx: &Ctx, a: EvalArgs) -> Result<()> {
    let manifest = ExemplarIndex::open(&a.index, true)?.manifest;
    if manifest.build.multi_label {
        let mut eo = ctx.encoder_options();
        if eo.model.is_none() {
            eo.model = manifest
                .model
                .source_dir
                .clone()
                .filter(|d| Path::new(d).exists())
                .or(Some(manifest.model.id.clone()));
        }
        let encoder = Encoder::load(&eo)?;
        let tax = semtel::pipeline::Taxonomy::open("eval", &a.index, &encoder)?;
        let opts = ctx.input_options(&a.cols);
        let progress = ctx.progress(input::open(&a.input, &opts)?.total_rows(), "eval");
        let r = semtel::ops::evaluate_multi(&encoder, &tax, &a.input, &opts, &progress)?;
        progress.finish();
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
            return Ok(());
        }
        println!(
            "multi-label: rows {}  exact-set accuracy {:.4}  micro-F1 {:.4}  macro-F1 {:.4}",
            r.rows, r.subset_accuracy, r.micro_f1, r.macro_f1
        );
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
    let classifier = Classifier::open(&a.index, &classifier_options(ctx, a.k, None, a.signal)?)?;
    let opts = ctx.input_options(&a.cols);
    let progress = ctx.progress(input::open(&a.input, &opts)?.total_rows(), "eval");
    let ev = semtel::ops::evaluate(&classifier, &a.input, &opts, &progress)?;
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

fn demo(ctx: &Ctx, a: DemoArgs) -> Result<()> {
    let exemplars = PathBuf::from("data/exemplars.jsonl");
    let conversations = PathBuf::from("data/conversations.jsonl");
    if !exemplars.exists() || !conversations.exists() {
        bail!("run the demo from the semtel repository root (data/exemplars.jsonl and data/conversations.jsonl are needed)");
    }
    let idx = a.out.join("index");
    let labels = a.out.join("labels.jsonl");
    if idx.exists() {
        std::fs::remove_dir_all(&idx)?;
    }
    let encoder = Encoder::load(&ctx.encoder_options())?;
    println!(
        "model {} ({} dims, {:?} pooling, {} tokens), engine: {}",
        encoder.files.id,
        encoder.dim(),
        encoder.pooling(),
        encoder.files.max_tokens,
        encoder.engine.describe()
    );
    let opts = ctx.input_options(&ColumnArgs::default());
    let (index, s) = semtel::ops::build_index(
        &encoder,
        &[(exemplars.clone(), opts.clone())],
        &idx,
        10,
        None,
        &Progress::hidden(),
    )?;
    println!(
        "index  {}: {} exemplars, {} labels ({:.2}s)",
        idx.display(),
        index.len(),
        index.labels().len(),
        s.seconds
    );
    let classifier = Classifier::new(encoder, index, &ClassifierOptions::default())?;
    let reader = input::open(&conversations, &opts)?;
    let (writer, done) = OutputWriter::open(&labels, OutputSpec::new(vec![]), Existing::Overwrite)?;
    let summary = pipeline::run(
        &classifier,
        reader,
        writer,
        done,
        &mut NoEscalation,
        &Progress::hidden(),
    )?;
    println!(
        "classify {} → {}: {} rows in {:.2}s ({:.0} rows/s); kNN kept {}, escalated {}, errors {}",
        conversations.display(),
        labels.display(),
        summary.rows_written,
        summary.seconds,
        summary.rows_per_second,
        summary.knn,
        summary.escalated,
        summary.errors
    );
    let ev = semtel::ops::evaluate(&classifier, &conversations, &opts, &Progress::hidden())?;
    let r = &ev.report;
    let t = classifier.thresholds.global;
    let kept_rows: Vec<_> = ev
        .scored
        .iter()
        .filter(|x| x.pred.is_some() && x.confidence >= t)
        .collect();
    let kept = (
        kept_rows.len() as f64 / ev.scored.len().max(1) as f64,
        (!kept_rows.is_empty()).then(|| {
            kept_rows.iter().filter(|x| x.correct()).count() as f64 / kept_rows.len() as f64
        }),
    );
    println!(
        "gold labels of the sample: kNN accuracy {:.1}% on all rows; at the calibrated threshold {:.3} kNN keeps {:.0}% of rows at {} accuracy",
        r.accuracy * 100.0,
        classifier.thresholds.global,
        kept.0 * 100.0,
        kept.1.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
    );
    println!("\nfirst rows of {}:", labels.display());
    for (id, label, by) in semtel::output::read_ids_and_labels(&labels)?.iter().take(8) {
        println!("  {id:<10} {:<22} {by}", label.as_deref().unwrap_or("-"));
    }
    Ok(())
}

/// The index and prompt builder of a Batch API export or import. Token counts only size
/// requests here (nothing is rate-limited), so a length estimate stands in for the tokenizer.
fn batch_prompts(
    index: &Path,
    llm: &Path,
) -> Result<(ExemplarIndex, semtel::llm::tier::PromptBuilder)> {
    let idx = ExemplarIndex::open(index, true)?;
    let pb = semtel::llm::tier::PromptBuilder::new(
        semtel::llm::LlmConfig::load(llm)?,
        idx.labels().to_vec(),
        std::sync::Arc::new(|t: &str| t.len() / 4),
    )?;
    Ok((idx, pb))
}

fn bench_embed(ctx: &Ctx, a: BenchEmbedArgs) -> Result<()> {
    use semtel::bench;
    let threads = rayon::current_num_threads();
    let texts = match &a.texts_file {
        Some(f) => bench::read_text_file(f)?,
        None => bench::embed_text_set(&a.shared, a.texts)?,
    };
    if let Some(f) = &a.save_texts {
        bench::write_text_file(f, &texts)?;
    }
    let peak = bench::f32_gemm_peak(threads);
    eprintln!(
        "{} texts, {threads} threads; measured f32 GEMM peak (gemm crate, {threads} threads): {peak:.0} GFLOP/s",
        texts.len()
    );
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut runs = Vec::new();
    let load = |engine| -> Result<Encoder> {
        let mut eo = ctx.encoder_options();
        eo.engine = engine;
        let mut enc = Encoder::load(&eo)?;
        if let Some(b) = a.batch_tokens {
            enc.batch.max_batch_tokens = b;
        }
        if let Some(r) = a.batch_rows {
            enc.batch.max_batch_rows = r;
        }
        Ok(enc)
    };
    // The first engine is kept loaded: it runs again after the reference.
    let first = load(a.engines[0])?;
    let model_dir = first.files.dir.clone();
    // FLOP counts need the transformer's shape (a static table has none: zeros).
    let cfg: serde_json::Value = std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let dims = |k: &str| cfg[k].as_u64().unwrap_or(0) as usize;
    let model_dims = (
        dims("hidden_size"),
        dims("intermediate_size"),
        dims("num_hidden_layers"),
    );
    for (i, &engine) in a.engines.iter().enumerate() {
        let other;
        let enc = if i == 0 {
            &first
        } else {
            other = load(engine)?;
            &other
        };
        let r = bench::bench_encoder(enc, &texts, a.repeats, model_dims, peak)?;
        eprintln!(
            "{:<52} {:>7.1} texts/s {:>8.0} tokens/s (padded {:>8.0}/s) {:>6.1} GFLOP/s = {:>4.0}% of f32 GEMM peak, peak RSS {:.0} MB",
            r.engine,
            r.texts_per_s,
            r.tokens_per_s,
            r.padded_tokens_per_s,
            r.gflops,
            r.share_of_f32_gemm_peak * 100.0,
            r.peak_rss_mb
        );
        results.push(serde_json::to_value(&r)?);
        runs.push(r);
    }
    let mut st_best: Option<(String, f64)> = None;
    if let Some(py) = &a.st {
        let dir = std::env::temp_dir().join(format!("semtel-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let tf = dir.join("texts.jsonl");
        bench::write_text_file(&tf, &texts)?;
        let script = PathBuf::from("benches/st_embed.py");
        let out = std::process::Command::new(py)
            .arg(&script)
            .arg(&tf)
            .arg(&model_dir)
            .args([
                "--threads",
                &threads.to_string(),
                "--repeats",
                &a.repeats.to_string(),
                "--dtypes",
                &a.st_dtypes,
                "--batch-size",
                &a.st_batch_size.to_string(),
                "--device",
                // The reference runs where semtel's first engine runs.
                if first.engine.on_gpu() { "cuda" } else { "cpu" },
            ])
            .env("TOKENIZERS_PARALLELISM", "true")
            .output()
            .with_context(|| format!("running {} {}", py.display(), script.display()))?;
        let _ = std::fs::remove_dir_all(&dir);
        if !out.status.success() {
            bail!(
                "sentence-transformers run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let tps = v["tokens_per_s"].as_f64().unwrap_or(0.0);
            eprintln!(
                "{:<52} {:>7.1} texts/s {:>8.0} tokens/s",
                v["engine"].as_str().unwrap_or("?"),
                v["texts_per_s"].as_f64().unwrap_or(0.0),
                tps
            );
            if st_best.as_ref().is_none_or(|b| tps > b.1) {
                st_best = Some((v["engine"].as_str().unwrap_or("?").to_string(), tps));
            }
            results.push(v);
        }
        // Repeat semtel's first engine after the reference, so machine noise hits both sides.
        let again = bench::bench_encoder(&first, &texts, a.repeats, model_dims, peak)?;
        let mut all = runs[0].runs.clone();
        all.extend(again.runs.iter());
        let med = bench::median(&all);
        runs[0].seconds = med;
        runs[0].tokens_per_s = runs[0].real_tokens as f64 / med;
        eprintln!(
            "{:<52} {:>7.1} texts/s {:>8.0} tokens/s (median of {} runs before and after the reference)",
            runs[0].engine,
            texts.len() as f64 / med,
            runs[0].tokens_per_s,
            all.len()
        );
    }
    if let Some((name, tps)) = &st_best {
        eprintln!(
            "\nratio: {} / {name} = {:.2}x (tokens/s, same texts, same {threads} threads)",
            runs[0].engine,
            runs[0].tokens_per_s / tps
        );
    }
    if a.json {
        for r in results {
            println!("{r}");
        }
    }
    Ok(())
}

fn bench_llm(ctx: &Ctx, a: BenchLlmArgs) -> Result<()> {
    use semtel::llm::{config::EndpointConfig, simulator, LlmConfig};
    let classifier = Classifier::open(
        &a.index,
        &classifier_options(ctx, None, Some(f32::INFINITY), None)?,
    )?;
    let mut opts = ctx.input_options(&ColumnArgs::default());
    opts.split = Some(a.split.clone());
    let mut rows = input::read_all(&a.truth, &opts)?;
    rows.truncate(a.items);
    let mut gold = std::collections::HashMap::new();
    let mut truth = std::collections::HashMap::new();
    for r in &rows {
        if let (Ok(c), Some(l)) = (&r.content, &r.label) {
            gold.insert(r.id.clone(), l.clone());
            truth.insert(simulator::truth_key(&c.flatten()), l.clone());
        }
    }
    let classified = classifier.classify(rows)?;
    let labels = classifier.index.labels().to_vec();
    let tok = std::sync::Arc::new(classifier.encoder.renderer.tokenizer().clone());
    let counter: semtel::llm::tier::TokenCounter = std::sync::Arc::new(move |t: &str| {
        tok.encode_fast(t, false)
            .map(|e| e.len())
            .unwrap_or(t.len() / 4)
    });
    let endpoint = |rpm: u64, tpm: u64, conc: usize| EndpointConfig {
        name: "sim".into(),
        kind: Default::default(),
        url: String::new(),
        model: "sim-1".into(),
        deployment: None,
        api_version: "2024-10-21".into(),
        api_key_env: None,
        weight: 1.0,
        rpm,
        tpm,
        price_in_per_1k: 0.00015,
        price_out_per_1k: 0.0006,
        max_concurrency: conc,
    };
    let base_cfg = |n: usize, narrow: bool, ep: EndpointConfig| LlmConfig {
        items_per_call: n,
        narrow_above: if narrow { 20 } else { 0 },
        cache: Some("off".into()),
        endpoints: vec![ep],
        ..Default::default()
    };
    let mut runs = Vec::new();
    let print = |r: &semtel::bench::LlmRun| {
        eprintln!(
            "{:<34} N={:<2} narrow={:<5} {:>6.1}s (floor {:>6}) calls {:>4} 429s {:>4} lost {} dup {} out-of-schema {} acc {:.3} tokens/item in {:>6.1} out {:>4.1} ${:.4}/1k items",
            r.scenario,
            r.items_per_call,
            r.narrowing,
            r.seconds,
            r.floor_seconds.map_or("-".into(), |f| format!("{f:.1}s")),
            r.calls,
            r.http_429,
            r.lost,
            r.duplicated,
            r.out_of_schema,
            r.accuracy_vs_truth,
            r.tokens_in_per_item,
            r.tokens_out_per_item,
            r.cost_per_1k_items_usd
        );
    };
    let limited = |sim_latency: f64| simulator::SimConfig {
        rpm: 600,
        tpm: 200_000,
        latency_ms: sim_latency,
        jitter_ms: 75.0,
        truth: truth.clone(),
        ..Default::default()
    };
    if a.scenarios.iter().any(|s| s == "throughput") {
        let r = semtel::bench::llm_scenario(
            "throughput adaptive (600 RPM, 200k TPM)",
            &classified,
            &gold,
            &labels,
            limited(300.0),
            base_cfg(8, true, endpoint(600, 200_000, 64)),
            counter.clone(),
        )?;
        print(&r);
        runs.push(r);
        let mut fixed = base_cfg(8, true, endpoint(0, 0, 32));
        fixed.adaptive = false;
        fixed.max_attempts = 30;
        let r = semtel::bench::llm_scenario(
            "throughput fixed concurrency 32",
            &classified,
            &gold,
            &labels,
            limited(300.0),
            fixed,
            counter.clone(),
        )?;
        print(&r);
        runs.push(r);
    }
    if a.scenarios.iter().any(|s| s == "tokens") {
        for narrow in [false, true] {
            for n in [1, 4, 8, 16] {
                let r = semtel::bench::llm_scenario(
                    "tokens per item",
                    &classified,
                    &gold,
                    &labels,
                    simulator::SimConfig {
                        latency_ms: 5.0,
                        jitter_ms: 1.0,
                        truth: truth.clone(),
                        ..Default::default()
                    },
                    base_cfg(n, narrow, endpoint(0, 0, 16)),
                    counter.clone(),
                )?;
                print(&r);
                runs.push(r);
            }
        }
    }
    if a.scenarios.iter().any(|s| s == "faults") {
        let mut cfg = base_cfg(8, true, endpoint(0, 0, 32));
        cfg.timeout_base_s = 1.5;
        cfg.timeout_per_1k_tokens_s = 0.0;
        cfg.backoff_base_s = 0.1;
        cfg.backoff_max_s = 2.0;
        cfg.max_item_attempts = 8;
        cfg.max_attempts = 10;
        let r = semtel::bench::llm_scenario(
            "30% injected faults (all kinds)",
            &classified,
            &gold,
            &labels,
            simulator::SimConfig {
                latency_ms: 50.0,
                jitter_ms: 10.0,
                hang_s: 4.0,
                faults: simulator::Faults::spread(0.3, &[]).map_err(anyhow::Error::msg)?,
                truth: truth.clone(),
                ..Default::default()
            },
            cfg,
            counter.clone(),
        )?;
        print(&r);
        runs.push(r);
    }
    if a.json {
        for r in runs {
            println!("{}", serde_json::to_string(&r)?);
        }
    }
    Ok(())
}

fn calibrate(ctx: &Ctx, a: CalibrateArgs) -> Result<()> {
    use semtel::calibrate::{calibrate as run_cal, CalibrateOptions};
    let mut classifier = Classifier::open(
        &a.index,
        &classifier_options(ctx, None, None, Some(Signal::VoteSim))?,
    )?;
    let mut opts = CalibrateOptions {
        target: Some(a.target),
        budget: a.budget,
        signal: a.signal,
        folds: a.folds,
        train_head: !a.no_head,
        per_label: !a.no_per_label,
        ..Default::default()
    };
    if let Some(e) = a.head_epochs {
        opts.head.epochs = e;
    }
    if let Some(l) = a.head_l2 {
        opts.head.l2 = l;
    }
    if let Some(l) = a.head_lr {
        opts.head.lr = l;
    }
    let in_opts = ctx.input_options(&a.cols);
    let labelled = a.labelled.clone();
    let held = |c: &Classifier| -> semtel::Result<Vec<(semtel::decide::Scores, Option<u32>)>> {
        let path = labelled.as_ref().expect("labelled");
        let mut reader = input::open(path, &in_opts)?;
        let mut out = Vec::new();
        while let Some(rows) = reader.next_batch()? {
            let gold: Vec<Option<String>> = rows.iter().map(|r| r.label.clone()).collect();
            for (x, g) in c.classify(rows)?.into_iter().zip(gold) {
                if let (Some(s), Some(g)) = (x.scores, g) {
                    out.push((s, c.index.labels().binary_search(&g).ok().map(|i| i as u32)));
                }
            }
        }
        Ok(out)
    };
    let t = std::time::Instant::now();
    let report = if a.labelled.is_some() {
        run_cal(&mut classifier, Some(&held), &opts)?
    } else {
        run_cal(&mut classifier, None, &opts)?
    };
    if let Some(h) = &classifier.head {
        h.save(&a.index)?;
    }
    classifier.index.save_manifest()?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    eprintln!(
        "calibrated {} on {} rows by {} ({:.1}s)",
        a.index.display(),
        report.rows,
        report.method,
        t.elapsed().as_secs_f64()
    );
    eprintln!(
        "signal      AURC    accuracy  kept at {:.0}% (one threshold)",
        a.target * 100.0
    );
    for s in &report.signals {
        eprintln!(
            "{:<11} {:.4}  {:.4}    {:.1}%",
            s.signal,
            s.aurc,
            s.accuracy,
            s.coverage_at_target * 100.0
        );
    }
    let ci = |i: &semtel::calibrate::Interval| {
        format!(
            "{:.1}% [{:.1}–{:.1}]",
            i.value * 100.0,
            i.lo * 100.0,
            i.hi * 100.0
        )
    };
    eprintln!(
        "chosen: {}; {} thresholds ({} labels stricter, {} looser than the global {:.3}); expected coverage {}, kept-accuracy {} (95% CI)",
        report.signal,
        if report.per_label { "per-label" } else { "one global" },
        report.stricter_labels,
        report.looser_labels,
        classifier.index.manifest.decision.threshold,
        ci(&report.expected_coverage),
        ci(&report.expected_kept_accuracy)
    );
    Ok(())
}

fn bench_accuracy_cost(ctx: &Ctx, a: BenchAccArgs) -> Result<()> {
    use semtel::llm::{tier::PromptBuilder, LlmConfig};
    let classifier = Classifier::open(&a.index, &classifier_options(ctx, None, None, None)?)?;
    let opts = ctx.input_options(&a.cols);
    let mut reader = input::open(&a.input, &opts)?;
    let labels = classifier.index.labels().to_vec();
    let mut classified = Vec::new();
    let mut gold = Vec::new();
    while let Some(rows) = reader.next_batch()? {
        let rows: Vec<_> = rows
            .into_iter()
            .filter(|r| r.label.is_some() && r.content.is_ok())
            .collect();
        gold.extend(rows.iter().map(|r| r.label.clone().unwrap()));
        classified.extend(classifier.classify(rows)?);
    }
    if classified.is_empty() {
        bail!("no labelled rows in {}", a.input.display());
    }
    let signal = classifier.thresholds.signal;
    let mut knn_ok = Vec::new();
    let mut conf = Vec::new();
    let mut keep = Vec::new();
    for (c, g) in classified.iter().zip(&gold) {
        let (p, cf) = c
            .scores
            .as_ref()
            .map_or((None, f32::NEG_INFINITY), |s| s.decision(signal));
        knn_ok.push(p.map(|p| &labels[p as usize]) == Some(g));
        conf.push(cf);
        keep.push(classifier.thresholds.keep(p, cf));
    }
    let tok = std::sync::Arc::new(classifier.encoder.renderer.tokenizer().clone());
    let counter: semtel::llm::tier::TokenCounter = std::sync::Arc::new(move |t: &str| {
        tok.encode_fast(t, false)
            .map(|e| e.len())
            .unwrap_or(t.len() / 4)
    });
    let n = classified.len();
    let (llm_ok, cost_per_row, llm_name, basis): (Vec<bool>, f64, String, String) = if let Some(
        acc,
    ) =
        a.llm.strip_prefix("oracle:")
    {
        let acc: f64 = acc.parse().context("oracle:<accuracy>, e.g. oracle:0.95")?;
        let ok: Vec<bool> = classified
            .iter()
            .map(|c| {
                let h = semtel::llm::cache::text_hash(&c.out.id);
                let u = u64::from_str_radix(&h[..12], 16).unwrap_or(0) as f64 / (1u64 << 48) as f64;
                u < acc
            })
            .collect();
        // Cost estimate: the prompts semtel would send (default settings: 8 rows per call,
        // candidate narrowing, few-shot examples), counted with the tokenizer.
        let pb = PromptBuilder::new(LlmConfig::default(), labels.clone(), counter.clone())?;
        let items: Vec<semtel::llm::tier::PromptItem> = classified
            .iter()
            .map(|c| {
                let candidates = pb.candidates(c.out.neighbors.iter().map(|x| x.label.as_str()));
                semtel::llm::tier::PromptItem {
                    text: semtel::llm::tier::head_tail_chars(
                        &c.content.as_ref().map(|x| x.flatten()).unwrap_or_default(),
                        pb.cfg.max_item_chars,
                    ),
                    full_schema: candidates.is_empty(),
                    candidates,
                    examples: c.examples.clone(),
                }
            })
            .collect();
        let (mut tin, mut tout) = (0f64, 0f64);
        for chunk in items.chunks(pb.cfg.items_per_call) {
            let refs: Vec<&semtel::llm::tier::PromptItem> = chunk.iter().collect();
            let (req, est) = pb.request(&refs);
            tin += est * 1.3; // WordPiece undercounts BPE tokens by ~30 % on this text
            tout += chunk.len() as f64 * 8.0;
            let _ = req;
        }
        let cost = (tin * a.price_in + tout * a.price_out) / 1e6 / n as f64;
        (
                ok,
                cost,
                format!("oracle:{acc} (simulated LLM: gold label, wrong at {:.0}%)", (1.0 - acc) * 100.0),
                format!(
                    "estimated from prompt token counts (8 rows per call, narrowing, few-shot) at ${}/1M input and ${}/1M output tokens",
                    a.price_in, a.price_out
                ),
            )
    } else {
        let cfg = LlmConfig::load(Path::new(&a.llm))?;
        let name = cfg
            .endpoints
            .iter()
            .map(|e| e.model.clone())
            .collect::<Vec<_>>()
            .join("+");
        let (out, stats) = semtel::bench::llm_label_all(cfg, &labels, counter, &classified)?;
        let by_id: std::collections::HashMap<&str, Option<&String>> = out
            .iter()
            .map(|r| (r.id.as_str(), r.label.as_ref()))
            .collect();
        let ok = classified
            .iter()
            .zip(&gold)
            .map(|(c, g)| by_id.get(c.out.id.as_str()).copied().flatten() == Some(g))
            .collect();
        (
            ok,
            stats.cost_usd / n as f64,
            format!("endpoint {name}"),
            format!(
                "measured: {} calls, {} input and {} output tokens at the configured prices",
                stats.calls, stats.tokens_in, stats.tokens_out
            ),
        )
    };
    let curve = semtel::report::curve(&knn_ok, &llm_ok, &conf, cost_per_row, 40);
    let op_right = (0..n)
        .filter(|&i| if keep[i] { knn_ok[i] } else { llm_ok[i] })
        .count();
    let op_esc = keep.iter().filter(|k| !**k).count();
    let report = semtel::report::AccuracyCost {
        set: a.set.clone().unwrap_or_else(|| {
            format!(
                "{}{}",
                a.input
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                a.cols
                    .split
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            )
        }),
        rows: n,
        llm: llm_name,
        signal: signal.name().into(),
        cost_basis: basis,
        llm_cost_per_row_usd: cost_per_row,
        knn_only: curve[0].clone(),
        llm_only: curve.last().unwrap().clone(),
        operating_point: semtel::report::CurvePoint {
            escalated: op_esc as f64 / n as f64,
            accuracy: op_right as f64 / n as f64,
            cost_per_1k_usd: op_esc as f64 * cost_per_row / n as f64 * 1000.0,
        },
        curve,
    };
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
