//! `semtel serve`: flags and the config file's `[serve]` section → the service handle and the
//! HTTP adapter; prints the address, serves until SIGTERM/SIGINT, then shuts down gracefully.

use crate::args::ServeArgs;
use crate::options::Ctx;
use anyhow::{Context, Result};
use semtel::app::serve::{ServeOptions, Service};
use semtel::server::ServerOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

fn options(ctx: &Ctx, a: &ServeArgs) -> Result<(ServeOptions, ServerOptions, String)> {
    let c = &ctx.cfg.serve;
    let index = a
        .index
        .clone()
        .or(c.index.clone().map(PathBuf::from))
        .context("--index DIR (or `index` in the config file's [serve] section) is required")?;
    let also_specs = if a.also.is_empty() {
        c.also.clone().unwrap_or_default()
    } else {
        a.also.clone()
    };
    let also = super::parse_also(&also_specs)?;
    let mut s = ServeOptions::new(index);
    s.also = also;
    s.classifier = ctx.classifier_options(a.k, a.threshold, None)?;
    s.classifier.audit = a.audit.plan()?;
    s.classifier.no_novelty = !a.audit.novelty_on()?;
    s.guards = a.audit.guards_on()?;
    anyhow::ensure!(
        a.audit.segment_col.is_none(),
        "--segment-col is for classify (the service reports audits by label and language)"
    );
    s.llm = a.llm.clone().or(ctx.cfg.llm.clone().map(PathBuf::from));
    s.llm_overrides = a.send.overrides()?;
    s.results = a.results.clone().or(c.results.clone().map(PathBuf::from));
    if a.grow || c.grow.unwrap_or(false) {
        s.grow_min_confidence = Some(
            a.grow_min_confidence
                .or(c.grow_min_confidence)
                .unwrap_or(0.0),
        );
    }
    if let Some(v) = a.max_batch_tokens.or(c.max_batch_tokens) {
        s.max_batch_tokens = v.max(1);
    }
    if let Some(v) = a.max_batch_wait_ms.or(c.max_batch_wait_ms) {
        s.max_batch_wait = Duration::from_millis(v);
    }
    if let Some(v) = a.max_queue.or(c.max_queue) {
        s.max_queue = v.max(1);
    }
    if let Some(v) = a.fair_step_ms.or(c.fair_step_ms) {
        s.fair_step = Duration::from_millis(v.max(1));
    }
    let mut h = ServerOptions::default();
    if let Some(v) = a.max_concurrent_requests.or(c.max_concurrent_requests) {
        h.max_concurrent_requests = v.max(1);
    }
    if let Some(v) = a.max_body_bytes.or(c.max_body_bytes) {
        h.max_body_bytes = v;
    }
    if let Some(v) = a.max_items.or(c.max_items) {
        h.max_items = v.max(1);
    }
    if let Some(v) = a.max_text_bytes.or(c.max_text_bytes) {
        h.max_text_bytes = v;
    }
    if let Some(v) = a.escalate_timeout_ms.or(c.escalate_timeout_ms) {
        h.escalate_timeout = Duration::from_millis(v);
    }
    if let Some(v) = a.max_connections.or(c.max_connections) {
        h.max_connections = v.max(1);
    }
    if let Some(v) = a.header_timeout_ms.or(c.header_timeout_ms) {
        h.header_timeout = Duration::from_millis(v.max(1));
    }
    if let Some(v) = a.body_timeout_ms.or(c.body_timeout_ms) {
        h.body_timeout = Duration::from_millis(v.max(1));
    }
    if let Some(v) = a.shutdown_timeout_ms.or(c.shutdown_timeout_ms) {
        h.shutdown_timeout = Duration::from_millis(v);
    }
    h.max_connections = h.max_connections.min(connection_capacity());
    h.api_key = api_key()?;
    let addr = a
        .addr
        .clone()
        .or(c.addr.clone())
        .unwrap_or_else(|| "127.0.0.1:8080".to_string());
    Ok((s, h, addr))
}

/// The key, only from the environment (never a flag: shell history; never a file value). Set
/// but empty is refused (it would silently serve an open API); whitespace around it (a
/// newline from `$(cat key.txt)`, say) is trimmed with a warning, since no client sends it.
fn api_key() -> Result<Option<String>> {
    let Ok(raw) = std::env::var("SEMTEL_API_KEY") else {
        return Ok(None);
    };
    let key = raw.trim();
    if key.is_empty() {
        anyhow::bail!(
            "SEMTEL_API_KEY is set but empty: set it to the key clients must send, or unset it to serve without one"
        );
    }
    if key.len() != raw.len() {
        eprintln!(
            "semtel serve: warning: SEMTEL_API_KEY had whitespace around it (a trailing newline?); it was trimmed"
        );
    }
    Ok(Some(key.to_string()))
}

/// Connections this process can hold: the open-file limit is raised to its hard limit, and a
/// quarter is kept for the model, index, logs and the LLM's connections.
fn connection_capacity() -> usize {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                if lim.rlim_cur < lim.rlim_max {
                    let raised = libc::rlimit {
                        rlim_cur: lim.rlim_max,
                        rlim_max: lim.rlim_max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                        lim.rlim_cur = lim.rlim_max;
                    }
                }
                return (lim.rlim_cur as usize).saturating_mul(3) / 4;
            }
        }
        usize::MAX
    }
    #[cfg(not(unix))]
    {
        usize::MAX
    }
}

pub fn run(ctx: &Ctx, a: ServeArgs) -> Result<()> {
    let (serve_opts, http_opts, addr) = options(ctx, &a)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("semtel-http")
        .build()
        .context("starting the HTTP runtime")?;
    // Bind first: a taken port fails before the model is loaded. The routes answer at once
    // (`/health` 200, everything else 503) while the model and index load.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&addr))
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let keyed = http_opts.api_key.is_some();
    let slot: Arc<OnceLock<Service>> = Arc::new(OnceLock::new());
    let server = rt.spawn(semtel::server::run(
        listener,
        slot.clone(),
        http_opts,
        semtel::server::termination(),
    ));
    // The line scripts and tests wait for (stdout, flushed).
    println!("listening on http://{local}");
    let _ = std::io::stdout().flush();
    semtel::failpoint::serve_start_delay();
    let svc = match Service::open(serve_opts) {
        Ok(s) => s,
        Err(e) => {
            server.abort();
            return Err(anyhow::Error::new(e).context("starting the service"));
        }
    };
    let info = svc.info();
    let _ = slot.set(svc.clone());
    eprintln!(
        "semtel serve: ready: {} ({} exemplars, {} labels, model {}, {}){}{}",
        info.index,
        info.exemplars,
        info.labels.len(),
        info.model,
        info.engine,
        if info.llm { ", LLM tier on" } else { "" },
        if keyed { ", API key required" } else { "" }
    );
    match rt.block_on(server) {
        Ok(r) => r.context("serving")?,
        Err(e) => anyhow::bail!("the HTTP server stopped: {e}"),
    }
    eprintln!("semtel serve: stopping (finishing queued work, flushing the result log)");
    let report = svc.shutdown().context("shutting down")?;
    if report.grown_saved > 0 {
        eprintln!(
            "semtel serve: {} learned exemplars saved into the index",
            report.grown_saved
        );
    }
    eprintln!("semtel serve: stopped");
    Ok(())
}
