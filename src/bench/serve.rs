//! `semtel bench serve`: the live service under a bounded loopback load, against the batch
//! path on the same rows in the same run.
//!
//! The server is the real binary (`semtel serve`, a child process, so its memory is its own);
//! the load generator is a fixed number of requests from N concurrent clients (keep-alive
//! connections on one client thread), each request one conversation or a list of them, with a
//! time limit per level. The reference is `semtel classify` on the same rows (its own
//! `rows_per_second`, which excludes loading the model), run before and after the levels.
//! A soak keeps 8 clients busy for a while and samples the server's resident memory.
//! Contention scenarios measure what one client can do to another: the latency of normal
//! one-conversation requests (one client, one after another) while N slow connections trickle
//! a body a byte every two seconds, or while K clients loop the largest requests the server
//! allows.
//!
//! This module never prints; it reports each figure through a callback.

use crate::{Error, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ServeBenchOptions {
    /// The `semtel` binary (the server and the batch reference are run as it).
    pub exe: PathBuf,
    /// Another `semtel` binary to serve instead (an earlier build, to compare against).
    pub server_exe: Option<PathBuf>,
    pub index: PathBuf,
    /// Rows to send (JSONL or Parquet; their text or turns, flattened).
    pub input: PathBuf,
    pub split: Option<String>,
    /// Rows per level (cycled when the input has fewer).
    pub rows: usize,
    /// Concurrent clients per level.
    pub clients: Vec<usize>,
    /// Conversations per request per level.
    pub batch: Vec<usize>,
    /// Each level is run this many times; the median is reported.
    pub repeats: usize,
    /// A level stops after this long even when rows are left.
    pub max_seconds: f64,
    /// Seconds of the memory soak (0: none).
    pub soak_s: u64,
    /// Global flags passed to both server and batch runs (`--threads`, `--model`, …).
    pub global_args: Vec<String>,
    pub work: PathBuf,
    /// Contention: slow connections held open per scenario (e.g. 0, 100, 500).
    pub slow_clients: Vec<usize>,
    /// Contention: clients looping the largest allowed requests per scenario (e.g. 3).
    pub heavy_clients: Vec<usize>,
    /// Seconds of normal requests measured per contention scenario.
    pub contention_s: f64,
    /// Skip the throughput levels (contention scenarios only).
    pub only_contention: bool,
}

/// Normal requests while other clients press on the server.
#[derive(Debug, Clone, Serialize)]
pub struct Contention {
    pub slow_connections: usize,
    pub heavy_clients: usize,
    pub requests: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Normal requests not answered 200.
    pub errors: usize,
    /// Requests the heavy clients got through (rows), and what they were refused.
    pub heavy_rows: usize,
    pub heavy_refused: usize,
}

/// One load level's figures (the median run by rows/s).
#[derive(Debug, Clone, Serialize)]
pub struct ServeLevel {
    pub clients: usize,
    pub rows_per_request: usize,
    pub requests: usize,
    pub rows: usize,
    pub seconds: f64,
    pub rows_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// Requests answered with another status than 200 (or not at all).
    pub errors: usize,
    /// `rows_per_s` over the batch path's (median of its runs).
    pub vs_batch: f64,
    /// rows/s of every repeat.
    pub runs: Vec<f64>,
    /// Mean rows per micro-batch the server formed over the level's runs (from `/metrics`).
    pub mean_batch_rows: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Soak {
    pub seconds: f64,
    pub requests: usize,
    pub rows_per_s: f64,
    /// (seconds since the soak began, server RSS in MB).
    pub rss_mb: Vec<(f64, f64)>,
    pub rss_first_mb: f64,
    pub rss_last_mb: f64,
    pub rss_max_mb: f64,
    /// Least-squares slope of RSS over the second half of the soak, MB per minute.
    pub rss_slope_mb_per_min: f64,
    pub errors: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeBench {
    pub rows_available: usize,
    /// `semtel classify` rows/s, each run.
    pub batch_runs: Vec<f64>,
    pub batch_rows_per_s: f64,
    pub levels: Vec<ServeLevel>,
    /// The best level's rows/s over the batch path's.
    pub saturation_vs_batch: f64,
    pub soak: Option<Soak>,
    pub server_rss_mb_after_levels: f64,
    pub contention: Vec<Contention>,
}

/// Runs the benchmark; `report` gets a line per figure as it is measured.
pub fn serve_benchmark(o: &ServeBenchOptions, report: &mut dyn FnMut(&str)) -> Result<ServeBench> {
    std::fs::create_dir_all(&o.work).map_err(|e| Error::io(&o.work, e))?;
    let texts = read_texts(&o.input, o.split.as_deref())?;
    if texts.is_empty() {
        return Err(Error::Config(format!(
            "{} has no conversation to send",
            o.input.display()
        )));
    }
    let n = o.rows.max(1);
    let rows: Vec<String> = (0..n).map(|i| texts[i % texts.len()].clone()).collect();
    let rows_file = o.work.join("rows.jsonl");
    {
        let mut s = String::new();
        for (i, t) in rows.iter().enumerate() {
            s.push_str(&serde_json::json!({"id": format!("r{i}"), "text": t}).to_string());
            s.push('\n');
        }
        std::fs::write(&rows_file, s).map_err(|e| Error::io(&rows_file, e))?;
    }
    let mut batch_runs = Vec::new();
    let batch = |o: &ServeBenchOptions| batch_rows_per_s(o, &rows_file);
    for _ in 0..if o.only_contention {
        0
    } else {
        o.repeats.max(1).div_ceil(2)
    } {
        let r = batch(o)?;
        report(&format!("batch path (semtel classify): {r:.1} rows/s"));
        batch_runs.push(r);
    }

    let mut server = Server::start(o)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("bench runtime: {e}")))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| Error::Internal(format!("bench client: {e}")))?;
    let url = format!("{}/v1/classify?escalate=off", server.base);
    // Warm-up: the first requests pay for page faults and allocator growth.
    rt.block_on(load(
        &client,
        &url,
        &bodies(&rows[..rows.len().min(64)], 1),
        4,
        30.0,
    ));

    let mut raw: Vec<(usize, usize, Vec<Run>, f64)> = Vec::new();
    for &b in if o.only_contention {
        &[][..]
    } else {
        &o.batch[..]
    } {
        let reqs = bodies(&rows, b.max(1));
        for &c in &o.clients {
            let before = rt.block_on(batch_totals(&client, &server.base));
            let mut runs = Vec::new();
            for _ in 0..o.repeats.max(1) {
                let r = rt.block_on(load(&client, &url, &reqs, c.max(1), o.max_seconds));
                report(&format!(
                    "serve: {c} clients × {b} rows/request: {:.1} rows/s, p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, {} errors",
                    r.rows as f64 / r.seconds,
                    pct(&r.latencies, 0.50),
                    pct(&r.latencies, 0.95),
                    pct(&r.latencies, 0.99),
                    r.errors
                ));
                runs.push(r);
            }
            let after = rt.block_on(batch_totals(&client, &server.base));
            let mean = (after.0 - before.0) / (after.1 - before.1).max(1.0);
            report(&format!(
                "serve: {c} clients × {b}: {mean:.1} rows per micro-batch"
            ));
            raw.push((c, b, runs, mean));
        }
    }
    let rss_after = server.rss_mb();
    let soak = if o.soak_s > 0 {
        Some(rt.block_on(soak(&client, &url, &rows, &server, o.soak_s, report)))
    } else {
        None
    };
    let mut contention = Vec::new();
    for &heavy in if o.heavy_clients.is_empty() {
        &[0][..]
    } else {
        &o.heavy_clients[..]
    } {
        for &slow in if o.slow_clients.is_empty() {
            &[0][..]
        } else {
            &o.slow_clients[..]
        } {
            if o.slow_clients.is_empty() && o.heavy_clients.is_empty() {
                break;
            }
            let c = rt.block_on(contend(
                &client,
                &server.base,
                &rows,
                slow,
                heavy,
                o.contention_s,
            ));
            report(&format!(
                "contention: {slow} slow connections, {heavy} heavy clients: one-row requests p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} requests, {} errors); heavy clients got {} rows through, {} refused",
                c.p50_ms, c.p99_ms, c.max_ms, c.requests, c.errors, c.heavy_rows, c.heavy_refused
            ));
            contention.push(c);
        }
    }
    server.stop();
    for _ in 0..if o.only_contention {
        0
    } else {
        o.repeats.max(1) / 2
    } {
        let r = batch(o)?;
        report(&format!("batch path (semtel classify): {r:.1} rows/s"));
        batch_runs.push(r);
    }
    let batch_median = if batch_runs.is_empty() {
        f64::NAN
    } else {
        super::median(&batch_runs)
    };
    let mut levels = Vec::new();
    for (c, b, mut runs, mean_batch_rows) in raw {
        let all: Vec<f64> = runs.iter().map(|r| r.rows as f64 / r.seconds).collect();
        runs.sort_by(|x, y| (x.rows as f64 / x.seconds).total_cmp(&(y.rows as f64 / y.seconds)));
        let m = &runs[runs.len() / 2];
        let rps = m.rows as f64 / m.seconds;
        levels.push(ServeLevel {
            clients: c,
            rows_per_request: b,
            requests: m.requests,
            rows: m.rows,
            seconds: m.seconds,
            rows_per_s: rps,
            p50_ms: pct(&m.latencies, 0.50),
            p95_ms: pct(&m.latencies, 0.95),
            p99_ms: pct(&m.latencies, 0.99),
            errors: m.errors,
            vs_batch: rps / batch_median.max(1e-9),
            runs: all,
            mean_batch_rows,
        });
    }
    let best = levels.iter().map(|l| l.rows_per_s).fold(0.0, f64::max);
    Ok(ServeBench {
        rows_available: texts.len(),
        batch_runs,
        batch_rows_per_s: batch_median,
        saturation_vs_batch: best / batch_median.max(1e-9),
        levels,
        soak,
        server_rss_mb_after_levels: rss_after,
        contention,
    })
}

/// One contention scenario: `slow` connections that send a request head and then one body
/// byte every two seconds, `heavy` clients looping requests of 256 conversations as large as
/// the default body limit allows, and one normal client sending one conversation at a time
/// for `secs`; its latencies are the figure.
async fn contend(
    client: &reqwest::Client,
    base: &str,
    rows: &[String],
    slow: usize,
    heavy: usize,
    secs: f64,
) -> Contention {
    use tokio::io::AsyncWriteExt;
    let addr = base.trim_start_matches("http://").to_string();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..slow {
        let (addr, stop) = (addr.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            // Reconnect when the server cuts us (body timeout): the pressure stays.
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let head = format!(
                    "POST /v1/classify HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n["
                );
                if s.write_all(head.as_bytes()).await.is_err() {
                    continue;
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    if s.write_all(b" ").await.is_err() {
                        break;
                    }
                }
            }
        }));
    }
    // Largest allowed: 256 items in a 4 MiB body (the defaults), real text repeated.
    let per_item = (4usize << 20) / 256 - 96;
    let heavy_body: Arc<str> = {
        let items: Vec<serde_json::Value> = (0..256)
            .map(|i| {
                let mut t = String::new();
                while t.len() < per_item {
                    t.push_str(&rows[(i + t.len()) % rows.len()]);
                    t.push(' ');
                }
                let mut cut = per_item;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
                serde_json::json!({"id": format!("h{i}"), "text": t})
            })
            .collect();
        serde_json::Value::Array(items).to_string().into()
    };
    let heavy_rows = Arc::new(AtomicUsize::new(0));
    let heavy_refused = Arc::new(AtomicUsize::new(0));
    for _ in 0..heavy {
        let (client, stop, body) = (client.clone(), stop.clone(), heavy_body.clone());
        let (ok, refused) = (heavy_rows.clone(), heavy_refused.clone());
        let url = format!("{base}/v1/classify?escalate=off");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        ok.fetch_add(256, Ordering::Relaxed);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    // Let the pressure build before measuring.
    tokio::time::sleep(Duration::from_secs(if slow + heavy > 0 { 3 } else { 0 })).await;
    let url = format!("{base}/v1/classify?escalate=off");
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut i = 0;
    while start.elapsed().as_secs_f64() < secs {
        let body = serde_json::json!({"id": format!("n{i}"), "text": rows[i % rows.len()]});
        i += 1;
        let t = Instant::now();
        let ok = match client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
        {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        if !ok {
            errors += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    lat.sort_by(f64::total_cmp);
    Contention {
        slow_connections: slow,
        heavy_clients: heavy,
        requests: lat.len(),
        p50_ms: pct(&lat, 0.5),
        p99_ms: pct(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(f64::NAN),
        errors,
        heavy_rows: heavy_rows.load(Ordering::Relaxed),
        heavy_refused: heavy_refused.load(Ordering::Relaxed),
    }
}

/// (rows, batches) the server has run in micro-batches so far, from its `/metrics`.
async fn batch_totals(client: &reqwest::Client, base: &str) -> (f64, f64) {
    let Ok(r) = client.get(format!("{base}/metrics")).send().await else {
        return (0.0, 0.0);
    };
    let text = r.text().await.unwrap_or_default();
    let get = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        get("semtel_batch_rows_sum "),
        get("semtel_batch_rows_count "),
    )
}

/// Text of each row of `input` (turns flattened), in order; rows without one are skipped.
fn read_texts(input: &Path, split: Option<&str>) -> Result<Vec<String>> {
    let opts = crate::input::InputOptions {
        split: split.map(str::to_string),
        ..Default::default()
    };
    Ok(crate::input::read_all(input, &opts)?
        .into_iter()
        .filter_map(|r| r.content.ok().map(|c| c.flatten()))
        .filter(|t| !t.trim().is_empty())
        .collect())
}

/// `semtel classify` on the rows file: its own rows/s (the model load excluded).
fn batch_rows_per_s(o: &ServeBenchOptions, rows: &Path) -> Result<f64> {
    let out_file = o.work.join("batch-out.jsonl");
    let out = Command::new(&o.exe)
        .args(&o.global_args)
        .args(["classify", "--overwrite", "--json", "-q", "--index"])
        .arg(&o.index)
        .arg("--input")
        .arg(rows)
        .arg("--output")
        .arg(&out_file)
        .output()
        .map_err(|e| Error::io(&o.exe, e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "semtel classify failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| Error::Internal("semtel classify printed no summary".into()))?;
    summary["rows_per_second"]
        .as_f64()
        .ok_or_else(|| Error::Internal(format!("no rows_per_second in {summary}")))
}

/// Request bodies of `per` rows each.
fn bodies(rows: &[String], per: usize) -> Vec<(usize, bytes_body::Body)> {
    rows.chunks(per)
        .enumerate()
        .map(|(k, chunk)| {
            let items: Vec<serde_json::Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, t)| serde_json::json!({"id": format!("b{k}-{i}"), "text": t}))
                .collect();
            let v = if per == 1 {
                items.into_iter().next().unwrap_or_default()
            } else {
                serde_json::Value::Array(items)
            };
            (chunk.len(), bytes_body::Body::from(v.to_string()))
        })
        .collect()
}

/// Cheaply clonable request bodies (shared bytes).
mod bytes_body {
    #[derive(Clone)]
    pub struct Body(std::sync::Arc<str>);
    impl From<String> for Body {
        fn from(s: String) -> Self {
            Body(s.into())
        }
    }
    impl Body {
        pub fn to_reqwest(&self) -> reqwest::Body {
            reqwest::Body::from(self.0.to_string())
        }
    }
}

struct Run {
    requests: usize,
    rows: usize,
    seconds: f64,
    latencies: Vec<f64>,
    errors: usize,
}

/// Sends every request once from `clients` concurrent clients (or until `max_s`).
async fn load(
    client: &reqwest::Client,
    url: &str,
    reqs: &[(usize, bytes_body::Body)],
    clients: usize,
    max_s: f64,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let reqs = Arc::new(reqs.to_vec());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(max_s);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, reqs, client, url) =
            (next.clone(), reqs.clone(), client.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut rows, mut errors, mut requests) = (0usize, 0usize, 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= reqs.len() || Instant::now() >= deadline {
                    break;
                }
                let (n, body) = &reqs[i];
                let t = Instant::now();
                let ok = match client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.to_reqwest())
                    .send()
                    .await
                {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                requests += 1;
                if ok {
                    rows += n;
                } else {
                    errors += 1;
                }
            }
            (lat, rows, errors, requests)
        }));
    }
    let mut run = Run {
        requests: 0,
        rows: 0,
        seconds: 0.0,
        latencies: Vec::new(),
        errors: 0,
    };
    for t in tasks {
        if let Ok((lat, rows, errors, requests)) = t.await {
            run.latencies.extend(lat);
            run.rows += rows;
            run.errors += errors;
            run.requests += requests;
        }
    }
    run.seconds = start.elapsed().as_secs_f64().max(1e-9);
    run.latencies.sort_by(f64::total_cmp);
    run
}

/// 8 clients, single conversations, for `secs`; the server's RSS every 10 s.
async fn soak(
    client: &reqwest::Client,
    url: &str,
    rows: &[String],
    server: &Server,
    secs: u64,
    report: &mut dyn FnMut(&str),
) -> Soak {
    let reqs = bodies(rows, 1);
    let start = Instant::now();
    let mut samples = vec![(0.0, server.rss_mb())];
    let (mut requests, mut errors, mut rows_done) = (0, 0, 0);
    while start.elapsed().as_secs() < secs {
        let left = secs as f64 - start.elapsed().as_secs_f64();
        let r = load(client, url, &reqs, 8, left.min(10.0)).await;
        requests += r.requests;
        errors += r.errors;
        rows_done += r.rows;
        let t = start.elapsed().as_secs_f64();
        let rss = server.rss_mb();
        report(&format!(
            "soak: {t:.0} s, {requests} requests, server RSS {rss:.1} MB"
        ));
        samples.push((t, rss));
    }
    let seconds = start.elapsed().as_secs_f64();
    let half: Vec<&(f64, f64)> = samples.iter().filter(|s| s.0 >= seconds / 2.0).collect();
    let slope = {
        let n = half.len() as f64;
        let (mx, my) = (
            half.iter().map(|s| s.0).sum::<f64>() / n,
            half.iter().map(|s| s.1).sum::<f64>() / n,
        );
        let sxx: f64 = half.iter().map(|s| (s.0 - mx).powi(2)).sum();
        let sxy: f64 = half.iter().map(|s| (s.0 - mx) * (s.1 - my)).sum();
        if sxx > 0.0 {
            sxy / sxx * 60.0
        } else {
            0.0
        }
    };
    Soak {
        seconds,
        requests,
        rows_per_s: rows_done as f64 / seconds,
        rss_first_mb: samples.first().map_or(0.0, |s| s.1),
        rss_last_mb: samples.last().map_or(0.0, |s| s.1),
        rss_max_mb: samples.iter().map(|s| s.1).fold(0.0, f64::max),
        rss_mb: samples,
        rss_slope_mb_per_min: slope,
        errors,
    }
}

/// The `q` quantile of sorted values (nearest rank).
fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// The server child process.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(o: &ServeBenchOptions) -> Result<Server> {
        let mut child = Command::new(o.server_exe.as_ref().unwrap_or(&o.exe))
            .args(&o.global_args)
            .args(["serve", "--addr", "127.0.0.1:0", "--index"])
            .arg(&o.index)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .env_remove("SEMTEL_API_KEY")
            .spawn()
            .map_err(|e| Error::io(&o.exe, e))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(u) = l.strip_prefix("listening on ") {
                        break u.trim().to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    return Err(Error::Internal(
                        "semtel serve ended before listening".into(),
                    ));
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let s = Server { child, base };
        let t = Instant::now();
        loop {
            if ready(&s.base) {
                return Ok(s);
            }
            if t.elapsed() > Duration::from_secs(300) {
                return Err(Error::Internal("semtel serve never became ready".into()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok())
            })
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    fn stop(&mut self) {
        // SIGTERM: the graceful path; then make sure.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /ready` answers 200 (a plain blocking HTTP/1.0 exchange: no runtime needed).
fn ready(base: &str) -> bool {
    use std::io::{Read, Write};
    let Some(addr) = base.strip_prefix("http://") else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(format!("GET /ready HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert_eq!(pct(&[7.0], 0.95), 7.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
