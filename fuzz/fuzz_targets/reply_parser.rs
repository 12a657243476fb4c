//! Any LLM reply: the parser returns one answer slot per item and never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use semtel::llm::parse::{parse_reply, Schema};

fuzz_target!(|data: &[u8]| {
    // libFuzzer's panic hook aborts on every panic; panics semtel catches on purpose (the
    // parquet crate's, on damaged pages) are handled, not crashes. Any other panic still is.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(semtel::error::quiet_expected_panics);
    let reply = String::from_utf8_lossy(data);
    let schema = Schema::new(vec![
        "card_arrival".into(),
        "lost_or_stolen_card".into(),
        "Другое".into(),
        "料理".into(),
    ]);
    for n in [1usize, 3, 8] {
        for other in [None, Some("other")] {
            assert_eq!(parse_reply(&reply, n, &schema, other).len(), n);
        }
    }
});
