//! Content hashes shared by several stages: the normalised-text hash (LLM cache keys,
//! deduplication) and the 60-bit group key of an exemplar id (multi-label exemplars of one row
//! vote once). Pure functions; no I/O.

use sha2::{Digest, Sha256};

/// Hash of a conversation's text after whitespace and case normalisation (32 hex digits).
pub fn text_hash(text: &str) -> String {
    let mut h = Sha256::new();
    let mut first = true;
    for w in text.split_whitespace() {
        if !first {
            h.update(b" ");
        }
        first = false;
        h.update(w.to_lowercase().as_bytes());
    }
    format!("{:x}", h.finalize())[..32].to_string()
}

/// A stable 60-bit key for an exemplar id: the exemplars one multi-label row was stored as
/// share their id, so they share this key and count as one neighbour.
pub fn group_key(id: &str) -> u64 {
    let h = text_hash(id);
    u64::from_str_radix(&h[..15], 16).unwrap_or(0)
}
