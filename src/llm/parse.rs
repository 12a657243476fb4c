//! Turning an LLM reply back into labels of the schema, strictly.
//!
//! Extraction tolerates fenced code blocks, chatty text around the JSON, trailing commas and a
//! reply cut off mid-object (the items that arrived whole are kept). Label mapping accepts case,
//! whitespace, hyphen/underscore and close misspellings (a unique nearest label within a small
//! edit distance) and rejects everything else: nothing outside the schema can come out of here.
//! This module must never do I/O.

use std::collections::HashMap;

/// The label set an LLM answer must fall into.
#[derive(Debug, Clone)]
pub struct Schema {
    pub labels: Vec<String>,
    norm: HashMap<String, usize>,
}

/// What the reply said about one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A label of the schema (index into `Schema::labels`).
    Label(usize),
    /// The escape label: none of the item's candidates fits.
    Other,
    /// Something that is not a label of the schema (kept for the error report).
    Invalid(String),
}

fn normalize(s: &str) -> String {
    let s = s
        .trim()
        .trim_matches(|c: char| c == '"' || c == '\'' || c == '`' || c == '.');
    let mut out = String::with_capacity(s.len());
    let mut sep = false;
    for c in s.chars() {
        if c.is_whitespace() || c == '-' || c == '_' || c == '/' {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('_');
            }
            sep = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            cur[j] = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

impl Schema {
    pub fn new(labels: Vec<String>) -> Self {
        let norm = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (normalize(l), i))
            .collect();
        Schema { labels, norm }
    }

    /// Maps an answer to a label of the schema, or `None`.
    pub fn resolve(&self, answer: &str) -> Option<usize> {
        let n = normalize(answer);
        if n.is_empty() {
            return None;
        }
        if let Some(&i) = self.norm.get(&n) {
            return Some(i);
        }
        // A close misspelling: the unique nearest label within ~1 edit per 6 characters.
        let limit = (n.chars().count() / 6).clamp(1, 3);
        let mut best: Option<(usize, usize)> = None;
        let mut tie = false;
        for (l, &i) in &self.norm {
            let d = edit_distance(&n, l);
            if d > limit {
                continue;
            }
            match best {
                Some((bd, _)) if d > bd => {}
                Some((bd, _)) if d == bd => tie = true,
                _ => {
                    best = Some((d, i));
                    tie = false;
                }
            }
        }
        match best {
            Some((_, i)) if !tie => Some(i),
            _ => None,
        }
    }
}

/// Finds the JSON value in a reply: a fenced block, else the first balanced `{…}` or `[…]`.
pub fn extract_json(reply: &str) -> Option<&str> {
    if let Some(start) = reply.find("```") {
        let after = &reply[start + 3..];
        let body_start = after.find('\n').map(|i| i + 1).unwrap_or(0);
        let body = &after[body_start..];
        let end = body.find("```").unwrap_or(body.len());
        let inner = body[..end].trim();
        if inner.starts_with('{') || inner.starts_with('[') {
            return Some(inner);
        }
    }
    let start = reply.find(['{', '['])?;
    let bytes = reply.as_bytes();
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for (i, &c) in bytes.iter().enumerate().skip(start) {
        if in_str {
            match c {
                _ if esc => esc = false,
                b'\\' => esc = true,
                b'"' => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&reply[start..=i]);
                }
            }
            _ => {}
        }
    }
    Some(&reply[start..]) // unbalanced: a truncated reply, salvaged below
}

fn strip_trailing_commas(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut in_str = false;
    let mut esc = false;
    for (i, &c) in chars.iter().enumerate() {
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        if c == ',' {
            let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
            if matches!(next, Some('}') | Some(']')) {
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Pairs `"N": "label"` scanned from text that is not valid JSON (a reply cut mid-object).
fn salvage_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    let read_str = |mut j: usize| -> Option<(String, usize)> {
        let mut v = String::new();
        let mut esc = false;
        let rest = std::str::from_utf8(&b[j..]).ok()?;
        for c in rest.chars() {
            j += c.len_utf8();
            if esc {
                v.push(c);
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                return Some((v, j));
            } else {
                v.push(c);
            }
        }
        None // unterminated: the value was cut off
    };
    while i < b.len() {
        if b[i] == b'"' {
            if let Some((key, j)) = read_str(i + 1) {
                let mut k = j;
                while k < b.len() && b[k].is_ascii_whitespace() {
                    k += 1;
                }
                if k < b.len() && b[k] == b':' {
                    k += 1;
                    while k < b.len() && b[k].is_ascii_whitespace() {
                        k += 1;
                    }
                    if k < b.len() && b[k] == b'"' {
                        if let Some((val, end)) = read_str(k + 1) {
                            out.push((key, val));
                            i = end;
                            continue;
                        }
                        break;
                    }
                }
                i = j;
                continue;
            }
            break;
        }
        i += 1;
    }
    out
}

/// Reads the label given to each of `n` items (numbered from 1). `None`: the item is missing
/// from the reply. `other`: the escape label, when the prompt offered one.
pub fn parse_reply(
    reply: &str,
    n: usize,
    schema: &Schema,
    other: Option<&str>,
) -> Vec<Option<Answer>> {
    let mut raw: Vec<Option<String>> = vec![None; n];
    let put = |raw: &mut Vec<Option<String>>, key: &str, val: String| {
        let key = key
            .trim()
            .trim_start_matches('#')
            .trim_start_matches("item")
            .trim();
        if let Ok(k) = key.parse::<usize>() {
            if (1..=n).contains(&k) && raw[k - 1].is_none() {
                raw[k - 1] = Some(val);
            }
        }
    };
    let label_of = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o
                .get("label")
                .or_else(|| o.get("category"))
                .and_then(|x| x.as_str())
                .map(str::to_string),
            _ => None,
        }
    };
    if let Some(js) = extract_json(reply) {
        let parsed = serde_json::from_str::<serde_json::Value>(js)
            .or_else(|_| serde_json::from_str(&strip_trailing_commas(js)));
        match parsed {
            Ok(serde_json::Value::Object(o)) => {
                for (k, v) in &o {
                    if let Some(l) = label_of(v) {
                        put(&mut raw, k, l);
                    }
                }
            }
            Ok(serde_json::Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    let key = v
                        .get("id")
                        .or_else(|| v.get("item"))
                        .map(|x| x.to_string().trim_matches('"').to_string())
                        .unwrap_or_else(|| (i + 1).to_string());
                    if let Some(l) = label_of(v) {
                        put(&mut raw, &key, l);
                    }
                }
            }
            _ => {
                for (k, v) in salvage_pairs(js) {
                    put(&mut raw, &k, v);
                }
            }
        }
    }
    if n == 1 && raw[0].is_none() {
        // A single item answered with a bare label.
        let t = reply.trim();
        if !t.is_empty() && !t.contains(['{', '[']) && t.len() < 80 {
            raw[0] = Some(t.to_string());
        }
    }
    raw.into_iter()
        .map(|r| {
            r.map(|s| {
                if other.is_some_and(|o| normalize(o) == normalize(&s)) {
                    Answer::Other
                } else {
                    match schema.resolve(&s) {
                        Some(i) => Answer::Label(i),
                        None => Answer::Invalid(s),
                    }
                }
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::new(vec![
            "card_arrival".into(),
            "lost_or_stolen_card".into(),
            "Refund not showing up".into(),
            "balance".into(),
        ])
    }

    #[test]
    fn maps_case_spacing_and_misspellings() {
        let s = schema();
        assert_eq!(s.resolve("card_arrival"), Some(0));
        assert_eq!(s.resolve(" Card Arrival "), Some(0));
        assert_eq!(s.resolve("card-arival"), Some(0));
        assert_eq!(s.resolve("refund_not_showing_up"), Some(2));
        assert_eq!(s.resolve("lost or stolen card."), Some(1));
        assert_eq!(s.resolve("transfer"), None);
        assert_eq!(s.resolve("balances"), Some(3));
        assert_eq!(s.resolve(""), None);
    }

    #[test]
    fn reads_fenced_chatty_and_truncated_replies() {
        let s = schema();
        let r = parse_reply(
            "Sure! Here you go:\n```json\n{\"1\": \"card_arrival\", \"2\": \"balance\",}\n```",
            2,
            &s,
            None,
        );
        assert_eq!(r, vec![Some(Answer::Label(0)), Some(Answer::Label(3))]);
        let r = parse_reply("{\"1\": \"balance\", \"2\": \"lost_or_st", 2, &s, None);
        assert_eq!(r, vec![Some(Answer::Label(3)), None]);
        let r = parse_reply("[{\"id\": 2, \"label\": \"card arrival\"}]", 2, &s, None);
        assert_eq!(r, vec![None, Some(Answer::Label(0))]);
        let r = parse_reply(
            "{\"1\": {\"label\": \"balance\"}, \"3\": \"x\"}",
            2,
            &s,
            None,
        );
        assert_eq!(r, vec![Some(Answer::Label(3)), None]);
        let r = parse_reply("balance", 1, &s, None);
        assert_eq!(r, vec![Some(Answer::Label(3))]);
        let r = parse_reply("not json at all, sorry", 2, &s, None);
        assert_eq!(r, vec![None, None]);
    }

    #[test]
    fn injected_labels_are_rejected_and_other_is_recognised() {
        let s = schema();
        let r = parse_reply(
            "{\"1\": \"HACKED\", \"2\": \"other\"}",
            2,
            &s,
            Some("other"),
        );
        assert_eq!(
            r,
            vec![Some(Answer::Invalid("HACKED".into())), Some(Answer::Other)]
        );
    }
}
