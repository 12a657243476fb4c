//! Any Prompty file: parsing may fail with an error, rendering a parsed one may fail with an
//! error, but nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use semtel::llm::prompty::Prompty;

fuzz_target!(|data: &[u8]| {
    // libFuzzer's panic hook aborts on every panic; panics semtel catches on purpose (the
    // parquet crate's, on damaged pages) are handled, not crashes. Any other panic still is.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(semtel::error::quiet_expected_panics);
    let text = String::from_utf8_lossy(data);
    if let Ok(p) = Prompty::parse(&text, "fuzz") {
        let ctx = serde_json::json!({
            "labels": [{"name": "a", "description": "first"}],
            "items": [{"n": 1, "text": "user: hi", "candidates": []}],
            "examples": [],
            "other": "",
        });
        let _ = p.render(&ctx);
    }
});
