//! No input, second process, damaged file or full disk may end a run, lose a row or write one
//! twice. One test per defect class: multilingual and messy input end to end, the output lock,
//! duplicate ids, damaged indexes, a full disk, and the small ones (BOM, truncated gzip,
//! `--max-line-bytes`, non-text Parquet columns, secrets in URLs and error bodies).

mod common;
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn semtel(args: &[&str]) -> Output {
    semtel_cmd(args)
        .arg("--model")
        .arg(model_dir())
        .output()
        .expect("run semtel")
}

/// `semtel classify --index IDX --input IN --output OUT EXTRA…` with the test model.
fn classify(idx: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    semtel(&args)
}

fn no_panic(o: &Output) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
}

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/multilingual.jsonl")
}

fn fixture_rows() -> usize {
    std::fs::read_to_string(fixture()).unwrap().lines().count()
}

/// The project's multilingual fixture through `index build`, `classify` (JSONL and Parquet)
/// and `eval`: exit 0, one row per input row, no panic.
#[test]
fn multilingual_conversations_end_to_end() {
    let dir = tmpdir("rob-multilingual");
    let n = fixture_rows();
    let idx = dir.join("ml-idx");
    let o = semtel(&[
        "index",
        "build",
        "--exemplars",
        fixture().to_str().unwrap(),
        "--out",
        idx.to_str().unwrap(),
    ]);
    no_panic(&o);
    let log = ok(o);
    assert!(log.contains(&format!("{n} exemplars")), "{log}");
    for out_name in ["ml.jsonl", "ml.parquet"] {
        let out = dir.join(out_name);
        let o = classify(&idx, &fixture(), &out, &[]);
        no_panic(&o);
        let log = ok(o);
        assert!(log.contains(&format!("wrote {n} rows")), "{log}");
        assert!(log.contains("errors 0"), "{log}");
        assert_eq!(semtel::output::read_ids_and_labels(&out).unwrap().len(), n);
    }
    let o = semtel(&[
        "eval",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        fixture().to_str().unwrap(),
        "--json",
    ]);
    no_panic(&o);
    let log = ok(o);
    assert!(log.contains("accuracy"), "{log}");
}

/// The shared torture set (`../shared/tools/multilingual_torture.py`): exit 0, one row per
/// input row, error rows for exactly the empty ones.
#[test]
fn shared_torture_set_gets_one_row_per_input_row() {
    let dir = tmpdir("rob-torture");
    let input = dir.join("torture.jsonl");
    let gen = Command::new("python3")
        .arg(shared().join("tools/multilingual_torture.py"))
        .arg(&input)
        .output()
        .expect("python3 runs the shared generator");
    assert!(gen.status.success());
    let idx = sample_index(&dir);
    let out = dir.join("out.jsonl");
    let o = classify(&idx, &input, &out, &[]);
    no_panic(&o);
    ok(o);
    let want = std::fs::read_to_string(&input).unwrap().lines().count();
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), want);
    let errors: Vec<_> = rows.iter().filter(|r| r["decided_by"] == "error").collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors
        .iter()
        .all(|r| r["error"].as_str().unwrap().contains("empty")));
}

/// Every bad-row kind in one file: the run goes on, one row per non-blank line, and the BOM
/// does not cost the first row.
#[test]
fn every_bad_row_kind_in_one_file() {
    let dir = tmpdir("rob-badmix");
    let idx = sample_index(&dir);
    let input = dir.join("mix.jsonl");
    let mut d: Vec<u8> = Vec::new();
    d.extend_from_slice(
        b"\xEF\xBB\xBF{\"id\": \"bom\", \"text\": \"How do I reverse a list in Python?\"}\n",
    );
    d.extend_from_slice(b"{\"id\": \"broken\", \"text\": \"unterminated\n");
    d.extend_from_slice(b"{\"id\": \"num\", \"text\": 42}\n");
    d.extend_from_slice(b"{\"id\": \"list\", \"text\": [\"a\"]}\n");
    d.extend_from_slice(b"{\"id\": \"nul\", \"text\": \"a\\u0000b nul inside\"}\n");
    d.extend_from_slice(b"{\"id\": \"surrogate\", \"text\": \"\\ud800 lone\"}\n");
    d.extend_from_slice(b"{\"id\": \"utf8\", \"text\": \"caf\xff latte\"}\n");
    d.extend_from_slice(
        format!("{{\"id\": \"deep\", \"text\": {}}}\n", "[".repeat(500)).as_bytes(),
    );
    d.extend_from_slice(
        format!("{{\"id\": \"long\", \"text\": \"{}\"}}\n", "x".repeat(5000)).as_bytes(),
    );
    d.extend_from_slice(b"{\"id\": \"emptyturns\", \"turns\": []}\n");
    d.extend_from_slice(b"{\"id\": \"last\", \"text\": \"no newline at the end\"}");
    std::fs::write(&input, d).unwrap();
    let out = dir.join("out.jsonl");
    let o = classify(&idx, &input, &out, &["--max-line-bytes", "4000"]);
    no_panic(&o);
    ok(o);
    let rows: HashMap<String, serde_json::Value> = read_jsonl(&out)
        .into_iter()
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(rows.len(), 11, "{:?}", rows.keys());
    let by = |id: &str| rows[id]["decided_by"].as_str().unwrap().to_string();
    let err = |id: &str| rows[id]["error"].as_str().unwrap_or("").to_string();
    assert_ne!(by("bom"), "error", "{}", rows["bom"]);
    assert_ne!(by("nul"), "error");
    assert_ne!(by("last"), "error");
    assert!(err("num").contains("not a string"));
    assert!(err("list").contains("not a string"));
    assert!(
        err("mix:8").contains("--max-line-bytes"),
        "{}",
        err("mix:8")
    );
    // A line with invalid UTF-8 keeps its own id ("utf8"); broken JSON gets a positional one.
    for id in ["mix:1", "mix:5", "utf8", "mix:7", "emptyturns"] {
        assert_eq!(by(id), "error", "{id}: {}", rows[id]);
    }
}

/// A `.jsonl.gz` cut off mid-stream: the rows before the cut are classified, the cut becomes
/// one error row naming the line and what to do.
#[test]
fn truncated_gzip_keeps_its_readable_rows() {
    let dir = tmpdir("rob-gz");
    let idx = sample_index(&dir);
    let base = std::fs::read_to_string(repo().join("data/conversations.jsonl")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for rep in 0..20 {
        for l in base.lines() {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] = format!("{}-{rep}", v["id"].as_str().unwrap()).into();
            writeln!(gz, "{v}").unwrap();
        }
    }
    let bytes = gz.finish().unwrap();
    let input = dir.join("cut.jsonl.gz");
    std::fs::write(&input, &bytes[..bytes.len() * 6 / 10]).unwrap();
    let out = dir.join("out.jsonl");
    let o = classify(&idx, &input, &out, &[]);
    no_panic(&o);
    ok(o);
    let rows = read_jsonl(&out);
    let errors: Vec<_> = rows.iter().filter(|r| r["decided_by"] == "error").collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = errors[0]["error"].as_str().unwrap();
    assert!(
        e.contains("truncated") && e.contains("line") && e.contains("--resume"),
        "{e}"
    );
    assert!(rows.len() > 300, "only {} rows kept", rows.len());
}

fn write_parquet(path: &Path, cols: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// A Parquet integer column used as text is an error, as it is in JSONL, not a stringified
/// number.
#[test]
fn parquet_non_text_column_is_an_error_like_jsonl() {
    let dir = tmpdir("rob-pq-int");
    let idx = sample_index(&dir);
    let input = dir.join("ints.parquet");
    write_parquet(
        &input,
        vec![
            (
                "id",
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
            ),
            ("text", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ],
    );
    let o = classify(&idx, &input, &dir.join("o.jsonl"), &[]);
    no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not text") && err.contains("Int64"), "{err}");
}

/// While one process writes an output, a second one is refused (JSONL and Parquet) and the
/// first one's output is untouched.
#[test]
fn a_second_writer_is_refused() {
    let dir = tmpdir("rob-lock");
    let idx = sample_index(&dir);
    for name in ["o.jsonl", "o.parquet", "o_dir"] {
        let out = dir.join(name);
        let lock = semtel::output::PathLock::acquire(&out).unwrap();
        let o = classify(
            &idx,
            Path::new("data/conversations.jsonl"),
            &out,
            &["--resume"],
        );
        assert_eq!(o.status.code(), Some(1), "{name}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("another semtel process"), "{err}");
        assert!(!out.exists(), "{name}: the refused run wrote something");
        drop(lock);
        ok(classify(
            &idx,
            Path::new("data/conversations.jsonl"),
            &out,
            &[],
        ));
    }
}

/// Repeated ids: an uninterrupted run and a killed-and-resumed run write the same number of
/// rows per id (one per input row), and the repeats are reported.
#[test]
fn duplicate_ids_follow_one_rule_in_both_paths() {
    let dir = tmpdir("rob-dups");
    let idx = sample_index(&dir);
    let base: Vec<String> = std::fs::read_to_string(repo().join("data/conversations.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    // Every conversation twice under the same id, and a third copy of the first ten.
    let mut text = String::new();
    for l in base.iter().chain(base.iter()).chain(base.iter().take(10)) {
        text.push_str(l);
        text.push('\n');
    }
    let input = dir.join("dups.jsonl");
    std::fs::write(&input, text).unwrap();
    let mut want: HashMap<String, usize> = HashMap::new();
    for l in std::fs::read_to_string(&input).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        *want
            .entry(v["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let run = |out: &Path, resume: bool, abort: Option<&str>| {
        let mut c = semtel_cmd(&[
            "classify",
            "--index",
            idx.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--chunk-rows",
            "7",
        ]);
        c.arg("--model")
            .arg(model_dir())
            .env_remove("SEMTEL_ABORT_AT");
        if resume {
            c.arg("--resume");
        }
        if let Some(a) = abort {
            c.env("SEMTEL_ABORT_AT", a);
        }
        c.output().unwrap()
    };
    let whole = dir.join("whole.jsonl");
    let log = ok(run(&whole, false, None));
    assert!(log.contains("60 rows repeat an id"), "{log}");
    assert_eq!(id_counts(&whole), want);
    for out_name in ["killed.jsonl", "killed.parquet"] {
        let killed = dir.join(out_name);
        let o = run(&killed, false, Some("batch-written:9"));
        assert!(o.status.code().is_none(), "not aborted");
        ok(run(&killed, true, None));
        assert_eq!(id_counts(&killed), want, "{out_name}");
    }
}

fn classify_with(idx: &Path, dir: &Path) -> Output {
    classify(
        idx,
        Path::new("data/conversations.jsonl"),
        &dir.join("o.jsonl"),
        &["--overwrite"],
    )
}

/// Damaged index files are refused with advice instead of changing labels or panicking.
#[test]
fn damaged_indexes_are_refused() {
    let dir = tmpdir("rob-damage");
    let clean = sample_index(&dir);
    let copy = |name: &str| {
        let d = dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(&clean).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let vectors = |d: &Path| d.join(semtel::index::VECTORS);
    // Zeroed vector bytes.
    let zeroed = copy("zeroed");
    let mut b = std::fs::read(vectors(&zeroed)).unwrap();
    let n = b.len();
    b[n / 2..n / 2 + 4096].fill(0);
    std::fs::write(vectors(&zeroed), &b).unwrap();
    // Random bytes over the graph region (the start of the file, after the header).
    let random = copy("random");
    let mut b = std::fs::read(vectors(&random)).unwrap();
    let mut rng = 0x9e3779b97f4a7c15u64;
    for x in b[64..4096].iter_mut() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        *x = rng as u8;
    }
    std::fs::write(vectors(&random), &b).unwrap();
    for d in [&zeroed, &random] {
        let o = classify_with(d, &dir);
        no_panic(&o);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("damaged") && err.contains("rebuild"), "{err}");
    }
    // A manifest with k = 0.
    let k0 = copy("k0");
    let m = std::fs::read_to_string(k0.join("manifest.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&m).unwrap();
    v["decision"]["k"] = 0.into();
    std::fs::write(k0.join("manifest.json"), v.to_string()).unwrap();
    let o = classify_with(&k0, &dir);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("decision.k = 0"));
    // The clean copy still works.
    ok(classify_with(&clean, &dir));
}

/// A full disk is named as such, and `--resume` finishes the run once there is room again.
/// Needs a small tmpfs in a private mount namespace (root, as on CI); says so and passes
/// where this machine cannot make one.
#[test]
fn full_disk_is_reported_and_resume_recovers() {
    let dir = tmpdir("rob-diskfull");
    let idx = sample_index(&dir);
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=64k tmpfs {}",
            mnt.display()
        ))
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and unshare)");
        return;
    }
    let input = dir.join("in.jsonl");
    let base = std::fs::read_to_string(repo().join("data/conversations.jsonl")).unwrap();
    let mut text = String::new();
    for rep in 0..8 {
        for l in base.lines() {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["id"] = format!("{}-{rep}", v["id"].as_str().unwrap()).into();
            text.push_str(&format!("{v}\n"));
        }
    }
    std::fs::write(&input, &text).unwrap();
    let cmd = |resume: &str| {
        format!(
            "{} classify --index {} --input {} --output {}/out.jsonl --model {} -q --chunk-rows 16 {resume}",
            bin().display(),
            idx.display(),
            input.display(),
            mnt.display(),
            model_dir().display()
        )
    };
    // One namespace: a 64 KiB disk fills, then grows to 64 MiB and the run is resumed.
    let script = format!(
        "set -u; mount -t tmpfs -o size=64k tmpfs {m}; {first} 2> {d}/first.err; echo $? > {d}/first.code; \
         mount -o remount,size=64m {m}; {second} 2> {d}/second.err; echo $? > {d}/second.code; \
         cp {m}/out.jsonl {d}/out.jsonl",
        m = mnt.display(),
        d = dir.display(),
        first = cmd(""),
        second = cmd("--resume"),
    );
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read("first.code").trim(), "1");
    assert!(
        read("first.err").contains("no space left on device"),
        "{}",
        read("first.err")
    );
    assert_eq!(read("second.code").trim(), "0", "{}", read("second.err"));
    let rows = read_jsonl(&dir.join("out.jsonl"));
    assert_eq!(rows.len(), text.lines().count());
}

/// A one-shot HTTP server on loopback that records the request line and answers 401 with a
/// body that echoes the request's Authorization header (as some gateways do).
fn echo_401_server() -> (String, std::thread::JoinHandle<Vec<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(false).unwrap();
    let h = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut last = std::time::Instant::now();
        listener.set_nonblocking(true).unwrap();
        while std::time::Instant::now() < deadline && seen.len() < 64 {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(20));
                // Done once requests stopped coming for a while.
                if !seen.is_empty() && last.elapsed() > std::time::Duration::from_secs(3) {
                    break;
                }
                continue;
            };
            last = std::time::Instant::now();
            s.set_nonblocking(false).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let head_end = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(p + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let auth = head
                .lines()
                .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                .unwrap_or("")
                .to_string();
            seen.push(head.lines().next().unwrap_or("").to_string());
            let body = format!(
                "{{\"error\": {{\"message\": \"Incorrect API key provided: {}\"}}}}",
                auth.replace('"', "")
            );
            let resp = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
        seen
    });
    (format!("http://{addr}"), h)
}

/// An API key in the endpoint URL or echoed back in a 401 body never reaches the output or
/// the error that stops the run, and the URL keeps its query string after the path.
#[test]
fn secrets_never_reach_the_output() {
    let dir = tmpdir("rob-secrets");
    let idx = sample_index(&dir);
    let (url, server) = echo_401_server();
    let cfg = dir.join("llm.toml");
    std::fs::write(
        &cfg,
        format!(
            "cache = \"off\"\nmax_attempts = 1\nmax_item_attempts = 1\n[[endpoints]]\nname = \"gw\"\nurl = \"{url}/v1?api_key=QUERYSECRET42xyz\"\nmodel = \"m\"\napi_key_env = \"SEMTEL_TEST_SECRET\"\n"
        ),
    )
    .unwrap();
    let input = dir.join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"text\": \"How do I reverse a list in Python?\"}\n",
    )
    .unwrap();
    let out = dir.join("o.jsonl");
    let key = "sk-test-HEADERSECRET0123456789";
    let o = semtel_cmd(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--llm",
        cfg.to_str().unwrap(),
        "--threshold",
        "2",
    ])
    .arg("--model")
    .arg(model_dir())
    .env("SEMTEL_TEST_SECRET", key)
    .output()
    .unwrap();
    no_panic(&o);
    let all = String::from_utf8_lossy(&o.stderr).to_string()
        + &String::from_utf8_lossy(&o.stdout)
        + &std::fs::read_to_string(&out).unwrap_or_default();
    for secret in [key, "HEADERSECRET0123456789", "QUERYSECRET42xyz"] {
        assert!(!all.contains(secret), "{secret} leaked: {all}");
    }
    // A refused key stops the run with the (scrubbed) reason; the row is left for --resume.
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused the API key (401"),
        "{all}"
    );
    assert_eq!(read_jsonl(&out).len(), 0);
    drop(o);
    let seen = server.join().unwrap();
    assert!(
        seen.iter()
            .all(|l| l.starts_with("POST /v1/chat/completions?api_key=QUERYSECRET42xyz ")),
        "{seen:?}"
    );
}

/// A bug that panics on one row costs that row (an error row saying so), not the run: every
/// other row is classified, the summary counts it, and the exit code (3) says the run had
/// internal errors.
#[test]
fn a_panic_is_one_error_row_not_the_end_of_the_run() {
    let dir = tmpdir("rob-panic");
    let idx = sample_index(&dir);
    let out = dir.join("o.jsonl");
    let o = semtel_cmd(&[
        "classify",
        "--index",
        idx.to_str().unwrap(),
        "--input",
        "data/conversations.jsonl",
        "--output",
        out.to_str().unwrap(),
    ])
    .arg("--model")
    .arg(model_dir())
    .env("SEMTEL_PANIC_ON_ROW", "conv-003")
    .output()
    .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1 rows hit an internal error"), "{err}");
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 50);
    for r in &rows {
        if r["id"] == "conv-003" {
            assert_eq!(r["decided_by"], "error");
            assert!(
                r["error"].as_str().unwrap().contains("internal error")
                    && r["error"].as_str().unwrap().contains("injected panic"),
                "{r}"
            );
        } else {
            assert_ne!(r["decided_by"], "error", "{r}");
        }
    }
}

/// A Parquet file with a malformed page header (found by the parquet_reader fuzz target: the
/// parquet crate unwraps a missing header there). Reading it gives rows and error rows, or a
/// clear error, never a crash.
#[test]
fn a_damaged_parquet_page_is_not_a_crash() {
    let path = repo().join("tests/fixtures/damaged-page.parquet");
    let opts = semtel::input::InputOptions {
        batch_rows: 3,
        ..Default::default()
    };
    if let Ok(mut r) = semtel::input::open(&path, &opts) {
        let mut rows = 0;
        while let Ok(Some(b)) = r.next_batch() {
            rows += b.len();
        }
        assert!(rows > 0);
    }
    let dir = tmpdir("rob-damaged-parquet");
    let idx = sample_index(&dir);
    let o = classify(&idx, &path, &dir.join("o.jsonl"), &[]);
    assert!(matches!(o.status.code(), Some(0) | Some(1)), "{o:?}");
}

/// A categorical (dictionary-encoded) text column is read as text; a JSON line with invalid
/// UTF-8 keeps its id in its error row; `turns` given as a string says so.
#[test]
fn dictionary_text_invalid_utf8_ids_and_string_turns() {
    use arrow_array::types::Int32Type;
    use arrow_array::DictionaryArray;
    let dir = tmpdir("rob-dict");
    let idx = sample_index(&dir);
    let input = dir.join("dict.parquet");
    let text: DictionaryArray<Int32Type> = vec![
        "how do I sort a list in Python",
        "plan a trip to Lisbon",
        "how do I sort a list in Python",
    ]
    .into_iter()
    .collect();
    write_parquet(
        &input,
        vec![
            (
                "id",
                Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
            ),
            ("text", Arc::new(text) as ArrayRef),
        ],
    );
    let out = dir.join("o.jsonl");
    let o = classify(&idx, &input, &out, &[]);
    no_panic(&o);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = read_jsonl(&out);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["decided_by"] != "error"), "{rows:?}");

    let jsonl = dir.join("bad.jsonl");
    let mut bytes =
        b"{\"id\": \"ok-1\", \"text\": \"hello\"}\n{\"id\": \"bad-utf8\", \"text\": \"caf\xe9\"}\n"
            .to_vec();
    bytes.extend_from_slice(b"{\"id\": \"str-turns\", \"turns\": \"user: hi\"}\n");
    std::fs::write(&jsonl, bytes).unwrap();
    let out = dir.join("o2.jsonl");
    let o = classify(&idx, &jsonl, &out, &[]);
    no_panic(&o);
    let rows = read_jsonl(&out);
    let by: HashMap<String, serde_json::Value> = rows
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect();
    assert_eq!(by.len(), 3, "{by:?}");
    assert!(by["bad-utf8"]["error"].as_str().unwrap().contains("UTF-8"));
    assert!(by["str-turns"]["error"]
        .as_str()
        .unwrap()
        .contains("`turns` is a string"));
}

/// An index whose files are cut or overwritten while a process has it open: searches go on
/// (the vectors live in the process's memory, not in a mapping of the file).
#[test]
fn an_open_index_survives_its_files_being_cut() {
    let dir = tmpdir("rob-cut-index");
    let idx = sample_index(&dir);
    let index = semtel::index::ExemplarIndex::open(&idx, true).unwrap();
    let q = index.vectors_of(&[0, 1, 2]).unwrap();
    let before = index.search_batch(&q, 5).unwrap();
    let vectors = idx.join(semtel::index::VECTORS);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vectors)
        .unwrap()
        .set_len(64)
        .unwrap();
    let after = index.search_batch(&q, 5).unwrap();
    assert_eq!(before, after);
    // Reopening the damaged files is refused with a message, not a crash.
    let e = semtel::index::ExemplarIndex::open(&idx, true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("damaged"), "{e}");
}
