//! One OpenAI-compatible chat endpoint over HTTP (reqwest): request shapes for OpenAI-style
//! servers and Azure OpenAI, and a classification of every failure (rate limited, server error,
//! timeout, network, bad reply, fatal) with the rate-limit headers the orchestrator adapts to.
//! It holds the API key but never prints or logs it; it never retries (the orchestrator does).

use super::config::{EndpointConfig, EndpointKind};
use super::prompty::Message;
use crate::{Error, Result};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub parameters: serde_json::Map<String, serde_json::Value>,
    pub max_tokens: u32,
}

/// Rate-limit information a server sent back.
#[derive(Debug, Clone, Default)]
pub struct RateInfo {
    /// The endpoint's stated limits per minute (`x-ratelimit-limit-*`, OpenAI).
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
    pub retry_after: Option<Duration>,
    /// `retry_after` came from a whole-seconds `Retry-After` alone (rounded up: the real
    /// wait may be much shorter).
    pub retry_after_coarse: bool,
}

#[derive(Debug, Clone)]
pub struct ChatResponse {
    pub content: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub latency: Duration,
    pub rate: RateInfo,
}

#[derive(Debug, Clone)]
pub enum CallError {
    /// 429: slow down, retry later.
    RateLimited(RateInfo),
    /// 429 saying the account's quota or credit is used up: waiting cannot help.
    QuotaExhausted(String),
    /// 5xx or an overloaded server: retry, maybe elsewhere.
    Server(u16, String),
    /// No complete answer within the call's deadline (headers *and* body).
    Timeout,
    /// Connection refused/reset and the like.
    Network(String),
    /// 2xx but not a chat completion we can read.
    BadResponse(String),
    /// 2xx with a body that is not JSON at all (an HTML login or error page): the URL points
    /// at something other than the API.
    NotTheApi(String),
    /// 400/413/422: this request was refused as it is; the same bytes will be refused again.
    Refused(u16, String),
    /// 401/403/404 and other 4xx (bad key, unknown model or deployment): retrying cannot help.
    Fatal(u16, String),
}

impl CallError {
    /// Whether sending the same request again later could succeed.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            CallError::RateLimited(_)
                | CallError::Server(..)
                | CallError::Timeout
                | CallError::Network(_)
                | CallError::BadResponse(_)
        )
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::RateLimited(_) => write!(f, "rate limited (429)"),
            CallError::QuotaExhausted(m) => write!(f, "quota exhausted (429): {m}"),
            CallError::Server(s, m) => write!(f, "server error {s}: {m}"),
            CallError::Timeout => write!(f, "timed out"),
            CallError::Network(m) => write!(f, "network error: {m}"),
            CallError::BadResponse(m) => write!(f, "unreadable response: {m}"),
            CallError::NotTheApi(m) => write!(f, "the reply is not an API response: {m}"),
            CallError::Refused(s, m) => write!(f, "request refused ({s}): {m}"),
            CallError::Fatal(s, m) => write!(f, "request refused ({s}): {m}"),
        }
    }
}

/// The LLM behind one endpoint.
pub trait LlmClient: Send + Sync {
    fn name(&self) -> &str;
    fn model(&self) -> &str;
    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, std::result::Result<ChatResponse, CallError>>;
}

/// A key that refuses to show itself in debug output.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

pub struct HttpClient {
    cfg: EndpointConfig,
    url: String,
    key: Option<Secret>,
    http: reqwest::Client,
    /// Every credential this client knows (the key, credential values in the URL): scrubbed
    /// from each error message it returns.
    secrets: Vec<String>,
    /// `--show-sent`: where every body sent is recorded.
    sent: Option<std::sync::Arc<SentLog>>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("endpoint", &self.cfg.name)
            .field("url", &super::redact::redact(&self.url, &self.secrets))
            .finish_non_exhaustive()
    }
}

/// The request URL for an endpoint. A query string in the configured URL (some gateways take
/// their key or routing there) stays a query string: the path is extended before it.
pub fn chat_url(cfg: &EndpointConfig) -> String {
    let (path, query) = match cfg.url.split_once('?') {
        Some((p, q)) => (p, Some(q).filter(|q| !q.is_empty())),
        None => (cfg.url.as_str(), None),
    };
    let base = path.trim_end_matches('/');
    let with_query = |url: String, extra: Option<String>| -> String {
        let parts: Vec<String> = query.map(str::to_string).into_iter().chain(extra).collect();
        if parts.is_empty() {
            url
        } else {
            format!("{url}?{}", parts.join("&"))
        }
    };
    match cfg.kind {
        EndpointKind::Openai => {
            let url = if base.ends_with("/chat/completions") {
                base.to_string()
            } else {
                format!("{base}/chat/completions")
            };
            with_query(url, None)
        }
        EndpointKind::Azure => {
            let dep = cfg.deployment.as_deref().unwrap_or("");
            let base = if base.contains("/openai/deployments/") {
                base.to_string()
            } else {
                format!("{base}/openai/deployments/{dep}")
            };
            let url = if base.ends_with("/chat/completions") {
                base
            } else {
                format!("{base}/chat/completions")
            };
            let has_version =
                query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("api-version=")));
            with_query(
                url,
                (!has_version).then(|| format!("api-version={}", cfg.api_version)),
            )
        }
    }
}

/// `--show-sent`: every request body exactly as it leaves, one JSON line per request
/// (endpoint, URL without its query, body). Headers are not written, so no key is.
pub struct SentLog {
    path: std::path::PathBuf,
    file: std::sync::Mutex<std::fs::File>,
}

impl SentLog {
    pub fn open(path: &std::path::Path) -> Result<SentLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(SentLog {
            path: path.to_path_buf(),
            file: std::sync::Mutex::new(file),
        })
    }

    fn record(&self, endpoint: &str, url: &str, body: &serde_json::Value) {
        use std::io::Write;
        let url = url.split('?').next().unwrap_or(url);
        let line = serde_json::json!({"endpoint": endpoint, "url": url, "body": body});
        if let Ok(mut f) = self.file.lock() {
            if let Err(e) = writeln!(f, "{line}") {
                tracing::warn!("--show-sent: cannot write {}: {e}", self.path.display());
            }
        }
    }
}

impl HttpClient {
    /// Records every body this client sends in `log` (`--show-sent`).
    pub fn with_sent_log(mut self, log: Option<std::sync::Arc<SentLog>>) -> Self {
        self.sent = log;
        self
    }

    pub fn new(cfg: &EndpointConfig) -> Result<Self> {
        let key = match &cfg.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(Secret(k)),
                _ => {
                    return Err(Error::Config(format!(
                        "endpoint `{}`: environment variable {var} (api_key_env) is not set",
                        cfg.name
                    )))
                }
            },
            None => None,
        };
        // reqwest is built without a bundled crypto provider; use ring (ignore "already set").
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(cfg.max_concurrency.max(4))
            .build()
            .map_err(|e| Error::Llm(format!("building the HTTP client: {e}")))?;
        let url = chat_url(cfg);
        let mut secrets = super::redact::url_secrets(&url);
        if let Some(k) = &key {
            secrets.push(k.0.clone());
        }
        Ok(HttpClient {
            url,
            cfg: cfg.clone(),
            key,
            http,
            secrets,
            sent: None,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `e` with this client's credentials (and anything that looks like one) masked.
    fn scrub(&self, e: CallError) -> CallError {
        let r = |m: String| super::redact::redact(&m, &self.secrets);
        match e {
            CallError::Server(s, m) => CallError::Server(s, r(m)),
            CallError::Network(m) => CallError::Network(r(m)),
            CallError::BadResponse(m) => CallError::BadResponse(r(m)),
            CallError::NotTheApi(m) => CallError::NotTheApi(r(m)),
            CallError::QuotaExhausted(m) => CallError::QuotaExhausted(r(m)),
            CallError::Refused(s, m) => CallError::Refused(s, r(m)),
            CallError::Fatal(s, m) => CallError::Fatal(s, r(m)),
            other => other,
        }
    }

    fn body(&self, req: &ChatRequest) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        if self.cfg.kind == EndpointKind::Openai {
            body.insert("model".into(), self.cfg.model.clone().into());
        }
        body.insert(
            "messages".into(),
            serde_json::to_value(&req.messages).expect("messages serialise"),
        );
        for (k, v) in &req.parameters {
            body.insert(k.clone(), v.clone());
        }
        body.entry("max_tokens").or_insert(req.max_tokens.into());
        serde_json::Value::Object(body)
    }
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Parses OpenAI's reset durations ("1s", "6m0s", "250ms", "1h2m3.5s") or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return (secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += v * unit;
        any = true;
    }
    (any && num.is_empty()).then(|| Duration::from_secs_f64(total))
}

pub fn rate_info(h: &reqwest::header::HeaderMap) -> RateInfo {
    let dur = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_duration)
    };
    RateInfo {
        limit_requests: header_u64(h, "x-ratelimit-limit-requests"),
        limit_tokens: header_u64(h, "x-ratelimit-limit-tokens"),
        remaining_requests: header_u64(h, "x-ratelimit-remaining-requests"),
        remaining_tokens: header_u64(h, "x-ratelimit-remaining-tokens"),
        reset_requests: dur("x-ratelimit-reset-requests"),
        reset_tokens: dur("x-ratelimit-reset-tokens"),
        retry_after: dur("retry-after-ms")
            .map(|d| d / 1000)
            .or_else(|| dur("retry-after")),
        retry_after_coarse: h.get("retry-after-ms").is_none()
            && h.get("retry-after").is_some()
            && h.get("x-ratelimit-reset-requests").is_none()
            && h.get("x-ratelimit-reset-tokens").is_none(),
    }
}

impl HttpClient {
    /// Posts a JSON body with the endpoint's auth header within `timeout`: (status, rate-limit
    /// headers, reply text). The one place a request leaves semtel.
    async fn send(
        &self,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> std::result::Result<(u16, RateInfo, String), CallError> {
        if let Some(log) = &self.sent {
            log.record(&self.cfg.name, &self.url, body);
        }
        let mut rb = self.http.post(&self.url).json(body);
        if let Some(k) = &self.key {
            rb = match self.cfg.kind {
                EndpointKind::Openai => rb.bearer_auth(&k.0),
                EndpointKind::Azure => rb.header("api-key", &k.0),
            };
        }
        let fut = async {
            let resp = rb.send().await.map_err(|e| {
                if e.is_timeout() {
                    CallError::Timeout
                } else {
                    CallError::Network(e.to_string())
                }
            })?;
            let status = resp.status().as_u16();
            let rate = rate_info(resp.headers());
            let text = resp
                .text()
                .await
                .map_err(|e| CallError::Network(e.to_string()))?;
            Ok::<_, CallError>((status, rate, text))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| CallError::Timeout)?
            .map_err(|e| self.scrub(e))
    }

    /// Posts a ready-made chat request body (a Batch API line's `body`), returning the HTTP
    /// status and the parsed JSON reply. Used by `semtel llm run-batch`.
    pub async fn post_raw(
        &self,
        mut body: serde_json::Value,
        timeout: Duration,
    ) -> std::result::Result<(u16, serde_json::Value, RateInfo), CallError> {
        if self.cfg.kind == EndpointKind::Azure {
            if let Some(o) = body.as_object_mut() {
                o.remove("model");
            }
        }
        let (status, rate, text) = self.send(&body, timeout).await?;
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, v, rate))
    }
}

impl LlmClient for HttpClient {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn model(&self) -> &str {
        &self.cfg.model
    }

    fn chat<'a>(
        &'a self,
        req: &'a ChatRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, std::result::Result<ChatResponse, CallError>> {
        Box::pin(async move {
            self.chat_inner(req, timeout)
                .await
                .map_err(|e| self.scrub(e))
        })
    }
}

impl HttpClient {
    async fn chat_inner(
        &self,
        req: &ChatRequest,
        timeout: Duration,
    ) -> std::result::Result<ChatResponse, CallError> {
        {
            let start = Instant::now();
            let (status, rate, text) = self.send(&self.body(req), timeout).await?;
            let short = |t: &str| t.chars().take(300).collect::<String>();
            match status {
                200..=299 => {}
                429 if text.contains("insufficient_quota") || text.contains("quota_exceeded") => {
                    return Err(CallError::QuotaExhausted(short(&text)))
                }
                429 => return Err(CallError::RateLimited(rate)),
                408 | 409 | 425 | 500..=599 => return Err(CallError::Server(status, short(&text))),
                400 | 413 | 422 => return Err(CallError::Refused(status, short(&text))),
                _ => return Err(CallError::Fatal(status, short(&text))),
            }
            let v: serde_json::Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) if text.trim_start().starts_with('{') => {
                    return Err(CallError::BadResponse(format!("{e}: {}", short(&text))))
                }
                Err(_) => return Err(CallError::NotTheApi(short(&text))),
            };
            let content = v["choices"][0]["message"]["content"]
                .as_str()
                .ok_or_else(|| {
                    CallError::BadResponse(format!(
                        "no choices[0].message.content: {}",
                        short(&text)
                    ))
                })?
                .to_string();
            Ok(ChatResponse {
                content,
                prompt_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as u32,
                completion_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0) as u32,
                latency: start.elapsed(),
                rate,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(kind: EndpointKind, url: &str) -> EndpointConfig {
        EndpointConfig {
            name: "e".into(),
            kind,
            url: url.into(),
            model: "m".into(),
            deployment: Some("dep".into()),
            api_version: "2024-10-21".into(),
            api_key_env: None,
            weight: 1.0,
            rpm: 0,
            tpm: 0,
            price_in_per_1k: 0.0,
            price_out_per_1k: 0.0,
            max_concurrency: 8,
        }
    }

    #[test]
    fn url_shapes() {
        assert_eq!(
            chat_url(&ep(EndpointKind::Openai, "https://api.openai.com/v1/")),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(
            chat_url(&ep(EndpointKind::Azure, "https://r.openai.azure.com")),
            "https://r.openai.azure.com/openai/deployments/dep/chat/completions?api-version=2024-10-21"
        );
    }

    #[test]
    fn url_keeps_its_query_string() {
        assert_eq!(
            chat_url(&ep(
                EndpointKind::Openai,
                "https://gw.example/v1?api_key=XYZ"
            )),
            "https://gw.example/v1/chat/completions?api_key=XYZ"
        );
        assert_eq!(
            chat_url(&ep(EndpointKind::Openai, "https://gw.example/v1/?")),
            "https://gw.example/v1/chat/completions"
        );
        assert_eq!(
            chat_url(&ep(EndpointKind::Azure, "https://r.openai.azure.com?sig=abc")),
            "https://r.openai.azure.com/openai/deployments/dep/chat/completions?sig=abc&api-version=2024-10-21"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(format!("{:?}", Secret("sk-123".into())), "Secret(***)");
    }
}
