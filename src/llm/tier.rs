//! The LLM tier: labels the rows the kNN stage escalated, as fast as the endpoints allow and
//! without losing or duplicating a row.
//!
//! A single dispatcher task owns all state: it deduplicates identical conversations, answers
//! from the response cache, packs items into calls of N, picks an endpoint (among those whose
//! learned pacing, concurrency and circuit breaker let a call start now, weighted by weight ×
//! learned capacity; see [`super::limiter`]), sends with a deadline from the endpoint's observed
//! latencies, hedges a call that runs far past them (first answer wins, the copy is
//! cancelled), parses, and routes every item to exactly one outcome: a label of the schema
//! (`decided_by = "llm"`), or, after its retries, a failure that keeps the row as `escalate`
//! with the reason and the raw reply. Items missing from a batched reply ride the next call;
//! items with an unreadable answer are retried alone; an "other" answer to a narrowed
//! candidate list is re-asked with the full schema. A 429 spends no attempt; a 400 splits the
//! call once; an item waits at most `max_item_wait_s`. What waiting cannot fix (every endpoint
//! refusing the key, the model, the quota or the requests) ends the dispatcher with
//! [`Error::LlmRefused`]: rows not yet answered are then not written, so `--resume` redoes them.
//!
//! The classification pipeline is synchronous; this module bridges it to a tokio runtime of
//! its own. It must never write files other than the response cache.

use super::cache::{text_hash, Cache};
use super::client::{CallError, ChatRequest, ChatResponse, HttpClient, LlmClient};
use super::config::LlmConfig;
use super::limiter::{backoff, EndpointStats, Flow, Ticket};
use super::parse::{parse_reply, Answer, Schema};
use super::prompty::Prompty;
use crate::conversation::{Content, Role};
use crate::pipeline::{Classified, Escalation};
use crate::row::{DecidedBy, LlmInfo, OutputRow};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Counts a text's tokens (semtel uses its embedding tokenizer as the estimator, corrected by
/// the `usage` the server reports).
pub use crate::embed::TokenCounter;

/// Called with every row the LLM labelled (its embedding and the text the LLM saw) — the hook
/// exemplar growth uses.
pub type OnLabel = Box<dyn FnMut(&OutputRow, &[f32], &str) + Send>;

#[derive(Debug, Clone, Default, Serialize)]
pub struct LlmStats {
    pub rows_in: u64,
    pub rows_labelled: u64,
    pub rows_failed: u64,
    /// Kept rows asked blind for an audit (`--audit-rate`), answered or not.
    pub rows_audited: u64,
    pub cache_hits: u64,
    pub deduplicated: u64,
    pub calls: u64,
    pub items_sent: u64,
    pub retried_items: u64,
    pub rate_limited: u64,
    pub server_errors: u64,
    pub timeouts: u64,
    pub bad_replies: u64,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub cost_usd: f64,
    /// Copies sent of calls that ran far past the usual latency.
    pub hedges: u64,
    /// Requests an endpoint refused as they were (4xx other than 429, non-API replies).
    pub refused: u64,
    pub endpoints: Vec<EndpointStats>,
}

#[derive(Clone)]
struct Item {
    hash: String,
    p: PromptItem,
    attempts: u32,
    last_problem: Option<String>,
}

struct Call {
    id: u64,
    items: Vec<Item>,
    /// Failed sends charged to this call.
    attempts: u32,
    not_before: Instant,
    /// The endpoint that just failed it (another is preferred).
    avoid: Option<usize>,
    /// When it was formed: it fails after `max_item_wait_s` without an answer.
    queued: Instant,
}

struct Waiting {
    row: OutputRow,
    vector: Option<Vec<f32>>,
    text: String,
    /// An audited kept row: the answer lands in `row.audit` and the row keeps its label.
    audit: bool,
}

type Finished = (OutputRow, Option<Vec<f32>>, String);

struct Incoming {
    item: Item,
    waiting: Waiting,
}

/// Builds the chat request for a group of items: the prompt, the label list (narrowed to the
/// items' candidates when they all have some), few-shot examples and the answer budget.
pub struct PromptBuilder {
    pub cfg: LlmConfig,
    /// Personal data out of every conversation and example before it is put in a prompt.
    pub redactor: Arc<crate::pii::Redactor>,
    pub prompt: Prompty,
    pub schema: Schema,
    pub descriptions: Vec<String>,
    /// The escape label offered with narrowed candidate lists.
    pub other: String,
    pub counter: TokenCounter,
}

/// What the prompt shows about one conversation.
#[derive(Clone)]
pub struct PromptItem {
    pub text: String,
    /// Candidate labels (indices); empty: the full schema.
    pub candidates: Vec<usize>,
    pub examples: Vec<(String, String)>,
    pub full_schema: bool,
}

impl PromptBuilder {
    pub fn new(cfg: LlmConfig, labels: Vec<String>, counter: TokenCounter) -> Result<Self> {
        let prompt = match &cfg.prompt {
            Some(p) => Prompty::load(p)?,
            None => Prompty::default_prompt(),
        };
        let descriptions = labels
            .iter()
            .map(|l| cfg.labels.get(l).cloned().unwrap_or_default())
            .collect();
        let other = if labels.iter().any(|l| l.eq_ignore_ascii_case("other")) {
            "none_of_these".to_string()
        } else {
            "other".to_string()
        };
        let redactor = Arc::new(crate::pii::Redactor::new(cfg.redact, &cfg.redaction)?);
        Ok(PromptBuilder {
            cfg,
            redactor,
            prompt,
            schema: Schema::new(labels),
            descriptions,
            other,
            counter,
        })
    }

    /// What the prompt shows of one conversation (`text`, already cut to `max_item_chars`) and
    /// its labelled `examples`, with personal data replaced by placeholders: the only way a
    /// conversation gets into a prompt. Returns the item and what was redacted from its text
    /// (the examples are other people's conversations: redacted too, counted apart).
    pub fn item(
        &self,
        text: &str,
        candidates: Vec<usize>,
        examples: &[(String, String)],
        full_schema: bool,
    ) -> (PromptItem, crate::pii::Counts) {
        let red = self.redactor.redact(text);
        let examples = examples
            .iter()
            .map(|(l, t)| (l.clone(), self.redactor.redact(t).text))
            .collect();
        (
            PromptItem {
                text: red.text,
                full_schema,
                candidates,
                examples,
            },
            red.counts,
        )
    }

    /// Whether items get narrowed candidate lists under this configuration.
    pub fn narrows(&self) -> bool {
        self.cfg.narrow_above > 0 && self.schema.labels.len() > self.cfg.narrow_above
    }

    /// Candidate labels from neighbour labels (when narrowing applies).
    pub fn candidates<'a>(&self, neighbor_labels: impl Iterator<Item = &'a str>) -> Vec<usize> {
        if !self.narrows() {
            return Vec::new();
        }
        let mut c = Vec::new();
        for l in neighbor_labels {
            if let Some(i) = self.schema.labels.iter().position(|x| x == l) {
                if !c.contains(&i) {
                    c.push(i);
                }
            }
        }
        c
    }

    /// True when the request for these items offers narrowed candidates (and the escape).
    pub fn is_narrowed(items: &[&PromptItem]) -> bool {
        items
            .iter()
            .all(|i| !i.full_schema && !i.candidates.is_empty())
    }

    /// The chat request for `items` and its estimated prompt tokens (before correction).
    pub fn request(&self, items: &[&PromptItem]) -> (ChatRequest, f64) {
        let narrowed = Self::is_narrowed(items);
        let label_ids: Vec<usize> = if narrowed {
            let mut v: Vec<usize> = items
                .iter()
                .flat_map(|i| i.candidates.iter().copied())
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        } else {
            (0..self.schema.labels.len()).collect()
        };
        let labels: Vec<serde_json::Value> = label_ids
            .iter()
            .map(|&i| serde_json::json!({"name": self.schema.labels[i], "description": self.descriptions[i]}))
            .collect();
        let rendered_items: Vec<serde_json::Value> = items
            .iter()
            .enumerate()
            .map(|(k, it)| {
                let cands: Vec<&str> = if narrowed {
                    it.candidates
                        .iter()
                        .map(|&i| self.schema.labels[i].as_str())
                        .collect()
                } else {
                    Vec::new()
                };
                serde_json::json!({"n": k + 1, "text": escape_text(&it.text), "candidates": cands})
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        let examples: Vec<serde_json::Value> = items
            .iter()
            .flat_map(|it| it.examples.iter().take(self.cfg.examples_per_item))
            .filter(|(_, t)| seen.insert(t.clone()))
            .map(|(l, t)| serde_json::json!({"label": l, "text": escape_text(&head_tail_chars(t, self.cfg.max_example_chars))}))
            .collect();
        let ctx = serde_json::json!({
            "labels": labels,
            "items": rendered_items,
            "examples": examples,
            "other": if narrowed { self.other.as_str() } else { "" },
        });
        let messages = self.prompt.render(&ctx).unwrap_or_default();
        let est: usize = messages
            .iter()
            .map(|m| (self.counter)(&m.content) + 4)
            .sum();
        let longest_label = label_ids
            .iter()
            .map(|&i| self.schema.labels[i].len())
            .max()
            .unwrap_or(8)
            .max(self.other.len());
        // Each answer is `"N": "label",` — about a token per 3 characters, plus slack.
        let max_tokens = (items.len() * (longest_label / 3 + 8) + 16) as u32;
        (
            ChatRequest {
                messages,
                parameters: self.prompt.parameters.clone(),
                max_tokens,
            },
            est as f64,
        )
    }
}

/// Static parts shared by the dispatcher.
struct Shared {
    pb: PromptBuilder,
    clients: Vec<Arc<dyn LlmClient>>,
    prices: Vec<(f64, f64)>,
}

/// The LLM tier as a pipeline escalation stage.
pub struct LlmTier {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    tx: Option<tokio::sync::mpsc::Sender<Vec<Incoming>>>,
    dispatcher: Option<tokio::task::JoinHandle<Result<LlmStats>>>,
    forwarder: Option<std::thread::JoinHandle<()>>,
    results_tx: Option<std::sync::mpsc::Sender<Finished>>,
    results_rx: Option<std::sync::mpsc::Receiver<Finished>>,
    cache: Option<Cache>,
    on_label: Option<OnLabel>,
    include_system_turns: bool,
    pub stats: LlmStats,
}

impl LlmTier {
    /// Builds HTTP clients for every endpoint of `cfg`.
    pub fn new(cfg: LlmConfig, labels: Vec<String>, counter: TokenCounter) -> Result<LlmTier> {
        let sent = match &cfg.show_sent {
            Some(p) => Some(Arc::new(super::client::SentLog::open(p)?)),
            None => None,
        };
        let clients = cfg
            .endpoints
            .iter()
            .map(|e| {
                HttpClient::new(e)
                    .map(|c| Arc::new(c.with_sent_log(sent.clone())) as Arc<dyn LlmClient>)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::with_clients(cfg, labels, counter, clients)
    }

    /// Same, with clients supplied by the caller (one per configured endpoint, same order).
    pub fn with_clients(
        cfg: LlmConfig,
        labels: Vec<String>,
        counter: TokenCounter,
        clients: Vec<Arc<dyn LlmClient>>,
    ) -> Result<LlmTier> {
        cfg.validate().map_err(Error::Config)?;
        if clients.len() != cfg.endpoints.len() {
            return Err(Error::Config("one client per endpoint is needed".into()));
        }
        let cache = match cfg.cache_path() {
            Some(p) => Cache::open(&p)?,
            None => Cache::disabled(),
        };
        let prices = cfg
            .endpoints
            .iter()
            .map(|e| (e.price_in_per_1k, e.price_out_per_1k))
            .collect();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("semtel-llm")
            .build()
            .map_err(|e| Error::Llm(format!("starting the async runtime: {e}")))?;
        let (results_tx, results_rx) = std::sync::mpsc::channel();
        Ok(LlmTier {
            rt,
            shared: Arc::new(Shared {
                pb: PromptBuilder::new(cfg, labels, counter)?,
                clients,
                prices,
            }),
            tx: None,
            dispatcher: None,
            forwarder: None,
            results_tx: Some(results_tx),
            results_rx: Some(results_rx),
            cache: Some(cache),
            on_label: None,
            include_system_turns: false,
            stats: LlmStats::default(),
        })
    }

    pub fn prompt_version(&self) -> &str {
        &self.shared.pb.prompt.version
    }

    pub fn with_system_turns(mut self, include: bool) -> Self {
        self.include_system_turns = include;
        self
    }

    /// Registers a hook called for every LLM-labelled row (with its embedding).
    pub fn on_label(&mut self, f: OnLabel) {
        self.on_label = Some(f);
    }

    fn start(&mut self, out: &SyncSender<Vec<OutputRow>>) {
        if self.tx.is_some() {
            return;
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Incoming>>(
            (self.shared.pb.cfg.max_pending / 64).max(4),
        );
        let shared = self.shared.clone();
        let results = self.results_tx.take().expect("started once");
        let cache = self.cache.take().expect("started once");
        self.dispatcher = Some(self.rt.spawn(dispatch(shared, rx, results, cache)));
        let rrx = self.results_rx.take().expect("started once");
        let out = out.clone();
        let mut hook = self.on_label.take();
        self.forwarder = Some(std::thread::spawn(move || {
            // Forward finished rows to the writer in small groups (the writer is bounded, so
            // this thread is where LLM results feel backpressure).
            let mut buf: Vec<OutputRow> = Vec::new();
            loop {
                let idle = match rrx.recv_timeout(Duration::from_millis(50)) {
                    Ok((r, v, text)) => {
                        if let (Some(h), Some(v)) = (hook.as_mut(), v) {
                            if r.decided_by == DecidedBy::Llm {
                                h(&r, &v, &text);
                            }
                        }
                        buf.push(r);
                        false
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => true,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                };
                if (buf.len() >= 64 || idle)
                    && !buf.is_empty()
                    && out.send(std::mem::take(&mut buf)).is_err()
                {
                    return;
                }
            }
            let _ = hook.take();
            if !buf.is_empty() {
                let _ = out.send(buf);
            }
        }));
        self.tx = Some(tx);
    }

    /// Text of a conversation as the LLM sees it: system turns dropped unless asked for, at
    /// most `max_item_chars` (head and tail kept).
    fn llm_text(&self, c: &Content) -> String {
        let text = match c {
            Content::Text(t) => t.clone(),
            Content::Turns(ts) => {
                let kept: Vec<_> = ts
                    .iter()
                    .filter(|t| self.include_system_turns || t.role != Role::System)
                    .cloned()
                    .collect();
                Content::Turns(if kept.is_empty() { ts.clone() } else { kept }).flatten()
            }
        };
        head_tail_chars(&text, self.shared.pb.cfg.max_item_chars)
    }
}

/// At most `max` bytes of `s` (on char boundaries): the head and the tail, marked by " … ".
/// Conversation text is data inside the prompt's `<item>`/`<example>` tags: escaping `&`, `<`
/// and `>` means no conversation can close its own item and forge another one (or an answer
/// for its neighbour). LLMs read the entities as the characters they stand for.
pub fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

pub fn head_tail_chars(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let half = max / 2;
    let mut a = half;
    while !s.is_char_boundary(a) {
        a -= 1;
    }
    let mut b = s.len() - half;
    while !s.is_char_boundary(b) {
        b += 1;
    }
    format!("{} … {}", &s[..a], &s[b..])
}

impl Escalation for LlmTier {
    fn submit(&mut self, rows: Vec<Classified>, out: &SyncSender<Vec<OutputRow>>) -> Result<()> {
        self.start(out);
        let sh = self.shared.clone();
        let narrow = sh.pb.narrows();
        let mut batch = Vec::with_capacity(rows.len());
        for c in rows {
            self.stats.rows_in += 1;
            let Some(content) = &c.content else {
                // Nothing to show the LLM (cannot happen for escalated rows): keep as is.
                let _ = out.send(vec![c.out]);
                continue;
            };
            let text = self.llm_text(content);
            let candidates = sh
                .pb
                .candidates(c.out.neighbors.iter().map(|n| n.label.as_str()));
            let full = !narrow || candidates.is_empty();
            let (p, counts) = sh.pb.item(&text, candidates, &c.examples, full);
            let mut row = c.out;
            if !counts.is_empty() {
                row.redacted
                    .get_or_insert_with(crate::pii::Counts::default)
                    .add(&counts);
            }
            batch.push(Incoming {
                item: Item {
                    // What is sent decides the answer: identical prompts are asked once.
                    hash: text_hash(&p.text),
                    p,
                    attempts: 0,
                    last_problem: None,
                },
                waiting: Waiting {
                    row,
                    vector: c.vector,
                    text: match &c.content {
                        Some(c) => c.flatten(),
                        None => String::new(),
                    },
                    audit: c.audit,
                },
            });
        }
        let tx = self.tx.as_ref().expect("started");
        if tx.blocking_send(batch).is_err() {
            return Err(self.fail_reason());
        }
        Ok(())
    }

    fn finish(&mut self, out: &SyncSender<Vec<OutputRow>>) -> Result<()> {
        self.start(out);
        self.tx = None; // closes the channel: the dispatcher drains and ends
        let stats = match self.dispatcher.take() {
            Some(h) => self
                .rt
                .block_on(h)
                .map_err(|e| Error::Llm(format!("dispatcher panicked: {e}")))??,
            None => LlmStats::default(),
        };
        if let Some(f) = self.forwarder.take() {
            let _ = f.join();
        }
        let rows_in = self.stats.rows_in;
        self.stats = LlmStats { rows_in, ..stats };
        Ok(())
    }

    fn summary(&self) -> Option<serde_json::Value> {
        serde_json::to_value(&self.stats).ok()
    }
}

impl LlmTier {
    /// Submits every group of rows, then finishes: the first error (a group that could not be
    /// built, or the tier stopping) ends it. Rows answered before that have gone to `out`, so
    /// callers keep them.
    pub fn submit_all(
        &mut self,
        groups: impl IntoIterator<Item = Result<Vec<Classified>>>,
        out: &SyncSender<Vec<OutputRow>>,
    ) -> Result<()> {
        for g in groups {
            self.submit(g?, out)?;
        }
        self.finish(out)
    }

    fn fail_reason(&mut self) -> Error {
        match self.dispatcher.take() {
            Some(h) => match self.rt.block_on(h) {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => Error::Llm("LLM tier stopped early".into()),
                Err(e) => Error::Llm(format!("dispatcher panicked: {e}")),
            },
            None => Error::Llm("LLM tier not running".into()),
        }
    }
}

/// One send of a call finished (or was cancelled: `result` is `None`).
struct Outcome {
    call_id: u64,
    send_id: u64,
    ticket: Ticket,
    endpoint: usize,
    reserved: f64,
    est_prompt: f64,
    started: Instant,
    result: Option<std::result::Result<ChatResponse, CallError>>,
}

/// Resolution of one distinct conversation.
enum Resolution {
    Label {
        label: usize,
        model: String,
        tokens_in: u32,
        tokens_out: u32,
        cost: f64,
    },
    Failed(String),
    /// Failed because the LLM kept answering with labels outside the schema: for an audited
    /// row, a disagreement (the row is of a topic the taxonomy lacks, as the LLM sees it).
    OutsideSchema(String),
}

impl Resolution {
    /// What the call cost this row: duplicates share one call, only the first carries it.
    fn llm_info(&self, first: bool) -> Option<LlmInfo> {
        match self {
            Resolution::Label {
                model,
                tokens_in,
                tokens_out,
                cost,
                ..
            } => Some(LlmInfo {
                model: model.clone(),
                tokens_in: if first { *tokens_in } else { 0 },
                tokens_out: if first { *tokens_out } else { 0 },
                cost_usd: if first { *cost } else { 0.0 },
            }),
            _ => None,
        }
    }
}

/// One in-flight copy of a call. Dropping `cancel` cancels it.
struct SendCopy {
    id: u64,
    endpoint: usize,
    started: Instant,
    _cancel: tokio::sync::oneshot::Sender<()>,
}

/// A call with sends in flight (one, or two once hedged).
struct Live {
    call: Call,
    req: Arc<ChatRequest>,
    est: f64,
    reserve: f64,
    sends: Vec<SendCopy>,
    hedged: bool,
}

/// Hedges allowed per call launched, and at most this many banked.
const HEDGE_SHARE: f64 = 0.1;
const HEDGE_BANK: f64 = 5.0;
/// Refusals (400s, non-API replies) from an endpoint that never answered before it is taken
/// for misconfigured.
const REFUSALS_BEFORE_FATAL: u32 = 3;

struct Dispatcher {
    sh: Arc<Shared>,
    flows: Vec<Flow>,
    ep_stats: Vec<EndpointStats>,
    pending: VecDeque<Item>,
    ready: VecDeque<Call>,
    live: HashMap<u64, Live>,
    waiting: HashMap<String, Vec<Waiting>>,
    results: std::sync::mpsc::Sender<Finished>,
    cache: Cache,
    stats: LlmStats,
    token_ratio: f64,
    oldest_pending: Option<Instant>,
    fatal: Option<Error>,
    next_id: u64,
    hedge_credit: f64,
    last_success: Instant,
}

async fn dispatch(
    sh: Arc<Shared>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Incoming>>,
    results: std::sync::mpsc::Sender<Finished>,
    cache: Cache,
) -> Result<LlmStats> {
    let eps = &sh.pb.cfg.endpoints;
    let flows = eps
        .iter()
        .map(|e| {
            if sh.pb.cfg.adaptive {
                Flow::new(e.rpm, e.tpm, e.max_concurrency)
            } else {
                Flow::fixed(e.max_concurrency)
            }
        })
        .collect();
    let ep_stats = eps
        .iter()
        .map(|e| EndpointStats {
            name: e.name.clone(),
            ..Default::default()
        })
        .collect();
    let mut d = Dispatcher {
        stats: LlmStats::default(),
        sh,
        flows,
        ep_stats,
        pending: VecDeque::new(),
        ready: VecDeque::new(),
        live: HashMap::new(),
        waiting: HashMap::new(),
        results,
        cache,
        token_ratio: 1.3,
        oldest_pending: None,
        fatal: None,
        next_id: 0,
        hedge_credit: 2.0,
        last_success: Instant::now(),
    };
    let mut inflight: JoinSet<Outcome> = JoinSet::new();
    let mut closed = false;
    // How long a partial batch may wait for more items while input keeps coming.
    let linger = Duration::from_millis(200);
    loop {
        let now = Instant::now();
        d.form_calls(closed, linger, now);
        let mut wake = d.launch(&mut inflight, now);
        if let Some(w) = d.hedge(&mut inflight, now) {
            wake = Some(wake.map_or(w, |x| x.min(w)));
        }
        d.expire(now);
        if let Some(e) = d.fatal.take() {
            // Waiting cannot help: stop here. Rows not yet answered are not written, so a
            // rerun with --resume classifies them.
            return Err(e);
        }
        if closed && d.ready.is_empty() && d.pending.is_empty() && d.live.is_empty() {
            break;
        }
        let mut sleep_for = wake.unwrap_or(Duration::from_millis(500));
        if !d.live.is_empty() {
            // Hedging and deadlines are checked on this tick.
            sleep_for = sleep_for.min(Duration::from_millis(100));
        }
        let sleep_for = sleep_for.max(Duration::from_millis(1));
        let admit = !closed && d.pending.len() < 4 * d.sh.pb.cfg.max_pending.max(64);
        tokio::select! {
            msg = rx.recv(), if admit => match msg {
                Some(batch) => d.admit(batch),
                None => closed = true,
            },
            Some(res) = inflight.join_next(), if !inflight.is_empty() => {
                match res {
                    Ok(o) => d.on_outcome(o),
                    Err(e) => return Err(Error::Llm(format!("LLM call task failed: {e}"))),
                }
            }
            _ = tokio::time::sleep(sleep_for) => {}
        }
    }
    d.stats.endpoints = d
        .flows
        .iter()
        .zip(&d.ep_stats)
        .map(|(f, s)| EndpointStats {
            calls: s.calls,
            ok: s.ok,
            rate_limited: s.rate_limited,
            server_errors: s.server_errors,
            timeouts: s.timeouts,
            hedges: s.hedges,
            ..f.stats(&s.name)
        })
        .collect();
    Ok(d.stats)
}

impl Dispatcher {
    fn admit(&mut self, batch: Vec<Incoming>) {
        for inc in batch {
            let hash = inc.item.hash.clone();
            if let Some(w) = self.waiting.get_mut(&hash) {
                // The same conversation is already on its way: share its answer.
                self.stats.deduplicated += 1;
                w.push(inc.waiting);
                continue;
            }
            let cached = self.sh.clients.iter().find_map(|c| {
                self.cache
                    .get(&self.sh.pb.prompt.version, c.model(), &hash)
                    .and_then(|l| self.sh.pb.schema.resolve(l))
                    .map(|l| (l, c.model().to_string()))
            });
            self.waiting.insert(hash.clone(), vec![inc.waiting]);
            if let Some((label, model)) = cached {
                self.stats.cache_hits += 1;
                self.resolve(
                    &hash,
                    Resolution::Label {
                        label,
                        model,
                        tokens_in: 0,
                        tokens_out: 0,
                        cost: 0.0,
                    },
                );
                continue;
            }
            if self.pending.is_empty() {
                self.oldest_pending = Some(Instant::now());
            }
            self.pending.push_back(inc.item);
        }
    }

    fn new_call(&mut self, items: Vec<Item>, now: Instant) -> Call {
        self.next_id += 1;
        Call {
            id: self.next_id,
            items,
            attempts: 0,
            not_before: now,
            avoid: None,
            queued: now,
        }
    }

    fn form_calls(&mut self, closed: bool, linger: Duration, now: Instant) {
        let n = self.sh.pb.cfg.items_per_call;
        // Only keep a small queue of formed calls so late items still batch well.
        while !self.pending.is_empty() && self.ready.len() < 64 {
            let due = closed
                || self
                    .oldest_pending
                    .is_some_and(|t| now.duration_since(t) >= linger);
            if self.pending.len() < n && !due {
                break;
            }
            let take = n.min(self.pending.len());
            let items: Vec<Item> = self.pending.drain(..take).collect();
            let call = self.new_call(items, now);
            self.ready.push_back(call);
            self.oldest_pending = (!self.pending.is_empty()).then_some(now);
        }
    }

    /// The endpoint for a call of `reserve` tokens that can start now, weighted by configured
    /// weight times learned capacity; else how long until one could (`None`: none can while
    /// calls are in flight).
    fn pick(
        &mut self,
        reserve: f64,
        avoid: Option<usize>,
        now: Instant,
    ) -> std::result::Result<usize, Option<Duration>> {
        let mut candidates = Vec::new();
        let mut soonest: Option<Duration> = None;
        for (i, f) in self.flows.iter_mut().enumerate() {
            match f.ready_in(reserve, now) {
                Some(w) if w.is_zero() => candidates.push(i),
                Some(w) => soonest = Some(soonest.map_or(w, |s: Duration| s.min(w))),
                None => {}
            }
        }
        if candidates.len() > 1 {
            if let Some(a) = avoid {
                candidates.retain(|&i| i != a);
            }
        }
        if candidates.is_empty() {
            return Err(soonest);
        }
        let endpoints = &self.sh.pb.cfg.endpoints;
        let caps: Vec<Option<f64>> = candidates
            .iter()
            .map(|&i| self.flows[i].capacity(reserve))
            .collect();
        let all_known = caps.iter().all(Option::is_some);
        let weights: Vec<f64> = candidates
            .iter()
            .zip(&caps)
            .map(|(&i, c)| endpoints[i].weight * if all_known { c.unwrap_or(1.0) } else { 1.0 })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut pick = fastrand::f64() * total;
        for (&i, w) in candidates.iter().zip(&weights) {
            pick -= w;
            if pick <= 0.0 {
                return Ok(i);
            }
        }
        Ok(*candidates.last().expect("not empty"))
    }

    /// Starts one send of a call's request on endpoint `ep` (a hedge adds a copy to the live
    /// call).
    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        inflight: &mut JoinSet<Outcome>,
        call: Call,
        req: Arc<ChatRequest>,
        est: f64,
        reserve: f64,
        ep: usize,
        now: Instant,
    ) {
        let ticket = self.flows[ep].start(reserve, now);
        self.stats.calls += 1;
        self.stats.items_sent += call.items.len() as u64;
        self.ep_stats[ep].calls += 1;
        let cfg = &self.sh.pb.cfg;
        let ceiling = Duration::from_secs_f64(
            cfg.timeout_base_s + cfg.timeout_per_1k_tokens_s * reserve / 1000.0,
        );
        let deadline = self.flows[ep].deadline(ceiling);
        self.next_id += 1;
        let send_id = self.next_id;
        let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
        let client = self.sh.clients[ep].clone();
        let call_id = call.id;
        let r = req.clone();
        inflight.spawn(async move {
            let started = Instant::now();
            let result = tokio::select! {
                r = client.chat(&r, deadline) => Some(r),
                _ = cancelled => None,
            };
            Outcome {
                call_id,
                send_id,
                ticket,
                endpoint: ep,
                reserved: reserve,
                est_prompt: est,
                started,
                result,
            }
        });
        let s = SendCopy {
            id: send_id,
            endpoint: ep,
            started: now,
            _cancel: cancel,
        };
        match self.live.get_mut(&call_id) {
            Some(l) => l.sends.push(s),
            None => {
                self.live.insert(
                    call_id,
                    Live {
                        call,
                        req,
                        est,
                        reserve,
                        sends: vec![s],
                        hedged: false,
                    },
                );
            }
        }
    }

    /// Starts every call that can start now; returns how long until the next could.
    fn launch(&mut self, inflight: &mut JoinSet<Outcome>, now: Instant) -> Option<Duration> {
        let mut wake: Option<Duration> = None;
        let mut deferred = VecDeque::new();
        while let Some(call) = self.ready.pop_front() {
            if self.fatal.is_some() {
                deferred.push_back(call);
                continue;
            }
            if call.not_before > now {
                let w = call.not_before - now;
                wake = Some(wake.map_or(w, |x: Duration| x.min(w)));
                deferred.push_back(call);
                continue;
            }
            let refs: Vec<&PromptItem> = call.items.iter().map(|i| &i.p).collect();
            let (req, est) = self.sh.pb.request(&refs);
            let est = est * self.token_ratio;
            let reserve = est + req.max_tokens as f64;
            match self.pick(reserve, call.avoid, now) {
                Ok(ep) => {
                    self.hedge_credit = (self.hedge_credit + HEDGE_SHARE).min(HEDGE_BANK);
                    self.send(inflight, call, Arc::new(req), est, reserve, ep, now);
                }
                Err(soonest) => {
                    if let Some(w) = soonest {
                        wake = Some(wake.map_or(w, |x: Duration| x.min(w)));
                    }
                    deferred.push_back(call);
                    // Calls behind this one would meet the same full endpoints.
                    break;
                }
            }
        }
        while let Some(c) = self.ready.pop_front() {
            deferred.push_back(c);
        }
        self.ready = deferred;
        wake
    }

    /// Sends a second copy of each call that has run far past its endpoint's usual latency
    /// (a hang is not overload: the copy usually answers in the usual time). Returns when
    /// the next check is due.
    fn hedge(&mut self, inflight: &mut JoinSet<Outcome>, now: Instant) -> Option<Duration> {
        if !self.sh.pb.cfg.hedge || !self.sh.pb.cfg.adaptive {
            return None;
        }
        let mut due = Vec::new();
        let mut wake: Option<Duration> = None;
        for (id, l) in &self.live {
            if l.hedged || l.sends.len() != 1 {
                continue;
            }
            let s = &l.sends[0];
            let Some(after) = self.flows[s.endpoint].hedge_after() else {
                continue;
            };
            let at = s.started + after;
            if at <= now {
                due.push((s.started, *id));
            } else {
                let w = at - now;
                wake = Some(wake.map_or(w, |x: Duration| x.min(w)));
            }
        }
        due.sort();
        for (_, id) in due {
            if self.hedge_credit < 1.0 {
                break;
            }
            let (reserve, first_ep) = {
                let l = &self.live[&id];
                (l.reserve, l.sends[0].endpoint)
            };
            let Ok(ep) = self.pick(reserve, Some(first_ep), now) else {
                continue;
            };
            self.hedge_credit -= 1.0;
            self.stats.hedges += 1;
            self.ep_stats[ep].hedges += 1;
            let l = self.live.get_mut(&id).expect("live");
            l.hedged = true;
            let (req, est) = (l.req.clone(), l.est);
            // The call record stays with the live entry; `send` only adds the copy.
            let placeholder = Call {
                id,
                items: Vec::new(),
                attempts: 0,
                not_before: now,
                avoid: None,
                queued: now,
            };
            self.send(inflight, placeholder, req, est, reserve, ep, now);
            // `send` counted the items again; a hedge sends no new items.
            let n = self.live[&id].call.items.len() as u64;
            self.stats.items_sent += n;
        }
        wake
    }

    /// Calls that waited longer than `max_item_wait_s` since they were formed fail (their
    /// rows stay `escalate` with the reason): nothing waits forever on endpoints that are down
    /// or refuse to take more.
    fn expire(&mut self, now: Instant) {
        let max = Duration::from_secs_f64(self.sh.pb.cfg.max_item_wait_s);
        let all_down = self.flows.iter().all(|f| f.breaker.is_open());
        let down_long = all_down && now.saturating_duration_since(self.last_success) > max;
        let mut keep = VecDeque::new();
        while let Some(call) = self.ready.pop_front() {
            if down_long || now.saturating_duration_since(call.queued) > max {
                let why = format!(
                    "no LLM answer within {:.0} s (max_item_wait_s): {}",
                    max.as_secs_f64(),
                    call.items
                        .first()
                        .and_then(|i| i.last_problem.clone())
                        .unwrap_or_else(|| "the endpoints were busy or down".into())
                );
                for it in call.items {
                    self.resolve(&it.hash, Resolution::Failed(why.clone()));
                }
            } else {
                keep.push_back(call);
            }
        }
        self.ready = keep;
    }

    /// Takes endpoint `ep` out of the rotation; with none left the run stops.
    fn disable(&mut self, ep: usize, what: String) {
        if self.flows[ep].disabled.is_none() {
            tracing::warn!(
                "LLM endpoint `{}` {what}; it takes no more calls",
                self.sh.pb.cfg.endpoints[ep].name
            );
            self.flows[ep].disabled = Some(what.clone());
        }
        if self.flows.iter().all(|f| f.disabled.is_some()) && self.fatal.is_none() {
            self.fatal = Some(Error::LlmRefused {
                endpoint: self.sh.pb.cfg.endpoints[ep].name.clone(),
                what,
            });
        }
    }

    /// What to tell the user about an endpoint that refuses in a way waiting cannot fix.
    fn refusal_advice(&self, ep: usize, e: &CallError) -> String {
        let cfg = &self.sh.pb.cfg.endpoints[ep];
        let key = cfg
            .api_key_env
            .as_deref()
            .map_or("set api_key_env in the LLM config".to_string(), |v| {
                format!("check the key in ${v} (api_key_env)")
            });
        match e {
            CallError::Fatal(401, m) => format!("refused the API key (401: {m}): {key}"),
            CallError::Fatal(403, m) => {
                format!(
                    "denied access (403: {m}): {key} and its access to model `{}`",
                    cfg.model
                )
            }
            CallError::Fatal(404, m) => format!(
                "does not know this URL or model (404: {m}): check url, model and deployment"
            ),
            CallError::QuotaExhausted(m) => {
                format!("has no quota left (429: {m}): add credit or raise the quota")
            }
            CallError::Refused(s, m) => {
                format!("refused every request ({s}: {m}): check model and the prompt's parameters")
            }
            CallError::NotTheApi(m) => format!(
                "answers with something that is not an OpenAI-compatible API ({m}): check url"
            ),
            other => format!("refused requests ({other})"),
        }
    }

    /// Updates the endpoint's flow state and counters for one finished send.
    fn account(&mut self, o: &Outcome, now: Instant) {
        let ep = o.endpoint;
        let f = &mut self.flows[ep];
        let st = &mut self.ep_stats[ep];
        match &o.result {
            None => f.on_neutral(),
            Some(Ok(resp)) => {
                // What the rate limiter charged: the prompt as the server counted it plus the
                // whole answer budget (OpenAI and Azure count `max_tokens` at admission).
                let used = if resp.prompt_tokens > 0 {
                    resp.prompt_tokens as f64 + (o.reserved - o.est_prompt)
                } else {
                    o.reserved
                };
                f.on_success(o.ticket, now - o.started, o.reserved, used, &resp.rate, now);
                st.ok += 1;
                self.last_success = now;
            }
            Some(Err(e)) => match e {
                CallError::RateLimited(rate) => {
                    self.stats.rate_limited += 1;
                    st.rate_limited += 1;
                    let cap = Duration::from_secs_f64(self.sh.pb.cfg.max_retry_after_s);
                    f.on_rate_limited(o.ticket, o.reserved, rate, cap, now);
                }
                CallError::Server(..) | CallError::Network(_) => {
                    self.stats.server_errors += 1;
                    st.server_errors += 1;
                    f.on_failure(now);
                }
                CallError::Timeout => {
                    self.stats.timeouts += 1;
                    st.timeouts += 1;
                    f.on_failure(now);
                }
                CallError::BadResponse(_) => {
                    self.stats.bad_replies += 1;
                    f.on_neutral();
                }
                CallError::NotTheApi(_) | CallError::Refused(..) => {
                    self.stats.refused += 1;
                    f.refusals_since_success += 1;
                    f.on_neutral();
                }
                CallError::QuotaExhausted(_) | CallError::Fatal(..) => {
                    self.stats.refused += 1;
                    f.on_neutral();
                }
            },
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        let now = Instant::now();
        self.account(&o, now);
        let Some(live) = self.live.get_mut(&o.call_id) else {
            // The call was already answered by another copy.
            return;
        };
        live.sends.retain(|s| s.id != o.send_id);
        let result = match o.result {
            Some(r) => r,
            None => {
                if live.sends.is_empty() {
                    // Every copy was cancelled without an answer (cannot happen: copies are
                    // cancelled only once the call is answered); keep the call going.
                    let l = self.live.remove(&o.call_id).expect("live");
                    self.ready.push_front(l.call);
                }
                return;
            }
        };
        let ep = o.endpoint;
        match result {
            Ok(resp) => {
                // The first answer wins; dropping the entry cancels any other copy.
                let l = self.live.remove(&o.call_id).expect("live");
                if resp.prompt_tokens > 0 && o.est_prompt > 0.0 {
                    // Correct the tokenizer-based estimate towards what the server counted.
                    let r = resp.prompt_tokens as f64 / (o.est_prompt / self.token_ratio);
                    self.token_ratio = 0.8 * self.token_ratio + 0.2 * r.clamp(0.2, 5.0);
                }
                self.on_reply(l.call, ep, resp);
            }
            Err(e) => {
                if !live.sends.is_empty() {
                    // Another copy is still on its way: let it answer.
                    return;
                }
                let l = self.live.remove(&o.call_id).expect("live");
                self.on_failed_call(l.call, ep, e, now);
            }
        }
    }

    fn on_failed_call(&mut self, mut call: Call, ep: usize, e: CallError, now: Instant) {
        for it in &mut call.items {
            it.last_problem = Some(e.to_string());
        }
        let cfg = &self.sh.pb.cfg;
        let (base, cap) = (cfg.backoff_base_s, cfg.backoff_max_s);
        match &e {
            CallError::RateLimited(_) if !cfg.adaptive => {
                // The naive baseline: exponential backoff, an attempt spent per 429.
                call.attempts += 1;
                if call.attempts >= cfg.max_attempts {
                    let why = format!("LLM call failed {} times: {e}", call.attempts);
                    self.split_or_fail(call.items, &why);
                } else {
                    call.not_before = now + backoff(call.attempts, base, cap);
                    self.ready.push_back(call);
                }
            }
            CallError::RateLimited(_) => {
                // Not a failure of the call: it goes again as soon as the endpoint's flow
                // (blocked by Retry-After, capped, or paced) lets it, without spending an
                // attempt; another endpoint may take it sooner.
                call.not_before = now;
                call.avoid = Some(ep);
                self.ready.push_front(call);
            }
            CallError::Fatal(..) | CallError::QuotaExhausted(_) => {
                let what = self.refusal_advice(ep, &e);
                self.disable(ep, what);
                call.avoid = Some(ep);
                self.ready.push_front(call);
            }
            CallError::Refused(..) | CallError::NotTheApi(_) => {
                let f = &self.flows[ep];
                if f.successes == 0 && f.refusals_since_success >= REFUSALS_BEFORE_FATAL {
                    let what = self.refusal_advice(ep, &e);
                    self.disable(ep, what);
                    call.avoid = Some(ep);
                    self.ready.push_front(call);
                } else if call.items.len() > 1 {
                    // Refused as a whole: one item may be the cause (too long, filtered);
                    // each goes alone, once.
                    for it in call.items {
                        self.retry_alone(it);
                    }
                } else if matches!(e, CallError::NotTheApi(_))
                    && call.attempts + 1 < cfg.max_attempts
                {
                    call.attempts += 1;
                    call.not_before = now + backoff(call.attempts, base, cap);
                    call.avoid = Some(ep);
                    self.ready.push_back(call);
                } else {
                    let why = format!("the LLM endpoint refused this conversation: {e}");
                    for it in call.items {
                        self.resolve(&it.hash, Resolution::Failed(why.clone()));
                    }
                }
            }
            _ => {
                // 5xx, timeouts, network errors, unreadable replies. While the endpoint's
                // breaker is open the endpoint is down, not the call: no attempt is spent
                // (`max_item_wait_s` bounds the wait instead).
                if !self.flows[ep].breaker.is_open() {
                    call.attempts += 1;
                }
                if call.attempts >= cfg.max_attempts {
                    let why = format!("LLM call failed {} times: {e}", call.attempts);
                    self.split_or_fail(call.items, &why);
                } else {
                    call.not_before = now + backoff(call.attempts, base, cap);
                    call.avoid = Some(ep);
                    self.ready.push_back(call);
                }
            }
        }
    }

    /// Queues one item as a call of its own, now.
    fn retry_alone(&mut self, it: Item) {
        self.stats.retried_items += 1;
        let call = self.new_call(vec![it], Instant::now());
        self.ready.push_back(call);
    }

    /// Items of a call that failed too often go on alone (each a fresh chance) or fail.
    fn split_or_fail(&mut self, items: Vec<Item>, why: &str) {
        let single = items.len() == 1;
        for mut it in items {
            it.attempts += 1;
            if single || it.attempts >= self.sh.pb.cfg.max_item_attempts {
                self.resolve(&it.hash.clone(), Resolution::Failed(why.to_string()));
            } else {
                self.retry_alone(it);
            }
        }
    }

    fn on_reply(&mut self, call: Call, endpoint: usize, resp: ChatResponse) {
        crate::failpoint::hit("llm-reply");
        let n = call.items.len();
        let (pin, pout) = self.sh.prices[endpoint];
        let cost = resp.prompt_tokens as f64 / 1000.0 * pin
            + resp.completion_tokens as f64 / 1000.0 * pout;
        self.stats.tokens_in += resp.prompt_tokens as u64;
        self.stats.tokens_out += resp.completion_tokens as u64;
        self.stats.cost_usd += cost;
        let refs: Vec<&PromptItem> = call.items.iter().map(|i| &i.p).collect();
        let narrowed = PromptBuilder::is_narrowed(&refs);
        let pb = &self.sh.pb;
        let other = narrowed.then_some(pb.other.as_str());
        let answers = parse_reply(&resp.content, n, &pb.schema, other);
        let (version, max_item_attempts) = (pb.prompt.version.clone(), pb.cfg.max_item_attempts);
        let model = self.sh.clients[endpoint].model().to_string();
        let share = |x: u32| (x as f64 / n as f64).round() as u32;
        let raw: String = resp.content.chars().take(300).collect();
        let mut flawed = false;
        let mut again: Vec<Item> = Vec::new();
        for (mut it, ans) in call.items.into_iter().zip(answers) {
            // With narrowed lists an item may only take one of the candidates it was offered
            // (or the escape): a label offered to its neighbour is an injected or confused
            // answer, asked again on its own.
            let ans = match ans {
                Some(Answer::Label(l))
                    if narrowed && !it.p.full_schema && !it.p.candidates.contains(&l) =>
                {
                    Some(Answer::Invalid(format!(
                        "{} (not among this item's candidates)",
                        self.sh.pb.schema.labels[l]
                    )))
                }
                other => other,
            };
            match ans {
                Some(Answer::Label(l)) => {
                    let label = self.sh.pb.schema.labels[l].clone();
                    self.cache.put(&version, &model, &it.hash, &label);
                    self.resolve(
                        &it.hash,
                        Resolution::Label {
                            label: l,
                            model: model.clone(),
                            tokens_in: share(resp.prompt_tokens),
                            tokens_out: share(resp.completion_tokens),
                            cost: cost / n as f64,
                        },
                    );
                }
                Some(Answer::Other) if !it.p.full_schema => {
                    // None of the neighbours' labels fits: ask again with the whole schema.
                    it.p.full_schema = true;
                    it.attempts += 1;
                    self.retry_alone(it);
                }
                other => {
                    flawed = true;
                    it.attempts += 1;
                    let missing = other.is_none();
                    it.last_problem = Some(match &other {
                        Some(Answer::Invalid(s)) => {
                            format!("label `{s}` is not in the schema; reply: {raw}")
                        }
                        _ => format!("no answer for this item; reply: {raw}"),
                    });
                    if it.attempts >= max_item_attempts {
                        let why = format!(
                            "LLM gave no label of the schema after {} attempts ({})",
                            it.attempts,
                            it.last_problem.clone().unwrap_or_default()
                        );
                        let r = if missing {
                            Resolution::Failed(why)
                        } else {
                            Resolution::OutsideSchema(why)
                        };
                        self.resolve(&it.hash.clone(), r);
                    } else if missing {
                        // Dropped or cut off: nothing wrong with the item; it rides the next
                        // call with others.
                        again.push(it);
                    } else {
                        self.retry_alone(it);
                    }
                }
            }
        }
        if !again.is_empty() {
            self.stats.retried_items += again.len() as u64;
            if self.pending.is_empty() {
                self.oldest_pending = Some(Instant::now());
            }
            for it in again.into_iter().rev() {
                self.pending.push_front(it);
            }
        }
        self.stats.bad_replies += u64::from(flawed);
    }

    fn resolve(&mut self, hash: &str, r: Resolution) {
        let Some(rows) = self.waiting.remove(hash) else {
            return;
        };
        for (j, w) in rows.into_iter().enumerate() {
            let mut row = w.row;
            if w.audit {
                // A kept row asked blind: it keeps its kNN label and carries the answer (a
                // failed audit is `missing`, never an error: the row itself was decided).
                self.stats.rows_audited += 1;
                row.audit = Some(crate::row::Audit {
                    label: match &r {
                        Resolution::Label { label, .. } => {
                            Some(self.sh.pb.schema.labels[*label].clone())
                        }
                        // Counting it as missing would hide exactly the drift audits are for.
                        Resolution::OutsideSchema(_) => {
                            Some(crate::row::OUTSIDE_SCHEMA.to_string())
                        }
                        Resolution::Failed(_) => None,
                    },
                });
                row.llm = r.llm_info(j == 0);
                if self.results.send((row, w.vector, w.text)).is_err() {
                    return;
                }
                continue;
            }
            match &r {
                Resolution::Label { label, .. } => {
                    self.stats.rows_labelled += 1;
                    row.label = Some(self.sh.pb.schema.labels[*label].clone());
                    row.decided_by = DecidedBy::Llm;
                    row.llm = r.llm_info(j == 0);
                }
                Resolution::Failed(why) | Resolution::OutsideSchema(why) => {
                    self.stats.rows_failed += 1;
                    row.decided_by = DecidedBy::Escalate;
                    row.error = Some(why.clone());
                }
            }
            if self.results.send((row, w.vector, w.text)).is_err() {
                return;
            }
        }
    }
}
