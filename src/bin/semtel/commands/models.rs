//! `semtel models`: the known encoders as a table (or JSON).

use crate::args::ModelsArgs;
use crate::options::Ctx;
use anyhow::Result;
use std::path::Path;

pub fn run(ctx: &Ctx, a: ModelsArgs) -> Result<()> {
    let texts: Vec<String> = if a.measure {
        let opts = semtel::input::InputOptions::default();
        semtel::input::read_all(Path::new("data/conversations.jsonl"), &opts)?
            .into_iter()
            .filter_map(|r| r.content.ok().map(|c| c.flatten()))
            .collect()
    } else {
        Vec::new()
    };
    let opts = ctx.encoder_options();
    let list = semtel::app::models::list(
        Path::new("models"),
        a.measure.then_some((&opts, texts.as_slice())),
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<22} {:<30} {:<30} {:>5} {:>6} {:<10} {:<9} {:>10} {:>10}",
        "name",
        "hub id",
        "languages",
        "dims",
        "layers",
        "licence",
        "here",
        "tokens/s",
        "int8 tok/s"
    );
    for m in &list {
        let num = |v: Option<usize>| v.map_or("-".into(), |v| v.to_string());
        println!(
            "{:<22} {:<30} {:<30} {:>5} {:>6} {:<10} {:<9} {:>10} {:>10}",
            m.name,
            m.hub_id,
            m.languages,
            num(m.dims),
            num(m.layers),
            m.licence,
            if m.present { "present" } else { "missing" },
            m.tokens_per_second
                .map_or("-".into(), |t| format!("{t:.0}")),
            m.int8_tokens_per_second
                .map_or("-".into(), |t| format!("{t:.0}"))
        );
    }
    for m in &list {
        if let Some(t) = &m.terms {
            println!("  {}: {t}", m.name);
        }
        if !m.present {
            println!("  {}: {}   (from {})", m.name, m.fetch, m.source);
        } else if let Some(p) = &m.problem {
            println!("  {}: {p}", m.name);
        } else if let Some(e) = &m.engine {
            println!(
                "  {}: {} tokens max{}, measured with {e}",
                m.name,
                m.max_tokens.unwrap_or(0),
                m.prompt
                    .as_ref()
                    .map_or(String::new(), |p| format!(", prompt {p:?}"))
            );
            if let Some(e8) = &m.int8_engine {
                println!("  {}: int8 measured with {e8}", m.name);
            }
        }
    }
    if !a.measure {
        println!("(--measure times each present model on data/conversations.jsonl with this machine's threads)");
    }
    Ok(())
}
