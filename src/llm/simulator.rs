//! A loopback OpenAI-compatible chat server for tests and benchmarks (`semtel llm simulate`).
//!
//! It answers semtel's item-numbered prompts from a file of true labels (with a configurable
//! error rate, so runs are checkable), enforces requests- and tokens-per-minute limits (with a
//! burst allowance) with real 429s and the rate-limit headers of OpenAI (`x-ratelimit-limit-*`,
//! `-remaining-*`, `-reset-*`, `Retry-After(-ms)`), of Azure (`-remaining-*`) or of a gateway
//! that strips them (a whole-seconds `Retry-After` only), draws latency from a normal
//! distribution whose mean may drift, and injects faults on demand from a seeded generator:
//! 5xx, hangs past the client's deadline, malformed JSON, labels outside the schema, truncated
//! replies, dropped items, bodies that trickle, 400s, HTML pages; plus outage windows (503 at
//! once, or held then 503). It binds to 127.0.0.1 only and records the shape of every request
//! (path, auth header kind) for protocol tests. One instance is one endpoint.

use crate::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Probabilities (per request) of each injected fault; at most one fault per request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Faults {
    pub server_error: f64,
    pub hang: f64,
    pub malformed: f64,
    pub out_of_schema: f64,
    pub truncated: f64,
    pub drop_item: f64,
    /// The answer's body trickles out a byte at a time (a stalled proxy).
    pub trickle: f64,
    /// 400 with an error message (what a content filter or an unknown parameter gets).
    pub bad_request: f64,
    /// 200 with an HTML page instead of JSON (a login or error page of a proxy).
    pub html: f64,
}

/// Every fault kind the simulator can inject, by the name `Faults::spread` takes.
pub const FAULT_KINDS: [&str; 9] = [
    "5xx",
    "hang",
    "malformed",
    "out_of_schema",
    "truncated",
    "drop",
    "trickle",
    "400",
    "html",
];

/// The kinds `all` stands for: what a flaky but correctly configured endpoint does (400s and
/// HTML pages are configuration problems, asked for by name).
pub const TRANSIENT_FAULTS: [&str; 6] = [
    "5xx",
    "hang",
    "malformed",
    "out_of_schema",
    "truncated",
    "drop",
];

impl Faults {
    /// `total` spread evenly over the named kinds (`5xx, hang, malformed, out_of_schema,
    /// truncated, drop`; `all` for every kind).
    pub fn spread(total: f64, kinds: &[String]) -> std::result::Result<Faults, String> {
        let kinds: Vec<&str> = if kinds.iter().any(|k| k == "all") || kinds.is_empty() {
            TRANSIENT_FAULTS.to_vec()
        } else {
            kinds.iter().map(String::as_str).collect()
        };
        let p = total / kinds.len() as f64;
        let mut f = Faults::default();
        for k in kinds {
            match k {
                "5xx" => f.server_error = p,
                "hang" => f.hang = p,
                "malformed" => f.malformed = p,
                "out_of_schema" => f.out_of_schema = p,
                "truncated" => f.truncated = p,
                "drop" => f.drop_item = p,
                "trickle" => f.trickle = p,
                "400" => f.bad_request = p,
                "html" => f.html = p,
                other => {
                    return Err(format!(
                        "unknown fault `{other}` (use {})",
                        FAULT_KINDS.join(", ")
                    ))
                }
            }
        }
        Ok(f)
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub rpm: u64,
    pub tpm: u64,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    /// Probability that an item's answer is a wrong (but valid) label (the overall rate; with
    /// [`ErrorModel::Confusable`] each known item has its own).
    pub error_rate: f64,
    /// Where the wrong answers fall: uniformly, or on the ambiguous items.
    pub errors: ErrorModel,
    /// Keep every request body in [`SimState::seen`].
    pub record_bodies: bool,
    pub faults: Faults,
    /// How long a "hang" holds the request before answering.
    pub hang_s: f64,
    /// Truth: normalised text key → label.
    pub truth: HashMap<String, String>,
    /// When set, requests must carry this key (Bearer or `api-key`), else 401.
    pub api_key: Option<String>,
    /// Behave like a gullible model: an item saying "answer with X" gets X.
    pub obey_injection: bool,
    pub seed: u64,
    /// Seconds of traffic the limits let through at once (a fresh bucket is full).
    pub burst_s: f64,
    /// Which rate-limit headers the server sends.
    pub headers: HeaderMode,
    /// Windows (seconds since start) in which every request fails.
    pub outages: Vec<(f64, f64)>,
    /// How requests fail during an outage.
    pub outage_mode: OutageMode,
    /// Latency drifts linearly from `latency_ms` to this over `drift_s` seconds from start.
    pub drift_to_ms: Option<f64>,
    pub drift_s: f64,
    /// Faults start after this many requests (a healthy start, then trouble).
    pub faults_after: u64,
}

/// Rate-limit headers the simulator sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HeaderMode {
    /// OpenAI: `x-ratelimit-limit-*`, `-remaining-*`, `-reset-*`, and `Retry-After(-ms)` on 429.
    Full,
    /// Azure OpenAI: `x-ratelimit-remaining-*`, and `Retry-After(-ms)` on 429.
    Remaining,
    /// A gateway that strips them: a 429 carries only `Retry-After` in whole seconds.
    None,
}

impl std::str::FromStr for HeaderMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "full" => Ok(HeaderMode::Full),
            "remaining" => Ok(HeaderMode::Remaining),
            "none" => Ok(HeaderMode::None),
            o => Err(format!("unknown header mode `{o}` (full, remaining, none)")),
        }
    }
}

/// What an outage looks like to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OutageMode {
    /// 503 at once.
    Unavailable,
    /// The request is held (for `hang_s`) and then answered 503.
    Hang,
}

impl std::str::FromStr for OutageMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "503" => Ok(OutageMode::Unavailable),
            "hang" => Ok(OutageMode::Hang),
            o => Err(format!("unknown outage mode `{o}` (503, hang)")),
        }
    }
}

/// Parses `T1-T2` (seconds since start), e.g. `30-90`.
pub fn parse_window(s: &str) -> std::result::Result<(f64, f64), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}`: expected START-END in seconds, e.g. 30-90"))?;
    let a: f64 = a.trim().parse().map_err(|_| format!("`{s}`: bad start"))?;
    let b: f64 = b.trim().parse().map_err(|_| format!("`{s}`: bad end"))?;
    if b <= a || a < 0.0 {
        return Err(format!("`{s}`: the end must come after the start"));
    }
    Ok((a, b))
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            rpm: 0,
            tpm: 0,
            latency_ms: 50.0,
            jitter_ms: 10.0,
            error_rate: 0.0,
            errors: ErrorModel::Uniform,
            record_bodies: false,
            faults: Faults::default(),
            hang_s: 30.0,
            truth: HashMap::new(),
            api_key: None,
            obey_injection: false,
            seed: 7,
            burst_s: 5.0,
            headers: HeaderMode::Remaining,
            outages: Vec::new(),
            outage_mode: OutageMode::Unavailable,
            drift_to_ms: None,
            drift_s: 120.0,
            faults_after: 0,
        }
    }
}

/// Where the simulated LLM's wrong answers fall.
///
/// A real LLM does not err at random: it errs on the items that are hard, the ones near other
/// labels' items, and then it picks one of those neighbouring labels. A kNN vote is unsure of
/// the same items, so uniform errors flatter every cascade that escalates the uncertain rows
/// (the LLM looks most reliable exactly where it is asked). [`confusable_errors`] builds the
/// realistic model from the items' embeddings.
#[derive(Debug, Clone, Default)]
pub enum ErrorModel {
    /// Every item wrong with probability `error_rate`, the wrong label uniform over the allowed.
    #[default]
    Uniform,
    /// Per item (by [`truth_key`]): its own error probability and the labels it is confused
    /// with. Items not in the map fall back to the uniform model.
    Confusable(Arc<HashMap<String, Hardness>>),
}

impl ErrorModel {
    pub fn name(&self) -> &'static str {
        match self {
            ErrorModel::Uniform => "uniform",
            ErrorModel::Confusable(_) => "confusable",
        }
    }
}

/// How hard one item is for the simulated LLM.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardness {
    /// Probability that its answer is wrong.
    pub p_wrong: f64,
    /// Labels a wrong answer is drawn from, with weights (its nearest other-label neighbours).
    pub confusions: Vec<(String, f32)>,
}

/// Share of the error mass spread evenly over all items; the rest follows ambiguity. Even an
/// LLM errs now and then on a clear item (a slip, a misread), so no item is error-free.
const EVEN_SHARE: f64 = 0.15;
/// No item is wrong more often than this: a hard item is still answered right sometimes.
const MAX_P_WRONG: f64 = 0.9;

/// The realistic error model for labelled `items` (`(text, label)`) with L2-normalised
/// `vectors` (`dim` wide, one row per item), at overall error rate `rate`.
///
/// An item's ambiguity is the similarity-weighted share of its `k` nearest other items
/// (leave-one-out, exact) whose label differs from its own. Its error probability is
/// proportional to `EVEN_SHARE + (1 - EVEN_SHARE) * ambiguity / mean ambiguity`, capped at
/// `MAX_P_WRONG` and rescaled so that the mean over all items is `rate`. A wrong answer is
/// drawn from the other labels among those neighbours, weighted by similarity (uniform when
/// every neighbour agrees). Pure and deterministic.
pub fn confusable_errors(
    items: &[(String, String)],
    vectors: &[f32],
    dim: usize,
    rate: f64,
    k: usize,
) -> HashMap<String, Hardness> {
    let n = items.len();
    if n == 0 || dim == 0 || vectors.len() != n * dim {
        return HashMap::new();
    }
    let neighbours = exact_knn(vectors, dim, k.max(1));
    let mut amb = Vec::with_capacity(n);
    let mut confusions = Vec::with_capacity(n);
    for (i, nb) in neighbours.iter().enumerate() {
        let own = &items[i].1;
        let (mut total, mut other) = (0f64, 0f64);
        let mut conf: Vec<(String, f32)> = Vec::new();
        for &(j, sim) in nb {
            let w = (sim.max(0.0) as f64) + 1e-6;
            total += w;
            let l = &items[j].1;
            if l != own {
                other += w;
                match conf.iter_mut().find(|(c, _)| c == l) {
                    Some(c) => c.1 += w as f32,
                    None => conf.push((l.clone(), w as f32)),
                }
            }
        }
        amb.push(if total > 0.0 { other / total } else { 0.0 });
        conf.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        confusions.push(conf);
    }
    let mean = amb.iter().sum::<f64>() / n as f64;
    let raw: Vec<f64> = amb
        .iter()
        .map(|&a| {
            if mean > 0.0 {
                EVEN_SHARE + (1.0 - EVEN_SHARE) * a / mean
            } else {
                1.0
            }
        })
        .collect();
    // Scale so the capped probabilities average to `rate` (a few passes: capping moves mass).
    let target = rate.clamp(0.0, MAX_P_WRONG);
    let mut scale = target;
    let mut p: Vec<f64> = Vec::new();
    for _ in 0..20 {
        p = raw.iter().map(|&r| (r * scale).min(MAX_P_WRONG)).collect();
        let m = p.iter().sum::<f64>() / n as f64;
        if m <= 0.0 || (m - target).abs() < 1e-6 {
            break;
        }
        scale *= target / m;
    }
    let mut out = HashMap::with_capacity(n);
    for (i, ((text, _), conf)) in items.iter().zip(confusions).enumerate() {
        out.insert(
            truth_key(text),
            Hardness {
                p_wrong: p[i],
                confusions: conf,
            },
        );
    }
    out
}

/// Neighbours an item's ambiguity is measured over (a kNN vote's usual width).
pub const CONFUSABLE_K: usize = 10;

/// [`ErrorModel::Confusable`] for labelled `items` (`(text, label)`), embedded with `encoder`.
pub fn confusable_from_file(
    items: &[(String, String)],
    encoder: &crate::embed::Encoder,
    rate: f64,
) -> Result<ErrorModel> {
    Ok(ErrorModel::Confusable(Arc::new(embed_confusable(
        items, encoder, rate,
    )?)))
}

/// [`confusable_errors`] for labelled `items` embedded with `encoder`: per item (by
/// [`truth_key`]) how often it is answered wrong, and with what.
pub fn embed_confusable(
    items: &[(String, String)],
    encoder: &crate::embed::Encoder,
    rate: f64,
) -> Result<HashMap<String, Hardness>> {
    let texts: Vec<&str> = items.iter().map(|(t, _)| t.as_str()).collect();
    let mut vectors = Vec::with_capacity(items.len() * encoder.dim());
    for chunk in texts.chunks(4096) {
        vectors.extend(encoder.embed_texts(chunk)?);
    }
    crate::embed::normalize_rows(&mut vectors, encoder.dim());
    Ok(confusable_errors(
        items,
        &vectors,
        encoder.dim(),
        rate,
        CONFUSABLE_K,
    ))
}

/// The `k` nearest other rows of each row (cosine = dot product of normalised rows), exact:
/// blocks of the full similarity matrix with the `gemm` crate.
fn exact_knn(v: &[f32], dim: usize, k: usize) -> Vec<Vec<(usize, f32)>> {
    use rayon::prelude::*;
    let n = v.len() / dim;
    const BLOCK: usize = 256;
    (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .flat_map_iter(|b| {
            let lo = b * BLOCK;
            let m = BLOCK.min(n - lo);
            let mut sims = vec![0f32; m * n];
            // SAFETY: the pointers and strides describe `v` (n × dim, row-major), its transpose
            // and `sims` (m × n, row-major), all of the sizes given.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    dim,
                    sims.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    v[lo * dim..].as_ptr(),
                    1,
                    dim as isize,
                    v.as_ptr(),
                    dim as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            (0..m)
                .map(|r| {
                    let row = &sims[r * n..(r + 1) * n];
                    let mut best: Vec<(usize, f32)> = row
                        .iter()
                        .enumerate()
                        .filter(|&(j, _)| j != lo + r)
                        .map(|(j, &s)| (j, s))
                        .collect();
                    let kk = k.min(best.len());
                    if kk > 0 && kk < best.len() {
                        best.select_nth_unstable_by(kk - 1, |a, b| b.1.total_cmp(&a.1));
                    }
                    best.truncate(kk);
                    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    best
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The key under which the simulator looks up an item's true label.
pub fn truth_key(text: &str) -> String {
    let mut s = String::new();
    for w in text.split_whitespace() {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&w.to_lowercase());
        if s.len() >= 200 {
            break;
        }
    }
    s.chars().take(200).collect()
}

/// Shape of one request as the simulator saw it.
#[derive(Debug, Clone, Serialize)]
pub struct SeenRequest {
    pub path: String,
    /// `bearer`, `api-key` or `none`.
    pub auth: String,
    pub model: Option<String>,
    pub items: usize,
    /// The request body as received, when [`SimConfig::record_bodies`] is on (tests that
    /// check what left semtel).
    pub body: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct SimStats {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub hangs: AtomicU64,
    pub malformed: AtomicU64,
    pub out_of_schema: AtomicU64,
    pub truncated: AtomicU64,
    pub dropped_items: AtomicU64,
    pub items_answered: AtomicU64,
    pub unauthorized: AtomicU64,
    pub trickled: AtomicU64,
    pub bad_requests: AtomicU64,
    pub html_pages: AtomicU64,
    /// Requests that met an outage window.
    pub outage_failures: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Tokens charged against the TPM limit (prompt + max_tokens of admitted requests).
    pub admitted_tokens: AtomicU64,
}

struct Limits {
    req: f64,
    tok: f64,
    last: Instant,
}

pub struct SimState {
    cfg: SimConfig,
    started: Instant,
    limits: Mutex<Limits>,
    rng: Mutex<fastrand::Rng>,
    pub stats: SimStats,
    pub seen: Mutex<Vec<SeenRequest>>,
}

impl SimState {
    fn cap(per_min: u64, burst_s: f64) -> f64 {
        (per_min as f64 / 60.0 * burst_s).max(1.0)
    }

    /// Seconds since the server started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn in_outage(&self) -> bool {
        let t = self.elapsed();
        self.cfg.outages.iter().any(|&(a, b)| t >= a && t < b)
    }

    /// Mean latency now (drifting when asked to).
    fn latency_now(&self) -> f64 {
        match self.cfg.drift_to_ms {
            Some(to) => {
                let f = (self.elapsed() / self.cfg.drift_s.max(1e-3)).min(1.0);
                self.cfg.latency_ms + (to - self.cfg.latency_ms) * f
            }
            None => self.cfg.latency_ms,
        }
    }

    /// Takes capacity for a request, or says how long until there is some (and what is left
    /// of each limit).
    fn admit(&self, tokens: f64) -> std::result::Result<(f64, f64), (Duration, f64, f64)> {
        let mut l = self.limits.lock().unwrap();
        let now = Instant::now();
        let dt = now.duration_since(l.last).as_secs_f64();
        l.last = now;
        let (rpm, tpm) = (self.cfg.rpm, self.cfg.tpm);
        let burst = self.cfg.burst_s;
        if rpm > 0 {
            l.req = (l.req + dt * rpm as f64 / 60.0).min(Self::cap(rpm, burst));
        }
        if tpm > 0 {
            l.tok = (l.tok + dt * tpm as f64 / 60.0).min(Self::cap(tpm, burst));
        }
        let mut wait = 0f64;
        if rpm > 0 && l.req < 1.0 {
            wait = wait.max((1.0 - l.req) / (rpm as f64 / 60.0));
        }
        let tokens = if tpm > 0 {
            tokens.min(Self::cap(tpm, burst))
        } else {
            tokens
        };
        if tpm > 0 && l.tok < tokens {
            wait = wait.max((tokens - l.tok) / (tpm as f64 / 60.0));
        }
        if wait > 0.0 {
            return Err((Duration::from_secs_f64(wait), l.req, l.tok));
        }
        if rpm > 0 {
            l.req -= 1.0;
        }
        if tpm > 0 {
            l.tok -= tokens;
        }
        Ok((l.req, l.tok))
    }
}

/// A running simulator; dropping it stops the server.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub state: Arc<SimState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimHandle {
    /// Base URL for an OpenAI-style endpoint config.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts a simulator on 127.0.0.1:`port` (0: any free port) in a thread of its own.
pub fn start(cfg: SimConfig, port: u16) -> Result<SimHandle> {
    let std_listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| crate::Error::Llm(format!("simulator cannot bind 127.0.0.1:{port}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| crate::Error::Llm(e.to_string()))?;
    let addr = std_listener
        .local_addr()
        .map_err(|e| crate::Error::Llm(e.to_string()))?;
    let now = Instant::now();
    let state = Arc::new(SimState {
        limits: Mutex::new(Limits {
            req: SimState::cap(cfg.rpm, cfg.burst_s),
            tok: SimState::cap(cfg.tpm, cfg.burst_s),
            last: now,
        }),
        started: now,
        rng: Mutex::new(fastrand::Rng::with_seed(cfg.seed)),
        cfg,
        stats: SimStats::default(),
        seen: Mutex::new(Vec::new()),
    });
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("simulator runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    acc = listener.accept() => {
                        let Ok((stream, _)) = acc else { continue };
                        let st = st.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| handle(req, st.clone()));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                }
            }
        });
        rt.shutdown_timeout(Duration::from_millis(100));
    });
    Ok(SimHandle {
        addr,
        state,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

fn json_response(status: StatusCode, body: String, headers: &[(&str, String)]) -> Response<Body> {
    typed_response(status, "application/json", body, headers)
}

fn typed_response(
    status: StatusCode,
    content_type: &str,
    body: String,
    headers: &[(&str, String)],
) -> Response<Body> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", content_type);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(Full::new(Bytes::from(body)).boxed())
        .expect("response")
}

/// A body that comes out one byte per `every` (a stalled proxy or a server under duress).
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    every: Duration,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Trickle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::future::Future;
        let me = self.get_mut();
        if me.pos >= me.data.len() {
            return std::task::Poll::Ready(None);
        }
        if me.sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        let next = tokio::time::Instant::now() + me.every;
        me.sleep.as_mut().reset(next);
        let b = Bytes::copy_from_slice(&me.data[me.pos..me.pos + 1]);
        me.pos += 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(b))))
    }
}

struct ParsedItem {
    n: usize,
    text: String,
    candidates: Vec<String>,
}

/// Reads semtel's prompt: the allowed labels, the escape label, and the numbered items.
fn parse_prompt(user: &str) -> (Vec<String>, Option<String>, Vec<ParsedItem>) {
    let mut labels = Vec::new();
    let mut escape = None;
    let mut in_labels = false;
    for line in user.lines() {
        if line.starts_with("Allowed labels:") {
            in_labels = true;
            continue;
        }
        if in_labels {
            match line.strip_prefix("- ") {
                Some(rest) => {
                    let (name, desc) = rest.split_once(':').unwrap_or((rest, ""));
                    if desc.contains("none of the item's candidates fits") {
                        escape = Some(name.trim().to_string());
                    } else {
                        labels.push(name.trim().to_string());
                    }
                }
                None => in_labels = false,
            }
        }
    }
    let mut items = Vec::new();
    let mut rest = user;
    while let Some(start) = rest.find("<item id=\"") {
        let after = &rest[start + 10..];
        let Some(q) = after.find('"') else { break };
        let n: usize = after[..q].parse().unwrap_or(0);
        let Some(gt) = after.find('>') else { break };
        let attrs = &after[q + 1..gt];
        let candidates = attrs
            .split_once("candidates=\"")
            .and_then(|(_, c)| c.split('"').next())
            .map(|c| c.split('|').map(str::to_string).collect())
            .unwrap_or_default();
        let body = &after[gt + 1..];
        let end = body.find("</item>").unwrap_or(body.len());
        items.push(ParsedItem {
            n,
            // semtel escapes item text (see `tier::escape_text`); a model reads the entities
            // as the characters they stand for, and so does the simulator.
            text: body[..end]
                .trim()
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&"),
            candidates,
        });
        rest = &body[end..];
    }
    (labels, escape, items)
}

/// Answers a naming prompt of `semtel discover`: each `<cluster id="N">` is named after the
/// true label most of its `<conversation>`s have (from the truth file; `unknown_topic` when
/// none is known, `noise` when no label has a majority), each `<group id="N">` after its first
/// `<topic>`'s name.
fn name_blocks(
    user: &str,
    truth: &HashMap<String, String>,
) -> serde_json::Map<String, serde_json::Value> {
    let unescape = |t: &str| {
        t.trim()
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    let mut out = serde_json::Map::new();
    for (open, close, inner) in [
        ("<cluster id=\"", "</cluster>", "<conversation>"),
        ("<group id=\"", "</group>", "<topic>"),
    ] {
        let mut rest = user;
        while let Some(start) = rest.find(open) {
            let after = &rest[start + open.len()..];
            let Some(q) = after.find('"') else { break };
            let n = after[..q].to_string();
            let end = after.find(close).unwrap_or(after.len());
            let body = &after[..end];
            let parts: Vec<String> = body
                .split(inner)
                .skip(1)
                .map(|p| unescape(p.split(&inner.replace('<', "</")).next().unwrap_or("")))
                .collect();
            let name = if inner == "<topic>" {
                parts
                    .first()
                    .and_then(|t| t.split(':').next())
                    .map(|t| format!("{}_topics", t.trim()))
                    .unwrap_or_else(|| "topics".into())
            } else {
                let mut votes: HashMap<&str, usize> = HashMap::new();
                for p in &parts {
                    if let Some(l) = truth.get(&truth_key(p)) {
                        *votes.entry(l.as_str()).or_default() += 1;
                    }
                }
                match votes.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) {
                    Some((l, &v)) if 2 * v > parts.len() => l.to_string(),
                    Some(_) => "noise".into(),
                    None => "unknown_topic".into(),
                }
            };
            let desc = format!("conversations about {}", name.replace('_', " "));
            out.insert(n, serde_json::json!({"name": name, "description": desc}));
            rest = &after[end..];
        }
    }
    out
}

fn normal(rng: &mut fastrand::Rng, mean: f64, sd: f64) -> f64 {
    let u1 = rng.f64().max(1e-12);
    let u2 = rng.f64();
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<SimState>,
) -> std::result::Result<Response<Body>, std::convert::Infallible> {
    let path = req.uri().to_string();
    if req.method() == hyper::Method::GET && path.starts_with("/stats") {
        let body = serde_json::to_string(&st.stats).unwrap_or_default();
        return Ok(json_response(StatusCode::OK, body, &[]));
    }
    let headers = req.headers().clone();
    let auth = if let Some(v) = headers.get("authorization") {
        (
            "bearer",
            v.to_str()
                .unwrap_or("")
                .trim_start_matches("Bearer ")
                .to_string(),
        )
    } else if let Some(v) = headers.get("api-key") {
        ("api-key", v.to_str().unwrap_or("").to_string())
    } else {
        ("none", String::new())
    };
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(json_response(StatusCode::BAD_REQUEST, "{}".into(), &[])),
    };
    let nth = st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let user = v["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let (labels, escape, items) = parse_prompt(&user);
    st.seen.lock().unwrap().push(SeenRequest {
        path: path.clone(),
        auth: auth.0.into(),
        model: v["model"].as_str().map(str::to_string),
        items: items.len(),
        body: st
            .cfg
            .record_bodies
            .then(|| String::from_utf8_lossy(&body).into_owned()),
    });
    if !(path.starts_with("/v1/chat/completions")
        || (path.starts_with("/openai/deployments/")
            && path.contains("/chat/completions?api-version=")))
    {
        return Ok(json_response(
            StatusCode::NOT_FOUND,
            r#"{"error":{"message":"unknown path"}}"#.into(),
            &[],
        ));
    }
    if let Some(k) = &st.cfg.api_key {
        if &auth.1 != k {
            st.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Ok(json_response(
                StatusCode::UNAUTHORIZED,
                r#"{"error":{"message":"invalid api key"}}"#.into(),
                &[],
            ));
        }
    }
    let prompt_chars: usize = v["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| x["content"].as_str().unwrap_or("").len())
                .sum()
        })
        .unwrap_or(0);
    let prompt_tokens = (prompt_chars / 4) as u64;
    let max_tokens = v["max_tokens"].as_u64().unwrap_or(256);
    if st.in_outage() {
        st.stats.outage_failures.fetch_add(1, Ordering::Relaxed);
        if st.cfg.outage_mode == OutageMode::Hang {
            tokio::time::sleep(Duration::from_secs_f64(st.cfg.hang_s)).await;
        }
        return Ok(json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":{"message":"The service is temporarily unavailable"}}"#.into(),
            &[],
        ));
    }
    let mode = st.cfg.headers;
    let limits = |rem_req: f64, rem_tok: f64| -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if st.cfg.rpm == 0 && st.cfg.tpm == 0 || mode == HeaderMode::None {
            return h;
        }
        if mode == HeaderMode::Full {
            if st.cfg.rpm > 0 {
                h.push(("x-ratelimit-limit-requests", st.cfg.rpm.to_string()));
            }
            if st.cfg.tpm > 0 {
                h.push(("x-ratelimit-limit-tokens", st.cfg.tpm.to_string()));
            }
        }
        if st.cfg.rpm > 0 {
            h.push((
                "x-ratelimit-remaining-requests",
                format!("{}", rem_req.max(0.0) as u64),
            ));
        }
        if st.cfg.tpm > 0 {
            h.push((
                "x-ratelimit-remaining-tokens",
                format!("{}", rem_tok.max(0.0) as u64),
            ));
        }
        h
    };
    let (rem_req, rem_tok) = match st.admit((prompt_tokens + max_tokens) as f64) {
        Ok(r) => {
            st.stats
                .admitted_tokens
                .fetch_add(prompt_tokens + max_tokens, Ordering::Relaxed);
            r
        }
        Err((wait, rem_req, rem_tok)) => {
            st.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let secs = wait.as_secs_f64();
            let ms = (secs * 1000.0).ceil() as u64;
            let mut h = vec![("retry-after", format!("{}", secs.ceil() as u64))];
            if mode != HeaderMode::None {
                h.push(("retry-after-ms", ms.to_string()));
                h.extend(limits(rem_req, rem_tok));
            }
            if mode == HeaderMode::Full {
                h.push(("x-ratelimit-reset-requests", format!("{ms}ms")));
                h.push(("x-ratelimit-reset-tokens", format!("{ms}ms")));
            }
            return Ok(json_response(
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#.into(),
                &h,
            ));
        }
    };
    st.stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::Relaxed);
    let (latency, fault, style, answers) = {
        let mut rng = st.rng.lock().unwrap();
        let mean = st.latency_now();
        // Jitter scales with the mean, so a drifting latency keeps its shape.
        let sd = st.cfg.jitter_ms * mean / st.cfg.latency_ms.max(1e-3);
        let latency = normal(&mut rng, mean, sd).max(1.0);
        let f = &st.cfg.faults;
        let r = rng.f64();
        let r = if nth < st.cfg.faults_after { 2.0 } else { r };
        let mut acc = 0.0;
        let mut fault = "";
        for (name, p) in [
            ("5xx", f.server_error),
            ("hang", f.hang),
            ("malformed", f.malformed),
            ("out_of_schema", f.out_of_schema),
            ("truncated", f.truncated),
            ("drop", f.drop_item),
            ("trickle", f.trickle),
            ("400", f.bad_request),
            ("html", f.html),
        ] {
            acc += p;
            if fault.is_empty() && r < acc {
                fault = name;
            }
        }
        let style = rng.u8(0..3);
        let mut answers: Vec<(usize, String)> = Vec::new();
        for it in &items {
            let truth = st.cfg.truth.get(&truth_key(&it.text)).cloned();
            let pool: Vec<&String> = if it.candidates.is_empty() {
                labels.iter().collect()
            } else {
                it.candidates.iter().collect()
            };
            let mut label = match truth {
                Some(t) => t,
                None if !pool.is_empty() => {
                    // No truth for this text: a deterministic guess among the allowed labels.
                    let h = crate::llm::cache::text_hash(&it.text);
                    let k = usize::from_str_radix(&h[..8], 16).unwrap_or(0) % pool.len();
                    pool[k].clone()
                }
                None => String::new(),
            };
            let hard = match &st.cfg.errors {
                ErrorModel::Uniform => None,
                ErrorModel::Confusable(m) => m.get(&truth_key(&it.text)),
            };
            let p_wrong = hard.map_or(st.cfg.error_rate, |h| h.p_wrong);
            if p_wrong > 0.0 && rng.f64() < p_wrong && pool.len() > 1 {
                // A confusable neighbour's label when one is allowed here, else any other.
                let near: Vec<&(String, f32)> = hard
                    .map(|h| {
                        h.confusions
                            .iter()
                            .filter(|(l, _)| *l != label && pool.contains(&l))
                            .collect()
                    })
                    .unwrap_or_default();
                let total: f32 = near.iter().map(|(_, w)| *w).sum();
                if total > 0.0 {
                    let mut r = rng.f32() * total;
                    let mut pick = &near[near.len() - 1].0;
                    for (l, w) in &near {
                        r -= *w;
                        if r <= 0.0 {
                            pick = l;
                            break;
                        }
                    }
                    label = pick.clone();
                } else {
                    let wrong: Vec<&&String> = pool.iter().filter(|l| ***l != label).collect();
                    label = wrong[rng.usize(0..wrong.len())].to_string();
                }
            }
            if !it.candidates.is_empty() && !it.candidates.contains(&label) {
                if let Some(e) = &escape {
                    label = e.clone();
                }
            }
            if st.cfg.obey_injection {
                // (Sliced from the lowercased text itself: lowercasing can change byte lengths.)
                let lower = it.text.to_lowercase();
                if let Some(p) = lower.find("answer with ") {
                    let word: String = lower[p + 12..]
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '.' && *c != '"')
                        .collect();
                    if !word.is_empty() {
                        label = word;
                    }
                }
            }
            answers.push((it.n, label));
        }
        (latency, fault, style, answers)
    };
    if fault == "hang" {
        st.stats.hangs.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs_f64(st.cfg.hang_s)).await;
    } else {
        tokio::time::sleep(Duration::from_secs_f64(latency / 1000.0)).await;
    }
    let rl = limits(rem_req, rem_tok);
    match fault {
        "5xx" => {
            st.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            return Ok(json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":{"message":"The server is overloaded"}}"#.into(),
                &rl,
            ));
        }
        "400" => {
            st.stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                r#"{"error":{"message":"Invalid request: the input was refused","type":"invalid_request_error"}}"#.into(),
                &rl,
            ));
        }
        "html" => {
            st.stats.html_pages.fetch_add(1, Ordering::Relaxed);
            return Ok(typed_response(
                StatusCode::OK,
                "text/html",
                "<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in to continue.</body></html>".into(),
                &rl,
            ));
        }
        "malformed" => {
            st.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return Ok(json_response(
                StatusCode::OK,
                r#"{"id": "x", "choices": [{"mess"#.into(),
                &rl,
            ));
        }
        _ => {}
    }
    let mut answers = answers;
    if fault == "drop" && !answers.is_empty() {
        st.stats.dropped_items.fetch_add(1, Ordering::Relaxed);
        let k = st.rng.lock().unwrap().usize(0..answers.len());
        answers.remove(k);
    }
    if fault == "out_of_schema" && !answers.is_empty() {
        st.stats.out_of_schema.fetch_add(1, Ordering::Relaxed);
        answers[0].1 = "definitely_not_a_label".into();
    }
    st.stats
        .items_answered
        .fetch_add(answers.len() as u64, Ordering::Relaxed);
    // When two items claim one number (a conversation forged an item), a gullible model
    // answers the first one it read: that is the cross-item injection semtel must withstand.
    let mut obj = serde_json::Map::new();
    for (n, l) in answers {
        obj.entry(n.to_string())
            .or_insert(serde_json::Value::String(l));
    }
    // `semtel discover`'s prompts: clusters (or groups of topics) to name.
    if user.contains("<cluster id=\"") || user.contains("<group id=\"") {
        obj = name_blocks(&user, &st.cfg.truth);
        // Under the error rate a cluster gets another true label's name (a confusable one
        // when the error model has them for its first conversation).
        let all: Vec<&String> = {
            let mut v: Vec<&String> = st.cfg.truth.values().collect();
            v.sort();
            v.dedup();
            v
        };
        let mut rng = st.rng.lock().unwrap();
        for v in obj.values_mut() {
            if st.cfg.error_rate > 0.0 && rng.f64() < st.cfg.error_rate && all.len() > 1 {
                let wrong = all[rng.usize(0..all.len())].clone();
                let desc = format!("conversations about {}", wrong.replace('_', " "));
                *v = serde_json::json!({"name": wrong, "description": desc});
            }
        }
    }
    let json = serde_json::Value::Object(obj).to_string();
    let mut content = match style {
        0 => json,
        1 => format!("```json\n{json}\n```"),
        _ => format!(
            "Here are the labels you asked for:\n{json}\nLet me know if you need anything else."
        ),
    };
    if fault == "truncated" {
        st.stats.truncated.fetch_add(1, Ordering::Relaxed);
        let mut cut = content.len() * 6 / 10;
        while !content.is_char_boundary(cut) {
            cut -= 1;
        }
        content.truncate(cut);
    }
    st.stats.ok.fetch_add(1, Ordering::Relaxed);
    let completion_tokens = (content.len() / 4) as u64;
    let body = serde_json::json!({
        "id": "chatcmpl-sim",
        "object": "chat.completion",
        "model": v["model"].as_str().unwrap_or("simulated"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": if fault == "truncated" {"length"} else {"stop"}}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    });
    if fault == "trickle" {
        st.stats.trickled.fetch_add(1, Ordering::Relaxed);
        let mut b = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json");
        for (k, v) in &rl {
            b = b.header(*k, v);
        }
        let every = Duration::from_millis(200);
        let body = Trickle {
            data: body.to_string().into_bytes(),
            pos: 0,
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
        };
        return Ok(b.body(body.boxed()).expect("response"));
    }
    Ok(json_response(StatusCode::OK, body.to_string(), &rl))
}

/// True labels keyed the way the simulator looks them up, from a labelled file.
pub fn truth_from_file(
    path: &std::path::Path,
    opts: &crate::input::InputOptions,
) -> crate::Result<HashMap<String, String>> {
    let mut truth = HashMap::new();
    for r in crate::input::read_all(path, opts)? {
        if let (Ok(c), Some(l)) = (r.content, r.label) {
            truth.insert(truth_key(&c.flatten()), l);
        }
    }
    Ok(truth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_flags_parse() {
        assert_eq!(parse_window("30-90"), Ok((30.0, 90.0)));
        assert_eq!(parse_window(" 0.5 - 2 "), Ok((0.5, 2.0)));
        assert!(parse_window("90-30").is_err());
        assert!(parse_window("soon").is_err());
        assert_eq!("none".parse::<HeaderMode>(), Ok(HeaderMode::None));
        assert!("most".parse::<HeaderMode>().is_err());
        assert_eq!("hang".parse::<OutageMode>(), Ok(OutageMode::Hang));
        let f = Faults::spread(0.3, &["400".into(), "trickle".into(), "html".into()]).unwrap();
        assert!((f.bad_request - 0.1).abs() < 1e-12 && (f.trickle - 0.1).abs() < 1e-12);
        assert!(Faults::spread(0.3, &["gremlins".into()]).is_err());
    }

    #[test]
    fn reads_semtel_prompts() {
        let user = "Allowed labels:\n- a: first\n- b\n- other: none of the item's candidates fits\n\nItems:\n<item id=\"1\" candidates=\"a|b\">\nuser: hi\nassistant: yo\n</item>\n<item id=\"2\">\nsecond\n</item>\n";
        let (labels, esc, items) = parse_prompt(user);
        assert_eq!(labels, vec!["a", "b"]);
        assert_eq!(esc.as_deref(), Some("other"));
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].candidates, vec!["a", "b"]);
        assert_eq!(items[0].text, "user: hi\nassistant: yo");
        assert_eq!(items[1].n, 2);
    }

    #[test]
    fn confusable_errors_fall_on_ambiguous_items() {
        // Two clusters (labels a, b) on a circle, plus items half-way between them.
        let mut items = Vec::new();
        let mut v = Vec::new();
        let mut push = |text: String, label: &str, angle: f32| {
            items.push((text, label.to_string()));
            v.extend_from_slice(&[angle.cos(), angle.sin()]);
        };
        for i in 0..40 {
            push(format!("clear a {i}"), "a", 0.0 + i as f32 * 0.002);
            push(format!("clear b {i}"), "b", 1.5 + i as f32 * 0.002);
        }
        for i in 0..10 {
            let l = if i % 2 == 0 { "a" } else { "b" };
            push(format!("between {i}"), l, 0.75 + i as f32 * 0.001);
        }
        let m = confusable_errors(&items, &v, 2, 0.05, 10);
        assert_eq!(m.len(), items.len());
        let mean = m.values().map(|h| h.p_wrong).sum::<f64>() / m.len() as f64;
        assert!((mean - 0.05).abs() < 1e-3, "mean error rate {mean}");
        let hard = &m[&truth_key("between 0")];
        let easy = &m[&truth_key("clear a 3")];
        assert!(hard.p_wrong > 5.0 * easy.p_wrong, "{hard:?} vs {easy:?}");
        assert!(easy.p_wrong > 0.0, "no item is error-free");
        assert_eq!(hard.confusions[0].0, "b");
        assert!(m.values().all(|h| h.p_wrong <= MAX_P_WRONG));
        // Degenerate inputs give an empty model, never a panic.
        assert!(confusable_errors(&items, &v[..3], 2, 0.05, 10).is_empty());
        assert!(confusable_errors(&[], &[], 2, 0.05, 10).is_empty());
    }
}
