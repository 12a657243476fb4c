//! The HTTP adapter of the live service (`semtel serve`): axum routes over one
//! [`app::serve::Service`](crate::app::serve::Service). It parses requests, enforces the
//! limits and the API key, maps service errors to status codes and keeps the Prometheus
//! metrics; everything else (batching, escalation, the result log, reload) is the handle's.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/classify` | one conversation (an object with `text` or `messages`) or a list (`[…]` or `{"items": […]}`); `?escalate=off\|wait\|async&timeout_ms=N` |
//! | `GET /v1/results/{id}` | an `async` item: 200 with its row, 202 while pending, 404 unknown |
//! | `POST /v1/embeddings` | OpenAI-compatible (`input` string or list, `encoding_format` float or base64) |
//! | `GET /health`, `/ready`, `/info`, `/metrics` | liveness and readiness (neither needs the key), what is served, Prometheus text |
//! | `POST /admin/reload` | reopen the index and swap it in (also on SIGHUP) |
//!
//! What one client can hold, and for how long, is bounded so that it cannot shut others out:
//! connections (`max_connections`; beyond it new ones wait in the listen backlog), the time to
//! send the request head (`header_timeout`, also the idle keep-alive limit) and the body
//! (`body_timeout`), the body's size (a declared `Content-Length` over the limit is refused
//! before a byte is read). A body is read whole before the request takes one of the
//! `max_concurrent_requests` permits, so slow senders hold connections, never the service's
//! capacity; the handle then shares the model between requests (smallest served first), so a
//! large request never starves small ones. Shutdown stops accepting, cuts connections that
//! have no request in a handler (half-sent heads or bodies included), gives the ones in
//! progress `shutdown_timeout`, then cuts the rest.
//!
//! This module must never log conversation text or the API key, and never block the async
//! runtime on model work (the handle's compute thread does that).

use crate::app::serve::{AsyncStatus, Escalate, ServeError, Service};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The adapter's own settings (the handle's are [`crate::app::serve::ServeOptions`]).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Requests bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// Conversations per request at most (413 beyond).
    pub max_items: usize,
    /// Bytes of text per conversation at most (that item becomes an error row).
    pub max_text_bytes: usize,
    /// Requests in progress at most (429 beyond).
    pub max_concurrent_requests: usize,
    /// Bearer token every route but `/health` needs (none: open).
    pub api_key: Option<String>,
    /// `escalate=wait` deadline when the request names none.
    pub escalate_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request head (and the longest a kept-alive connection may
    /// sit idle): then the connection is closed.
    pub header_timeout: Duration,
    /// Time a client has to send the whole body: then 408.
    pub body_timeout: Duration,
    /// After SIGTERM, how long requests in handlers may still take; then they are cut.
    pub shutdown_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: 4 << 20,
            max_items: 256,
            max_text_bytes: 256 << 10,
            max_concurrent_requests: 512,
            api_key: None,
            escalate_timeout: Duration::from_secs(10),
            max_connections: 4096,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Latency histogram bucket bounds (seconds), Prometheus style.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    buckets: [u64; LATENCY_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct HttpMetrics {
    /// (route, status) → requests.
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
}

struct AppState {
    /// Empty while the model and index load (every route but `/health` answers 503 then).
    svc: Arc<OnceLock<Service>>,
    opts: ServerOptions,
    /// SHA-256 of the key: compared in constant time, and the key itself is not kept.
    key_digest: Option<[u8; 32]>,
    permits: Arc<tokio::sync::Semaphore>,
    metrics: Mutex<HttpMetrics>,
    started: Instant,
    /// Fires when shutdown starts: body reads in progress stop at once.
    stopping: tokio::sync::watch::Receiver<Stop>,
    /// Connections open now (a gauge).
    connections: std::sync::atomic::AtomicU64,
}

/// Where shutdown stands, for connections and body reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Running,
    /// Stop accepting; connections without a request in a handler close now.
    Draining,
    /// The deadline passed: every connection closes.
    Now,
}

type Shared = Arc<AppState>;

fn digest(s: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s).into()
}

/// Equal digests, in time independent of where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    let kind = match status.as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        404 => "not_found_error",
        405 => "method_not_allowed",
        408 => "timeout_error",
        409 => "conflict_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "not_ready",
        _ => "server_error",
    };
    let mut r = (
        status,
        axum::Json(
            json!({"error": {"message": msg.into(), "type": kind, "code": status.as_u16()}}),
        ),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// The service when it is loaded and serving; otherwise the 503 to answer.
// The error is the response to return at once: a handler's early exit, not an error value
// passed around (boxing it would buy nothing).
#[allow(clippy::result_large_err)]
fn serving(st: &AppState) -> Result<&Service, Response> {
    match st.svc.get() {
        Some(s) if s.is_ready() => Ok(s),
        Some(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is shutting down",
        )),
        None => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service is starting (loading the model and index): retry in a moment",
        )),
    }
}

fn serve_error(e: ServeError) -> Response {
    match e {
        ServeError::Busy(_) => error(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        ServeError::NotReady => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        ServeError::BadRequest(m) => error(StatusCode::UNPROCESSABLE_ENTITY, m),
        ServeError::Failed(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The router over the service in `svc` (503 until it is set), for embedding in another
/// server; [`run`] serves it with this module's connection limits and shutdown.
pub fn router(svc: Arc<OnceLock<Service>>, opts: ServerOptions) -> Router {
    let (_tx, rx) = tokio::sync::watch::channel(Stop::Running);
    router_with(state(svc, opts, rx))
}

fn state(
    svc: Arc<OnceLock<Service>>,
    opts: ServerOptions,
    stopping: tokio::sync::watch::Receiver<Stop>,
) -> Shared {
    Arc::new(AppState {
        key_digest: opts.api_key.as_ref().map(|k| digest(k.as_bytes())),
        permits: Arc::new(tokio::sync::Semaphore::new(
            opts.max_concurrent_requests.max(1),
        )),
        svc,
        metrics: Mutex::new(HttpMetrics::default()),
        started: Instant::now(),
        stopping,
        connections: Default::default(),
        opts,
    })
}

fn router_with(state: Shared) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/v1/classify", post(classify))
        .route("/v1/results/{id}", get(result))
        .route("/v1/embeddings", post(embeddings))
        .route("/admin/reload", post(reload))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such route (see GET /info for what is served)",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method",
            )
        })
        // The guard has read (and bounded) the body already.
        .layer(DefaultBodyLimit::max(
            state.opts.max_body_bytes.saturating_add(1),
        ))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Every request: the key, the body (read whole, bounded in size and time, before anything
/// else is held), the concurrency limit, the metrics.
async fn guard(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let t = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    // Liveness and readiness probes carry no token (orchestrators cannot send one).
    let resp = if route == "/health" || route == "/ready" {
        next.run(req).await
    } else {
        match authorised(&st, req.headers()) {
            Auth::Denied => {
                let mut r = error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong API key: send `Authorization: Bearer <SEMTEL_API_KEY>`",
                );
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            Auth::Ambiguous => error(
                StatusCode::BAD_REQUEST,
                "send one Authorization header, not several",
            ),
            Auth::Ok => match read_body(&st, req).await {
                Err(r) => r,
                Ok(req) if route.starts_with("/v1/") => {
                    match st.permits.clone().try_acquire_owned() {
                        Ok(_permit) => next.run(req).await,
                        Err(_) => error(
                            StatusCode::TOO_MANY_REQUESTS,
                            format!(
                                "{} requests are in progress (--max-concurrent-requests): retry after a moment",
                                st.opts.max_concurrent_requests
                            ),
                        ),
                    }
                }
                Ok(req) => next.run(req).await,
            },
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let mut m = st.metrics.lock().expect("metrics");
    *m.requests
        .entry((route.clone(), resp.status().as_u16()))
        .or_insert(0) += 1;
    let h = m.latency.entry(route).or_default();
    h.count += 1;
    h.sum += secs;
    if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
        h.buckets[i] += 1;
    }
    resp
}

/// The request with its body read into memory: refused at once when its declared length is
/// far over the limit (413), refused when it grows past it (413), when it takes longer than
/// `body_timeout` (408) or when shutdown starts (503).
///
/// A body up to twice the limit is read to its end (and dropped) before the 413 goes out:
/// closing a connection with unread bytes makes the client's side see a reset instead of the
/// answer. Beyond that the answer goes out at once.
// The error is the response to return at once (see `serving`).
#[allow(clippy::result_large_err)]
async fn read_body(st: &AppState, req: Request) -> Result<Request, Response> {
    use http_body_util::BodyExt;
    let max = st.opts.max_body_bytes;
    let drain_to = max.saturating_mul(2);
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over this server's limit of {max} bytes (--max-body-bytes): send fewer conversations per request"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain_to as u64) {
        return Err(too_large());
    }
    let (parts, mut body) = req.into_parts();
    let mut stopping = st.stopping.clone();
    let deadline = tokio::time::Instant::now() + st.opts.body_timeout;
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout_at(deadline, body.frame()) => match f {
                Ok(f) => f,
                Err(_) => {
                    return Err(error(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the body took longer than {} s to arrive: send it at once",
                            st.opts.body_timeout.as_secs_f64()
                        ),
                    ))
                }
            },
            _ = stopping.wait_for(|s| *s != Stop::Running) => {
                return Err(error(StatusCode::SERVICE_UNAVAILABLE, "the service is shutting down"));
            }
        };
        let Some(frame) = frame else { break };
        let Ok(frame) = frame else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "the body could not be read (the connection broke off?)",
            ));
        };
        if let Ok(data) = frame.into_data() {
            seen = seen.saturating_add(data.len());
            if seen > drain_to {
                return Err(too_large());
            }
            if seen <= max {
                buf.extend_from_slice(&data);
            }
        }
    }
    if seen > max {
        return Err(too_large());
    }
    Ok(Request::from_parts(parts, Body::from(buf.freeze())))
}

enum Auth {
    Ok,
    Denied,
    /// Several `Authorization` headers: which one counts is not ours to guess.
    Ambiguous,
}

fn authorised(st: &AppState, headers: &HeaderMap) -> Auth {
    let Some(want) = &st.key_digest else {
        return Auth::Ok;
    };
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(v), None) = (all.next(), all.next()) else {
        return if headers.contains_key(header::AUTHORIZATION) {
            Auth::Ambiguous
        } else {
            Auth::Denied
        };
    };
    // The scheme is case-insensitive (RFC 7235): `Bearer`, `bearer`, `BEARER`.
    let got = v
        .to_str()
        .ok()
        .map(str::trim)
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, k)| digest(k.trim().as_bytes()));
    if got.is_some_and(|g| same(&g, want)) {
        Auth::Ok
    } else {
        Auth::Denied
    }
}

async fn ready(State(st): State<Shared>) -> Response {
    match serving(&st) {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(r) => r,
    }
}

async fn info(State(st): State<Shared>) -> Response {
    let svc = match serving(&st) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mut v = serde_json::to_value(svc.info()).unwrap_or(Value::Null);
    v["uptime_s"] = json!(st.started.elapsed().as_secs_f64());
    v["limits"] = json!({
        "max_body_bytes": st.opts.max_body_bytes,
        "max_items": st.opts.max_items,
        "max_text_bytes": st.opts.max_text_bytes,
        "max_concurrent_requests": st.opts.max_concurrent_requests,
    });
    axum::Json(v).into_response()
}

#[derive(serde::Deserialize, Default)]
struct ClassifyQuery {
    escalate: Option<String>,
    timeout_ms: Option<u64>,
}

fn parse_escalate(
    svc: &Service,
    st: &AppState,
    mode: Option<&str>,
    timeout_ms: Option<u64>,
) -> Result<Escalate, String> {
    let wait = Escalate::Wait(
        timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(st.opts.escalate_timeout)
            .min(Duration::from_secs(300)),
    );
    match mode {
        None => Ok(if svc.has_llm() { wait } else { Escalate::Off }),
        Some("off") | Some("none") => Ok(Escalate::Off),
        Some("wait") => Ok(wait),
        Some("async") => Ok(Escalate::Async),
        Some(other) => Err(format!(
            "escalate must be off, wait or async, not `{}`",
            other.chars().take(40).collect::<String>()
        )),
    }
}

/// Longest id the service accepts (ids are kept while their item is pending and echoed in
/// every answer).
pub const MAX_ID_BYTES: usize = 256;

/// A request's conversations as rows: each item parsed like an input line; a bad item is an
/// error row, never the whole request.
///
/// Ids: an item without one (or with `null`) gets a unique generated id; an id must be a
/// non-empty string of at most [`MAX_ID_BYTES`] (a number is refused: `7` and `"7"` would be
/// one id in the result log), otherwise the item is an error row under a generated id.
fn rows_of(st: &AppState, items: &[Value]) -> Vec<crate::conversation::Row> {
    let cols = crate::input::Columns::default();
    let stamp = format!("{:016x}", fastrand::u64(..));
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let generated = format!("req-{stamp}-{i}");
            let mut row = match v {
                Value::Object(o) => {
                    let mut r = crate::input::row_from_json(o, i as u64, "req", &cols);
                    let bad = match o.get(&cols.id) {
                        None | Some(Value::Null) => {
                            r.id = generated.clone();
                            None
                        }
                        Some(Value::String(s)) if s.trim().is_empty() => {
                            Some("the id is empty: send a non-empty string, or no id (one is generated)".to_string())
                        }
                        Some(Value::String(s)) if s.len() > MAX_ID_BYTES => Some(format!(
                            "the id is {} bytes, over the limit of {MAX_ID_BYTES}: send a shorter id",
                            s.len()
                        )),
                        Some(Value::String(_)) => None,
                        Some(other) => Some(format!(
                            "ids must be strings (a {} was sent): send \"{}\"",
                            match other {
                                Value::Number(_) => "number",
                                Value::Bool(_) => "boolean",
                                Value::Array(_) => "list",
                                _ => "object",
                            },
                            other.to_string().chars().take(40).collect::<String>().replace('"', "")
                        )),
                    };
                    if let Some(msg) = bad {
                        r.id = generated;
                        r.content = Err(msg);
                    }
                    r
                }
                Value::String(s) => crate::conversation::Row {
                    index: i as u64,
                    id: generated,
                    content: Ok(crate::conversation::Content::Text(s.clone())),
                    label: None,
                    passthrough: Vec::new(),
                },
                _ => crate::conversation::Row {
                    index: i as u64,
                    id: generated,
                    content: Err(format!(
                        "item {i} is not a conversation: send an object with `text` or `messages`"
                    )),
                    label: None,
                    passthrough: Vec::new(),
                },
            };
            row.label = None;
            if let Ok(c) = &row.content {
                let n = c.char_len();
                if n > st.opts.max_text_bytes {
                    row.content = Err(format!(
                        "the conversation is {n} bytes, over this server's limit of {} (--max-text-bytes)",
                        st.opts.max_text_bytes
                    ));
                }
            }
            row
        })
        .collect()
}

// The error is the response to return at once: a handler's early exit, not an error value
// passed around (boxing it would buy nothing).
#[allow(clippy::result_large_err)]
fn json_body(body: &[u8]) -> Result<Value, Response> {
    // A body saved by an editor that writes a byte-order mark is still JSON to its sender.
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    serde_json::from_slice(body).map_err(|e| {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the body is not JSON ({e})"),
        )
    })
}

async fn classify(
    State(st): State<Shared>,
    q: Result<Query<ClassifyQuery>, QueryRejection>,
    body: axum::body::Bytes,
) -> Response {
    let svc = match serving(&st) {
        Ok(s) => s.clone(),
        Err(r) => return r,
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "bad query parameters ({}): escalate=off|wait|async, timeout_ms=<milliseconds>",
                    e.body_text()
                ),
            )
        }
    };
    let v = match json_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (items, single, mode, timeout) = match v {
        Value::Array(a) => (a, false, q.escalate, q.timeout_ms),
        Value::Object(mut o) if o.get("items").is_some_and(Value::is_array) => {
            let mode = q.escalate.or_else(|| {
                o.get("escalate")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            });
            let timeout = q
                .timeout_ms
                .or_else(|| o.get("timeout_ms").and_then(Value::as_u64));
            let Some(Value::Array(a)) = o.remove("items") else {
                unreachable!("checked above")
            };
            (a, false, mode, timeout)
        }
        Value::Object(o) => (vec![Value::Object(o)], true, q.escalate, q.timeout_ms),
        _ => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "send a conversation object (`text` or `messages`), a list of them, or {\"items\": [...]}",
            )
        }
    };
    if items.is_empty() {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the list holds no conversation",
        );
    }
    if items.len() > st.opts.max_items {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} conversations in one request; this server takes at most {} (--max-items): split the list",
                items.len(),
                st.opts.max_items
            ),
        );
    }
    let escalate = match parse_escalate(&svc, &st, mode.as_deref(), timeout) {
        Ok(e) => e,
        Err(m) => return error(StatusCode::UNPROCESSABLE_ENTITY, m),
    };
    let rows = rows_of(&st, &items);
    if single {
        if let Err(e) = &rows[0].content {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("no conversation: {e}"),
            );
        }
    }
    match svc.classify(rows, escalate).await {
        Ok(mut out) => {
            let pending = out.iter().any(|r| r["status"] == "pending");
            let code = if pending {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            let body = if single {
                out.swap_remove(0)
            } else {
                json!({"results": out})
            };
            (code, axum::Json(body)).into_response()
        }
        Err(e) => serve_error(e),
    }
}

async fn result(State(st): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    let svc = match serving(&st) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match svc.result(&id) {
        Some(AsyncStatus::Done(mut v)) => {
            v["status"] = "done".into();
            axum::Json(v).into_response()
        }
        Some(AsyncStatus::Stored) => axum::Json(json!({
            "id": id,
            "status": "done",
            "stored": true,
            "message": "resolved in an earlier run or long ago: the row is in the result log",
        }))
        .into_response(),
        Some(AsyncStatus::Pending) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({"id": id, "status": "pending"})),
        )
            .into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no async item has this id (results are kept for ids sent with escalate=async)",
        ),
    }
}

async fn embeddings(State(st): State<Shared>, body: axum::body::Bytes) -> Response {
    let svc = match serving(&st) {
        Ok(s) => s.clone(),
        Err(r) => return r,
    };
    let v = match json_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let texts: Vec<String> = match v.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(Value::Array(_)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "`input` must be a string or a list of strings (token arrays are not accepted)",
            )
        }
        _ => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "`input` (a string or a list of strings) is required",
            )
        }
    };
    if texts.is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "`input` is empty");
    }
    if texts.len() > st.opts.max_items {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} inputs in one request; this server takes at most {} (--max-items)",
                texts.len(),
                st.opts.max_items
            ),
        );
    }
    let base64 = match v.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "encoding_format must be float or base64",
            )
        }
    };
    let info = svc.info();
    if let Some(d) = v.get("dimensions").and_then(Value::as_u64) {
        if d as usize != info.dims {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("this model gives {}-dimensional vectors only", info.dims),
            );
        }
    }
    let rows: Vec<crate::conversation::Row> = texts
        .into_iter()
        .enumerate()
        .map(|(i, t)| crate::conversation::Row {
            index: i as u64,
            id: i.to_string(),
            content: if t.len() > st.opts.max_text_bytes {
                Err(format!(
                    "input {i} is {} bytes, over this server's limit of {} (--max-text-bytes)",
                    t.len(),
                    st.opts.max_text_bytes
                ))
            } else {
                Ok(crate::conversation::Content::Text(t))
            },
            label: None,
            passthrough: Vec::new(),
        })
        .collect();
    let bad: Vec<(usize, String)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.content.as_ref().err().map(|e| (i, e.clone())))
        .collect();
    if let Some((_, e)) = bad.first() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, e.clone());
    }
    let out = match svc.embed(rows).await {
        Ok(o) => o,
        Err(e) => return serve_error(e),
    };
    let mut data = Vec::with_capacity(out.len());
    let mut tokens = 0usize;
    for (i, r) in out.into_iter().enumerate() {
        match r {
            Ok((vector, n)) => {
                tokens += n;
                let embedding = if base64 {
                    use base64::Engine;
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(vector)
                };
                data.push(json!({"object": "embedding", "index": i, "embedding": embedding}));
            }
            Err(e) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("input {i} cannot be embedded: {e}"),
                )
            }
        }
    }
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": info.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn reload(State(st): State<Shared>) -> Response {
    let svc = match serving(&st) {
        Ok(s) => s.clone(),
        Err(r) => return r,
    };
    match tokio::task::spawn_blocking(move || svc.reload()).await {
        Ok(Ok(r)) => axum::Json(serde_json::to_value(r).unwrap_or(Value::Null)).into_response(),
        Ok(Err(e)) => error(
            StatusCode::CONFLICT,
            format!("the index was not reloaded ({e}); the previous one keeps serving"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("reload: {e}")),
    }
}

async fn metrics(State(st): State<Shared>) -> Response {
    let text = render_metrics(&st);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Body::from(text))
        .expect("metrics response")
}

fn render_metrics(st: &AppState) -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = String::new();
    let m = st.metrics.lock().expect("metrics");
    let _ = writeln!(
        s,
        "# HELP semtel_http_requests_total HTTP requests by route and status."
    );
    let _ = writeln!(s, "# TYPE semtel_http_requests_total counter");
    for ((route, code), n) in &m.requests {
        let _ = writeln!(
            s,
            "semtel_http_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
        );
    }
    let _ = writeln!(
        s,
        "# HELP semtel_http_request_duration_seconds Request latency by route."
    );
    let _ = writeln!(s, "# TYPE semtel_http_request_duration_seconds histogram");
    for (route, h) in &m.latency {
        let mut cum = 0;
        for (b, n) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
            cum += n;
            let _ = writeln!(
                s,
                "semtel_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {cum}"
            );
        }
        let _ = writeln!(
            s,
            "semtel_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(
            s,
            "semtel_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
            h.sum
        );
        let _ = writeln!(
            s,
            "semtel_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
            h.count
        );
    }
    drop(m);
    let in_flight = st.opts.max_concurrent_requests - st.permits.available_permits();
    let ready = st.svc.get().is_some_and(Service::is_ready);
    for (name, help, v) in [
        (
            "semtel_in_flight_requests",
            "Requests in progress.",
            in_flight as f64,
        ),
        (
            "semtel_open_connections",
            "HTTP connections open now.",
            st.connections.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "semtel_ready",
            "1 when serving.",
            f64::from(u8::from(ready)),
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let Some(svc) = st.svc.get() else {
        return s;
    };
    let c = svc.counters();
    let _ = writeln!(
        s,
        "# HELP semtel_rows_total Classified rows by who decided."
    );
    let _ = writeln!(s, "# TYPE semtel_rows_total counter");
    for (k, v) in [
        ("knn", &c.rows_knn),
        ("escalate", &c.rows_escalated),
        ("llm", &c.rows_llm),
        ("error", &c.rows_error),
    ] {
        let _ = writeln!(
            s,
            "semtel_rows_total{{decided_by=\"{k}\"}} {}",
            v.load(Relaxed)
        );
    }
    let _ = writeln!(s, "# HELP semtel_batch_rows Rows per micro-batch.");
    let _ = writeln!(s, "# TYPE semtel_batch_rows histogram");
    let mut cum = 0;
    for (b, n) in crate::app::serve::Counters::BATCH_BUCKETS
        .iter()
        .zip(&c.batch_size_buckets)
    {
        cum += n.load(Relaxed);
        let _ = writeln!(s, "semtel_batch_rows_bucket{{le=\"{b}\"}} {cum}");
    }
    let batches = c.batches.load(Relaxed);
    let _ = writeln!(s, "semtel_batch_rows_bucket{{le=\"+Inf\"}} {batches}");
    let _ = writeln!(s, "semtel_batch_rows_sum {}", c.batch_rows.load(Relaxed));
    let _ = writeln!(s, "semtel_batch_rows_count {batches}");
    let _ = writeln!(
        s,
        "# HELP semtel_pause_steps_total Micro-batches of small requests run between the layers of a long one.\n# TYPE semtel_pause_steps_total counter\nsemtel_pause_steps_total {}",
        c.pause_steps.load(Relaxed)
    );
    let gauges = [
        (
            "semtel_queue_depth",
            "Requests waiting for the compute thread.",
            c.queue_depth.load(Relaxed) as f64,
        ),
        (
            "semtel_llm_pending_rows",
            "Rows waiting for the LLM tier.",
            c.llm_pending.load(Relaxed) as f64,
        ),
        (
            "semtel_index_exemplars",
            "Exemplars in the served index (with those learned since the last save).",
            svc.index_size() as f64,
        ),
        (
            "semtel_async_journal_lines",
            "Lines in the journal of accepted async items (compacted as items finish).",
            svc.journal_lines().unwrap_or(0) as f64,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    }
    let counters = [
        (
            "semtel_llm_tokens_in_total",
            "Prompt tokens the LLM tier was billed.",
            c.llm_tokens_in.load(Relaxed) as f64,
        ),
        (
            "semtel_llm_tokens_out_total",
            "Completion tokens the LLM tier was billed.",
            c.llm_tokens_out.load(Relaxed) as f64,
        ),
        (
            "semtel_llm_cost_usd_total",
            "LLM cost (endpoint prices).",
            c.llm_cost_micro_usd.load(Relaxed) as f64 / 1e6,
        ),
        (
            "semtel_llm_wait_timeouts_total",
            "escalate=wait items answered with the kNN decision at their deadline.",
            c.llm_timeouts.load(Relaxed) as f64,
        ),
        (
            "semtel_async_accepted_total",
            "Items accepted with escalate=async.",
            c.async_accepted.load(Relaxed) as f64,
        ),
        (
            "semtel_async_resumed_total",
            "Journaled async items resumed at start.",
            c.async_resumed.load(Relaxed) as f64,
        ),
        (
            "semtel_reloads_total",
            "Index reloads since start.",
            svc.info().reloads as f64,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
    let _ = writeln!(
        s,
        "# HELP semtel_redacted_entities_total Personal data replaced before text left, by type.\n# TYPE semtel_redacted_entities_total counter"
    );
    if let Ok(c) = c.redacted.lock() {
        for (k, v) in &c.0 {
            let _ = writeln!(s, "semtel_redacted_entities_total{{type=\"{k}\"}} {v}");
        }
    }
    let _ = writeln!(
        s,
        "# HELP semtel_audit_rows_total Kept rows also asked of the LLM (--audit-rate), by its verdict.\n# TYPE semtel_audit_rows_total counter"
    );
    for (i, v) in ["agree", "disagree", "missing"].iter().enumerate() {
        let _ = writeln!(
            s,
            "semtel_audit_rows_total{{verdict=\"{v}\"}} {}",
            c.audit[i].load(Relaxed)
        );
    }
    if let Some(g) = svc.guards() {
        let r = g.snapshot();
        let _ = writeln!(
            s,
            "# HELP semtel_guard_tripped Segments (label or language) whose audited agreement with the LLM fell below the promise: 1 while their rows are escalated.\n# TYPE semtel_guard_tripped gauge"
        );
        for (name, seg) in &r.segments {
            let _ = writeln!(
                s,
                "semtel_guard_tripped{{segment=\"{}\"}} {}",
                name.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', " "),
                u8::from(seg.tripped)
            );
        }
        let _ = writeln!(
            s,
            "# HELP semtel_guard_trips_total Guard trips since start.\n# TYPE semtel_guard_trips_total counter\nsemtel_guard_trips_total {}",
            r.trips
        );
        let _ = writeln!(
            s,
            "# HELP semtel_language_probation Languages the exemplars do not cover whose rows all go to the LLM until their own threshold is learned: 1 while on probation.\n# TYPE semtel_language_probation gauge"
        );
        for l in &r.probation {
            let _ = writeln!(s, "semtel_language_probation{{lang=\"{l}\"}} 1");
        }
        let _ = writeln!(
            s,
            "# HELP semtel_language_threshold Confidence a language's rows need to be kept, learned from the LLM's answers on its rows (absent: the index's threshold; +Inf: none kept yet).\n# TYPE semtel_language_threshold gauge"
        );
        for (l, t) in &r.learned_language_thresholds {
            if *t < crate::guard::KEEP_NONE {
                let _ = writeln!(s, "semtel_language_threshold{{lang=\"{l}\"}} {t}");
            } else {
                let _ = writeln!(s, "semtel_language_threshold{{lang=\"{l}\"}} +Inf");
            }
        }
    }
    s
}

/// Serves the routes on `listener` until `shutdown` resolves. Every route but `/health`
/// answers 503 until `svc` is set; SIGHUP reloads the index once it is.
///
/// Then: no new connection is accepted, connections with no request in a handler close at
/// once (a half-sent head or body is cut), the requests in handlers get `shutdown_timeout` to
/// finish, and whatever remains is cut; only then does this return.
pub async fn run(
    listener: tokio::net::TcpListener,
    svc: Arc<OnceLock<Service>>,
    opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let svc = svc.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                let Some(s) = svc.get().cloned() else {
                    tracing::warn!("SIGHUP while starting: nothing to reload yet");
                    continue;
                };
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(r)) => tracing::info!(
                        "SIGHUP: index reloaded ({} exemplars, {} labels, {:.2} s)",
                        r.exemplars,
                        r.labels,
                        r.seconds
                    ),
                    Ok(Err(e)) => tracing::error!(
                        "SIGHUP: the index was not reloaded ({e}); the previous one keeps serving"
                    ),
                    Err(e) => tracing::error!("SIGHUP reload: {e}"),
                }
            }
        });
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(Stop::Running);
    let max_connections = opts.max_connections.max(1);
    let header_timeout = opts.header_timeout;
    let shutdown_timeout = opts.shutdown_timeout;
    let st = state(svc, opts, stop_rx.clone());
    let app = router_with(st.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        // A free connection slot first: at the limit, new connections wait in the backlog.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            s = slots.clone().acquire_owned() => s.expect("never closed"),
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, say: wait for connections to close.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            app.clone(),
            st.clone(),
            slot,
            stop_rx.clone(),
            header_timeout,
        ));
    }
    drop(listener);
    let _ = stop_tx.send(Stop::Draining);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(shutdown_timeout, slots.acquire_many(all)).await;
    if drained.is_err() {
        let _ = stop_tx.send(Stop::Now);
        tracing::warn!(
            "shutdown: requests still in progress after {} s were cut",
            shutdown_timeout.as_secs_f64()
        );
        // The connections end at their next poll; give them a moment to say so.
        let _ = tokio::time::timeout(Duration::from_secs(2), slots.acquire_many(all)).await;
    }
    Ok(())
}

/// One connection: HTTP/1.1 with the head timeout, counted against the connection limit
/// (`slot`), closed early at shutdown unless a request is in a handler.
async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    st: Shared,
    slot: tokio::sync::OwnedSemaphorePermit,
    mut stop: tokio::sync::watch::Receiver<Stop>,
    header_timeout: Duration,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;
    st.connections.fetch_add(1, Ordering::Relaxed);
    let busy = Arc::new(AtomicUsize::new(0));
    let in_handler = busy.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        let busy = in_handler.clone();
        busy.fetch_add(1, Ordering::SeqCst);
        async move {
            let r = app.oneshot(req.map(Body::new)).await;
            busy.fetch_sub(1, Ordering::SeqCst);
            r
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(conn);
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            changed = stop.changed() => {
                let now = if changed.is_err() { Stop::Now } else { *stop.borrow_and_update() };
                match now {
                    Stop::Running => {}
                    // A request in a handler finishes (its response is sent, then the
                    // connection closes); nothing else is worth waiting for.
                    Stop::Draining if busy.load(Ordering::SeqCst) > 0 => {
                        conn.as_mut().graceful_shutdown();
                    }
                    Stop::Draining | Stop::Now => break,
                }
            }
        }
    }
    st.connections.fetch_sub(1, Ordering::Relaxed);
    drop(slot);
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison_is_exact() {
        let k = digest(b"secret-key");
        assert!(same(&k, &digest(b"secret-key")));
        assert!(!same(&k, &digest(b"secret-kez")));
        assert!(!same(&k, &digest(b"")));
    }
}
