//! Any bytes as a JSONL file: the reader never panics, and once a readable row was seen it
//! never fails — every further line becomes a row or an error row.
#![no_main]
use libfuzzer_sys::fuzz_target;
use semtel::input::{self, InputOptions};

fuzz_target!(|data: &[u8]| {
    // libFuzzer's panic hook aborts on every panic; panics semtel catches on purpose (the
    // parquet crate's, on damaged pages) are handled, not crashes. Any other panic still is.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(semtel::error::quiet_expected_panics);
    let path = std::env::temp_dir().join(format!("semtel-fuzz-{}.jsonl", std::process::id()));
    let mut bytes = b"{\"text\": \"first readable row\"}\n".to_vec();
    bytes.extend_from_slice(data);
    std::fs::write(&path, &bytes).unwrap();
    for batch_rows in [1, 7] {
        let opts = InputOptions {
            batch_rows,
            max_line_bytes: 512,
            ..Default::default()
        };
        let rows = input::read_all(&path, &opts).expect("a readable first row: no whole-file error");
        assert!(!rows.is_empty());
    }
});
