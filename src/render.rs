//! Rendering: turns a conversation into the token ids the embedder sees, inside the model's
//! token budget. Counting is done with the model's own tokenizer, never with characters.
//!
//! Policy (deterministic, documented in the README):
//! * a plain text longer than the budget keeps its head and its tail (half each): a long message
//!   usually states its ask either before or after the material it pastes;
//! * a dialogue drops system turns (boilerplate shared by every conversation of a deployment)
//!   unless asked not to, then always keeps the first and the last user turn (sharing the budget
//!   if they are long), then fills what is left with the first turn, the last turn, the other
//!   user turns and finally the assistant turns; a turn that does not fit whole is cut to its
//!   head and tail; kept turns stay in their original order, as `role: content` lines;
//! * giant messages are pre-cut by bytes before tokenization so a 5 MB message costs no more
//!   than a few kilobytes of tokenizer work.
//!
//! This module must never run the model or touch the network.

use crate::conversation::{Content, Role, Turn};
use crate::{Error, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// Upper bound on bytes per token used for the byte pre-cut. WordPiece maps any word longer
/// than 100 characters to one [UNK], but realistic text averages 3–5 bytes per token, so 16 keeps
/// every token that could make it into the budget while bounding tokenizer work.
const BYTES_PER_TOKEN_BOUND: usize = 16;
/// A cut turn shorter than this carries too little meaning to be worth the tokens.
const MIN_PIECE: usize = 24;

#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// Token ids including the model's special tokens, at most `max_tokens` long.
    pub ids: Vec<u32>,
    /// Tokens the content would take without any truncation (after the byte pre-cut, so a lower
    /// bound for giant messages).
    pub full_tokens: usize,
    pub truncated: bool,
}

pub struct Renderer {
    tok: Tokenizer,
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    role_ids: [Vec<u32>; 4],
    max_tokens: usize,
    include_system: bool,
    /// The tokenizer keeps spaces as part of the next token and adds none of its own (Gemma's
    /// SentencePiece without a dummy prefix): `"a b"` is `a` + `▁b`, not `a` + `b`. Then the
    /// space that separates a prompt or a role from the text must be tokenized with the text.
    keeps_spaces: bool,
    /// What goes before a plain text's content: the prompt's trailing space on such a
    /// tokenizer, so `query:` + ` hi` gives the ids of `query: hi`; else nothing.
    lead: &'static str,
}

fn role_slot(r: Role) -> usize {
    match r {
        Role::User => 0,
        Role::Assistant => 1,
        Role::System => 2,
        Role::Tool => 3,
    }
}

impl Renderer {
    /// Loads `tokenizer.json`, switching off its own truncation and padding (MiniLM's file fixes
    /// both at 128, which would silently cut texts): semtel truncates here and pads per batch.
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self> {
        let mut tok = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        tok.with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tok.with_padding(None);
        let enc = |s: &str, special: bool| -> Result<Vec<u32>> {
            tok.encode_fast(s, special)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        // Find the special tokens the model wraps a single sequence with ([CLS] … [SEP] for BERT)
        // by locating a plain encoding inside the special one.
        let plain = enc("hello", false)?;
        let full = enc("hello", true)?;
        let pos = full
            .windows(plain.len())
            .position(|w| w == plain.as_slice())
            .ok_or_else(|| {
                Error::Tokenizer("cannot locate content inside special tokens".into())
            })?;
        let prefix = full[..pos].to_vec();
        let suffix = full[pos + plain.len()..].to_vec();
        if max_tokens <= prefix.len() + suffix.len() + MIN_PIECE {
            return Err(Error::Tokenizer(format!(
                "max_tokens {max_tokens} leaves no room for content"
            )));
        }
        let a_b = enc("a b", false)?;
        let keeps_spaces = a_b != [enc("a", false)?, enc("b", false)?].concat()
            && a_b == [enc("a", false)?, enc(" b", false)?].concat();
        let mut r = Renderer {
            tok,
            prefix,
            suffix,
            role_ids: Default::default(),
            max_tokens,
            include_system: false,
            keeps_spaces,
            lead: "",
        };
        r.role_ids = r.roles("")?;
        Ok(r)
    }

    /// The ids of `role:` for each role, after `lead`.
    fn roles(&self, lead: &str) -> Result<[Vec<u32>; 4]> {
        let enc = |s: &str| -> Result<Vec<u32>> {
            self.tok
                .encode_fast(format!("{lead}{s}"), false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        Ok([
            enc("user:")?,
            enc("assistant:")?,
            enc("system:")?,
            enc("tool:")?,
        ])
    }

    /// Puts the model's prompt (E5's `query: `) after the opening special tokens of every
    /// sequence, inside the token budget, as sentence-transformers does when it prepends the
    /// prompt to the text. The prompt is tokenized without its trailing space: a word-piece or
    /// SentencePiece tokenizer then gives the same ids as for the prompt and text together.
    pub fn with_prompt(mut self, prompt: Option<&str>) -> Result<Self> {
        let Some(p) = prompt.map(str::trim_end).filter(|p| !p.is_empty()) else {
            return Ok(self);
        };
        if self.keeps_spaces && prompt.is_some_and(|full| full.len() > p.len()) {
            self.lead = " ";
            self.role_ids = self.roles(" ")?;
        }
        let ids = self
            .tok
            .encode_fast(p, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        self.prefix.extend_from_slice(ids.get_ids());
        if self.max_tokens <= self.prefix.len() + self.suffix.len() + MIN_PIECE {
            return Err(Error::Tokenizer(format!(
                "max_tokens {} leaves no room for content after the prompt `{p}`",
                self.max_tokens
            )));
        }
        Ok(self)
    }

    pub fn with_system_turns(mut self, include: bool) -> Self {
        self.include_system = include;
        self
    }

    pub fn includes_system_turns(&self) -> bool {
        self.include_system
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Content tokens available between the special tokens.
    pub fn budget(&self) -> usize {
        self.max_tokens - self.prefix.len() - self.suffix.len()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.tok
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer failed: {e}"))
    }

    /// A text's content ids as they follow the prompt (see `lead`).
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
        if self.lead.is_empty() {
            self.encode(text)
        } else {
            self.encode(&format!("{}{text}", self.lead))
        }
    }

    /// Number of tokens of `text` without special tokens and without truncation.
    pub fn count_tokens(&self, text: &str) -> Result<usize, String> {
        Ok(self.encode(text)?.len())
    }

    /// sentence-transformers' own behaviour: special tokens around the first `max_tokens - 2`
    /// tokens. Used to compare against reference embeddings; the pipeline uses [`render`].
    ///
    /// [`render`]: Renderer::render
    pub fn encode_head(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = self.encode_text(text)?;
        ids.truncate(self.budget());
        Ok(self.wrap(&ids))
    }

    /// The content part of rendered ids (without the model's special tokens).
    pub fn content_ids<'a>(&self, ids: &'a [u32]) -> &'a [u32] {
        let end = ids
            .len()
            .saturating_sub(self.suffix.len())
            .max(self.prefix.len().min(ids.len()));
        &ids[self.prefix.len().min(ids.len())..end]
    }

    fn wrap(&self, content: &[u32]) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.prefix.len() + content.len() + self.suffix.len());
        v.extend_from_slice(&self.prefix);
        v.extend_from_slice(content);
        v.extend_from_slice(&self.suffix);
        v
    }

    /// Tokenizes a message, pre-cutting giant ones to their head and tail by bytes.
    /// `spaced`: the text follows something it must be separated from (a prompt or a role),
    /// which a tokenizer that keeps spaces needs to see as a leading space.
    fn encode_bounded(&self, text: &str, spaced: bool) -> Result<Vec<u32>, String> {
        let enc = |t: &str| {
            if spaced {
                self.encode(&format!(" {t}"))
            } else {
                self.encode(t)
            }
        };
        let cap = self.budget() * BYTES_PER_TOKEN_BOUND;
        if text.len() <= 2 * cap {
            return enc(text);
        }
        let head_end = cut_back(text, cap);
        let tail_start = cut_forward(text, text.len() - cap);
        let mut ids = enc(&text[..head_end])?;
        ids.extend(enc(&text[tail_start..])?);
        Ok(ids)
    }

    pub fn render(&self, content: &Content) -> Result<Rendered, String> {
        match content {
            Content::Text(t) => {
                if t.trim().is_empty() {
                    return Err(
                        "empty text: nothing to classify (fill the text column or drop the row)"
                            .into(),
                    );
                }
                let ids = self.encode_bounded(t, !self.lead.is_empty())?;
                let full = ids.len();
                let budget = self.budget();
                let (body, truncated) = if full <= budget {
                    (ids, false)
                } else {
                    (head_tail(&ids, budget), true)
                };
                Ok(Rendered {
                    ids: self.wrap(&body),
                    full_tokens: full,
                    truncated,
                })
            }
            Content::Turns(turns) => self.render_turns(turns),
        }
    }

    fn render_turns(&self, turns: &[Turn]) -> Result<Rendered, String> {
        let non_blank = |t: &&Turn| !t.content.trim().is_empty();
        let mut kept: Vec<&Turn> = turns
            .iter()
            .filter(non_blank)
            .filter(|t| self.include_system || t.role != Role::System)
            .collect();
        if kept.is_empty() {
            // A conversation of system turns only: better to embed them than to fail.
            kept = turns.iter().filter(non_blank).collect();
        }
        if kept.is_empty() {
            return Err(
                "empty conversation: no turn has any text (fill the turns or drop the row)".into(),
            );
        }
        // Token ids of each turn: `role:` followed by its content.
        let mut pieces: Vec<(Vec<u32>, Vec<u32>)> = Vec::with_capacity(kept.len());
        for t in &kept {
            pieces.push((
                self.role_ids[role_slot(t.role)].clone(),
                self.encode_bounded(&t.content, self.keeps_spaces)?,
            ));
        }
        let lens: Vec<usize> = pieces.iter().map(|(r, c)| r.len() + c.len()).collect();
        let full: usize = lens.iter().sum();
        let budget = self.budget();
        let mut alloc = vec![0usize; pieces.len()];
        let truncated = full > budget;
        if !truncated {
            alloc.copy_from_slice(&lens);
        } else {
            allocate(&kept, &lens, budget, &mut alloc);
        }
        let mut body = Vec::with_capacity(budget);
        for (i, (role, content)) in pieces.iter().enumerate() {
            let n = alloc[i];
            if n <= role.len() {
                continue;
            }
            body.extend_from_slice(role);
            let room = n - role.len();
            if room >= content.len() {
                body.extend_from_slice(content);
            } else {
                body.extend(head_tail(content, room));
            }
        }
        debug_assert!(body.len() <= budget);
        Ok(Rendered {
            ids: self.wrap(&body),
            full_tokens: full,
            truncated,
        })
    }
}

/// Decides how many tokens each turn gets when the whole dialogue does not fit.
fn allocate(turns: &[&Turn], lens: &[usize], budget: usize, alloc: &mut [usize]) {
    let n = turns.len();
    let users: Vec<usize> = (0..n).filter(|&i| turns[i].role == Role::User).collect();
    let mut essential: Vec<usize> = match (users.first(), users.last()) {
        (Some(&a), Some(&b)) if a != b => vec![a, b],
        (Some(&a), _) => vec![a],
        _ => vec![0],
    };
    essential.dedup();
    // Water-fill the budget over the essential turns: the largest cap c with Σ min(len, c) ≤ B.
    let ess_lens: Vec<usize> = essential.iter().map(|&i| lens[i]).collect();
    let cap = water_level(&ess_lens, budget);
    let mut used = 0;
    for &i in &essential {
        alloc[i] = lens[i].min(cap);
        used += alloc[i];
    }
    // Hand out the rounding remainder one token at a time, in turn order.
    for &i in &essential {
        if used < budget && alloc[i] < lens[i] {
            alloc[i] += 1;
            used += 1;
        }
    }
    let mut rest = budget - used;
    let mut order: Vec<usize> = Vec::with_capacity(n);
    let push = |i: usize, order: &mut Vec<usize>| {
        if !essential.contains(&i) && !order.contains(&i) {
            order.push(i);
        }
    };
    push(0, &mut order);
    push(n - 1, &mut order);
    for &i in &users {
        push(i, &mut order);
    }
    for i in 0..n {
        push(i, &mut order);
    }
    for i in order {
        if rest == 0 {
            break;
        }
        if lens[i] <= rest {
            alloc[i] = lens[i];
            rest -= lens[i];
        } else if rest >= MIN_PIECE {
            alloc[i] = rest;
            rest = 0;
        }
    }
}

/// Largest c such that Σ min(len_i, c) ≤ budget.
fn water_level(lens: &[usize], budget: usize) -> usize {
    let mut sorted = lens.to_vec();
    sorted.sort_unstable();
    let mut remaining = budget;
    let mut k = sorted.len();
    for &l in &sorted {
        if l * k <= remaining {
            remaining -= l;
            k -= 1;
        } else {
            return remaining / k;
        }
    }
    usize::MAX
}

/// First `ceil(n/2)` and last `floor(n/2)` ids.
fn head_tail(ids: &[u32], n: usize) -> Vec<u32> {
    if ids.len() <= n {
        return ids.to_vec();
    }
    let head = n.div_ceil(2);
    let tail = n - head;
    let mut v = Vec::with_capacity(n);
    v.extend_from_slice(&ids[..head]);
    v.extend_from_slice(&ids[ids.len() - tail..]);
    v
}

/// A byte offset ≤ `at` on a char boundary, moved back to whitespace when one is near, so the
/// cut does not split a word into misleading word pieces.
fn cut_back(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    // The look-back window must itself start on a char boundary: 64 bytes back from a CJK,
    // Arabic or emoji text usually lands inside a character.
    let mut window = i.saturating_sub(64);
    while !s.is_char_boundary(window) {
        window += 1;
    }
    match s[window..i].rfind(char::is_whitespace) {
        Some(p) => window + p,
        None => i,
    }
}

/// A byte offset ≥ `at` on a char boundary, moved forward past whitespace when one is near.
fn cut_forward(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i += 1;
    }
    let end = (i + 64).min(s.len());
    let mut e = end;
    while !s.is_char_boundary(e) {
        e -= 1;
    }
    match s[i..e].find(char::is_whitespace) {
        Some(p) => i + p,
        None => i,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_level_shares_budget() {
        assert_eq!(water_level(&[10, 10], 100), usize::MAX);
        assert_eq!(water_level(&[300, 300], 254), 127);
        assert_eq!(water_level(&[20, 300], 254), 234);
    }

    #[test]
    fn head_tail_keeps_both_ends() {
        let ids: Vec<u32> = (0..10).collect();
        assert_eq!(head_tail(&ids, 5), vec![0, 1, 2, 8, 9]);
        assert_eq!(head_tail(&ids, 20), ids);
    }

    #[test]
    fn cuts_respect_char_boundaries() {
        let s = "é".repeat(100);
        let b = cut_back(&s, 51);
        assert!(s.is_char_boundary(b));
        let f = cut_forward(&s, 51);
        assert!(s.is_char_boundary(f));
    }

    #[test]
    fn allocation_keeps_first_and_last_user_turns() {
        let t = |role| Turn {
            role,
            content: String::new(),
        };
        let turns = [
            t(Role::User),
            t(Role::Assistant),
            t(Role::User),
            t(Role::Assistant),
            t(Role::User),
        ];
        let refs: Vec<&Turn> = turns.iter().collect();
        let lens = [200, 200, 200, 200, 200];
        let mut alloc = [0; 5];
        allocate(&refs, &lens, 254, &mut alloc);
        assert_eq!(alloc, [127, 0, 0, 0, 127]);
        let lens = [20, 30, 40, 50, 20];
        let mut alloc = [0; 5];
        allocate(&refs, &lens, 100, &mut alloc);
        // essentials 20 + 20, then the last turn is the first user turn → already; then turn 2
        // (user, 40) fits; the 30-token assistant turn does not fit whole and 20 < MIN_PIECE.
        assert!(alloc.iter().sum::<usize>() <= 100);
        assert_eq!((alloc[0], alloc[4], alloc[2]), (20, 20, 40));
    }
}
