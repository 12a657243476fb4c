//! The LLM tier: labels the rows the kNN stage escalated, as fast as the endpoints allow and
//! without losing or duplicating a row.
//!
//! A single dispatcher task owns all state: it deduplicates identical conversations, answers
//! from the response cache, packs items into calls of N, picks an endpoint (weighted, within its
//! token buckets and adaptive concurrency), sends, parses, and routes every item to exactly one
//! outcome: a label of the schema (`decided_by = "llm"`), or, after its retries, a failure that
//! keeps the row as `escalate` with the reason and the raw reply. Items missing or unreadable
//! in a batched reply are retried alone; an "other" answer to a narrowed candidate list is
//! re-asked with the full schema.
//!
//! The classification pipeline is synchronous; this module bridges it to a tokio runtime of
//! its own. It must never write files other than the response cache.

use super::cache::{text_hash, Cache};
use super::client::{CallError, ChatRequest, ChatResponse, HttpClient, LlmClient};
use super::config::LlmConfig;
use super::limiter::{backoff, Flow};
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
    pub per_endpoint_calls: Vec<(String, u64)>,
}

#[derive(Clone)]
struct Item {
    hash: String,
    p: PromptItem,
    attempts: u32,
    last_problem: Option<String>,
}

struct Call {
    items: Vec<Item>,
    attempts: u32,
    not_before: Instant,
    avoid: Option<usize>,
}

struct Waiting {
    row: OutputRow,
    vector: Option<Vec<f32>>,
    text: String,
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
        Ok(PromptBuilder {
            cfg,
            prompt,
            schema: Schema::new(labels),
            descriptions,
            other,
            counter,
        })
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
        let clients = cfg
            .endpoints
            .iter()
            .map(|e| HttpClient::new(e).map(|c| Arc::new(c) as Arc<dyn LlmClient>))
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
            batch.push(Incoming {
                item: Item {
                    hash: text_hash(&text),
                    p: PromptItem {
                        text,
                        full_schema: !narrow || candidates.is_empty(),
                        candidates,
                        examples: c.examples.clone(),
                    },
                    attempts: 0,
                    last_problem: None,
                },
                waiting: Waiting {
                    row: c.out,
                    vector: c.vector,
                    text: match &c.content {
                        Some(c) => c.flatten(),
                        None => String::new(),
                    },
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

struct Outcome {
    call: Call,
    endpoint: usize,
    reserved: f64,
    est_prompt: f64,
    started: Instant,
    result: std::result::Result<ChatResponse, CallError>,
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
}

struct Dispatcher {
    sh: Arc<Shared>,
    flows: Vec<Flow>,
    pending: VecDeque<Item>,
    ready: VecDeque<Call>,
    waiting: HashMap<String, Vec<Waiting>>,
    results: std::sync::mpsc::Sender<Finished>,
    cache: Cache,
    stats: LlmStats,
    token_ratio: f64,
    oldest_pending: Option<Instant>,
    fatal: Option<String>,
}

async fn dispatch(
    sh: Arc<Shared>,
    mut rx: tokio::sync::mpsc::Receiver<Vec<Incoming>>,
    results: std::sync::mpsc::Sender<Finished>,
    cache: Cache,
) -> Result<LlmStats> {
    let now = Instant::now();
    let flows = sh
        .pb
        .cfg
        .endpoints
        .iter()
        .map(|e| {
            if sh.pb.cfg.adaptive {
                Flow::new(e.rpm, e.tpm, e.max_concurrency, now)
            } else {
                Flow::fixed(e.max_concurrency, now)
            }
        })
        .collect();
    let mut d = Dispatcher {
        stats: LlmStats {
            per_endpoint_calls: sh
                .pb
                .cfg
                .endpoints
                .iter()
                .map(|e| (e.name.clone(), 0))
                .collect(),
            ..Default::default()
        },
        sh,
        flows,
        pending: VecDeque::new(),
        ready: VecDeque::new(),
        waiting: HashMap::new(),
        results,
        cache,
        token_ratio: 1.3,
        oldest_pending: None,
        fatal: None,
    };
    let mut inflight: JoinSet<Outcome> = JoinSet::new();
    let mut closed = false;
    // How long a partial batch may wait for more items while input keeps coming.
    let linger = Duration::from_millis(200);
    loop {
        let now = Instant::now();
        d.form_calls(closed, linger, now);
        let wake = d.launch(&mut inflight, now);
        if closed && d.ready.is_empty() && d.pending.is_empty() && inflight.is_empty() {
            break;
        }
        let sleep_for = wake
            .unwrap_or(Duration::from_millis(500))
            .max(Duration::from_millis(1));
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
            self.ready.push_back(Call {
                items,
                attempts: 0,
                not_before: now,
                avoid: None,
            });
            self.oldest_pending = (!self.pending.is_empty()).then_some(now);
        }
    }

    /// Starts every call that can start now; returns how long until the next could.
    fn launch(&mut self, inflight: &mut JoinSet<Outcome>, now: Instant) -> Option<Duration> {
        let mut wake: Option<Duration> = None;
        let mut deferred = VecDeque::new();
        while let Some(call) = self.ready.pop_front() {
            if let Some(reason) = &self.fatal {
                let reason = reason.clone();
                for it in call.items {
                    self.resolve(&it.hash, Resolution::Failed(reason.clone()));
                }
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
            // Pick among endpoints that can start now, by weight (avoiding the one that just
            // failed this call when another is available).
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
                if let Some(a) = call.avoid {
                    candidates.retain(|&i| i != a);
                }
            }
            if candidates.is_empty() {
                if self.flows.iter().all(|f| f.disabled.is_some()) {
                    let why = self.flows[0].disabled.clone().unwrap_or_default();
                    self.fatal = Some(format!("every LLM endpoint refused requests ({why})"));
                    self.ready.push_front(call);
                    continue;
                }
                if let Some(w) = soonest {
                    wake = Some(wake.map_or(w, |x: Duration| x.min(w)));
                }
                deferred.push_back(call);
                // Calls behind this one would meet the same full endpoints.
                break;
            }
            let endpoints = &self.sh.pb.cfg.endpoints;
            let total: f64 = candidates.iter().map(|&i| endpoints[i].weight).sum();
            let mut pick = fastrand::f64() * total;
            let mut ep = candidates[0];
            for &i in &candidates {
                pick -= endpoints[i].weight;
                if pick <= 0.0 {
                    ep = i;
                    break;
                }
            }
            self.flows[ep].start(reserve, now);
            self.stats.calls += 1;
            self.stats.items_sent += call.items.len() as u64;
            self.stats.per_endpoint_calls[ep].1 += 1;
            let client = self.sh.clients[ep].clone();
            let cfg = &self.sh.pb.cfg;
            let timeout = Duration::from_secs_f64(
                cfg.timeout_base_s + cfg.timeout_per_1k_tokens_s * reserve / 1000.0,
            );
            inflight.spawn(async move {
                let started = Instant::now();
                let result = client.chat(&req, timeout).await;
                Outcome {
                    call,
                    endpoint: ep,
                    reserved: reserve,
                    est_prompt: est,
                    started,
                    result,
                }
            });
        }
        while let Some(c) = self.ready.pop_front() {
            deferred.push_back(c);
        }
        self.ready = deferred;
        wake
    }

    fn on_outcome(&mut self, o: Outcome) {
        let now = Instant::now();
        let Outcome {
            mut call,
            endpoint,
            reserved,
            est_prompt,
            started,
            result,
        } = o;
        match result {
            Ok(resp) => {
                let used = (resp.prompt_tokens + resp.completion_tokens) as f64;
                self.flows[endpoint].on_success(now - started, reserved, used, &resp.rate, now);
                // Correct the tokenizer-based estimate towards what the server counted.
                if resp.prompt_tokens > 0 && est_prompt > 0.0 {
                    let r = resp.prompt_tokens as f64 / (est_prompt / self.token_ratio);
                    self.token_ratio = 0.8 * self.token_ratio + 0.2 * r.clamp(0.2, 5.0);
                }
                self.on_reply(call, endpoint, resp);
            }
            Err(e) => {
                match &e {
                    CallError::RateLimited(rate) => {
                        self.stats.rate_limited += 1;
                        self.flows[endpoint].on_congestion(Some(rate), now);
                    }
                    CallError::Server(..) | CallError::Network(_) => {
                        self.stats.server_errors += 1;
                        self.flows[endpoint].on_congestion(None, now);
                    }
                    CallError::Timeout => {
                        self.stats.timeouts += 1;
                        self.flows[endpoint].on_congestion(None, now);
                    }
                    CallError::BadResponse(_) => {
                        self.stats.bad_replies += 1;
                        self.flows[endpoint].on_neutral_failure();
                    }
                    CallError::Fatal(status, msg) => {
                        self.flows[endpoint].on_neutral_failure();
                        if matches!(status, 401 | 403 | 404) {
                            self.flows[endpoint].disabled = Some(format!("{status}: {msg}"));
                        }
                    }
                }
                call.attempts += 1;
                for it in &mut call.items {
                    it.last_problem = Some(e.to_string());
                }
                let cfg = &self.sh.pb.cfg;
                let (base, cap, max_attempts) =
                    (cfg.backoff_base_s, cfg.backoff_max_s, cfg.max_attempts);
                if call.attempts >= max_attempts {
                    self.split_or_fail(
                        call.items,
                        &format!("LLM call failed {} times: {e}", call.attempts),
                    );
                } else {
                    let wait = match &e {
                        CallError::RateLimited(r) if self.sh.pb.cfg.adaptive => r
                            .retry_after
                            .unwrap_or_default()
                            .max(backoff(call.attempts, base, cap)),
                        _ => backoff(call.attempts, base, cap),
                    };
                    call.not_before = now + wait;
                    call.avoid = Some(endpoint);
                    self.ready.push_back(call);
                }
            }
        }
    }

    /// Queues one item as a call of its own, now.
    fn retry_alone(&mut self, it: Item) {
        self.stats.retried_items += 1;
        self.ready.push_back(Call {
            items: vec![it],
            attempts: 0,
            not_before: Instant::now(),
            avoid: None,
        });
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
                        self.resolve(&it.hash.clone(), Resolution::Failed(why));
                    } else {
                        self.retry_alone(it);
                    }
                }
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
            match &r {
                Resolution::Label {
                    label,
                    model,
                    tokens_in,
                    tokens_out,
                    cost,
                } => {
                    self.stats.rows_labelled += 1;
                    row.label = Some(self.sh.pb.schema.labels[*label].clone());
                    row.decided_by = DecidedBy::Llm;
                    // Duplicates share the one call: only the first row carries its cost.
                    let first = j == 0;
                    row.llm = Some(LlmInfo {
                        model: model.clone(),
                        tokens_in: if first { *tokens_in } else { 0 },
                        tokens_out: if first { *tokens_out } else { 0 },
                        cost_usd: if first { *cost } else { 0.0 },
                    });
                }
                Resolution::Failed(why) => {
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
