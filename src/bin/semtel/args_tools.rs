//! Command-line arguments of the tool commands: `llm`, `bench`, `static`.

use crate::args::ColumnArgs;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum StaticCmd {
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
pub enum LlmCmd {
    /// Serve an OpenAI-compatible simulator on 127.0.0.1 that answers from true labels.
    Simulate(SimulateArgs),
    /// Run two LLM configurations (two models, or two prompt versions) on the same rows:
    /// agreement, Cohen's kappa, label pairs they disagree on, tokens and cost of each, and the
    /// index exemplars the second would label differently.
    Compare {
        #[command(flatten)]
        send: crate::args::SendArgs,
        /// Index whose labels are the schema (its neighbours narrow candidates, as in classify).
        #[arg(long)]
        index: PathBuf,
        /// Conversations to compare on (the first --rows readable ones).
        #[arg(long)]
        input: PathBuf,
        #[command(flatten)]
        cols: ColumnArgs,
        /// The current LLM configuration…
        #[arg(long)]
        a: PathBuf,
        /// …and the candidate.
        #[arg(long)]
        b: PathBuf,
        #[arg(long, default_value_t = 500)]
        rows: usize,
        /// Index exemplars sent to B to find those whose label would change (0: none).
        #[arg(long, default_value_t = 200)]
        exemplars: usize,
        #[arg(long)]
        json: bool,
    },
    /// Write the escalated rows of a classify output as an OpenAI Batch API request file.
    ExportBatch {
        #[command(flatten)]
        send: crate::args::SendArgs,
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
        /// Only --show-sent applies (the bodies were built, and redacted, by export-batch).
        #[command(flatten)]
        send: crate::args::SendArgs,
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
pub struct SimulateArgs {
    /// Labelled file (JSONL/Parquet) the simulator takes true labels from.
    #[arg(long)]
    pub truth: PathBuf,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Port on 127.0.0.1 (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    #[arg(long, default_value_t = 0)]
    pub rpm: u64,
    #[arg(long, default_value_t = 0)]
    pub tpm: u64,
    #[arg(long, default_value_t = 300.0)]
    pub latency_ms: f64,
    #[arg(long, default_value_t = 50.0)]
    pub jitter_ms: f64,
    /// Probability of a wrong (but valid) label per item (the overall rate).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Where wrong answers fall: uniform (any item, any other label) or confusable (on the
    /// ambiguous items, a neighbouring label: the truth file is embedded with --model at start).
    #[arg(long, default_value = "uniform", value_parser = ["uniform", "confusable"])]
    pub error_model: String,
    /// Probability of an injected fault per request.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Fault kinds: all (the transient ones: 5xx, hang, malformed, out_of_schema,
    /// truncated, drop), or a list of those and trickle, 400, html.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub faults: Vec<String>,
    /// How long a hang (or an outage in `hang` mode) holds a request.
    #[arg(long, default_value_t = 30.0)]
    pub hang_s: f64,
    /// Require this API key (as Bearer or api-key header).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Seed of every random draw (latency, faults, wrong labels).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Seconds of traffic the limits let through at once.
    #[arg(long, default_value_t = 5.0)]
    pub burst_s: f64,
    /// Rate-limit headers sent: full (OpenAI), remaining (Azure), none (Retry-After only).
    #[arg(long, default_value = "full")]
    pub headers: semtel::llm::simulator::HeaderMode,
    /// Outage window START-END in seconds since start (repeatable), e.g. --outage 30-90.
    #[arg(long, value_parser = semtel::llm::simulator::parse_window)]
    pub outage: Vec<(f64, f64)>,
    /// What an outage does: 503 (at once) or hang (hold for --hang-s, then 503).
    #[arg(long, default_value = "503")]
    pub outage_mode: semtel::llm::simulator::OutageMode,
    /// Let the mean latency drift linearly to this many ms over --drift-s seconds.
    #[arg(long)]
    pub drift_to_ms: Option<f64>,
    #[arg(long, default_value_t = 120.0)]
    pub drift_s: f64,
    /// Inject faults only after this many requests (a healthy start, then trouble).
    #[arg(long, default_value_t = 0)]
    pub faults_after: u64,
}

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Embedding throughput of each engine on a fixed realistic text set, optionally against
    /// sentence-transformers on the same texts in the same run.
    Embed(BenchEmbedArgs),
    /// The LLM tier against the loopback simulator (or a real endpoint): wall time against the
    /// floor the true rate limits set with limits configured right, too high or not at all,
    /// under 25 % faults, with an endpoint down for a minute, with drifting latency; tokens
    /// per item for 1/4/8/16 items per call with and without candidate narrowing.
    Llm(BenchLlmArgs),
    /// Accuracy versus cost: from kNN-only to LLM-only, escalating the least confident rows
    /// first; JSON, CSV, PNG and SVG plots and an HTML report.
    AccuracyCost(BenchAccArgs),
    /// Cold start on Banking77 and CLINC150 (train + test) treated as unlabelled streams, the
    /// simulator answering from their gold labels with 5 % wrong answers standing in for the
    /// LLM: `bootstrap` then `classify --llm --grow`, against gold and against LLM-only.
    Bootstrap(BenchBootstrapArgs),
    /// Index build and calibration at 10k/50k/200k exemplars (single- and multi-label,
    /// synthesised from the shared data) against the cost of embedding them; peak memory.
    Build(BenchBuildArgs),
    /// Every encoder on the same rows in one run: kNN and head accuracy, share kept at the
    /// calibrated target (thresholds chosen without the test split) and tokens/s, on
    /// Banking77, CLINC150 (with oos) and xSID (13 languages; English-only and per-language
    /// indexes). JSON, CSV and an SVG plot.
    Encoders(BenchEncodersArgs),
    /// The live service (`semtel serve`, a child process) under a bounded loopback load: 1, 8
    /// and 64 concurrent clients sending one conversation or 32 per request; p50/p95/p99
    /// latency and rows/s against `semtel classify` on the same rows in the same run;
    /// optionally a memory soak.
    Serve(BenchServeArgs),
    /// The redaction stage on a labelled PII set: per-type precision and recall, values that
    /// would still leave, throughput; with --presidio, Microsoft Presidio on the same set in
    /// the same run.
    Redact(BenchRedactArgs),
    /// The guard rule on simulated audits of one segment: rows until a fall of its
    /// kept-accuracy trips the guard (detection delay, audited rows spent) and false trips
    /// while it holds, per audit rate; the real `Guards`, many seeded runs.
    Guards(BenchGuardsArgs),
}

#[derive(Args)]
pub struct BenchGuardsArgs {
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.02,0.05")]
    pub audit_rates: Vec<f64>,
    /// The segment's kept-accuracy before the fall (the promise).
    #[arg(long, default_value_t = 0.97)]
    pub base: f64,
    /// How far it falls.
    #[arg(long, default_value_t = 0.05)]
    pub fall: f64,
    /// The LLM's accuracy on audited rows (and what the guards are told).
    #[arg(long, default_value_t = 0.95)]
    pub llm_accuracy: f64,
    /// Rows of the segment before the fall (false trips are counted over them).
    #[arg(long, default_value_t = 20_000)]
    pub before: u64,
    #[arg(long, default_value_t = 50_000)]
    pub max_after: u64,
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One JSON object per audit rate on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchRedactArgs {
    /// The labelled set (benches/pii/make_pii_set.py).
    #[arg(long, default_value = "tests/fixtures/pii.jsonl")]
    pub set: PathBuf,
    #[arg(long, default_value = "standard", value_parser = ["standard", "strict"])]
    pub level: String,
    /// Timed passes (median).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// A Python with presidio-analyzer (benches/pii/setup-presidio.sh prints one).
    #[arg(long)]
    pub presidio: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "patterns,full")]
    pub presidio_modes: Vec<String>,
    /// Skip embedding the same texts with the default encoder (the cost comparison).
    #[arg(long)]
    pub no_embedding: bool,
    #[arg(long, default_value = "out/bench-redact")]
    pub work: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchServeArgs {
    /// The index to serve (build one first, e.g. from Banking77's train split).
    #[arg(long)]
    pub index: PathBuf,
    /// Conversations to send [default: ../shared/data/banking77/banking77.jsonl, split test].
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long)]
    pub split: Option<String>,
    /// Rows per level (the input is cycled).
    #[arg(long, default_value_t = 3080)]
    pub rows: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub clients: Vec<usize>,
    /// Conversations per request.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batch: Vec<usize>,
    /// Runs per level (the median is reported); the batch path runs as often, half before
    /// and half after the levels.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// A level stops after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub max_seconds: f64,
    /// Memory soak after the levels: 8 clients for this many seconds, the server's RSS
    /// sampled every 10 s (e.g. 600).
    #[arg(long, default_value_t = 0)]
    pub soak: u64,
    /// Contention: slow connections (a body byte every 2 s) held open while normal one-row
    /// requests are timed, one scenario per value (e.g. 0,100,500).
    #[arg(long, value_delimiter = ',')]
    pub slow_clients: Vec<usize>,
    /// Contention: clients looping the largest allowed requests (256 conversations, 4 MiB)
    /// while normal requests are timed (e.g. 0,3).
    #[arg(long, value_delimiter = ',')]
    pub heavy_clients: Vec<usize>,
    /// Seconds of normal requests per contention scenario.
    #[arg(long, default_value_t = 20.0)]
    pub contention_seconds: f64,
    /// Only the contention scenarios (no throughput levels, no batch reference).
    #[arg(long)]
    pub only_contention: bool,
    /// Serve with this `semtel` binary instead (an earlier build: the reference to compare
    /// against, same load, same machine).
    #[arg(long)]
    pub server_exe: Option<PathBuf>,
    #[arg(long, default_value = "out/bench-serve")]
    pub work: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchEncodersArgs {
    /// Model folders or names; default: every known model present under models/.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Any of banking77, clinc150, xsid.
    #[arg(long, value_delimiter = ',', default_value = "banking77,clinc150,xsid")]
    pub sets: Vec<String>,
    /// Folder with the shared data sets.
    #[arg(long, default_value = "../shared")]
    pub shared: PathBuf,
    /// The multilingual set (scripts/make-xsid.py).
    #[arg(long, default_value = "data/xsid/xsid.jsonl.gz")]
    pub xsid: PathBuf,
    /// xSID indexes to score every language with: en (the English rows, centred per
    /// language where the encoder is multilingual), en-centred / en-uncentred (the English
    /// rows, centring forced on / off), own (each language's rows).
    #[arg(long, value_delimiter = ',', default_value = "en,own")]
    pub xsid_indexes: Vec<String>,
    /// Kept-accuracy target the thresholds are calibrated for.
    #[arg(long, default_value_t = 0.97)]
    pub target: f64,
    /// Indexes and reports (encoders.json, encoders.csv, encoders.svg).
    #[arg(long, default_value = "out/reports/encoders")]
    pub out: PathBuf,
    /// Only rewrite the CSV and the plot from `--out`'s encoders.json.
    #[arg(long)]
    pub replot: bool,
}

#[derive(Args)]
pub struct BenchBuildArgs {
    /// Folder with the shared data sets.
    #[arg(long, default_value = "../shared")]
    pub shared: PathBuf,
    /// Labelled rows per index.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,200000")]
    pub sizes: Vec<usize>,
    /// Label kinds: single, multi.
    #[arg(long, value_delimiter = ',', default_value = "single,multi")]
    pub kinds: Vec<String>,
    /// Real rows embedded per kind (the rest are near-paraphrases of them).
    #[arg(long, default_value_t = 4000)]
    pub sample: usize,
    /// Work folder (its index folders are replaced).
    #[arg(long, default_value = "out/bench-build")]
    pub work: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchBootstrapArgs {
    /// Folder with the shared data sets.
    #[arg(long, default_value = "../shared")]
    pub shared: PathBuf,
    /// Sets: banking77, clinc150.
    #[arg(long, value_delimiter = ',', default_value = "banking77,clinc150")]
    pub sets: Vec<String>,
    /// Variants: active (representative sampling + active rounds), random (random, one round).
    #[arg(long, value_delimiter = ',', default_value = "active,random")]
    pub variants: Vec<String>,
    /// Bootstrap budget as a share of the stream's rows.
    #[arg(long, default_value_t = 0.12)]
    pub budget_share: f64,
    /// Wrong answers of the simulated LLM.
    #[arg(long, default_value_t = 0.05)]
    pub error_rate: f64,
    /// Where those wrong answers fall, one run of each: uniform (any item, any other label) or
    /// confusable (on ambiguous items, a neighbouring label; embedded with --model).
    #[arg(long, value_delimiter = ',', default_value = "uniform,confusable")]
    pub error_models: Vec<String>,
    /// Agreement target of the bootstrap (default: its automatic one).
    #[arg(long)]
    pub target: Option<f64>,
    /// Runs of each (set, variant), each with its own seed (sampling and the simulator's
    /// mistakes); with more than one, the medians are printed too.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Seed of the first run (the next runs add 1, 2, …).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Work folder (replaced).
    #[arg(long, default_value = "out/bench-bootstrap")]
    pub work: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchAccArgs {
    #[arg(long)]
    pub index: PathBuf,
    /// Labelled conversations to score.
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// `oracle:<accuracy>` (the gold label, replaced by a wrong one at 1 − accuracy; a
    /// simulated LLM) or an LLM configuration file (every row is sent to its endpoints).
    #[arg(long)]
    pub llm: String,
    /// Output folder for accuracy_cost.{json,csv,png,svg} and report.html.
    #[arg(long)]
    pub out: PathBuf,
    /// Name shown in the report (default: the input's file name and split).
    #[arg(long)]
    pub set: Option<String>,
    /// Prices for the oracle's cost estimate, USD per 1M input / output tokens.
    #[arg(long, default_value_t = 0.15)]
    pub price_in: f64,
    #[arg(long, default_value_t = 0.60)]
    pub price_out: f64,
}

#[derive(Args)]
pub struct BenchLlmArgs {
    /// Index whose neighbours feed candidate narrowing and few-shot examples.
    #[arg(long)]
    pub index: PathBuf,
    /// Labelled file: the items and the simulator's truth.
    #[arg(long)]
    pub truth: PathBuf,
    #[arg(long, default_value = "test")]
    pub split: String,
    #[arg(long, default_value_t = 2000)]
    pub items: usize,
    /// Scenarios: limits (none configured, too high, right; per header kind), faults (25 %
    /// incl. 30-s hangs), failover (two endpoints, one down for a minute), drift (latency
    /// 300 ms -> 3 s), tokens (items per call, narrowing), external (needs --llm).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "limits,faults,failover,drift,tokens"
    )]
    pub scenarios: Vec<String>,
    /// LLM configuration of a real endpoint for the `external` scenario (added to the list
    /// when given). Every item is sent to it: mind the cost.
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// The external endpoint's true limits (RPM, TPM), when known, for its floor.
    #[arg(long)]
    pub true_rpm: Option<u64>,
    #[arg(long)]
    pub true_tpm: Option<u64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchEmbedArgs {
    /// Folder with the shared data sets (the text set is drawn from it).
    #[arg(long, default_value = "../shared")]
    pub shared: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub texts: usize,
    /// Embed the texts of this JSONL file (`{"text": ...}` per line) instead of the set drawn
    /// from --shared (for machines without the data sets, e.g. a GPU box).
    #[arg(long)]
    pub texts_file: Option<PathBuf>,
    /// Write the text set used to this JSONL file (to rerun the same texts elsewhere).
    #[arg(long)]
    pub save_texts: Option<PathBuf>,
    /// Timed passes per engine (medians are reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Engines to run, comma-separated: fast, candle.
    #[arg(long, value_delimiter = ',', default_value = "fast,candle")]
    pub engines: Vec<semtel::embed::Engine>,
    /// Precisions of the fast engine to run, comma-separated: bf16, int8 (each a row; other
    /// engines run once).
    #[arg(long, value_delimiter = ',', default_value = "bf16,int8")]
    pub precisions: Vec<semtel::embed::Precision>,
    /// Python interpreter with sentence-transformers (see benches/setup-st.sh) to compare with.
    #[arg(long)]
    pub st: Option<PathBuf>,
    /// sentence-transformers dtypes to run (f32, bf16, f16).
    #[arg(long, default_value = "f32,bf16")]
    pub st_dtypes: String,
    /// sentence-transformers batch size (its default is 32; GPUs want more).
    #[arg(long, default_value_t = 32)]
    pub st_batch_size: usize,
    /// Padded-token budget per batch.
    #[arg(long)]
    pub batch_tokens: Option<usize>,
    /// Most rows per batch.
    #[arg(long)]
    pub batch_rows: Option<usize>,
    /// Print all results as JSON lines.
    #[arg(long)]
    pub json: bool,
}
