//! The live service's application handle (`semtel serve`): the same classifier, LLM tier,
//! growth and result writer as the classify job, behind one [`Service`] that an HTTP adapter
//! (or any other) calls with single requests.
//!
//! What it adds to the batch path is only what a live service needs:
//! - **cross-request micro-batching with a fair share**: requests wait in a bounded queue
//!   (`queue`); one compute thread runs steps of rows from several requests as one chunk
//!   through [`Classifier::classify_guarded`]. A step lasts about `fair_step` and the request
//!   served least goes first, so a one-row request is answered within a step or two however
//!   large the requests around it; small requests are batched whole (up to
//!   `max_batch_tokens`), so many clients still get large batches;
//! - **escalation per request**: `off` (the kNN answer), `wait` (the LLM tier's answer, or the
//!   kNN one at the request's deadline) or `async` (answered at once; the LLM's answer goes
//!   to the result log, readable by id);
//! - **a result log with the classify job's guarantees**: every `async` item is journaled
//!   (fsync) before it is acknowledged, results go through the same [`OutputWriter`] (lock,
//!   checkpoints, resume by id), and a restart resumes the journaled items that have no result:
//!   each accepted id gets exactly one result, even across `kill -9`;
//! - **reload without downtime**: a new classifier is opened and checked in full while the old
//!   one serves; the swap is one pointer store, and a broken index is refused.
//!
//! This module never parses HTTP, reads flags or prints; it must never hold a lock across a
//! model call (the queue, the swap and the routes are the only shared state).

mod journal;
mod queue;

pub use journal::{AsyncStatus, RESULTS_IN_MEMORY};

use crate::conversation::Row;
use crate::grow::Growth;
use crate::llm::LlmTier;
use crate::output::OutputSpec;
use crate::pipeline::{Classified, Classifier, ClassifierOptions, Escalation, Taxonomy};
use crate::row::{DecidedBy, OutputRow};
use crate::{Error, Result};
use journal::{journal_line, ResultLog};
use queue::{Budget, Kind, Queue, Refused, Ticket};
use serde::Serialize;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Everything the service needs, resolved (flags and config file merged by the adapter).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub index: PathBuf,
    /// Additional taxonomies: (name, index directory).
    pub also: Vec<(String, PathBuf)>,
    pub classifier: ClassifierOptions,
    /// LLM tier configuration; without one, escalated rows are answered as `escalate`.
    pub llm: Option<PathBuf>,
    /// `--redact`, `--show-sent`: win over the LLM configuration file.
    pub llm_overrides: crate::llm::config::Overrides,
    /// Result log for `escalate=async` (JSONL file, Parquet file or dataset directory); its
    /// journal of accepted items is `<results>.accepted.jsonl` beside it.
    pub results: Option<PathBuf>,
    /// `--grow`: LLM-labelled rows with kNN confidence at least this join the index.
    pub grow_min_confidence: Option<f32>,
    /// A micro-batch is closed when its estimated tokens reach this.
    pub max_batch_tokens: usize,
    /// … or when its first request has waited this long.
    pub max_batch_wait: Duration,
    /// Requests waiting for the compute thread at most (then `Busy`).
    pub max_queue: usize,
    /// While several requests wait, a model step lasts about this long.
    pub fair_step: Duration,
    /// With an audit plan (`classifier.audit`): whether tripped guards escalate their
    /// segments (otherwise they are only reported).
    pub guards: bool,
}

impl ServeOptions {
    pub fn new(index: PathBuf) -> Self {
        ServeOptions {
            index,
            also: Vec::new(),
            classifier: ClassifierOptions::default(),
            llm: None,
            llm_overrides: Default::default(),
            results: None,
            grow_min_confidence: None,
            max_batch_tokens: 16_384,
            max_batch_wait: Duration::from_millis(5),
            max_queue: 256,
            fair_step: Duration::from_millis(15),
            guards: true,
        }
    }
}

/// How a request wants its escalated items handled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Escalate {
    /// Answer with the kNN decision (`decided_by = "escalate"` for the uncertain).
    Off,
    /// Wait for the LLM tier up to this long, then answer with the kNN decision.
    Wait(Duration),
    /// Answer at once; the LLM's answer goes to the result log.
    Async,
}

/// Why a request was not served (item-level problems are error rows, not these).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the queue is full ({0} requests waiting): retry after a moment")]
    Busy(usize),
    #[error("the service is not ready (starting, reloading its model or shutting down)")]
    NotReady,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Failed(#[from] Error),
}

/// What `GET /info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    pub version: &'static str,
    pub index: String,
    pub model: String,
    pub engine: String,
    pub dims: usize,
    pub max_tokens: usize,
    pub labels: Vec<String>,
    pub exemplars: usize,
    pub k: usize,
    pub signal: String,
    pub threshold: f32,
    pub taxonomies: Vec<String>,
    pub llm: bool,
    pub results: Option<String>,
    pub grow: bool,
    /// How many times the index was reloaded since start.
    pub reloads: u64,
}

/// One opened index with everything derived from it; swapped whole on reload.
pub struct Loaded {
    pub classifier: Classifier,
    pub spec: OutputSpec,
    pub info: ServiceInfo,
}

/// Live counters the adapter exports (`/metrics`); all monotonic except the gauges.
#[derive(Debug, Default)]
pub struct Counters {
    pub rows_knn: AtomicU64,
    pub rows_escalated: AtomicU64,
    pub rows_llm: AtomicU64,
    pub rows_error: AtomicU64,
    pub llm_timeouts: AtomicU64,
    pub llm_tokens_in: AtomicU64,
    pub llm_tokens_out: AtomicU64,
    /// Cost in micro-dollars.
    pub llm_cost_micro_usd: AtomicU64,
    pub batches: AtomicU64,
    pub batch_rows: AtomicU64,
    /// Steps of small requests run at a pause point of a long step.
    pub pause_steps: AtomicU64,
    /// Gauge: requests waiting for the compute thread.
    pub queue_depth: AtomicU64,
    /// Gauge: rows waiting for the LLM.
    pub llm_pending: AtomicU64,
    /// Batch sizes (rows) as histogram buckets: ≤1, ≤2, ≤4 … ≤1024, more.
    pub batch_size_buckets: [AtomicU64; 12],
    pub async_accepted: AtomicU64,
    pub async_resumed: AtomicU64,
    /// Audited kept rows by the LLM's verdict: agree, disagree, missing.
    pub audit: [AtomicU64; 3],
    /// Personal data replaced before text left for the LLM (or before embedding), by type.
    pub redacted: Mutex<crate::pii::Counts>,
}

impl Counters {
    pub const BATCH_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

    fn count_batch(&self, rows: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batch_rows.fetch_add(rows as u64, Ordering::Relaxed);
        let i = Self::BATCH_BUCKETS
            .iter()
            .position(|&b| rows as u64 <= b)
            .unwrap_or(Self::BATCH_BUCKETS.len());
        self.batch_size_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    fn count_row(&self, r: &OutputRow) {
        if let Some(n) = &r.redacted {
            if let Ok(mut c) = self.redacted.lock() {
                c.add(n);
            }
        }
        let c = match r.decided_by {
            DecidedBy::Knn => &self.rows_knn,
            DecidedBy::Escalate => &self.rows_escalated,
            DecidedBy::Llm => &self.rows_llm,
            DecidedBy::Error => &self.rows_error,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per row of an embedding request: its vector and token count, or why it has none.
pub type Embedded = Vec<std::result::Result<(Vec<f32>, usize), String>>;

/// Where an LLM answer goes.
enum Route {
    Wait {
        id: String,
        tx: oneshot::Sender<OutputRow>,
    },
    Async {
        id: String,
    },
    /// An audited kept row, already answered: the LLM's answer only feeds the guards and the
    /// audit counters.
    Audit,
}

/// Messages to the LLM thread.
enum LlmMsg {
    Rows(Vec<Classified>),
    /// Drain everything submitted, then acknowledge (shutdown).
    Finish(std::sync::mpsc::Sender<()>),
}

/// What waits with a queued request: where its answer goes.
enum Reply {
    Classify(oneshot::Sender<Result<(Vec<Classified>, Arc<Loaded>)>>),
    Embed(oneshot::Sender<Result<Embedded>>),
}

/// A request's results while its rows run over several steps.
enum Partial {
    Classify(Vec<Classified>),
    Embed(Embedded),
}

struct Inner {
    opts: ServeOptions,
    loaded: RwLock<Arc<Loaded>>,
    queue: Arc<Queue<Reply>>,
    llm: Mutex<Option<SyncSender<LlmMsg>>>,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    next_key: AtomicU64,
    log: Option<Arc<ResultLog>>,
    growth: Option<Arc<Growth>>,
    guards: Option<Arc<crate::guard::Guards>>,
    ready: AtomicBool,
    reloads: AtomicU64,
    /// Serialises reloads (never held by a request).
    reload_lock: Mutex<()>,
    pub counters: Arc<Counters>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    max_tokens: usize,
    /// Tokens a step at a pause point may hold (the shared step budget, kept by the compute
    /// loop).
    express_tokens: AtomicUsize,
    /// A step runs at a pause point now (one at a time; never from inside another).
    in_pause: AtomicBool,
}

/// The service handle: cheap to clone, shared by every request.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub exemplars_before: usize,
    pub exemplars: usize,
    pub labels: usize,
    /// Exemplars learned by `--grow` saved into the index before it was reopened.
    pub grown_saved: usize,
    pub seconds: f64,
}

fn open_loaded(
    opts: &ServeOptions,
    growth: Option<&Arc<Growth>>,
    guards: Option<&Arc<crate::guard::Guards>>,
    reloads: u64,
) -> Result<Loaded> {
    let mut classifier = Classifier::open(&opts.index, &opts.classifier)?;
    classifier.guards = guards.cloned();
    if let Some(p) = &opts.llm {
        let cfg = crate::llm::LlmConfig::load_with(p, &opts.llm_overrides)?;
        classifier.redact_input = cfg.input_redactor()?;
    }
    for (name, dir) in &opts.also {
        let t = Taxonomy::open(name, dir, &classifier.encoder)?;
        classifier.extra.push(t);
    }
    classifier.growth = growth.cloned();
    let mut spec = OutputSpec::new(Vec::new());
    spec.taxonomies = classifier.taxonomy_columns();
    let info = ServiceInfo {
        version: env!("CARGO_PKG_VERSION"),
        index: opts.index.display().to_string(),
        model: classifier.index.manifest.model.id.clone(),
        engine: classifier.encoder.engine.describe(),
        dims: classifier.encoder.dim(),
        max_tokens: classifier.encoder.files.max_tokens,
        labels: classifier.index.labels().to_vec(),
        exemplars: classifier.index.len(),
        k: classifier.k,
        signal: classifier.thresholds.signal.name().to_string(),
        threshold: classifier.index.manifest.decision.threshold,
        taxonomies: opts.also.iter().map(|(n, _)| n.clone()).collect(),
        llm: opts.llm.is_some(),
        results: opts.results.as_ref().map(|p| p.display().to_string()),
        grow: growth.is_some(),
        reloads,
    };
    Ok(Loaded {
        classifier,
        spec,
        info,
    })
}

/// Estimated tokens of a row (cheap: no tokenization; a subword is 3–4 bytes of text in most
/// scripts), capped at the model's budget: what a micro-batch is filled by.
fn estimate_tokens(row: &Row, max_tokens: usize) -> usize {
    let bytes = row.content.as_ref().map_or(0, |c| c.char_len());
    (bytes / 3 + 4).min(max_tokens.max(8))
}

/// Answers a queued request with an error.
fn fail(reply: Reply, msg: &str) {
    match reply {
        Reply::Classify(tx) => {
            let _ = tx.send(Err(Error::Internal(msg.to_string())));
        }
        Reply::Embed(tx) => {
            let _ = tx.send(Err(Error::Internal(msg.to_string())));
        }
    }
}

impl Service {
    /// Opens the index (and taxonomies, the LLM tier, the result log), resumes the journaled
    /// `async` items that have no result, and starts the compute and LLM threads.
    pub fn open(opts: ServeOptions) -> Result<Service> {
        if opts.grow_min_confidence.is_some() && opts.llm.is_none() {
            return Err(Error::Config(
                "--grow needs --llm: only LLM-labelled rows grow the index".into(),
            ));
        }
        if opts.classifier.audit.is_some() && opts.llm.is_none() {
            return Err(Error::Config(
                "--audit-rate needs --llm: audited rows are asked of the LLM".into(),
            ));
        }
        let probe = open_loaded(&opts, None, None, 0)?;
        // The guards outlive reloads; with a result log their state is kept beside it.
        let guards = super::classify::guards_for(
            &probe.classifier,
            opts.llm.is_some(),
            opts.guards,
            opts.results
                .as_deref()
                .map(super::classify::guards_path)
                .as_deref(),
        )?;
        let growth = match opts.grow_min_confidence {
            Some(min) => Some(Arc::new(Growth::new(probe.classifier.encoder.dim(), min)?)),
            None => None,
        };
        let loaded = Arc::new(Loaded {
            classifier: {
                let mut c = probe.classifier;
                c.growth = growth.clone();
                c.guards = guards.clone();
                c
            },
            spec: probe.spec,
            info: ServiceInfo {
                grow: growth.is_some(),
                ..probe.info
            },
        });
        let max_tokens = loaded.classifier.encoder.files.max_tokens;
        let counters = Arc::new(Counters::default());
        // The LLM tier first: a bad configuration or a missing key stops the start before
        // the result log is locked.
        let tier = match &opts.llm {
            Some(p) => {
                let mut t = super::classify::llm_tier(&loaded.classifier, p, &opts.llm_overrides)?;
                if let Some(g) = &growth {
                    super::classify::attach_growth(
                        &mut t,
                        g.clone(),
                        loaded.classifier.index.labels().to_vec(),
                    );
                }
                Some(t)
            }
            None => None,
        };
        let (log, resume) = match &opts.results {
            Some(p) => {
                let (l, todo) = ResultLog::open(p, loaded.spec.clone())?;
                (Some(Arc::new(l)), todo)
            }
            None => (None, Vec::new()),
        };
        let inner = Arc::new(Inner {
            loaded: RwLock::new(loaded),
            queue: Queue::new(opts.max_queue.max(1)),
            llm: Mutex::new(None),
            routes: Arc::new(Mutex::new(HashMap::new())),
            next_key: AtomicU64::new(0),
            log,
            growth,
            guards,
            ready: AtomicBool::new(false),
            reloads: AtomicU64::new(0),
            reload_lock: Mutex::new(()),
            counters,
            threads: Mutex::new(Vec::new()),
            max_tokens,
            express_tokens: AtomicUsize::new(128),
            in_pause: AtomicBool::new(false),
            opts,
        });
        let svc = Service { inner };
        svc.install_pause(&svc.loaded());
        {
            let me = svc.clone();
            let h = std::thread::Builder::new()
                .name("semtel-serve-compute".into())
                .spawn(move || me.compute_loop())
                .map_err(|e| Error::Internal(format!("starting the compute thread: {e}")))?;
            svc.inner.threads.lock().expect("threads").push(h);
        }
        if let Some(tier) = tier {
            svc.start_llm(tier)?;
        }
        if !resume.is_empty() {
            svc.resume(resume)?;
        }
        svc.inner.ready.store(true, Ordering::SeqCst);
        Ok(svc)
    }

    fn start_llm(&self, mut tier: LlmTier) -> Result<()> {
        let (tx, rx) = sync_channel::<LlmMsg>(1024);
        let (out_tx, out_rx) = sync_channel::<Vec<OutputRow>>(64);
        let counters = self.inner.counters.clone();
        let h = std::thread::Builder::new()
            .name("semtel-serve-llm".into())
            .spawn(move || {
                let mut failed = false;
                for msg in rx.iter() {
                    match msg {
                        LlmMsg::Rows(rows) => {
                            if failed {
                                // The tier stopped (a refused key, say): answer as escalated.
                                let rows: Vec<OutputRow> =
                                    rows.into_iter().map(|c| c.out).collect();
                                let _ = out_tx.send(rows);
                                continue;
                            }
                            let n = rows.len() as u64;
                            let backup: Vec<OutputRow> =
                                rows.iter().map(|c| c.out.clone()).collect();
                            if let Err(e) = tier.submit(rows, &out_tx) {
                                tracing::warn!("the LLM tier stopped: {e}");
                                failed = true;
                                let _ = out_tx.send(backup);
                            }
                            let _ = n;
                        }
                        LlmMsg::Finish(ack) => {
                            if !failed {
                                if let Err(e) = tier.finish(&out_tx) {
                                    tracing::warn!("the LLM tier stopped: {e}");
                                }
                            }
                            let _ = ack.send(());
                            return;
                        }
                    }
                }
                if !failed {
                    let _ = tier.finish(&out_tx);
                }
            })
            .map_err(|e| Error::Internal(format!("starting the LLM thread: {e}")))?;
        let me = self.clone();
        let r = std::thread::Builder::new()
            .name("semtel-serve-router".into())
            .spawn(move || me.route_loop(out_rx, counters))
            .map_err(|e| Error::Internal(format!("starting the LLM router: {e}")))?;
        *self.inner.llm.lock().expect("llm") = Some(tx);
        let mut th = self.inner.threads.lock().expect("threads");
        th.push(h);
        th.push(r);
        Ok(())
    }

    /// LLM answers → the request waiting for them, or the result log.
    fn route_loop(&self, out_rx: Receiver<Vec<OutputRow>>, counters: Arc<Counters>) {
        for rows in out_rx.iter() {
            let mut logged = Vec::new();
            for mut r in rows {
                counters.llm_pending.fetch_sub(1, Ordering::Relaxed);
                if let Some(llm) = &r.llm {
                    counters
                        .llm_tokens_in
                        .fetch_add(llm.tokens_in as u64, Ordering::Relaxed);
                    counters
                        .llm_tokens_out
                        .fetch_add(llm.tokens_out as u64, Ordering::Relaxed);
                    counters
                        .llm_cost_micro_usd
                        .fetch_add((llm.cost_usd * 1e6).round() as u64, Ordering::Relaxed);
                }
                if let Some(g) = &self.inner.guards {
                    g.observe_row(&r);
                }
                let route = self.inner.routes.lock().expect("routes").remove(&r.id);
                match route {
                    Some(Route::Wait { id, tx }) => {
                        r.id = id;
                        // A request past its deadline has gone: its answer stays in the cache.
                        let _ = tx.send(r);
                    }
                    Some(Route::Async { id }) => {
                        r.id = id;
                        counters.count_row(&r);
                        logged.push(r);
                    }
                    Some(Route::Audit) => {
                        let verdict = r
                            .audit
                            .as_ref()
                            .map_or("missing", |a| a.verdict(r.label.as_deref()));
                        counters.audit[match verdict {
                            "agree" => 0,
                            "disagree" => 1,
                            _ => 2,
                        }]
                        .fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
            if let (Some(log), false) = (&self.inner.log, logged.is_empty()) {
                let spec = self.loaded().spec.clone();
                if let Err(e) = log.write(&logged, &spec) {
                    tracing::error!("writing the result log: {e}");
                }
            }
        }
    }

    /// The compute thread: steps of rows from the queue (see `queue`) through the current
    /// classifier, until the queue is closed and drained.
    ///
    /// While the model runs, new requests queue, so under load steps fill by themselves
    /// (continuous batching) and a lone client never waits for company; only when the previous
    /// step held several requests does a small one linger up to `max_batch_wait` for more. The
    /// shared step size follows the measured speed, so a step lasts about `fair_step`.
    fn compute_loop(&self) {
        let o = &self.inner.opts;
        let mut concurrent = false;
        // Tokens per second of the model here, measured as steps run (a modest start).
        let mut speed = 5_000.0f64;
        let mut partial: HashMap<u64, Partial> = HashMap::new();
        loop {
            let max = o.max_batch_tokens.max(16);
            let budget = Budget {
                step: ((speed * o.fair_step.as_secs_f64()) as usize).clamp(16, max),
                // Alone, steps of up to 64 × `fair_step` (about a second): nearly the speed
                // of the largest batches, and what a newcomer after a quiet spell waits at most.
                alone: ((speed * 64.0 * o.fair_step.as_secs_f64()) as usize).clamp(16, max),
                quiet: Duration::from_secs(1),
                whole: (max / 16).max(16),
                max,
                linger: o.max_batch_wait,
            };
            // A step at a pause point holds what a normal step would, and at least a one-row
            // request at the model's limit.
            self.inner
                .express_tokens
                .store(budget.step.max(self.inner.max_tokens), Ordering::Relaxed);
            let Some(step) = self.inner.queue.next_step(budget, concurrent) else {
                return;
            };
            concurrent = step.waiting > 1;
            self.inner
                .counters
                .queue_depth
                .store(self.inner.queue.depth() as u64, Ordering::Relaxed);
            let t = Instant::now();
            self.run_step(step.parts, &mut partial);
            let secs = t.elapsed().as_secs_f64();
            if step.tokens >= 64 && secs > 0.0 {
                speed = 0.8 * speed + 0.2 * (step.tokens as f64 / secs);
            }
        }
    }

    /// Runs one step: the classify rows as one chunk, the embed rows as another; each
    /// request's rows are added to its partial result, and a request whose last rows ran is
    /// answered.
    fn run_step(&self, parts: Vec<queue::Part<Reply>>, partial: &mut HashMap<u64, Partial>) {
        let loaded = self.loaded();
        for kind in [Kind::Classify, Kind::Embed] {
            let mine: Vec<&queue::Part<Reply>> = parts.iter().filter(|p| p.kind == kind).collect();
            if mine.is_empty() {
                continue;
            }
            let rows: Vec<Row> = mine.iter().flat_map(|p| p.rows.iter().cloned()).collect();
            self.inner.counters.count_batch(rows.len());
            let out: std::result::Result<Vec<Partial>, String> = match kind {
                Kind::Classify => loaded
                    .classifier
                    .classify_guarded(rows)
                    .map(|(rows, _panics)| {
                        let mut it = rows.into_iter();
                        mine.iter()
                            .map(|p| Partial::Classify(it.by_ref().take(p.rows.len()).collect()))
                            .collect()
                    })
                    .map_err(|e| e.to_string()),
                Kind::Embed => loaded
                    .classifier
                    .encoder
                    .embed_rows(&rows)
                    .map(|out| {
                        let mut it = out.into_iter().map(|e| e.map(|e| (e.vector, e.ids.len())));
                        mine.iter()
                            .map(|p| Partial::Embed(it.by_ref().take(p.rows.len()).collect()))
                            .collect()
                    })
                    .map_err(|e| e.to_string()),
            };
            match out {
                Ok(pieces) => {
                    for (p, piece) in mine.iter().zip(pieces) {
                        let acc = partial.entry(p.id).or_insert_with(|| match kind {
                            Kind::Classify => Partial::Classify(Vec::new()),
                            Kind::Embed => Partial::Embed(Vec::new()),
                        });
                        match (acc, piece) {
                            (Partial::Classify(a), Partial::Classify(b)) => a.extend(b),
                            (Partial::Embed(a), Partial::Embed(b)) => a.extend(b),
                            _ => unreachable!("one kind per request"),
                        }
                    }
                }
                Err(msg) => {
                    // The whole step failed: every request in it is answered with the error
                    // (and those with rows left are taken out of the queue).
                    for p in &mine {
                        partial.remove(&p.id);
                        if p.last.is_none() {
                            if let Some(reply) = self.inner.queue.cancel(p.id) {
                                fail(reply, &msg);
                            }
                        }
                    }
                }
            }
        }
        for p in parts {
            let Some(reply) = p.last else { continue };
            match (reply, partial.remove(&p.id)) {
                (Reply::Classify(tx), Some(Partial::Classify(rows))) => {
                    let _ = tx.send(Ok((rows, loaded.clone())));
                }
                (Reply::Embed(tx), Some(Partial::Embed(rows))) => {
                    let _ = tx.send(Ok(rows));
                }
                (reply, _) => fail(reply, "the model step for this request failed"),
            }
        }
    }

    /// Lets the encoder of `loaded` run small waiting requests between the layers of a long
    /// step (see [`crate::embed::Pause`]): a one-row request then waits for one layer of a
    /// long conversation, not its whole forward pass (measured: a 256-token row is 40–80 ms
    /// of this 2-core machine, a layer a sixth of it).
    fn install_pause(&self, loaded: &Loaded) {
        let me = Arc::downgrade(&self.inner);
        let _ = loaded.classifier.encoder.pause.set(Arc::new(move || {
            if let Some(inner) = me.upgrade() {
                Service { inner }.pause_point();
            }
        }));
    }

    /// A pause point of a long step: one step of small requests that have not been served
    /// yet, if any wait. Never nested (their own forward passes do not pause).
    fn pause_point(&self) {
        if self.inner.in_pause.swap(true, Ordering::AcqRel) {
            return;
        }
        let limit = self.inner.express_tokens.load(Ordering::Relaxed);
        if let Some(step) = self.inner.queue.next_express(limit) {
            self.inner
                .counters
                .pause_steps
                .fetch_add(1, Ordering::Relaxed);
            let mut partial = HashMap::new();
            self.run_step(step.parts, &mut partial);
        }
        self.inner.in_pause.store(false, Ordering::Release);
    }

    /// The classifier now serving (a reload swaps it; requests in flight keep theirs).
    pub fn loaded(&self) -> Arc<Loaded> {
        self.inner.loaded.read().expect("loaded").clone()
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::SeqCst)
    }

    /// Whether an LLM tier answers escalated items (`escalate=wait` is the default then).
    pub fn has_llm(&self) -> bool {
        self.inner.opts.llm.is_some()
    }

    pub fn info(&self) -> ServiceInfo {
        let mut i = self.loaded().info.clone();
        i.reloads = self.inner.reloads.load(Ordering::Relaxed);
        i
    }

    /// Lines in the async journal (pending items, plus finished ones not yet compacted away).
    pub fn journal_lines(&self) -> Option<usize> {
        self.inner.log.as_ref().map(|l| l.journal_lines())
    }

    /// Exemplars in the index plus those learned since the last save.
    pub fn index_size(&self) -> usize {
        self.loaded().classifier.index.len() + self.inner.growth.as_ref().map_or(0, |g| g.len())
    }

    /// A place in the queue for one request, or why there is none. Taken before anything
    /// about the request is recorded, so a refused request leaves no trace.
    fn reserve(&self) -> std::result::Result<Ticket<Reply>, ServeError> {
        if !self.is_ready() {
            return Err(ServeError::NotReady);
        }
        let t = self.inner.queue.reserve().map_err(|r| match r {
            Refused::Full(n) => ServeError::Busy(n),
            Refused::Closed => ServeError::NotReady,
        })?;
        self.inner
            .counters
            .queue_depth
            .store(self.inner.queue.depth() as u64, Ordering::Relaxed);
        Ok(t)
    }

    /// Queues rows under `ticket` (each with its token estimate) and waits for them; a
    /// dropped reply means the service stopped.
    async fn run_classify(
        &self,
        ticket: Ticket<Reply>,
        rows: Vec<Row>,
    ) -> std::result::Result<(Vec<Classified>, Arc<Loaded>), ServeError> {
        let (tx, rx) = oneshot::channel();
        ticket.submit(Kind::Classify, self.with_tokens(rows), Reply::Classify(tx));
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ServeError::NotReady),
        }
    }

    fn with_tokens(&self, rows: Vec<Row>) -> Vec<(Row, usize)> {
        rows.into_iter()
            .map(|r| {
                let t = estimate_tokens(&r, self.inner.max_tokens);
                (r, t)
            })
            .collect()
    }

    /// Embeds rows (for `/v1/embeddings`): per row its vector and token count, or why not.
    pub async fn embed(&self, rows: Vec<Row>) -> std::result::Result<Embedded, ServeError> {
        let ticket = self.reserve()?;
        let (tx, rx) = oneshot::channel();
        ticket.submit(Kind::Embed, self.with_tokens(rows), Reply::Embed(tx));
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ServeError::NotReady),
        }
    }

    fn key(&self) -> String {
        format!(
            "\u{1}srv{}",
            self.inner.next_key.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A copy of an audited kept row for the LLM, routed to the guards (the row itself is
    /// answered at once with its kNN label).
    fn audit_copy(&self, c: &Classified) -> Option<Classified> {
        if !c.audit || c.content.is_none() {
            return None;
        }
        let key = self.key();
        self.inner
            .routes
            .lock()
            .expect("routes")
            .insert(key.clone(), Route::Audit);
        let mut copy = c.clone();
        copy.out.id = key;
        Some(copy)
    }

    /// Sends audit copies; when the LLM queue is full they are dropped (an audit is a
    /// sample: skipping one biases nothing).
    fn send_audits(&self, audits: Vec<Classified>) {
        if audits.is_empty() {
            return;
        }
        let keys: Vec<String> = audits.iter().map(|c| c.out.id.clone()).collect();
        if !self.send_llm(audits) {
            let mut routes = self.inner.routes.lock().expect("routes");
            for k in keys {
                routes.remove(&k);
            }
        }
    }

    /// The guards (with `--audit-rate`).
    pub fn guards(&self) -> Option<&Arc<crate::guard::Guards>> {
        self.inner.guards.as_ref()
    }

    fn send_llm(&self, rows: Vec<Classified>) -> bool {
        let guard = self.inner.llm.lock().expect("llm");
        let Some(tx) = guard.as_ref() else {
            return false;
        };
        let n = rows.len() as u64;
        self.inner
            .counters
            .llm_pending
            .fetch_add(n, Ordering::Relaxed);
        if tx.try_send(LlmMsg::Rows(rows)).is_err() {
            self.inner
                .counters
                .llm_pending
                .fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Classifies `rows` (each with its id; bad ones are error rows) and answers with one
    /// output row (as JSON, the output files' fields) per input row, in order. `async` items
    /// that are pending carry `"status": "pending"`.
    pub async fn classify(
        &self,
        rows: Vec<Row>,
        escalate: Escalate,
    ) -> std::result::Result<Vec<Value>, ServeError> {
        let has_llm = self.inner.llm.lock().expect("llm").is_some();
        if escalate == Escalate::Async {
            let Some(log) = &self.inner.log else {
                return Err(ServeError::BadRequest(
                    "escalate=async needs a result log: start the server with --results FILE"
                        .into(),
                ));
            };
            // The queue place first: a refused request (429) leaves no claim and no journal line.
            let ticket = self.reserve()?;
            let spec = self.loaded().spec.clone();
            let answer = |id: String, msg: String, status: &str| {
                let mut v = crate::output::to_json(&OutputRow::error(id, msg, Vec::new()), &spec);
                v["status"] = status.into();
                v
            };
            let mut answers: Vec<Option<Value>> = vec![None; rows.len()];
            let mut positions = Vec::new();
            let mut candidates = Vec::new();
            for (i, r) in rows.into_iter().enumerate() {
                match &r.content {
                    // Nothing to classify later: answered now, never journaled.
                    Err(e) => answers[i] = Some(answer(r.id.clone(), e.clone(), "error")),
                    Ok(_) => {
                        positions.push(i);
                        candidates.push(r);
                    }
                }
            }
            let ids: Vec<&str> = candidates.iter().map(|r| r.id.as_str()).collect();
            let fresh = log.claim(&ids);
            let mut journal = Vec::new();
            let mut claimed = Vec::new();
            let mut claimed_at = Vec::new();
            for ((r, ok), i) in candidates.into_iter().zip(fresh).zip(positions) {
                if ok {
                    journal.push(journal_line(&r));
                    claimed.push(r);
                    claimed_at.push(i);
                } else {
                    answers[i] = Some(answer(
                        r.id,
                        "this id was already accepted for async classification: read its result at /v1/results/{id}, or send another id".into(),
                        "refused",
                    ));
                }
            }
            if let Err(e) = log.journal(&journal) {
                let ids: Vec<String> = claimed.iter().map(|r| r.id.clone()).collect();
                log.unclaim(&ids);
                return Err(e.into());
            }
            self.inner
                .counters
                .async_accepted
                .fetch_add(claimed.len() as u64, Ordering::Relaxed);
            if !claimed.is_empty() {
                let (classified, loaded) = self.run_classify(ticket, claimed).await?;
                let settled = self.settle_async(classified, &loaded, has_llm)?;
                for (i, v) in claimed_at.into_iter().zip(settled) {
                    answers[i] = Some(v);
                }
            }
            // In request order, one answer per item.
            return Ok(answers.into_iter().flatten().collect());
        }
        let ticket = self.reserve()?;
        let (classified, loaded) = self.run_classify(ticket, rows).await?;
        let mut out: Vec<Option<OutputRow>> = Vec::with_capacity(classified.len());
        let mut waits = Vec::new();
        let mut to_llm = Vec::new();
        let mut audits = Vec::new();
        for (i, mut c) in classified.into_iter().enumerate() {
            if has_llm {
                audits.extend(self.audit_copy(&c));
            }
            let wait = match escalate {
                Escalate::Wait(d) if has_llm => Some(d),
                _ => None,
            };
            if let (Some(_), DecidedBy::Escalate, true) =
                (wait, c.out.decided_by, c.content.is_some())
            {
                let key = self.key();
                let (tx, rx) = oneshot::channel();
                self.inner.routes.lock().expect("routes").insert(
                    key.clone(),
                    Route::Wait {
                        id: c.out.id.clone(),
                        tx,
                    },
                );
                waits.push((i, key.clone(), rx, c.out.clone()));
                c.out.id = key;
                to_llm.push(c);
                out.push(None);
            } else {
                out.push(Some(c.out));
            }
        }
        self.send_audits(audits);
        if !to_llm.is_empty() && !self.send_llm(to_llm) {
            // The LLM queue is full: answer with the kNN decision now.
            for (i, key, _, fallback) in waits.drain(..) {
                self.inner.routes.lock().expect("routes").remove(&key);
                out[i] = Some(fallback);
            }
        }
        if let Escalate::Wait(deadline) = escalate {
            let until = tokio::time::Instant::now() + deadline;
            for (i, key, rx, fallback) in waits {
                match tokio::time::timeout_at(until, rx).await {
                    Ok(Ok(row)) => out[i] = Some(row),
                    _ => {
                        self.inner.routes.lock().expect("routes").remove(&key);
                        self.inner
                            .counters
                            .llm_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        out[i] = Some(fallback);
                    }
                }
            }
        }
        let rows: Vec<OutputRow> = out.into_iter().flatten().collect();
        for r in &rows {
            self.inner.counters.count_row(r);
        }
        Ok(rows
            .iter()
            .map(|r| crate::output::to_json(r, &loaded.spec))
            .collect())
    }

    /// `async` items (already journaled and classified): decided rows go to the log at once;
    /// escalated ones to the LLM, whose answers the router writes.
    fn settle_async(
        &self,
        classified: Vec<Classified>,
        loaded: &Loaded,
        has_llm: bool,
    ) -> std::result::Result<Vec<Value>, ServeError> {
        let log = self.inner.log.as_ref().expect("checked by the caller");
        let mut answers = Vec::with_capacity(classified.len());
        let mut decided = Vec::new();
        let mut to_llm = Vec::new();
        let mut audits = Vec::new();
        for mut c in classified {
            if has_llm {
                audits.extend(self.audit_copy(&c));
            }
            let mut v = crate::output::to_json(&c.out, &loaded.spec);
            if has_llm && c.out.decided_by == DecidedBy::Escalate && c.content.is_some() {
                v["status"] = "pending".into();
                let key = self.key();
                self.inner.routes.lock().expect("routes").insert(
                    key.clone(),
                    Route::Async {
                        id: c.out.id.clone(),
                    },
                );
                c.out.id = key;
                to_llm.push(c);
            } else {
                v["status"] = "done".into();
                self.inner.counters.count_row(&c.out);
                decided.push(c.out);
            }
            answers.push(v);
        }
        log.write(&decided, &loaded.spec)?;
        if !to_llm.is_empty() {
            let keys: Vec<(String, OutputRow)> = to_llm
                .iter()
                .map(|c| (c.out.id.clone(), c.out.clone()))
                .collect();
            if !self.send_llm(to_llm) {
                // The LLM queue is full: the kNN decision is the result (never lost, never
                // twice: the route is removed before writing).
                let mut rows = Vec::new();
                for (key, mut r) in keys {
                    if let Some(Route::Async { id }) =
                        self.inner.routes.lock().expect("routes").remove(&key)
                    {
                        r.id = id;
                        self.inner.counters.count_row(&r);
                        rows.push(r);
                    }
                }
                log.write(&rows, &loaded.spec)?;
            }
        }
        self.send_audits(audits);
        Ok(answers)
    }

    /// Journaled items without a result (the last run ended before their answer): classified
    /// and escalated again, in the background of the start.
    fn resume(&self, rows: Vec<Row>) -> Result<()> {
        let has_llm = self.inner.llm.lock().expect("llm").is_some();
        self.inner
            .counters
            .async_resumed
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        let loaded = self.loaded();
        for chunk in rows.chunks(256) {
            let (classified, _) = loaded.classifier.classify_guarded(chunk.to_vec())?;
            self.settle_async(classified, &loaded, has_llm)
                .map_err(|e| match e {
                    ServeError::Failed(e) => e,
                    other => Error::Internal(other.to_string()),
                })?;
        }
        Ok(())
    }

    /// The state of an `async` id.
    pub fn result(&self, id: &str) -> Option<AsyncStatus> {
        self.inner.log.as_ref()?.status(id)
    }

    /// Opens the index again (after `index add`, `calibrate`, a new build in place) and swaps
    /// it in when it opens and checks cleanly; otherwise the old one keeps serving and the
    /// error says why. What `--grow` learned is saved into the index first.
    pub fn reload(&self) -> Result<ReloadReport> {
        let _one = self.inner.reload_lock.lock().expect("reload");
        let t = Instant::now();
        let before = self.loaded();
        let grown_saved = match &self.inner.growth {
            Some(g) => super::classify::save_growth(&self.inner.opts.index, g)?,
            None => 0,
        };
        let reloads = self.inner.reloads.load(Ordering::Relaxed) + 1;
        let fresh = open_loaded(
            &self.inner.opts,
            self.inner.growth.as_ref(),
            self.inner.guards.as_ref(),
            reloads,
        )?;
        if self.inner.llm.lock().expect("llm").is_some()
            && fresh.classifier.index.labels() != before.classifier.index.labels()
        {
            return Err(Error::index(
                &self.inner.opts.index,
                "the reloaded index has another label set than the LLM tier was started with: restart the server to change labels",
            ));
        }
        let report = ReloadReport {
            exemplars_before: before.classifier.index.len(),
            exemplars: fresh.classifier.index.len(),
            labels: fresh.classifier.index.labels().len(),
            grown_saved,
            seconds: 0.0,
        };
        let fresh = Arc::new(fresh);
        self.install_pause(&fresh);
        *self.inner.loaded.write().expect("loaded") = fresh;
        self.inner.reloads.store(reloads, Ordering::Relaxed);
        Ok(ReloadReport {
            seconds: t.elapsed().as_secs_f64(),
            ..report
        })
    }

    /// Stops taking work, finishes what is queued (and what the LLM owes), flushes the result
    /// log and saves what `--grow` learned. Idempotent.
    pub fn shutdown(&self) -> Result<ShutdownReport> {
        self.inner.ready.store(false, Ordering::SeqCst);
        // Closing the queue ends the compute thread once it has drained.
        self.inner.queue.close();
        let llm = self.inner.llm.lock().expect("llm").take();
        if let Some(tx) = llm {
            let (ack_tx, ack_rx) = std::sync::mpsc::channel();
            if tx.send(LlmMsg::Finish(ack_tx)).is_ok() {
                let _ = ack_rx.recv();
            }
        }
        let threads: Vec<_> = std::mem::take(&mut *self.inner.threads.lock().expect("threads"));
        for h in threads {
            let _ = h.join();
        }
        if let Some(log) = &self.inner.log {
            log.checkpoint()?;
        }
        if let (Some(g), Some(p)) = (&self.inner.guards, &self.inner.opts.results) {
            g.save(&super::classify::guards_path(p))?;
        }
        let grown = match &self.inner.growth {
            Some(g) => super::classify::save_growth(&self.inner.opts.index, g)?,
            None => 0,
        };
        Ok(ShutdownReport { grown_saved: grown })
    }
}

/// What a shutdown did.
#[derive(Debug, Clone, Serialize)]
pub struct ShutdownReport {
    pub grown_saved: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_is_capped() {
        let r = Row {
            index: 0,
            id: "x".into(),
            content: Ok(crate::conversation::Content::Text("x".repeat(100_000))),
            label: None,
            passthrough: Vec::new(),
        };
        assert_eq!(estimate_tokens(&r, 256), 256);
        let e = Row {
            content: Err("bad".into()),
            ..r
        };
        assert_eq!(estimate_tokens(&e, 256), 4);
    }
}
