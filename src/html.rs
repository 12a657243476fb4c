//! The one HTML escape shared by the pages semtel writes (monitor, discover, accuracy-cost).
//! Text only: it must never build markup.

/// Escapes text for HTML element content and double-quoted attributes.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
