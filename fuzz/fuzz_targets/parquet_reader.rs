//! Any bytes as a Parquet file: opening may refuse it with an error, reading may turn rows into
//! error rows, but nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use semtel::input::{self, InputOptions};

fuzz_target!(|data: &[u8]| {
    // libFuzzer's panic hook aborts on every panic; panics semtel catches on purpose (the
    // parquet crate's, on damaged pages) are handled, not crashes. Any other panic still is.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(semtel::error::quiet_expected_panics);
    let path = std::env::temp_dir().join(format!("semtel-fuzz-{}.parquet", std::process::id()));
    std::fs::write(&path, data).unwrap();
    let opts = InputOptions {
        batch_rows: 3,
        ..Default::default()
    };
    if let Ok(mut r) = input::open(&path, &opts) {
        for _ in 0..10_000 {
            match r.next_batch() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
