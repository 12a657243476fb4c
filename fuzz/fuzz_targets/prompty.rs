//! Any Prompty file: parsing may fail with an error, rendering a parsed one may fail with an
//! error, but nothing panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use semtel::llm::prompty::Prompty;

fuzz_target!(|data: &[u8]| {
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
