//! Keeps secrets out of every message semtel writes: error columns, summaries, logs. Servers
//! echo keys in 401 bodies, HTTP libraries print request URLs (which may carry `?api_key=`),
//! and all of that ends up in a row's `error` column unless it is scrubbed on the way.
//! This module only rewrites strings; it must never log or store what it removes.

/// Query parameter names whose values are credentials.
const SECRET_PARAMS: &[&str] = &[
    "api_key",
    "api-key",
    "apikey",
    "key",
    "access_token",
    "token",
    "secret",
    "client_secret",
    "password",
    "sig",
    "signature",
    "code",
    "subscription-key",
    "x-api-key",
];

const MASK: &str = "***";

/// Values of credential-like query parameters in `url` (to add to the known secrets).
pub fn url_secrets(url: &str) -> Vec<String> {
    let Some((_, query)) = url.split_once('?') else {
        return Vec::new();
    };
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, v)| is_secret_param(k) && !v.is_empty())
        .map(|(_, v)| v.to_string())
        .collect()
}

pub(crate) fn is_secret_param(name: &str) -> bool {
    SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// `msg` with every known secret, every credential-like query value, bearer token and
/// OpenAI-style `sk-…` key replaced by `***`.
pub fn redact(msg: &str, secrets: &[String]) -> String {
    let mut out = msg.to_string();
    for s in secrets {
        // Very short "secrets" would mask ordinary words.
        if s.len() >= 6 && out.contains(s.as_str()) {
            out = out.replace(s.as_str(), MASK);
        }
    }
    out = mask_after(&out, |prefix| {
        // `name=` where name is a credential parameter.
        let name_start = prefix
            .char_indices()
            .rev()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .map_or(0, |(p, c)| p + c.len_utf8());
        is_secret_param(&prefix[name_start..])
    });
    out = mask_token(&out, "Bearer ", 1);
    out = mask_token(&out, "bearer ", 1);
    mask_token(&out, "sk-", 16)
}

fn is_value_end(c: char) -> bool {
    c.is_whitespace() || matches!(c, '&' | '"' | '\'' | ')' | '>' | ',' | ';' | '}' | ']')
}

/// Masks the value after each `=` whose preceding name `is_secret` accepts.
fn mask_after(s: &str, is_secret: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        if is_secret(before) {
            let end = after.find(is_value_end).unwrap_or(after.len());
            if end > 0 {
                out.push_str(MASK);
            }
            rest = &after[end..];
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Masks the token (up to a delimiter) after each `prefix`, when at least `min_len` long.
fn mask_token(s: &str, prefix: &str, min_len: usize) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find(prefix) {
        out.push_str(&rest[..p + prefix.len()]);
        let after = &rest[p + prefix.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .unwrap_or(after.len());
        if end >= min_len && after[..end] != *MASK {
            out.push_str(MASK);
        } else {
            out.push_str(&after[..end]);
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_known_and_recognisable_secrets() {
        let k = "sk-live-0123456789abcdefXYZ".to_string();
        let m = redact(
            &format!("request refused (401): Incorrect API key provided: {k}."),
            std::slice::from_ref(&k),
        );
        assert!(!m.contains("0123456789"), "{m}");
        let m = redact(
            "error sending request for url (https://h/v1/chat/completions?api_key=abcdef123456&x=1)",
            &[],
        );
        assert_eq!(
            m,
            "error sending request for url (https://h/v1/chat/completions?api_key=***&x=1)"
        );
        assert_eq!(
            redact("Authorization: Bearer abc.def-ghi", &[]),
            "Authorization: Bearer ***"
        );
        assert_eq!(redact("nothing to hide: a=b", &[]), "nothing to hide: a=b");
        assert_eq!(
            url_secrets("https://h/v1?api_key=XYZ123&deployment=d"),
            vec!["XYZ123".to_string()]
        );
    }

    #[test]
    fn never_panics_on_odd_text() {
        for s in [
            "=",
            "key=",
            "ключ=значение key=値",
            "sk-",
            "Bearer ",
            "é=é&key=é",
            "👦=",
        ] {
            let _ = redact(s, &["é".repeat(10)]);
        }
        assert_eq!(redact("key=値&b", &[]), "key=***&b");
    }
}
