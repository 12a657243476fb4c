//! `semtel discover`: the density clustering against scikit-learn's HDBSCAN on the same
//! vectors, and the whole command on Banking77 with labels the index lacks — the LLM is the
//! loopback simulator (it names a cluster after the true label most of its representatives
//! have), the model is the real one.

mod common;
use common::*;
use semtel::cluster::{self, Params};
use semtel::llm::simulator::{self, SimConfig};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[test]
fn hdbscan_agrees_with_scikit_learn_on_the_reference_blobs() {
    let dir = repo().join("tests/fixtures/hdbscan");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let dims = r["dims"].as_u64().unwrap() as usize;
    let reference: Vec<i32> = r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect();
    let bytes = std::fs::read(dir.join("vectors.f32")).unwrap();
    let v: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(v.len(), reference.len() * dims);
    let p = Params::new(
        r["min_cluster_size"].as_u64().unwrap() as usize,
        r["min_samples"].as_u64().unwrap() as usize,
    );
    let c = cluster::cluster(&v, dims, &p).unwrap();
    let ref_k = reference.iter().copied().max().unwrap() + 1;
    let ari = cluster::adjusted_rand_index(&c.labels, &reference);
    let noise = |l: &[i32]| l.iter().filter(|&&x| x < 0).count();
    eprintln!(
        "clusters {} (sklearn {ref_k}), noise {} (sklearn {}), ARI {ari:.4}",
        c.n_clusters,
        noise(&c.labels),
        noise(&reference)
    );
    assert_eq!(c.n_clusters as i32, ref_k);
    assert!(
        ari >= 0.999,
        "the exact path is scikit-learn's algorithm: ARI {ari}"
    );
    // The same through usearch's approximate graph (the path for large inputs): the
    // approximation may cost a little, not the clusters.
    let mut big = Vec::new();
    let mut big_ref = Vec::new();
    for rep in 0..3 {
        for (i, row) in v.chunks(dims).enumerate() {
            // Three far-apart copies of the blobs: 5,400 rows, past the exact-search limit.
            big.extend(row.iter().map(|x| x + 100.0 * rep as f32));
            big_ref.push(if reference[i] < 0 {
                -1
            } else {
                reference[i] + rep * ref_k
            });
        }
    }
    let c = cluster::cluster(&big, dims, &p).unwrap();
    let ari = cluster::adjusted_rand_index(&c.labels, &big_ref);
    eprintln!("approximate graph: clusters {}, ARI {ari:.4}", c.n_clusters);
    assert_eq!(c.n_clusters as i32, 3 * ref_k);
    assert!(ari >= 0.95, "ARI {ari}");
}

/// Banking77 rows of `labels`, `per` of each, from `split`.
fn banking_rows(split: &str, labels: &[&str], per: usize) -> Vec<serde_json::Value> {
    let mut n: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for l in std::fs::read_to_string(shared().join("data/banking77/banking77.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let label = v["label"].as_str().unwrap().to_string();
        if v["split"] != split || !labels.contains(&label.as_str()) {
            continue;
        }
        let c = n.entry(label).or_default();
        if *c < per {
            *c += 1;
            out.push(v);
        }
    }
    out
}

fn all_labels() -> Vec<String> {
    let mut s: Vec<String> =
        std::fs::read_to_string(shared().join("data/banking77/banking77.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["label"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
    s.sort();
    s
}

/// `semtel ARGS… --json`: the summary it printed (the run must succeed; its log is shown).
fn discover_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["discover"];
    a.extend_from_slice(args);
    a.push("--json");
    let run = semtel_cmd(&a).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    eprintln!("{}", ok(run));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn write_jsonl(p: &Path, rows: &[serde_json::Value], extra: &[&str]) -> PathBuf {
    let mut s: String = rows.iter().map(|r| format!("{r}\n")).collect();
    for e in extra {
        s.push_str(e);
        s.push('\n');
    }
    std::fs::write(p, s).unwrap();
    p.to_path_buf()
}

#[test]
fn discover_names_the_topics_the_index_lacks() {
    let dir = tmpdir("discover-e2e");
    let labels = all_labels();
    let absent = [
        "card_arrival",
        "lost_or_stolen_phone",
        "exchange_rate",
        "top_up_failed",
        "passcode_forgotten",
    ];
    let seen = [
        "cash_withdrawal_charge",
        "terminate_account",
        "visa_or_mastercard",
        "refund_not_showing_up",
    ];
    let known: Vec<&str> = labels
        .iter()
        .map(String::as_str)
        .filter(|l| !absent.contains(l))
        .collect();
    let exemplars = write_jsonl(
        &dir.join("ex.jsonl"),
        &banking_rows("train", &known, 12),
        &[],
    );
    let idx = dir.join("idx");
    ok(semtel_cmd(&[
        "index",
        "build",
        "--exemplars",
        exemplars.to_str().unwrap(),
        "--out",
        idx.to_str().unwrap(),
        "--overwrite",
        "--model",
        model_dir().to_str().unwrap(),
    ])
    .output()
    .unwrap());
    // Traffic: the absent topics and some known ones, a planted e-mail address in some rows,
    // and rows no reader or encoder can use.
    let mut traffic: Vec<serde_json::Value> = banking_rows("test", &absent, 40);
    traffic.extend(banking_rows("test", &seen, 40));
    for (i, r) in traffic.iter_mut().enumerate() {
        if i % 7 == 0 {
            let t = format!(
                "{} my email is jane.roe{i}@example.org",
                r["text"].as_str().unwrap()
            );
            r["text"] = serde_json::json!(t);
        }
        r["ts"] = serde_json::json!(format!("2026-11-{:02}T10:00:00Z", 1 + i % 28));
    }
    let long = "x".repeat(20_000);
    let input = write_jsonl(
        &dir.join("traffic.jsonl"),
        &traffic,
        &[
            "{\"id\": \"broken\", \"text\": ",
            "{\"id\": \"nul\", \"text\": \"a\\u0000b 東京 😀\"}",
            &format!("{{\"id\": \"long\", \"text\": \"{long}\"}}"),
            "{\"id\": \"empty\", \"text\": \"\"}",
        ],
    );
    let truth: HashMap<String, String> = traffic
        .iter()
        .map(|r| {
            (
                simulator::truth_key(r["text"].as_str().unwrap()),
                r["label"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let sim = simulator::start(
        SimConfig {
            truth,
            latency_ms: 5.0,
            ..SimConfig::default()
        },
        0,
    )
    .unwrap();
    let cfg = sim_llm_config(&dir.join("llm.toml"), &sim.url(), "");
    let sent = dir.join("sent.jsonl");
    let _ = std::fs::remove_file(&sent);
    let out = dir.join("out");
    let r = discover_json(&[
        "--input",
        input.to_str().unwrap(),
        "--index",
        idx.to_str().unwrap(),
        "--llm",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--min-conversations",
        "15",
        "--time-col",
        "ts",
        "--levels",
        "2",
        "--show-sent",
        sent.to_str().unwrap(),
    ]);
    // Every line is a row (the broken one an unreadable row), none ends the run.
    assert_eq!(r["rows_read"], traffic.len() as u64 + 4, "{r}");
    assert!(r["unreadable"].as_u64().unwrap() >= 1);
    let clusters = r["clusters"].as_array().unwrap();
    let named: HashMap<String, &serde_json::Value> = clusters
        .iter()
        .filter_map(|c| Some((c["name"].as_str()?.to_string(), c)))
        .collect();
    let found_new: Vec<&str> = absent
        .iter()
        .copied()
        .filter(|a| named.get(*a).is_some_and(|c| c["status"] == "new"))
        .collect();
    let found_known: Vec<&str> = seen
        .iter()
        .copied()
        .filter(|a| named.get(*a).is_some_and(|c| c["status"] == "looks_like"))
        .collect();
    eprintln!("new: {found_new:?}; looks like a label: {found_known:?}");
    assert!(
        found_new.len() >= 3,
        "absent topics found as new: {found_new:?}"
    );
    assert!(
        found_known.len() >= 2,
        "known topics recognised: {found_known:?}"
    );
    for a in &found_new {
        assert!(r["new_labels"][*a].is_string());
    }
    // The privacy floor: clusters under it carry no ids and no name.
    for c in clusters {
        if c["conversations"].as_u64().unwrap() < 15 {
            assert_eq!(c["status"], "below_floor");
            assert!(c["example_ids"].as_array().unwrap().is_empty());
            assert!(c["name"].is_null());
        }
        assert!(
            c["examples"].as_array().unwrap().is_empty(),
            "no text without --show-examples"
        );
    }
    // Only redacted text left the machine.
    let sent_text = std::fs::read_to_string(&sent).unwrap();
    assert!(!sent_text.is_empty());
    assert!(
        !sent_text.contains("@example.org"),
        "an e-mail address was sent"
    );
    // The outputs: a taxonomy bootstrap reads, one row per clustered conversation, a page.
    let tax = semtel::app::bootstrap::TaxonomyFile::load(&out.join("taxonomy.toml")).unwrap();
    for a in &found_new {
        assert!(tax.labels.contains_key(*a));
    }
    assert!(
        tax.labels.contains_key("terminate_account"),
        "the index's labels come first"
    );
    let f = std::fs::File::open(out.join("clusters.parquet")).unwrap();
    let rows: usize = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap().num_rows())
        .sum();
    assert_eq!(rows as u64, r["rows_clustered"].as_u64().unwrap());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("<svg")
            && html.contains("Share over time")
            && html.contains("Broader topics")
    );
    assert_eq!(r["windows"].as_array().unwrap().len(), 12);
    assert!(!r["groups"].as_array().unwrap().is_empty());
    let calls = r["llm"]["calls"].as_u64().unwrap();
    assert!(calls > 0);

    // Again from `semtel embed` vectors, the escalated rows of a classify output only, and the
    // cache warm: the same clusters for the rows both runs share, no new call.
    let vecs = dir.join("vectors.parquet");
    ok(semtel_cmd(&[
        "embed",
        "--input",
        input.to_str().unwrap(),
        "--output",
        vecs.to_str().unwrap(),
        "--model",
        model_dir().to_str().unwrap(),
    ])
    .output()
    .unwrap());
    let cached_cfg = sim_llm_config(
        &dir.join("llm-cached.toml"),
        &sim.url(),
        &format!(
            "cache = {:?}",
            dir.join("cache.jsonl").display().to_string()
        ),
    );
    // (sim_llm_config writes `cache = "off"` first; the later key would be a duplicate.)
    let text = std::fs::read_to_string(&cached_cfg)
        .unwrap()
        .replacen("cache = \"off\"\n", "", 1);
    std::fs::write(&cached_cfg, text).unwrap();
    let _ = std::fs::remove_file(dir.join("cache.jsonl"));
    let mut runs = Vec::new();
    for _ in 0..2 {
        let out2 = dir.join("out2");
        runs.push(discover_json(&[
            "--input",
            input.to_str().unwrap(),
            "--index",
            idx.to_str().unwrap(),
            "--vectors",
            vecs.to_str().unwrap(),
            "--llm",
            cached_cfg.to_str().unwrap(),
            "--out",
            out2.to_str().unwrap(),
            "--min-conversations",
            "15",
        ]));
    }
    assert_eq!(runs[0]["embedded"], 0, "every readable row had a vector");
    assert!(runs[0]["vectors_reused"].as_u64().unwrap() >= traffic.len() as u64);
    assert!(runs[0]["llm"]["calls"].as_u64().unwrap() > 0);
    assert_eq!(
        runs[1]["llm"]["calls"], 0,
        "the second run is answered from the cache"
    );
    assert_eq!(runs[0]["clusters"], runs[1]["clusters"]);

    // Only what a classify run escalated.
    let classified = dir.join("classified.jsonl");
    let _ = std::fs::remove_file(&classified);
    ok(semtel_cmd(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        classified.to_str().unwrap(),
        "--model",
        model_dir().to_str().unwrap(),
    ])
    .output()
    .unwrap());
    let escalated = read_jsonl(&classified)
        .iter()
        .filter(|v| v["escalate_reason"].as_str().is_some_and(|s| !s.is_empty()))
        .count();
    let r3 = discover_json(&[
        "--input",
        input.to_str().unwrap(),
        "--index",
        idx.to_str().unwrap(),
        "--escalated-from",
        classified.to_str().unwrap(),
        "--out",
        dir.join("out3").to_str().unwrap(),
        "--min-conversations",
        "15",
    ]);
    eprintln!(
        "escalated rows {escalated}, clustered {}",
        r3["rows_clustered"]
    );
    assert!(r3["rows_clustered"].as_u64().unwrap() <= escalated as u64);
    assert!(r3["not_escalated"].as_u64().unwrap() > 0);
    assert!(r3["llm"].is_null());
}
