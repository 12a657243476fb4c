//! Command-line arguments of the main commands (clap). Raw values only: merging with the
//! configuration file and defaults happens once, in `options`.

use clap::{Args, Parser, Subcommand};
use semtel::decide::Signal;
use semtel::embed::Device;
use std::path::PathBuf;

use crate::args_tools::{BenchCmd, LlmCmd, StaticCmd};

#[derive(Parser)]
#[command(
    name = "semtel",
    version,
    about = "Label human–AI conversations embedding-first: kNN over labelled exemplars decides the confident rows, an LLM only the uncertain rest.",
    after_help = "Start with `semtel demo`, then `semtel index build`, `semtel classify`, `semtel eval`."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Args, Clone)]
pub struct Global {
    /// TOML configuration file (flags override it).
    #[arg(long, global = true, env = "SEMTEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Embedding model: a folder, or a Hugging Face id found in the local hf-hub cache.
    /// Default: the model the index was built with, else all-MiniLM-L6-v2 from models/.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// Where the model runs: auto, cpu or cuda (cuda needs a build with `--features cuda`).
    #[arg(long, global = true)]
    pub device: Option<Device>,
    /// CPU engine: auto (bf16 kernels where the CPU has AVX512-BF16, else candle), fast, candle.
    #[arg(long, global = true)]
    pub engine: Option<semtel::embed::Engine>,
    /// Fast engine arithmetic: bf16, or int8 in the feed-forward layers (AVX512-VNNI; else bf16).
    #[arg(long, global = true)]
    pub precision: Option<semtel::embed::Precision>,
    /// Run the CUDA engine in f32 instead of f16.
    #[arg(long, global = true)]
    pub gpu_f32: bool,
    /// Worker threads (default: all cores; also honours RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Keep system turns when embedding (by default they are dropped as boilerplate).
    #[arg(long, global = true)]
    pub include_system_turns: bool,
    /// No progress bar.
    #[arg(long, short, global = true)]
    pub quiet: bool,
}

#[derive(Args, Clone, Default)]
pub struct ColumnArgs {
    /// Column holding a conversation id (generated as `<file>:<row>` when absent).
    #[arg(long)]
    pub id_col: Option<String>,
    /// Column holding plain text.
    #[arg(long)]
    pub text_col: Option<String>,
    /// Column holding `[{role, content}]` turns (default: `turns` or `messages` when present).
    #[arg(long)]
    pub turns_col: Option<String>,
    /// Column holding the gold label.
    #[arg(long)]
    pub label_col: Option<String>,
    /// Column holding the split name (used with --split).
    #[arg(long)]
    pub split_col: Option<String>,
    /// Keep only rows of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// Longest JSONL line read (bytes); a longer line becomes an error row without being held
    /// in memory. Default 64 MiB.
    #[arg(long)]
    pub max_line_bytes: Option<usize>,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once
pub enum Cmd {
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
    /// Fine-tune the encoder on the index's exemplars (contrastive, SetFit-style; epochs and
    /// learning rate chosen on a held-out fold), store it in the index, re-embed the
    /// exemplars, retrain the head and re-calibrate. Keeps the frozen encoder when tuning does
    /// not help. Resumable.
    Tune(TuneArgs),
    /// Cold start: from a taxonomy, an LLM and unlabelled conversations to a calibrated index
    /// (the LLM labels representative rows, then the rows the index is least sure of, in
    /// rounds; thresholds are calibrated for agreement with the LLM). Resumable.
    Bootstrap(BootstrapArgs),
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
    /// The encoders semtel knows: languages, dimensions, layers, licence, how to fetch them,
    /// whether models/ has them, and (--measure) their tokens/s on this machine.
    Models(ModelsArgs),
    /// Personal data replaced by typed placeholders (<EMAIL_1>, <PHONE_2>, …) in a whole file,
    /// with the same stage the LLM tier runs before anything is sent: for sharing data. One
    /// JSON line per input row with `redacted` (entities by type, never the values).
    Redact(RedactArgs),
    /// A live classification service over HTTP: POST /v1/classify, /v1/embeddings
    /// (OpenAI-compatible), GET /v1/results/{id}, /health, /ready, /info, /metrics,
    /// POST /admin/reload (and SIGHUP). Bearer key from SEMTEL_API_KEY when set. Every flag
    /// has a key in the config file's [serve] section.
    Serve(ServeArgs),
    /// The drift report of a classify output (or a service's result log): per window, the
    /// escalation and novelty shares, label mix against the exemplars', languages, audited
    /// agreement and guard trips; JSON and a self-contained HTML page. Exits 3 when an alert
    /// threshold is crossed (for schedulers).
    Monitor(MonitorArgs),
    /// What the taxonomy misses: cluster conversations by density (all of a file, or only a
    /// run's escalated rows), name each cluster with the LLM from redacted representatives,
    /// compare them with the index's labels and propose a taxonomy (taxonomy.toml,
    /// clusters.parquet, summary.json, report.html).
    Discover(DiscoverArgs),
}

#[derive(Args)]
pub struct DiscoverArgs {
    #[command(flatten)]
    pub send: SendArgs,
    /// Conversations (JSONL or Parquet).
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// A `semtel embed` output: its vectors are reused for the ids it holds.
    #[arg(long)]
    pub vectors: Option<PathBuf>,
    /// A classify output: cluster only the rows it escalated (novel rows among them).
    #[arg(long, value_name = "OUTPUT")]
    pub escalated_from: Option<PathBuf>,
    /// The index: its encoder embeds, its labels are what clusters are compared with.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// LLM configuration: clusters are named only with one.
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// A .prompty file replacing the shipped naming prompt (prompts/discover.prompty).
    #[arg(long)]
    pub prompt: Option<PathBuf>,
    /// Folder for taxonomy.toml, clusters.parquet, summary.json and report.html.
    #[arg(long)]
    pub out: PathBuf,
    /// Privacy floor: a cluster with fewer distinct conversations is never named or shown.
    #[arg(long, default_value_t = 20)]
    pub min_conversations: usize,
    /// Smallest cluster [default: --min-conversations].
    #[arg(long)]
    pub min_cluster_size: Option<usize>,
    /// HDBSCAN's min_samples: larger is more conservative, more rows stay noise [default: 2,
    /// measured best on two labelled sets; scikit-learn's default is min_cluster_size].
    #[arg(long)]
    pub min_samples: Option<usize>,
    /// How clusters are chosen from the density tree: leaf (the finest dense groups) or eom
    /// (excess of mass: the most persistent ones, often one large parent of many topics).
    #[arg(long, default_value = "eom", value_parser = ["eom", "leaf"])]
    pub selection: String,
    /// Cluster on this many principal components of the vectors (0: the full vectors). 64
    /// measured best on two labelled sets (a plateau from 32 to 128).
    #[arg(long, default_value_t = 64)]
    pub reduce: usize,
    /// Conversations per cluster shown to the LLM (half central, half diverse).
    #[arg(long, default_value_t = 8)]
    pub representatives: usize,
    /// Put the representatives' (redacted) text in the report.
    #[arg(long)]
    pub show_examples: bool,
    /// A timestamp column (RFC 3339 or epoch seconds): each cluster's share over time.
    #[arg(long)]
    pub time_col: Option<String>,
    /// 2: also group the clusters into broader topics.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub levels: u8,
    /// Cosine above which a cluster looks like an existing label [default: the median
    /// similarity of each label to its nearest other label].
    #[arg(long)]
    pub similar_above: Option<f32>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct MonitorArgs {
    /// A classify output (JSONL, Parquet file or dataset) or a service's result log.
    #[arg(long)]
    pub input: PathBuf,
    /// Rows per window (`10000rows`) or a time span (`1h`, `30m`, `1d`; needs --time-col).
    #[arg(long, default_value = "10000rows")]
    pub window: String,
    /// A timestamp column of the output (pass it through at classify time): RFC 3339 text or
    /// epoch seconds.
    #[arg(long)]
    pub time_col: Option<String>,
    /// The index the output came from: the label mix, promise and novelty rate to compare with
    /// (default: the first window's mix, 97 %).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Write the HTML report here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write the JSON report here (`-`: stdout).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Alert when a window's novel share exceeds this (default 0.05, or 5 × the index's rate).
    #[arg(long, default_value_t = 0.05)]
    pub max_novel_share: f64,
    /// Alert when a window's label mix diverges from the reference by more than this
    /// (Jensen–Shannon, bits).
    #[arg(long, default_value_t = 0.10)]
    pub max_label_divergence: f64,
    /// Alert when a window escalates this many points more than the first.
    #[arg(long, default_value_t = 0.10)]
    pub max_escalation_rise: f64,
    /// Rows a window needs before its shares can alert.
    #[arg(long, default_value_t = 200)]
    pub min_rows: u64,
}

/// What leaves the machine, on every command that calls an LLM.
#[derive(Args, Clone, Default)]
pub struct SendArgs {
    /// Personal data replaced by typed placeholders before anything is sent: off, standard
    /// or strict [default: the LLM configuration's `redact`, standard].
    #[arg(long, value_parser = ["off", "standard", "strict"])]
    pub redact: Option<String>,
    /// Append every request body exactly as sent to this local file (JSON Lines; no headers,
    /// so never the key).
    #[arg(long, value_name = "FILE")]
    pub show_sent: Option<PathBuf>,
}

impl SendArgs {
    pub fn overrides(&self) -> anyhow::Result<semtel::llm::config::Overrides> {
        Ok(semtel::llm::config::Overrides {
            redact: self
                .redact
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            show_sent: self.show_sent.clone(),
        })
    }
}

#[derive(Args)]
pub struct RedactArgs {
    #[arg(long)]
    pub input: PathBuf,
    /// JSON Lines file to write.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub overwrite: bool,
    /// standard or strict [default: the LLM config's `redact`, else standard].
    #[arg(long, value_parser = ["standard", "strict"])]
    pub redact: Option<String>,
    /// An LLM configuration whose `[redaction]` rules (allow/deny lists, patterns) apply.
    #[arg(long)]
    pub llm: Option<PathBuf>,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub send: SendArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    /// The index to serve.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Another taxonomy from the same embeddings: NAME=INDEX_DIR (repeatable).
    #[arg(long, value_name = "NAME=DIR")]
    pub also: Vec<String>,
    /// LLM tier configuration (TOML) for escalated conversations.
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// Address to listen on (loopback by default; port 0 picks a free one, printed at start).
    #[arg(long)]
    pub addr: Option<String>,
    /// Result log for escalate=async (JSONL, Parquet file or dataset directory), with its
    /// journal of accepted items beside it; a restart resumes what has no result.
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// Add LLM-labelled conversations to the index (saved on reload and at shutdown).
    #[arg(long)]
    pub grow: bool,
    /// With --grow: only rows whose kNN confidence was at least this are added.
    #[arg(long)]
    pub grow_min_confidence: Option<f32>,
    /// A micro-batch closes at this many (estimated) tokens … [default: 16384]
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// … or when its first request has waited this long. [default: 5]
    #[arg(long)]
    pub max_batch_wait_ms: Option<u64>,
    /// Requests in progress at most; more get 429. [default: 512]
    #[arg(long)]
    pub max_concurrent_requests: Option<usize>,
    /// Requests waiting for the model at most; more get 429. [default: 256]
    #[arg(long)]
    pub max_queue: Option<usize>,
    /// Largest request body; larger get 413. [default: 4194304]
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Conversations per request at most; more get 413. [default: 256]
    #[arg(long)]
    pub max_items: Option<usize>,
    /// Bytes of text per conversation at most; longer ones are error rows. [default: 262144]
    #[arg(long)]
    pub max_text_bytes: Option<usize>,
    /// Deadline of escalate=wait when a request names none. [default: 10000]
    #[arg(long)]
    pub escalate_timeout_ms: Option<u64>,
    /// Open connections at most; more wait in the listen backlog. [default: 4096]
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Time a client has to send a request head; also the idle keep-alive limit.
    /// [default: 10000]
    #[arg(long)]
    pub header_timeout_ms: Option<u64>,
    /// Time a client has to send a request body; then 408. [default: 30000]
    #[arg(long)]
    pub body_timeout_ms: Option<u64>,
    /// After SIGTERM, how long requests in progress may still take. [default: 30000]
    #[arg(long)]
    pub shutdown_timeout_ms: Option<u64>,
    /// While several requests wait, one model step takes about this long, so a small request
    /// waits at most a step or two behind large ones. [default: 15]
    #[arg(long)]
    pub fair_step_ms: Option<u64>,
    /// Neighbours per vote (default: the index's).
    #[arg(long)]
    pub k: Option<usize>,
    /// Confidence threshold (default: the index's calibrated thresholds).
    #[arg(long)]
    pub threshold: Option<f32>,
}

#[derive(Args)]
pub struct ModelsArgs {
    /// Load each model present and time it on the bundled conversations (data/).
    #[arg(long)]
    pub measure: bool,
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum IndexCmd {
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
        /// Centre vectors per language (removes each language's offset so that queries in
        /// languages the exemplars are not written in find their topic). `auto`: on for
        /// multilingual encoders, off for single-language ones.
        #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
        center_languages: String,
        /// Then fine-tune the encoder on the exemplars (`semtel tune` with its defaults).
        #[arg(long)]
        tune: bool,
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
pub struct ClassifyArgs {
    #[command(flatten)]
    pub send: SendArgs,
    #[arg(long)]
    pub index: PathBuf,
    /// Conversations: JSONL or Parquet.
    #[arg(long)]
    pub input: PathBuf,
    /// Results: *.jsonl, *.parquet, or a directory for a Parquet dataset.
    #[arg(long)]
    pub output: PathBuf,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Input columns to copy into the output (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub passthrough: Vec<String>,
    /// Apply another taxonomy from the same embeddings: NAME=INDEX_DIR (repeatable). Adds
    /// NAME_label (NAME_labels for multi-label indexes), NAME_confidence, NAME_decided_by.
    #[arg(long, value_name = "NAME=DIR")]
    pub also: Vec<String>,
    /// Continue a previous run into the same output, skipping ids already written.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// With --resume and --llm: afterwards, send every row the output holds as `escalate`
    /// (the LLM failed or was down, or there was no LLM then) to the LLM again, and patch the
    /// answers into the output in place.
    #[arg(long, requires = "resume")]
    pub retry_escalated: bool,
    /// Replace an existing output.
    #[arg(long)]
    pub overwrite: bool,
    /// Neighbours per vote (default: the index's).
    #[arg(long)]
    pub k: Option<usize>,
    /// Confidence threshold (default: the index's calibrated thresholds).
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Confidence signal: vote_sim (default), vote, margin or top1.
    #[arg(long)]
    pub signal: Option<Signal>,
    /// Rows per pipeline chunk.
    #[arg(long, default_value_t = 1024)]
    pub chunk_rows: usize,
    /// Parquet outputs: close a part file (durable on disk) after this many rows.
    #[arg(long, default_value_t = 20_000)]
    pub part_rows: usize,
    /// Print the run summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// LLM tier configuration (TOML): escalated rows are labelled by these endpoints.
    #[arg(long)]
    pub llm: Option<PathBuf>,
    /// Add LLM-labelled rows to the exemplar index as the run goes (and save them into the
    /// index at the end), so fewer later rows need the LLM.
    #[arg(long, requires = "llm")]
    pub grow: bool,
    /// With --grow: only rows whose kNN confidence was at least this are added.
    #[arg(long, default_value_t = 0.0)]
    pub grow_min_confidence: f32,
    #[command(flatten)]
    pub audit: AuditArgs,
}

/// Audit sampling, guards and novelty (classify, serve).
#[derive(Args, Debug, Clone)]
pub struct AuditArgs {
    /// Share of kept rows also sent to the LLM, blind (the escalation prompt, never the kNN
    /// label): the run's realised kept-accuracy is estimated from them, and segments (label,
    /// language) whose agreement falls below the promise are guarded (escalated). Needs --llm.
    #[arg(long, value_name = "SHARE")]
    pub audit_rate: Option<f64>,
    /// Seed choosing the audited rows (by id: a resumed run audits the same rows).
    #[arg(long, default_value_t = 0)]
    pub audit_seed: u64,
    /// The LLM's own accuracy (e.g. the self-agreement `semtel bootstrap` reports): corrects
    /// the estimate and the guards' bar. Default: taken as 1.0, and reports say so.
    #[arg(long, value_name = "SHARE")]
    pub audit_llm_accuracy: Option<f64>,
    /// A pass-through column the audit is also reported by (an input source, a partition, a
    /// market).
    #[arg(long, value_name = "COLUMN")]
    pub segment_col: Option<String>,
    /// Escalate guarded segments (`on`, the default with --llm) or only report them. Guards
    /// also hold languages the exemplars do not cover on probation: their first rows go to the
    /// LLM until the language's own confidence threshold is learned from the answers.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub guards: String,
    /// `off`: ignore the index's novelty rule (rows far from every exemplar of their label
    /// are kept like any other).
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub novelty: String,
}

impl AuditArgs {
    fn on_off(flag: &str, v: &str) -> anyhow::Result<bool> {
        match v {
            "on" => Ok(true),
            "off" => Ok(false),
            other => anyhow::bail!("--{flag} takes on or off, not `{other}`"),
        }
    }

    /// The audit plan, checked.
    pub fn plan(&self) -> anyhow::Result<Option<semtel::pipeline::AuditPlan>> {
        for (name, v) in [
            ("audit-rate", self.audit_rate),
            ("audit-llm-accuracy", self.audit_llm_accuracy),
        ] {
            if let Some(x) = v {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&x),
                    "--{name} is a share between 0 and 1, not {x}"
                );
            }
        }
        Ok(self
            .audit_rate
            .filter(|&r| r > 0.0)
            .map(|rate| semtel::pipeline::AuditPlan {
                rate,
                seed: self.audit_seed,
                llm_accuracy: self.audit_llm_accuracy,
            }))
    }

    pub fn guards_on(&self) -> anyhow::Result<bool> {
        Self::on_off("guards", &self.guards)
    }

    pub fn novelty_on(&self) -> anyhow::Result<bool> {
        Self::on_off("novelty", &self.novelty)
    }
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub index: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    #[command(flatten)]
    pub cols: ColumnArgs,
    #[arg(long)]
    pub k: Option<usize>,
    #[arg(long)]
    pub signal: Option<Signal>,
    /// Also report what happened to rows of these gold labels (e.g. `oos`): escalated, kept
    /// right, kept wrong.
    #[arg(long, value_delimiter = ',')]
    pub report_label: Vec<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CalibrateArgs {
    #[arg(long)]
    pub index: PathBuf,
    /// Wanted accuracy on the rows kNN keeps.
    #[arg(long, default_value_t = 0.97, conflicts_with = "budget")]
    pub target: f64,
    /// Share of rows that may go to the LLM (instead of --target).
    #[arg(long)]
    pub budget: Option<f64>,
    /// Confidence signal (default: the lowest risk–coverage area among all).
    #[arg(long)]
    pub signal: Option<Signal>,
    /// Calibrate on this labelled file (e.g. a validation split) instead of cross-validating
    /// over the exemplars.
    #[arg(long)]
    pub labelled: Option<PathBuf>,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Do not train the learned head (kNN signals only).
    #[arg(long)]
    pub no_head: bool,
    /// One global threshold instead of per-label ones.
    #[arg(long)]
    pub no_per_label: bool,
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Head training: epochs, L2 penalty, learning rate.
    #[arg(long)]
    pub head_epochs: Option<usize>,
    #[arg(long)]
    pub head_l2: Option<f64>,
    #[arg(long)]
    pub head_lr: Option<f64>,
    /// Share of rows like the exemplars escalated as novel (far from every exemplar of the
    /// label they would get): the novelty cut. Default: the index's, else 0.01; 0 turns it off.
    #[arg(long, value_name = "SHARE")]
    pub novelty_rate: Option<f64>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct TuneArgs {
    #[arg(long)]
    pub index: PathBuf,
    /// Stop within this wall-clock time (`90s`, `20m`, `1h`, or seconds): the search shrinks
    /// to fit, and a final run cut short leaves a checkpoint the next run continues.
    #[arg(long)]
    pub time_budget: Option<String>,
    /// Contrastive loss: `supcon` (in-batch supervised contrastive) or `pairs` (SetFit's
    /// cosine-similarity pairs).
    #[arg(long, default_value = "supcon")]
    pub loss: String,
    /// Train this many epochs (with --lr: skip the held-out search).
    #[arg(long, requires = "lr")]
    pub epochs: Option<usize>,
    /// Learning rate (with --epochs: skip the held-out search).
    #[arg(long, requires = "epochs")]
    pub lr: Option<f64>,
    /// Candidate learning rates for the search.
    #[arg(long, value_delimiter = ',', default_values_t = vec![5e-5, 1e-4, 2e-4])]
    pub lrs: Vec<f64>,
    /// The most epochs a search candidate trains.
    #[arg(long, default_value_t = 3)]
    pub max_epochs: usize,
    /// Rows per training batch.
    #[arg(long, default_value_t = 64)]
    pub batch_rows: usize,
    /// Re-calibrate on this labelled file (e.g. a validation split) instead of
    /// cross-validating over the exemplars.
    #[arg(long)]
    pub labelled: Option<PathBuf>,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Wanted accuracy on the rows kNN keeps (re-calibration).
    #[arg(long, default_value_t = 0.97)]
    pub target: f64,
    /// Seconds between checkpoints of the final run.
    #[arg(long, default_value_t = 60.0, hide = true)]
    pub checkpoint_every: f64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo writes its index and labels.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct BootstrapArgs {
    #[command(flatten)]
    pub send: SendArgs,
    /// Unlabelled conversations (JSONL/Parquet); a label column, if any, is ignored.
    #[arg(long)]
    pub input: PathBuf,
    /// TOML with a [labels] table (label = "description") and optional [examples]
    /// (label = ["text", …]).
    #[arg(long)]
    pub labels: PathBuf,
    /// LLM configuration (endpoints, prompt, limits).
    #[arg(long)]
    pub llm: PathBuf,
    /// Index folder to create.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub cols: ColumnArgs,
    /// Rows the LLM may label in all.
    #[arg(long, required_unless_present = "budget_usd")]
    pub budget_rows: Option<usize>,
    /// Dollars the LLM may cost in all (at the prices in the LLM configuration).
    #[arg(long)]
    pub budget_usd: Option<f64>,
    /// Rounds: the first (representative rows) plus active ones (rows the index is unsure of).
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// How the first round picks rows: representative (k-means medoids) or random.
    #[arg(long, default_value = "representative", value_parser = ["representative", "random"])]
    pub sampling: String,
    /// Read and embed at most this many input rows (a seeded random subset).
    #[arg(long, default_value_t = 200_000)]
    pub max_rows: usize,
    /// Wanted agreement with the LLM on the rows the index keeps (default: as high as the LLM
    /// agrees with itself when asked twice, at most 0.97).
    #[arg(long)]
    pub target: Option<f64>,
    /// Share of the row budget spent on a random sample held back to calibrate on.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Replace an index already at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}
