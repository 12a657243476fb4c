//! The conversation value that flows through the pipeline: an id, the content (plain text or
//! role-tagged turns), an optional gold label and the pass-through values the user asked to keep.
//! This module only defines data; it must never do I/O or tokenization.

use serde::{Deserialize, Serialize};

/// Who spoke a turn, normalised from the many spellings found in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    System,
    Tool,
}

impl Role {
    /// Maps the role spellings of OpenAI, Anthropic, ShareGPT and HH-RLHF style logs.
    /// Unknown roles are treated as the assistant side: they are never the person whose intent
    /// we label, so they must not outrank user turns during truncation.
    pub fn parse(s: &str) -> Role {
        match s.trim().to_ascii_lowercase().as_str() {
            "user" | "human" | "customer" | "client" | "usr" => Role::User,
            "system" | "developer" => Role::System,
            "tool" | "function" | "ipython" => Role::Tool,
            _ => Role::Assistant,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Tool => "tool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Text(String),
    Turns(Vec<Turn>),
}

impl Content {
    /// The conversation flattened as `role: content` lines — the form shown to an LLM and
    /// stored with exemplars. (The embedder gets the token-budgeted form from `render`.)
    pub fn flatten(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Turns(turns) => {
                let mut s = String::new();
                for (i, t) in turns.iter().enumerate() {
                    if i > 0 {
                        s.push('\n');
                    }
                    s.push_str(t.role.as_str());
                    s.push_str(": ");
                    s.push_str(&t.content);
                }
                s
            }
        }
    }

    /// True when there is nothing to embed (no turn has any non-blank text).
    pub fn is_blank(&self) -> bool {
        match self {
            Content::Text(t) => t.trim().is_empty(),
            Content::Turns(ts) => ts.iter().all(|t| t.content.trim().is_empty()),
        }
    }

    pub fn char_len(&self) -> usize {
        match self {
            Content::Text(t) => t.len(),
            Content::Turns(ts) => ts.iter().map(|t| t.content.len()).sum(),
        }
    }
}

/// One input row. `content` is an error string when the row could not be read; such rows still
/// flow to the output (as `decided_by = "error"`) so that every input id appears exactly once.
#[derive(Debug, Clone)]
pub struct Row {
    /// 0-based position in its file, for error messages and generated ids.
    pub index: u64,
    pub id: String,
    pub content: Result<Content, String>,
    pub label: Option<String>,
    pub passthrough: Vec<serde_json::Value>,
}
