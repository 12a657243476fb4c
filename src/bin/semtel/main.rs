//! The `semtel` command line: parse the flags, set up logging and threads, resolve the options
//! once ([`options::Ctx`]), dispatch to one small command function, and map errors to exit
//! codes. All work happens in the library (`semtel::app`); the commands here only call it and
//! print what it reports.

mod args;
mod args_tools;
mod commands;
mod options;

use anyhow::{bail, Result};
use args::{Cli, Cmd, IndexCmd};
use args_tools::{BenchCmd, StaticCmd};
use clap::Parser;
use options::Ctx;
use semtel::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    semtel::error::quiet_expected_panics();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEMTEL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        let code = if e.downcast_ref::<commands::RunHadErrors>().is_some() {
            3
        } else {
            1
        };
        std::process::exit(code);
    }
}

fn run(cli: Cli) -> Result<()> {
    let cfg = match &cli.global.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let threads = cli.global.threads.or(cfg.threads);
    if let Some(n) = threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle reads RAYON_NUM_THREADS for its own matmul parallelism.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .build_global();
    let ctx = Ctx {
        cfg,
        global: cli.global.clone(),
    };
    use commands::*;
    match cli.cmd {
        Cmd::Index(IndexCmd::Build {
            exemplars,
            out,
            cols,
            k,
            threshold,
            overwrite,
            multi_label,
            center_languages,
            tune: then_tune,
        }) => index::build(
            &ctx,
            &exemplars,
            &out,
            &cols,
            k,
            threshold,
            overwrite,
            multi_label,
            semtel::center::CenterChoice::parse(&center_languages).unwrap_or_default(),
        )
        .and_then(|()| {
            if then_tune {
                tune::run(&ctx, tune::defaults(out))
            } else {
                Ok(())
            }
        }),
        Cmd::Index(IndexCmd::Add {
            index,
            exemplars,
            cols,
        }) => index::add(&ctx, &index, &exemplars, &cols),
        Cmd::Index(IndexCmd::Info { index }) => index::info(&index),
        Cmd::Classify(a) => classify::run(&ctx, a),
        Cmd::Eval(a) => eval::run(&ctx, a),
        Cmd::Calibrate(a) => calibrate::run(&ctx, a),
        Cmd::Tune(a) => tune::run(&ctx, a),
        Cmd::Bootstrap(a) => bootstrap::run(&ctx, a),
        Cmd::Demo(a) => demo::run(&ctx, a),
        Cmd::Models(a) => models::run(&ctx, a),
        Cmd::Serve(a) => serve::run(&ctx, a),
        Cmd::Redact(a) => redact::run(&ctx, a),
        Cmd::Monitor(a) => monitor::run(a),
        Cmd::Discover(a) => discover::run(&ctx, a),
        Cmd::Embed {
            input,
            output,
            cols,
        } => index::embed(&ctx, &input, &output, &cols),
        Cmd::Static(StaticCmd::Distill {
            out,
            dims,
            corpus,
            cols,
        }) => index::distill(&ctx, &out, dims, &corpus, &cols),
        Cmd::Bench(BenchCmd::Embed(a)) => bench::embed(&ctx, a),
        Cmd::Bench(BenchCmd::Llm(a)) => bench::llm(&ctx, a),
        Cmd::Bench(BenchCmd::AccuracyCost(a)) => accuracy_cost::run(&ctx, a),
        Cmd::Bench(BenchCmd::Bootstrap(a)) => bench::bootstrap(&ctx, a),
        Cmd::Bench(BenchCmd::Build(a)) => bench::build(&ctx, a),
        Cmd::Bench(BenchCmd::Encoders(a)) => bench::encoders(&ctx, a),
        Cmd::Bench(BenchCmd::Serve(a)) => bench::serve(&ctx, a),
        Cmd::Bench(BenchCmd::Redact(a)) => bench::redact(&ctx, a),
        Cmd::Bench(BenchCmd::Guards(a)) => bench::guards(a),
        Cmd::Llm(c) => llm::run(&ctx, c),
    }
}
