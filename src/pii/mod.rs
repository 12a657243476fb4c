//! Personal data out of what leaves the machine: the redaction stage in front of every LLM call
//! (the tier, the Batch API export, `bootstrap`, `llm compare`, the service), and optionally
//! in front of the embedding too.
//!
//! A [`Redactor`] finds spans of personal data ([`recognize`]: validated formats where the
//! format has a check — Luhn, mod-97, checksums — known secret prefixes, cue-based names and
//! addresses, custom patterns and deny lists from the configuration) and replaces each with a
//! typed placeholder such as `<EMAIL_1>`. Within one conversation ([`Placeholders`]) the same
//! value always gets the same placeholder, so the LLM still sees who wrote to whom.
//! [`Counts`] says how many entities of each type went, never which.
//!
//! This module is pure text in, text out: it must never log, store or return a redacted
//! value, and it must never split a character (every span is a regex match on `&str`, so it
//! starts and ends on character boundaries).

pub mod recognize;

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// How much is redacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Nothing (the text leaves as it is).
    Off,
    /// Every recogniser with good precision: validated formats (cards, IBANs, national ids,
    /// wallets), e-mail, phone numbers (library-validated), IPs, URLs with credentials, known
    /// secret formats, random-looking tokens, cue-based names and street addresses, and the
    /// configuration's patterns and deny list.
    #[default]
    Standard,
    /// Standard plus the greedy ones: phone-like and long digit runs that fail validation,
    /// hex strings of hash length, names after weaker cues.
    Strict,
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" | "none" => Ok(Level::Off),
            "standard" | "on" => Ok(Level::Standard),
            "strict" => Ok(Level::Strict),
            _ => Err(format!(
                "unknown redaction level `{s}` (off, standard, strict)"
            )),
        }
    }
}

impl Level {
    pub fn as_str(&self) -> &'static str {
        match self {
            Level::Off => "off",
            Level::Standard => "standard",
            Level::Strict => "strict",
        }
    }
}

/// A pattern of the user's own (`[[redaction.patterns]]`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CustomPattern {
    /// Placeholder name, e.g. `EMPLOYEE_ID` → `<EMPLOYEE_ID_1>`.
    pub name: String,
    /// A regular expression (Rust `regex` syntax); the whole match is redacted.
    pub regex: String,
}

/// The `[redaction]` table of the LLM configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// Values never redacted (compared case-insensitively), e.g. your own support address.
    pub allow: Vec<String>,
    /// Terms always redacted wherever they appear (case-insensitive), as `<CUSTOM_n>`.
    pub deny: Vec<String>,
    pub patterns: Vec<CustomPattern>,
    /// Also redact before embedding (the index and the kNN vote then see placeholders too).
    pub before_embedding: bool,
    /// Regions whose national phone formats are recognised without a `+` prefix (ISO 3166
    /// codes); default: a broad set of large markets.
    pub phone_regions: Option<Vec<String>>,
}

/// One recognised span (byte offsets into the text it was found in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    /// The placeholder name: `EMAIL`, `PHONE`, `CARD`, …
    pub kind: Kind,
}

/// Entity types (placeholder names).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Email,
    Phone,
    Card,
    Iban,
    Ip,
    Url,
    Ssn,
    NationalId,
    Secret,
    Crypto,
    Address,
    Person,
    /// A date next to a birth cue ("DOB:", "born on", "Geburtsdatum").
    DateOfBirth,
    /// A configured pattern's name, or `CUSTOM` for the deny list.
    Custom(String),
}

impl Kind {
    pub fn name(&self) -> &str {
        match self {
            Kind::Email => "EMAIL",
            Kind::Phone => "PHONE",
            Kind::Card => "CARD",
            Kind::Iban => "IBAN",
            Kind::Ip => "IP",
            Kind::Url => "URL",
            Kind::Ssn => "SSN",
            Kind::NationalId => "NATIONAL_ID",
            Kind::Secret => "SECRET",
            Kind::Crypto => "CRYPTO",
            Kind::Address => "ADDRESS",
            Kind::Person => "PERSON",
            Kind::DateOfBirth => "DATE_OF_BIRTH",
            Kind::Custom(n) => n,
        }
    }

    /// Which span wins an overlap: the more specific, validated kinds first.
    fn priority(&self) -> u8 {
        match self {
            Kind::Custom(_) => 100,
            Kind::Secret => 90,
            Kind::Url => 85,
            Kind::Email => 80,
            Kind::Card => 75,
            Kind::Iban => 74,
            // Above secrets: a checksummed wallet also looks like a random token.
            Kind::Crypto => 91,
            Kind::Ssn => 70,
            Kind::NationalId => 69,
            Kind::Ip => 60,
            Kind::Phone => 50,
            Kind::DateOfBirth => 45,
            Kind::Address => 40,
            Kind::Person => 30,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Entities redacted, by type (never the values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts(pub BTreeMap<String, u32>);

impl Counts {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn total(&self) -> u64 {
        self.0.values().map(|&v| u64::from(v)).sum()
    }
    pub fn add(&mut self, other: &Counts) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }
    fn bump(&mut self, kind: &Kind) {
        *self.0.entry(kind.name().to_string()).or_insert(0) += 1;
    }
}

/// The placeholders of one conversation: the same value, the same placeholder.
#[derive(Debug, Default)]
pub struct Placeholders {
    seen: HashMap<(String, String), u32>,
    next: HashMap<String, u32>,
    pub counts: Counts,
}

impl Placeholders {
    fn placeholder(&mut self, kind: &Kind, value: &str) -> String {
        let name = kind.name().to_string();
        let key = (name.clone(), normalise(kind, value));
        let n = match self.seen.get(&key) {
            Some(&n) => n,
            None => {
                let c = self.next.entry(name.clone()).or_insert(0);
                *c += 1;
                self.seen.insert(key, *c);
                *c
            }
        };
        self.counts.bump(kind);
        format!("<{name}_{n}>")
    }
}

/// The form under which two mentions count as the same value.
fn normalise(kind: &Kind, v: &str) -> String {
    match kind {
        Kind::Phone | Kind::Card | Kind::Ssn => v.chars().filter(char::is_ascii_digit).collect(),
        Kind::Iban | Kind::NationalId => v
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-' && *c != '.')
            .flat_map(char::to_uppercase)
            .collect(),
        _ => v.trim().to_lowercase(),
    }
}

/// Text with its spans replaced, and what was replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Redacted {
    pub text: String,
    pub counts: Counts,
}

/// The redaction stage: built once from the level and rules, shared by every thread.
pub struct Redactor {
    level: Level,
    rec: recognize::Recognizers,
    allow: HashSet<String>,
    custom: Vec<(Kind, regex::Regex)>,
    deny: Option<regex::Regex>,
    pub before_embedding: bool,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("level", &self.level)
            .field("custom", &self.custom.len())
            .finish()
    }
}

/// Text longer than this is redacted in windows (recognisers see at most a window at a
/// time plus an overlap), so a 5 MB message costs linear time.
const WINDOW: usize = 64 * 1024;
const OVERLAP: usize = 1024;

impl Redactor {
    pub fn new(level: Level, rules: &Rules) -> Result<Redactor> {
        let mut custom = Vec::new();
        for p in &rules.patterns {
            let name = p.name.trim().to_uppercase().replace([' ', '-'], "_");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(Error::Config(format!(
                    "redaction pattern name `{}`: use letters, digits and _ (it becomes <{}_1>)",
                    p.name, p.name
                )));
            }
            let re = regex::RegexBuilder::new(&p.regex)
                .size_limit(1 << 22)
                .build()
                .map_err(|e| {
                    Error::Config(format!("redaction pattern `{}`: bad regex: {e}", p.name))
                })?;
            custom.push((Kind::Custom(name), re));
        }
        let deny_terms: Vec<String> = rules
            .deny
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(regex::escape)
            .collect();
        let deny = if deny_terms.is_empty() {
            None
        } else {
            Some(
                regex::RegexBuilder::new(&format!(r"(?i)\b(?:{})\b", deny_terms.join("|")))
                    .size_limit(1 << 24)
                    .build()
                    .map_err(|e| Error::Config(format!("redaction deny list: {e}")))?,
            )
        };
        Ok(Redactor {
            level,
            rec: recognize::Recognizers::new(rules.phone_regions.as_deref())?,
            allow: rules
                .allow
                .iter()
                .map(|a| a.trim().to_lowercase())
                .collect(),
            custom,
            deny,
            before_embedding: rules.before_embedding,
        })
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// Whether this redactor changes anything at all.
    pub fn is_off(&self) -> bool {
        self.level == Level::Off && self.custom.is_empty() && self.deny.is_none()
    }

    /// The spans to redact in `text`: sorted, non-overlapping.
    ///
    /// Text with fullwidth forms (`ｊｏｈｎ＠ｍａｉｌ．ｃｏｍ`, `０９０－１２３４`: how CJK input
    /// methods type Latin letters and digits) is also searched in its folded form, and what
    /// is found there is mapped back to the original characters. A flattened dialogue
    /// (`user: …` / `assistant: …` lines, the form prompts carry) is also searched across its
    /// turns ([`find_turns`](Self::find_turns)).
    pub fn find(&self, text: &str) -> Vec<Span> {
        if self.is_off() || text.is_empty() {
            return Vec::new();
        }
        let mut spans = self.find_plain(text);
        let turns = dialogue_turns(text);
        if turns.len() >= 2 {
            let view: Vec<(crate::conversation::Role, &str)> =
                turns.iter().map(|&(r, a, b)| (r, &text[a..b])).collect();
            for (i, s) in self.seam_spans(&view) {
                spans.push(Span {
                    start: turns[i].1 + s.start,
                    end: turns[i].1 + s.end,
                    kind: s.kind,
                });
            }
        }
        resolve(spans, |s| {
            self.allow
                .contains(&text[s.start..s.end].trim().to_lowercase())
        })
    }

    /// Spans of a conversation's turns, each turn's in its own offsets: each turn on its own,
    /// and values that cross from one turn into the next ([`seam_spans`](Self::seam_spans)).
    pub fn find_turns(&self, turns: &[(crate::conversation::Role, &str)]) -> Vec<Vec<Span>> {
        let mut out: Vec<Vec<Span>> = turns.iter().map(|(_, t)| self.find_plain(t)).collect();
        if turns.len() >= 2 && !self.is_off() {
            for (i, s) in self.seam_spans(turns) {
                out[i].push(s);
            }
        }
        out.into_iter()
            .zip(turns)
            .map(|(spans, (_, t))| {
                resolve(spans, |s| {
                    self.allow
                        .contains(&t[s.start..s.end].trim().to_lowercase())
                })
            })
            .collect()
    }

    /// Values that need more than one turn to be seen: the turns are searched joined (all of
    /// them, and the user's alone, so an assistant's "could you send the rest?" in between
    /// does not hide it), and each part of what is found is returned as (turn, span in that
    /// turn). A number sent in two messages ("DE89 3704 0044" … "0532 0130 00") is one
    /// value.
    fn seam_spans(&self, turns: &[(crate::conversation::Role, &str)]) -> Vec<(usize, Span)> {
        // Only numbers are sent in pieces: without a turn that ends in digits and a later one
        // that starts with them, there is nothing to join (and most dialogues cost nothing).
        let digit_near = |s: &str, tail: bool| {
            let b = s.trim().as_bytes();
            let part = if tail {
                &b[b.len().saturating_sub(48)..]
            } else {
                &b[..b.len().min(48)]
            };
            part.iter().any(u8::is_ascii_digit)
        };
        let split = (0..turns.len()).any(|i| {
            digit_near(turns[i].1, true) && turns[i + 1..].iter().any(|t| digit_near(t.1, false))
        });
        if !split {
            return Vec::new();
        }
        let user: Vec<usize> = (0..turns.len())
            .filter(|&i| turns[i].0 == crate::conversation::Role::User)
            .collect();
        let all: Vec<usize> = (0..turns.len()).collect();
        let mut out = Vec::new();
        for group in [all, user] {
            if group.len() < 2 {
                continue;
            }
            let mut joined = String::new();
            let mut starts = Vec::with_capacity(group.len());
            for (n, &i) in group.iter().enumerate() {
                if n > 0 {
                    joined.push('\n');
                }
                starts.push(joined.len());
                joined.push_str(turns[i].1);
            }
            for s in resolve(self.find_plain(&joined), |_| false) {
                // Everything found joined counts (overlaps with what a turn found alone are
                // resolved later): a value that crosses a seam, and the parts of one whose
                // pieces are told apart by what came before (`iban_continued`).
                let first = starts.partition_point(|&b| b <= s.start) - 1;
                let last = starts.partition_point(|&b| b < s.end) - 1;
                for (n, &i) in group.iter().enumerate().take(last + 1).skip(first) {
                    let len = turns[i].1.len();
                    let a = s.start.saturating_sub(starts[n]).min(len);
                    let b = s.end.saturating_sub(starts[n]).min(len);
                    let piece = &turns[i].1[a..b];
                    if piece.trim().is_empty() {
                        continue;
                    }
                    let lead = piece.len() - piece.trim_start().len();
                    let tail = piece.len() - piece.trim_end().len();
                    out.push((
                        i,
                        Span {
                            start: a + lead,
                            end: b - tail,
                            kind: s.kind.clone(),
                        },
                    ));
                }
            }
        }
        out
    }

    /// The recognisers over `text` (in windows) and over its fullwidth-folded form; not yet
    /// resolved.
    fn find_plain(&self, text: &str) -> Vec<Span> {
        let mut spans = self.find_windows(text);
        if let Some((folded, map)) = fold_fullwidth(text) {
            for s in self.find_windows(&folded) {
                spans.push(Span {
                    start: map[s.start],
                    end: map[s.end],
                    kind: s.kind,
                });
            }
        }
        spans
    }

    fn find_windows(&self, text: &str) -> Vec<Span> {
        let mut spans = Vec::new();
        // Windows on character boundaries with an overlap, so nothing near a seam is missed.
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + WINDOW).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            let w = &text[start..end];
            self.find_in(w, &mut |s: Span| {
                spans.push(Span {
                    start: s.start + start,
                    end: s.end + start,
                    kind: s.kind,
                })
            });
            if end == text.len() {
                break;
            }
            let mut next = end - OVERLAP.min(end - start);
            while !text.is_char_boundary(next) {
                next -= 1;
            }
            start = next.max(start + 1);
            while !text.is_char_boundary(start) {
                start += 1;
            }
        }
        spans
    }

    fn find_in(&self, w: &str, out: &mut dyn FnMut(Span)) {
        for (kind, re) in &self.custom {
            for m in re.find_iter(w) {
                if m.start() < m.end() {
                    out(Span {
                        start: m.start(),
                        end: m.end(),
                        kind: kind.clone(),
                    });
                }
            }
        }
        if let Some(d) = &self.deny {
            for m in d.find_iter(w) {
                out(Span {
                    start: m.start(),
                    end: m.end(),
                    kind: Kind::Custom("CUSTOM".into()),
                });
            }
        }
        if self.level != Level::Off {
            self.rec.find(w, self.level == Level::Strict, out);
        }
    }

    /// `text` with its spans replaced, placeholders numbered within `ph` (one per
    /// conversation: pass the same one for every turn).
    pub fn redact_with(&self, text: &str, ph: &mut Placeholders) -> String {
        replace_spans(text, self.find(text), ph)
    }

    /// One text as one conversation.
    pub fn redact(&self, text: &str) -> Redacted {
        let mut ph = Placeholders::default();
        let text = self.redact_with(text, &mut ph);
        Redacted {
            text,
            counts: ph.counts,
        }
    }

    /// A conversation's content, turn by turn, with one placeholder map; values that span
    /// two turns are found too ([`find_turns`](Self::find_turns)).
    pub fn redact_content(
        &self,
        c: &crate::conversation::Content,
    ) -> (crate::conversation::Content, Counts) {
        use crate::conversation::{Content, Turn};
        let mut ph = Placeholders::default();
        let out = match c {
            Content::Text(t) => Content::Text(self.redact_with(t, &mut ph)),
            Content::Turns(ts) => {
                let view: Vec<(crate::conversation::Role, &str)> =
                    ts.iter().map(|t| (t.role, t.content.as_str())).collect();
                let spans = self.find_turns(&view);
                Content::Turns(
                    ts.iter()
                        .zip(spans)
                        .map(|(t, s)| Turn {
                            role: t.role,
                            content: replace_spans(&t.content, s, &mut ph),
                        })
                        .collect(),
                )
            }
        };
        (out, ph.counts)
    }
}

/// `text` with `spans` (sorted, non-overlapping) replaced by placeholders from `ph`.
fn replace_spans(text: &str, spans: Vec<Span>, ph: &mut Placeholders) -> String {
    if spans.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for s in spans {
        out.push_str(&text[at..s.start]);
        out.push_str(&ph.placeholder(&s.kind, &text[s.start..s.end]));
        at = s.end;
    }
    out.push_str(&text[at..]);
    out
}

/// The turns of a flattened dialogue (lines `user: …`, `assistant: …` as
/// [`crate::conversation::Content::flatten`] writes them): (role, start, end) of each turn's
/// content; empty when `text` is not one.
fn dialogue_turns(text: &str) -> Vec<(crate::conversation::Role, usize, usize)> {
    use crate::conversation::Role;
    const PREFIXES: [(&str, Role); 4] = [
        ("user: ", Role::User),
        ("assistant: ", Role::Assistant),
        ("system: ", Role::System),
        ("tool: ", Role::Tool),
    ];
    let starts_turn = |at: usize| {
        PREFIXES
            .iter()
            .find(|(p, _)| text[at..].starts_with(p))
            .map(|(p, r)| (*r, at + p.len()))
    };
    let mut turns: Vec<(Role, usize, usize)> = Vec::new();
    let mut line = 0;
    loop {
        if let Some((role, content)) = starts_turn(line) {
            if let Some(last) = turns.last_mut() {
                last.2 = line.saturating_sub(1).max(last.1);
            }
            turns.push((role, content, text.len()));
        } else if turns.is_empty() {
            return Vec::new();
        }
        match text[line..].find('\n') {
            Some(n) => line += n + 1,
            None => break,
        }
    }
    turns
}

/// Fullwidth ASCII forms (U+FF01–U+FF5E) and the ideographic space folded to ASCII, with the
/// map from each byte offset of the folded text (and its end) to the original's; `None` when
/// the text has none.
fn fold_fullwidth(text: &str) -> Option<(String, Vec<usize>)> {
    let wide = |c: char| ('\u{FF01}'..='\u{FF5E}').contains(&c) || c == '\u{3000}';
    if !text.chars().any(wide) {
        return None;
    }
    let mut folded = String::with_capacity(text.len());
    let mut map = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        let f = if c == '\u{3000}' {
            ' '
        } else if wide(c) {
            char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)
        } else {
            c
        };
        for _ in 0..f.len_utf8() {
            map.push(i);
        }
        folded.push(f);
    }
    map.push(text.len());
    Some((folded, map))
}

/// Keeps the best of overlapping spans (priority, then length, then position; a span that
/// contains every span it overlaps replaces them) and drops the allowed ones; returns them
/// sorted by position.
fn resolve(mut spans: Vec<Span>, allowed: impl Fn(&Span) -> bool) -> Vec<Span> {
    spans.retain(|s| s.start < s.end && !allowed(s));
    spans.sort_by(|a, b| {
        b.kind
            .priority()
            .cmp(&a.kind.priority())
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        let overlaps = |k: &Span| s.start < k.end && k.start < s.end;
        if !kept.iter().any(overlaps) {
            kept.push(s);
        } else if kept
            .iter()
            .filter(|k| overlaps(k))
            .all(|k| s.start <= k.start && k.end <= s.end && (s.end - s.start) > (k.end - k.start))
        {
            // A span that contains the ones it overlaps (a URL around its token) covers them.
            kept.retain(|k| !overlaps(k));
            kept.push(s);
        }
    }
    kept.sort_by_key(|s| s.start);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(level: Level) -> Redactor {
        Redactor::new(level, &Rules::default()).unwrap()
    }

    #[test]
    fn same_value_same_placeholder_within_a_conversation() {
        let red = r(Level::Standard);
        let out =
            red.redact("Mail ana.lopez@example.com or ANA.LOPEZ@example.com, not bob@example.org.");
        assert_eq!(out.text, "Mail <EMAIL_1> or <EMAIL_1>, not <EMAIL_2>.");
        assert_eq!(out.counts.0["EMAIL"], 3);
    }

    #[test]
    fn allow_deny_and_custom_patterns() {
        let rules = Rules {
            allow: vec!["support@acme.com".into()],
            deny: vec!["Project Falcon".into()],
            patterns: vec![CustomPattern {
                name: "employee id".into(),
                regex: r"EMP-\d{6}".into(),
            }],
            ..Default::default()
        };
        let red = Redactor::new(Level::Standard, &rules).unwrap();
        let out = red.redact("Write support@acme.com about project falcon for EMP-123456.");
        assert_eq!(
            out.text,
            "Write support@acme.com about <CUSTOM_1> for <EMPLOYEE_ID_1>."
        );
        assert!(Redactor::new(
            Level::Standard,
            &Rules {
                patterns: vec![CustomPattern {
                    name: "x".into(),
                    regex: "(".into()
                }],
                ..Default::default()
            }
        )
        .is_err());
    }

    #[test]
    fn off_changes_nothing_and_windows_cover_long_text() {
        let t = "call +44 20 7946 0958 now";
        assert_eq!(r(Level::Off).redact(t).text, t);
        // A value right at a window seam is still found, once.
        let mut long = "字".repeat(WINDOW / 3 - 5);
        long.push_str(" jane.doe@example.com ");
        long.push_str(&"a".repeat(WINDOW));
        let out = r(Level::Standard).redact(&long);
        assert_eq!(out.counts.0.get("EMAIL"), Some(&1), "{:?}", out.counts);
        assert!(!out.text.contains("jane.doe"));
    }
}
