//! `semtel serve` end to end: the real binary on a free loopback port, spoken to over HTTP,
//! with the loopback LLM simulator (faults included) behind it. Every status code the service
//! answers, escalation (`wait`, its deadline, `async` with the result log), kill -9 and
//! resume of accepted `async` items, reload (HTTP and SIGHUP; a damaged index refused), the
//! API key, graceful shutdown, `/v1/embeddings`, `/metrics`, and hostile input (the
//! multilingual fixture, broken bodies, arbitrary text) through the service; and what one
//! client or a neighbour process must not be able to do: damage the served index's files,
//! leave traces of refused requests, hold shutdown with a half-sent request, lock others out
//! with slow or huge requests.

mod common;
use common::*;
use proptest::prelude::*;
use semtel::llm::simulator::{self, Faults, SimConfig, SimHandle};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn client() -> &'static reqwest::Client {
    static C: OnceLock<reqwest::Client> = OnceLock::new();
    C.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    })
}

/// One HTTP answer: status, headers, body.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

fn send(method: &str, url: &str, body: Option<Vec<u8>>, key: Option<&str>) -> Answer {
    rt().block_on(async {
        let mut r = match method {
            "GET" => client().get(url),
            _ => client().post(url),
        };
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        let resp = r.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("body").to_vec();
        Answer {
            status,
            headers,
            body,
        }
    })
}

/// A running `semtel serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
    key: Option<String>,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args(args)
            .args(["--addr", "127.0.0.1:0", "--model"])
            .arg(model_dir())
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env_remove("SEMTEL_API_KEY");
        let mut key = None;
        for (k, v) in env {
            cmd.env(k, v);
            if *k == "SEMTEL_API_KEY" {
                // What a client sends: the server trims whitespace around the key.
                key = Some(v.trim().to_string());
            }
        }
        let mut child = cmd.spawn().expect("start semtel serve");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(u) = l.strip_prefix("listening on ") {
                        break u.trim().to_string();
                    }
                }
                _ => panic!("semtel serve ended before listening"),
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, base, key }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> Answer {
        send("GET", &self.url(path), None, self.key.as_deref())
    }

    fn post(&self, path: &str, body: &Value) -> Answer {
        send(
            "POST",
            &self.url(path),
            Some(body.to_string().into_bytes()),
            self.key.as_deref(),
        )
    }

    fn post_raw(&self, path: &str, body: Vec<u8>) -> Answer {
        send("POST", &self.url(path), Some(body), self.key.as_deref())
    }

    /// Waits until `/ready` says 200.
    fn ready(self) -> Server {
        let t = Instant::now();
        loop {
            if send("GET", &self.url("/ready"), None, None).status == 200 {
                return self;
            }
            assert!(t.elapsed() < Duration::from_secs(120), "never ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// SIGTERM, then the exit status (graceful shutdown must end the process).
    fn terminate(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sim(cfg: SimConfig) -> SimHandle {
    simulator::start(cfg, 0).unwrap()
}

fn llm_config(dir: &Path, h: &SimHandle, extra: &str) -> PathBuf {
    let extra = format!(
        "max_item_wait_s = 30
{extra}"
    );
    common::sim_llm_config(&dir.join("llm.toml"), &h.url(), &extra)
}

fn truth_sim(latency_ms: f64, faults: Faults) -> SimHandle {
    let (truth, _) = sample_truth();
    sim(SimConfig {
        truth,
        latency_ms,
        jitter_ms: 0.0,
        faults,
        record_bodies: true,
        ..Default::default()
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn every_route_and_status_code() {
    let dir = tmpdir("serve-routes");
    let idx = sample_index(&dir);
    let h = truth_sim(5.0, Faults::default());
    let cfg = llm_config(&dir, &h, "");
    let srv = Server::start(
        &[
            "--index",
            s(&idx),
            "--llm",
            s(&cfg),
            "--max-items",
            "4",
            "--max-body-bytes",
            "65536",
            "--max-text-bytes",
            "4000",
        ],
        &[("SEMTEL_API_KEY", "test-key-123")],
    )
    .ready();
    let (_, rows) = sample_truth();

    // The key: /health and /ready are open; everything else needs it.
    let open = |path: &str| send("GET", &srv.url(path), None, None);
    assert_eq!(open("/health").status, 200);
    assert_eq!(open("/ready").status, 200);
    let denied = send(
        "POST",
        &srv.url("/v1/classify"),
        Some(json!({"text": "hi"}).to_string().into_bytes()),
        None,
    );
    assert_eq!(denied.status, 401);
    assert_eq!(denied.headers["www-authenticate"], "Bearer");
    let wrong = send("GET", &srv.url("/info"), None, Some("test-key-124"));
    assert_eq!(wrong.status, 401);
    assert!(
        !wrong.text().contains("test-key"),
        "the key is never echoed"
    );

    // /info says what is served.
    let info = srv.get("/info").json();
    assert_eq!(info["exemplars"], 100);
    assert_eq!(info["labels"].as_array().unwrap().len(), 10);
    assert!(info["model"].as_str().unwrap().contains("MiniLM"));
    assert!(info["threshold"].is_number() && info["signal"].is_string());
    assert_eq!(info["llm"], true);
    assert!(info["version"].is_string());

    // One conversation: the output row's fields.
    let (id, text, label) = &rows[0];
    let a = srv.post(
        "/v1/classify?escalate=off",
        &json!({"id": id, "text": text}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let r = a.json();
    assert_eq!(r["id"], id.as_str());
    for f in [
        "label",
        "confidence",
        "decided_by",
        "knn_label",
        "lang",
        "neighbors",
        "escalate_reason",
    ] {
        assert!(r.get(f).is_some(), "field {f} missing: {r}");
    }
    assert_eq!(
        r["knn_label"],
        label.as_str(),
        "the sample's first row is an easy one"
    );

    // OpenAI-style messages, a list with a bad item: per-item errors, the rest answered.
    let a = srv.post(
        "/v1/classify?escalate=off",
        &json!([
            {"id": "m1", "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "How do I fix a borrow checker error in Rust?"}]},
            42,
            {"id": "long", "text": "x".repeat(5000)},
            {"id": "empty", "text": ""},
        ]),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let out = a.json()["results"].as_array().unwrap().clone();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0]["id"], "m1");
    assert_ne!(out[0]["decided_by"], "error");
    assert_eq!(out[1]["decided_by"], "error");
    assert_eq!(out[2]["decided_by"], "error");
    assert!(out[2]["error"].as_str().unwrap().contains("max-text-bytes"));
    assert_eq!(out[3]["decided_by"], "error");

    // 422: not JSON, no conversation, an empty list, a bad escalate mode.
    for body in [
        b"{not json".to_vec(),
        b"\xff\xfe\x00".to_vec(),
        json!({}).to_string().into_bytes(),
        json!({"texts": "hi"}).to_string().into_bytes(),
        json!([]).to_string().into_bytes(),
        json!("just a string").to_string().into_bytes(),
    ] {
        let a = srv.post_raw("/v1/classify", body.clone());
        assert_eq!(
            a.status,
            422,
            "{:?}: {}",
            String::from_utf8_lossy(&body),
            a.text()
        );
        assert!(a.json()["error"]["message"].is_string());
    }
    assert_eq!(
        srv.post("/v1/classify?escalate=later", &json!({"text": "hi"}))
            .status,
        422
    );

    // 413: too many items, too large a body.
    let five: Vec<Value> = (0..5).map(|i| json!({"text": format!("t{i}")})).collect();
    assert_eq!(srv.post("/v1/classify", &json!(five)).status, 413);
    let big = json!({"text": "y".repeat(70_000)});
    assert_eq!(srv.post("/v1/classify", &big).status, 413);

    // escalate=wait (the default with an LLM): the LLM's answer for the uncertain items.
    let hard: Vec<Value> = rows[..4]
        .iter()
        .map(|(i, t, _)| json!({"id": i, "text": t}))
        .collect();
    let a = srv.post(
        "/v1/classify?escalate=wait&timeout_ms=20000",
        &json!({"items": hard}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    for (r, (i, _, l)) in a.json()["results"].as_array().unwrap().iter().zip(&rows) {
        assert_eq!(r["id"], i.as_str());
        if r["decided_by"] == "llm" {
            assert_eq!(r["label"], l.as_str(), "the simulator answers the truth");
            assert_eq!(r["llm_model"], "sim-1");
        } else {
            assert_eq!(r["decided_by"], "knn", "{r}");
        }
    }

    // async without a result log: 422 saying what to do.
    let a = srv.post("/v1/classify?escalate=async", &json!({"text": "hi"}));
    assert_eq!(a.status, 422);
    assert!(a.text().contains("--results"));
    assert_eq!(srv.get("/v1/results/nope").status, 404);

    // Embeddings, OpenAI-compatible: float and base64 give the same vectors.
    let a = srv.post(
        "/v1/embeddings",
        &json!({"model": "any", "input": ["hello world", "你好，世界", "مرحبا"]}),
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let e = a.json();
    assert_eq!(e["object"], "list");
    let data = e["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let v0: Vec<f32> = data[0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(v0.len(), 384);
    let norm: f32 = v0.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3);
    assert!(e["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
    let b = srv
        .post(
            "/v1/embeddings",
            &json!({"input": "hello world", "encoding_format": "base64"}),
        )
        .json();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let v1: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(cosine(&v0, &v1) > 0.99999);
    // The same vector the library gives for the same text.
    let enc = semtel::embed::Encoder::load(&semtel::embed::EncoderOptions {
        model: Some(model_dir().display().to_string()),
        ..Default::default()
    })
    .unwrap();
    let mut lib = enc.embed_texts(&["hello world"]).unwrap();
    semtel::embed::normalize_rows(&mut lib, 384);
    assert!(cosine(&v0, &lib) > 0.9999);
    for bad in [
        json!({"input": [1, 2, 3]}),
        json!({"model": "x"}),
        json!({"input": "x", "encoding_format": "int8"}),
        json!({"input": "x", "dimensions": 128}),
    ] {
        assert_eq!(srv.post("/v1/embeddings", &bad).status, 422, "{bad}");
    }

    // Metrics: requests by route and code, latency, rows, batches, the index size.
    let m = srv.get("/metrics");
    assert_eq!(m.status, 200);
    let m = m.text();
    for want in [
        "semtel_http_requests_total{route=\"/v1/classify\",code=\"413\"} 2",
        "semtel_http_requests_total{route=\"/v1/classify\",code=\"401\"} 1",
        "semtel_http_request_duration_seconds_bucket{route=\"/v1/classify\",le=\"+Inf\"}",
        "semtel_rows_total{decided_by=\"error\"} 3",
        "semtel_batch_rows_count",
        "semtel_index_exemplars 100",
        "semtel_llm_tokens_in_total",
        "semtel_ready 1",
    ] {
        assert!(m.contains(want), "metrics lack `{want}`:\n{m}");
    }
    assert!(!m.contains("test-key"), "the key is never in the metrics");
    assert_eq!(srv.get("/nowhere").status, 404);
    assert!(srv.terminate().success());
}

#[test]
fn busy_starting_and_deadlines() {
    let dir = tmpdir("serve-busy");
    let idx = sample_index(&dir);
    // A slow LLM: 1.5 s per call.
    let h = truth_sim(1500.0, Faults::default());
    let cfg = llm_config(&dir, &h, "");
    let srv = Server::start(
        &[
            "--index",
            s(&idx),
            "--llm",
            s(&cfg),
            "--threshold",
            "2",
            "--max-concurrent-requests",
            "1",
        ],
        &[("SEMTEL_SERVE_START_DELAY_MS", "1500")],
    );
    // Starting: /health is up, the rest answers 503 with Retry-After.
    assert_eq!(srv.get("/health").status, 200);
    let a = srv.get("/ready");
    assert_eq!(a.status, 503);
    let a = srv.post("/v1/classify", &json!({"text": "hi"}));
    assert_eq!(a.status, 503);
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(srv.get("/info").status, 503);
    assert!(srv.get("/metrics").text().contains("semtel_ready 0"));
    let srv = srv.ready();

    // escalate=wait past its deadline: the kNN answer, marked escalate, in about the deadline.
    let t = Instant::now();
    let a = srv.post(
        "/v1/classify?escalate=wait&timeout_ms=200",
        &json!({"text": "I want to learn how to cook a proper risotto"}),
    );
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    let r = a.json();
    assert_eq!(r["decided_by"], "escalate");
    assert!(r["label"].is_null(), "undecided, as in output files: {r}");
    assert!(r["knn_label"].is_string(), "the vote's label is there: {r}");

    // One request in progress (waiting for the slow LLM): a second gets 429 + Retry-After.
    let url = srv.url("/v1/classify?escalate=wait&timeout_ms=5000");
    let slow = std::thread::spawn(move || {
        send(
            "POST",
            &url,
            Some(
                json!({"text": "plan a trip to Lisbon"})
                    .to_string()
                    .into_bytes(),
            ),
            None,
        )
        .status
    });
    std::thread::sleep(Duration::from_millis(300));
    let a = srv.post("/v1/classify?escalate=off", &json!({"text": "hello"}));
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(slow.join().unwrap(), 200);

    // What went to the LLM was redacted: the row and the metrics say so (never the value).
    let a = srv.post(
        "/v1/classify?escalate=wait&timeout_ms=8000",
        &json!({"text": "Please email the itinerary to ana.lopez@example.com before Friday"}),
    );
    let r = a.json();
    assert_eq!(r["decided_by"], "llm", "{r}");
    assert_eq!(r["redacted"]["EMAIL"], 1, "{r}");
    let m = srv.get("/metrics").text();
    assert!(
        m.contains("semtel_redacted_entities_total{type=\"EMAIL\"} 1"),
        "{m}"
    );
    assert!(!m.contains("ana.lopez"));
    let seen = h.state.seen.lock().unwrap();
    let bodies: Vec<&str> = seen.iter().filter_map(|r| r.body.as_deref()).collect();
    assert!(bodies.iter().any(|b| b.contains("EMAIL_1")), "{bodies:?}");
    assert!(
        !bodies.iter().any(|b| b.contains("ana.lopez")),
        "{bodies:?}"
    );
    drop(seen);
    assert!(srv.terminate().success());
}

#[test]
fn async_items_survive_kill_9_exactly_once() {
    let dir = tmpdir("serve-async");
    let idx = sample_index(&dir);
    // Faults too: 5xx, malformed replies, hangs (the tier retries; never twice in the log).
    let h = truth_sim(
        150.0,
        Faults::spread(0.2, &["5xx".into(), "malformed".into(), "hang".into()]).unwrap(),
    );
    let cfg = llm_config(&dir, &h, "timeout_base_s = 2");
    let results = dir.join("results.jsonl");
    let args = [
        "--index",
        s(&idx),
        "--llm",
        s(&cfg),
        "--threshold",
        "0.99",
        "--results",
        s(&results),
    ];
    let (_, rows) = sample_truth();
    let srv = Server::start(&args, &[]).ready();
    let mut accepted = Vec::new();
    for (k, chunk) in rows.chunks(10).enumerate() {
        let items: Vec<Value> = chunk
            .iter()
            .map(|(i, t, _)| json!({"id": format!("{i}-{k}"), "text": t}))
            .collect();
        let a = srv.post("/v1/classify?escalate=async", &json!(items));
        assert!(a.status == 200 || a.status == 202, "{}", a.text());
        for r in a.json()["results"].as_array().unwrap() {
            assert!(r["status"] == "pending" || r["status"] == "done", "{r}");
            accepted.push(r["id"].as_str().unwrap().to_string());
        }
    }
    // An id already accepted is refused, not classified twice.
    let again = srv.post(
        "/v1/classify?escalate=async",
        &json!([{"id": accepted[0], "text": "again"}]),
    );
    assert_eq!(again.json()["results"][0]["status"], "refused");
    let pending = accepted
        .iter()
        .filter(|id| srv.get(&format!("/v1/results/{id}")).status == 202)
        .count();
    assert!(
        pending > 0,
        "some items wait for the LLM when the kill comes"
    );
    assert_eq!(srv.get("/v1/results/never-sent").status, 404);

    // kill -9 with LLM answers outstanding; restart on the same result log.
    drop(srv);
    let srv = Server::start(&args, &[]).ready();
    let t = Instant::now();
    for id in &accepted {
        loop {
            let a = srv.get(&format!("/v1/results/{id}"));
            if a.status == 200 {
                assert_eq!(a.json()["status"], "done");
                break;
            }
            assert_eq!(a.status, 202, "{id}: {}", a.text());
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "{id} never resolved"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(srv.terminate().success());
    // The result log: every accepted id exactly once.
    let counts = id_counts(&results);
    assert_eq!(counts.len(), accepted.len(), "lost or unknown ids");
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
}

#[test]
fn reload_swaps_the_index_and_refuses_a_damaged_one() {
    let dir = tmpdir("serve-reload");
    let idx = sample_index(&dir);
    let h = truth_sim(5.0, Faults::default());
    let cfg = llm_config(&dir, &h, "");
    let srv = Server::start(
        &[
            "--index",
            s(&idx),
            "--llm",
            s(&cfg),
            "--threshold",
            "2",
            "--grow",
        ],
        &[],
    )
    .ready();
    // --grow: LLM-labelled rows join the index; a reload saves them first.
    let (_, rows) = sample_truth();
    let items: Vec<Value> = rows[..6]
        .iter()
        .map(|(i, t, _)| json!({"id": i, "text": t}))
        .collect();
    let a = srv.post("/v1/classify?escalate=wait&timeout_ms=20000", &json!(items));
    let llm = a.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["decided_by"] == "llm")
        .count();
    assert!(llm > 0);
    let r = srv.post("/admin/reload", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert_eq!(r["grown_saved"], llm);
    assert_eq!(r["exemplars"], 100 + llm);
    assert_eq!(srv.get("/info").json()["exemplars"], 100 + llm);

    // SIGHUP after an `index add`: the new exemplars are served.
    let extra = dir.join("extra.jsonl");
    std::fs::write(
        &extra,
        "{\"id\": \"x1\", \"text\": \"how do I bake sourdough bread\", \"label\": \"cooking\"}\n",
    )
    .unwrap();
    ok(
        semtel_cmd(&["index", "add", "--index", s(&idx), "--exemplars", s(&extra)])
            .arg("--model")
            .arg(model_dir())
            .output()
            .unwrap(),
    );
    srv.signal("HUP");
    let t = Instant::now();
    while srv.get("/info").json()["exemplars"] != 101 + llm {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "SIGHUP did not reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(srv.get("/info").json()["reloads"], 2);

    // A damaged index is refused; the old one keeps serving.
    let vectors = idx.join(semtel::index::VECTORS);
    let mut bytes = std::fs::read(&vectors).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&vectors, bytes).unwrap();
    let r = srv.post("/admin/reload", &json!({}));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("previous one keeps serving"));
    let a = srv.post(
        "/v1/classify?escalate=off",
        &json!({"text": "how do I sort a list in Python"}),
    );
    assert_eq!(a.status, 200);
    assert_eq!(srv.get("/info").json()["exemplars"], 101 + llm);
    assert!(srv.terminate().success());
}

#[test]
fn graceful_shutdown_finishes_what_is_in_flight() {
    let dir = tmpdir("serve-term");
    let idx = sample_index(&dir);
    let h = truth_sim(1000.0, Faults::default());
    let cfg = llm_config(&dir, &h, "");
    let srv = Server::start(
        &["--index", s(&idx), "--llm", s(&cfg), "--threshold", "2"],
        &[],
    )
    .ready();
    let (_, rows) = sample_truth();
    let url = srv.url("/v1/classify?escalate=wait&timeout_ms=20000");
    let body = json!({"id": rows[3].0, "text": rows[3].1})
        .to_string()
        .into_bytes();
    let inflight = std::thread::spawn(move || send("POST", &url, Some(body), None));
    std::thread::sleep(Duration::from_millis(300));
    let status = srv.terminate();
    assert!(status.success(), "{status}");
    let a = inflight.join().unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["decided_by"],
        "llm",
        "the request in flight got its LLM answer"
    );
}

/// Rows of the multilingual fixture and hostile bodies: never a 5xx, never a dead server, one
/// row per item.
#[test]
fn hostile_input_through_the_service() {
    let dir = tmpdir("serve-hostile");
    let idx = sample_index(&dir);
    let srv = Server::start(&["--index", s(&idx)], &[]).ready();
    let lines: Vec<Value> =
        std::fs::read_to_string(repo().join("tests/fixtures/multilingual.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or(Value::String(l.to_string())))
            .collect();
    let mut errors = 0;
    for chunk in lines.chunks(16) {
        let a = srv.post("/v1/classify", &json!(chunk));
        assert_eq!(a.status, 200, "{}", a.text());
        let out = a.json()["results"].as_array().unwrap().clone();
        assert_eq!(out.len(), chunk.len());
        errors += out.iter().filter(|r| r["decided_by"] == "error").count();
    }
    assert!(errors < lines.len(), "most fixture rows are classified");
    let mut garbage: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\0\0\0".to_vec(),
        "[".repeat(10_000).into_bytes(),
        b"{\"text\": \"\\ud800\"}".to_vec(),
        b"{\"text\": 1e999}".to_vec(),
        b"{\"messages\": [{\"role\": 7, \"content\": null}]}".to_vec(),
        b"{\"messages\": \"not a list\"}".to_vec(),
        b"{\"text\": \"a\\u0000b\"}".to_vec(),
        vec![0xc3, 0x28, 0xa0, 0xa1],
    ];
    garbage.push(format!("{{\"text\": \"{}\"}}", "字".repeat(20_000)).into_bytes());
    for body in garbage {
        for path in ["/v1/classify", "/v1/embeddings"] {
            let a = srv.post_raw(path, body.clone());
            assert!(
                a.status < 500,
                "{path} {:?} → {}: {}",
                String::from_utf8_lossy(&body[..body.len().min(40)]),
                a.status,
                a.text()
            );
        }
    }
    assert_eq!(srv.get("/health").status, 200);

    // Arbitrary text, one item per request: always 200 and one row.
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 48,
        ..Default::default()
    });
    runner
        .run(&hostile_text(), |t| {
            let a = srv.post("/v1/classify", &json!([{"id": "p", "text": t}]));
            prop_assert_eq!(a.status, 200);
            prop_assert_eq!(a.json()["results"].as_array().unwrap().len(), 1);
            let e = srv.post("/v1/embeddings", &json!({"input": t}));
            prop_assert!(e.status == 200 || e.status == 422, "{}", e.status);
            Ok(())
        })
        .unwrap();
    assert!(srv.terminate().success());
}

fn hostile_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,300}",
        "[\u{0}-\u{1f}\u{200d}\u{202e}\u{fe0f}\u{0301}a-z中文العربيةहिन्दी🙂👩‍👩‍👧]{0,500}",
        ".{0,20}".prop_map(|s| s.repeat(400)),
    ]
}

/// A raw HTTP/1.1 exchange on its own connection: `head` (and `body`) sent as given, the
/// status line's code and the body read back (`None` when the server closed without answering).
fn raw_exchange(base: &str, request: &[u8]) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Some((code, body))
}

/// A connection that has sent `prefix` and then goes quiet (or trickles a byte every `every`).
fn slow_connection(
    base: &str,
    prefix: &str,
    every: Option<Duration>,
) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let addr = base.trim_start_matches("http://").to_string();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
            return;
        };
        if s.write_all(prefix.as_bytes()).is_err() {
            return;
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(every.unwrap_or(Duration::from_millis(200)));
            if every.is_some() && s.write_all(b" ").is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_damaged_or_overwritten_index_never_takes_the_server_down() {
    let dir = tmpdir("serve-damaged-index");
    let idx = sample_index(&dir);
    // Another index to copy over it the way people update one (`cp new/* idx/`).
    let newer = dir.join("newer");
    ok(semtel_cmd(&[
        "index",
        "build",
        "--exemplars",
        "data/exemplars.jsonl",
        "--out",
        s(&newer),
        "--k",
        "7",
    ])
    .arg("--model")
    .arg(model_dir())
    .output()
    .unwrap());
    let srv = Server::start(&["--index", s(&idx)], &[]).ready();
    let ask = |srv: &Server| {
        srv.post(
            "/v1/classify?escalate=off",
            &json!({"text": "how do I sort a list in Python"}),
        )
    };
    assert_eq!(ask(&srv).status, 200);
    // The vectors file cut in half under the running server: it still answers.
    let vectors = idx.join(semtel::index::VECTORS);
    let len = std::fs::metadata(&vectors).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vectors)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    for _ in 0..5 {
        let a = ask(&srv);
        assert_eq!(a.status, 200, "{}", a.text());
    }
    // A reload of the damaged files is refused; the loaded index keeps serving.
    let r = srv.post("/admin/reload", &json!({}));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(ask(&srv).status, 200);
    // The new index's files copied over the old ones in place, then a reload: served.
    for f in [
        semtel::index::EXEMPLARS,
        semtel::index::MANIFEST,
        semtel::index::VECTORS,
    ] {
        std::fs::copy(newer.join(f), idx.join(f)).unwrap();
        assert_eq!(ask(&srv).status, 200, "during the copy of {f}");
    }
    let r = srv.post("/admin/reload", &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(srv.get("/info").json()["k"], 7);
    assert_eq!(ask(&srv).status, 200);
    assert!(srv.terminate().success());
}

#[test]
fn async_requests_refused_for_a_full_queue_leave_no_trace() {
    let dir = tmpdir("serve-async-refused");
    let idx = sample_index(&dir);
    let results = dir.join("results.jsonl");
    let args = [
        "--index",
        s(&idx),
        "--results",
        s(&results),
        "--max-queue",
        "1",
    ];
    let srv = Server::start(&args, &[]).ready();
    let (_, rows) = sample_truth();
    let url = srv.url("/v1/classify?escalate=async");
    let mut accepted: Vec<String> = Vec::new();
    let mut refused: Vec<Vec<Value>> = Vec::new();
    for round in 0..20 {
        let handles: Vec<_> = (0..12)
            .map(|c| {
                let items: Vec<Value> = rows
                    .iter()
                    .take(32)
                    .enumerate()
                    .map(|(i, (_, t, _))| json!({"id": format!("r{round}-c{c}-{i}"), "text": t}))
                    .collect();
                let url = url.clone();
                std::thread::spawn(move || {
                    let a = send(
                        "POST",
                        &url,
                        Some(json!(items).to_string().into_bytes()),
                        None,
                    );
                    (a.status, items, a.body)
                })
            })
            .collect();
        for h in handles {
            let (status, items, body) = h.join().unwrap();
            match status {
                429 => refused.push(items),
                200 | 202 => {
                    let v: Value = serde_json::from_slice(&body).unwrap();
                    for r in v["results"].as_array().unwrap() {
                        assert_ne!(r["status"], "refused", "{r}");
                        accepted.push(r["id"].as_str().unwrap().to_string());
                    }
                }
                other => panic!("status {other}"),
            }
        }
        if !refused.is_empty() && round >= 2 {
            break;
        }
    }
    assert!(
        !refused.is_empty(),
        "no request was refused: the test proves nothing"
    );
    // A refused id is unknown, and sending it again is accepted (not "already accepted").
    for items in &refused {
        for it in items {
            let id = it["id"].as_str().unwrap();
            assert_eq!(srv.get(&format!("/v1/results/{id}")).status, 404, "{id}");
        }
    }
    let again = srv.post("/v1/classify?escalate=async", &json!(refused[0]));
    assert!(
        again.status == 200 || again.status == 202,
        "{}",
        again.text()
    );
    for r in again.json()["results"].as_array().unwrap() {
        assert_ne!(r["status"], "refused", "{r}");
        accepted.push(r["id"].as_str().unwrap().to_string());
    }
    // After a restart the result log holds the accepted ids, once each, and nothing else.
    drop(srv);
    let srv = Server::start(&args, &[]).ready();
    assert!(srv.terminate().success());
    let counts = id_counts(&results);
    assert_eq!(counts.len(), accepted.len());
    for id in &accepted {
        assert_eq!(counts.get(id), Some(&1), "{id}");
    }
}

#[test]
fn shutdown_does_not_wait_for_half_sent_requests() {
    let dir = tmpdir("serve-half-sent");
    let idx = sample_index(&dir);
    let results = dir.join("results.jsonl");
    // Long head and body timeouts: only shutdown's own rule can end these connections.
    let srv = Server::start(
        &[
            "--index",
            s(&idx),
            "--results",
            s(&results),
            "--header-timeout-ms",
            "120000",
            "--body-timeout-ms",
            "120000",
        ],
        &[],
    )
    .ready();
    let a = srv.post(
        "/v1/classify?escalate=async",
        &json!({"id": "kept", "text": "how do I sort a list in Python"}),
    );
    assert!(a.status == 200 || a.status == 202, "{}", a.text());
    let _head = slow_connection(
        &srv.base,
        "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Le",
        None,
    );
    let _body = slow_connection(
        &srv.base,
        "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"te",
        None,
    );
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let status = srv.terminate();
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t.elapsed()
    );
    // What was accepted was flushed.
    assert_eq!(id_counts(&results).get("kept"), Some(&1));
}

#[test]
fn slow_and_oversized_clients_do_not_shut_others_out() {
    let dir = tmpdir("serve-slow-clients");
    let idx = sample_index(&dir);
    let srv = Server::start(
        &[
            "--index",
            s(&idx),
            "--max-concurrent-requests",
            "8",
            "--body-timeout-ms",
            "1500",
            "--header-timeout-ms",
            "1500",
        ],
        &[],
    )
    .ready();
    // 48 connections trickling a body (more than the 8 request permits).
    let slow: Vec<_> = (0..48)
        .map(|_| {
            slow_connection(
                &srv.base,
                "POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n[",
                Some(Duration::from_millis(300)),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..10 {
        let t = Instant::now();
        let a = srv.post(
            "/v1/classify?escalate=off",
            &json!({"id": format!("n{i}"), "text": "how do I reset my password"}),
        );
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a normal request took {:?} behind slow bodies",
            t.elapsed()
        );
    }
    // A slow body is cut with 408 (JSON), a declared length over the limit refused at once.
    let (code, body) = raw_exchange(
        &srv.base,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{",
    )
    .expect("an answer");
    assert_eq!(code, 408, "{body}");
    assert!(body.contains("\"timeout_error\""), "{body}");
    let t = Instant::now();
    let (code, body) = raw_exchange(
        &srv.base,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\nConnection: close\r\n\r\n",
    )
    .expect("an answer");
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("request_too_large"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(1));
    // A chunked body over the limit: 413 in the JSON error shape too.
    let mut chunked = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for _ in 0..80 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 65536, "a".repeat(65536)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (code, body) = raw_exchange(&srv.base, &chunked).expect("an answer");
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    // A head that never ends: the connection is closed after the head timeout.
    let t = Instant::now();
    let cut = raw_exchange(&srv.base, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    assert!(
        cut.is_none() || cut.as_ref().is_some_and(|c| c.0 == 408),
        "{cut:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    let m = srv.get("/metrics").text();
    assert!(m.contains("semtel_open_connections"), "{m}");
    drop(slow);
    assert!(srv.terminate().success());
}

#[test]
fn large_requests_share_the_model_with_small_ones() {
    let dir = tmpdir("serve-fair");
    let idx = sample_index(&dir);
    // Short steps (the machine's speed decides how many rows that is; at least one).
    let srv = Server::start(&["--index", s(&idx), "--fair-step-ms", "2"], &[]).ready();
    let (_, rows) = sample_truth();
    // 48 long conversations per request (every one past the token budget).
    let long: Vec<Value> = (0..48)
        .map(|i| {
            let mut t = String::new();
            while t.len() < 4000 {
                t.push_str(&rows[(i + t.len()) % rows.len()].1);
                t.push(' ');
            }
            json!({"id": format!("h{i}"), "text": t})
        })
        .collect();
    let body = json!(long).to_string().into_bytes();
    let url = srv.url("/v1/classify?escalate=off");
    // What one such request costs alone, here.
    let t = Instant::now();
    assert_eq!(send("POST", &url, Some(body.clone()), None).status, 200);
    let heavy_alone = t.elapsed();
    // Two clients loop them; one-row requests meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let heavy: Vec<_> = (0..2)
        .map(|_| {
            let (url, body, stop) = (url.clone(), body.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut done = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    assert_eq!(send("POST", &url, Some(body.clone()), None).status, 200);
                    done += 1;
                }
                done
            })
        })
        .collect();
    std::thread::sleep(heavy_alone / 4);
    let mut worst = Duration::ZERO;
    for (i, row) in rows.iter().take(10).enumerate() {
        let t = Instant::now();
        let a = srv.post(
            "/v1/classify?escalate=off",
            &json!({"id": format!("small{i}"), "text": row.1}),
        );
        assert_eq!(a.status, 200, "{}", a.text());
        worst = worst.max(t.elapsed());
        std::thread::sleep(heavy_alone / 20);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let big: usize = heavy.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(big >= 1, "the large requests made progress too");
    // Waiting behind whole large requests would take at least one of them.
    assert!(
        worst < heavy_alone / 2,
        "a one-row request waited {worst:?} behind large ones (one alone takes {heavy_alone:?})"
    );
    // On the bf16 engine a one-row request that arrives during a long row's forward pass runs
    // between two of its layers (a pause point) instead of after it.
    let engine = srv.get("/info").json()["engine"].to_string();
    let pauses: f64 = srv
        .get("/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("semtel_pause_steps_total ")?.parse().ok())
        .expect("the pause-step counter is exported");
    if engine.contains("bf16") {
        assert!(pauses >= 1.0, "no one-row request ran at a pause point");
    }
    assert!(srv.terminate().success());
}

#[test]
fn ids_auth_and_error_shapes() {
    let dir = tmpdir("serve-ids");
    let idx = sample_index(&dir);
    let results = dir.join("results.jsonl");
    let srv = Server::start(
        &["--index", s(&idx), "--results", s(&results)],
        &[("SEMTEL_API_KEY", "k3y\n")],
    )
    .ready();
    // The key was trimmed: clients send it without the newline; the scheme in any case.
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let a = rt().block_on(async {
            client()
                .get(srv.url("/info"))
                .header("authorization", format!("{scheme} k3y"))
                .send()
                .await
                .unwrap()
                .status()
        });
        assert_eq!(a.as_u16(), 200, "{scheme}");
    }
    let two = rt().block_on(async {
        client()
            .get(srv.url("/info"))
            .header("authorization", "Bearer k3y")
            .header("authorization", "Bearer other")
            .send()
            .await
            .unwrap()
    });
    assert_eq!(two.status().as_u16(), 400);
    // Missing or null ids get unique generated ones; async items with them are never refused.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        let a = srv.post(
            "/v1/classify?escalate=async",
            &json!([{"id": null, "text": "hello there"}, {"text": "good morning"}]),
        );
        assert!(a.status == 200 || a.status == 202, "{}", a.text());
        for r in a.json()["results"].as_array().unwrap() {
            assert_ne!(r["status"], "refused", "{r}");
            assert!(seen.insert(r["id"].as_str().unwrap().to_string()), "{r}");
        }
    }
    // Bad ids are error rows, in request order with the others (a refused one stays put).
    let a = srv.post(
        "/v1/classify?escalate=async",
        &json!([
            {"id": "fresh-1", "text": "hi"},
            {"id": 7, "text": "hi"},
            {"id": "", "text": "hi"},
            {"id": "x".repeat(300), "text": "hi"},
            {"id": "fresh-1", "text": "again"},
            {"id": "fresh-2", "text": "hi"},
        ]),
    );
    let out = a.json()["results"].as_array().unwrap().clone();
    assert_eq!(out.len(), 6);
    assert_eq!(out[0]["id"], "fresh-1");
    assert!(
        out[1]["error"].as_str().unwrap().contains("string"),
        "{}",
        out[1]
    );
    assert!(
        out[2]["error"].as_str().unwrap().contains("empty"),
        "{}",
        out[2]
    );
    assert!(
        out[3]["error"].as_str().unwrap().contains("256"),
        "{}",
        out[3]
    );
    assert_eq!(out[4]["status"], "refused");
    assert_eq!(out[5]["id"], "fresh-2");
    // Error bodies are the JSON error shape: unknown route, wrong method, bad query.
    let nf = srv.get("/nowhere");
    assert_eq!(nf.status, 404);
    assert_eq!(nf.json()["error"]["type"], "not_found_error");
    let bad_method = srv.get("/v1/classify");
    assert_eq!(bad_method.status, 405);
    assert!(bad_method.json()["error"]["message"].is_string());
    let q = srv.post("/v1/classify?timeout_ms=soon", &json!({"text": "hi"}));
    assert_eq!(q.status, 422, "{}", q.text());
    assert!(q.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("query"));
    // A body with a byte-order mark is JSON; `turns` as a string gets a message saying so.
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(json!({"text": "hello"}).to_string().as_bytes());
    assert_eq!(srv.post_raw("/v1/classify?escalate=off", bom).status, 200);
    let t = srv.post("/v1/classify?escalate=off", &json!({"turns": "user: hi"}));
    assert_eq!(t.status, 422);
    assert!(t.text().contains("`turns` is a string"), "{}", t.text());
    assert!(srv.terminate().success());
}

#[test]
fn an_empty_api_key_is_refused_at_start() {
    let dir = tmpdir("serve-empty-key");
    let idx = sample_index(&dir);
    let out = Command::new(bin())
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--index",
            s(&idx),
            "--model",
        ])
        .arg(model_dir())
        .env("SEMTEL_API_KEY", " ")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("SEMTEL_API_KEY is set but empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
