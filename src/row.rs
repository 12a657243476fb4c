//! The result of classifying one row, as every later stage sees it: the LLM tier refines it,
//! the growth hook reads it, sinks store it. Plain data; this module must never do I/O or know
//! any output format (those are `output`'s, behind the [`RowSink`](crate::sink::RowSink) trait).

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecidedBy {
    Knn,
    Escalate,
    Llm,
    Error,
}

impl DecidedBy {
    pub fn as_str(&self) -> &'static str {
        match self {
            DecidedBy::Knn => "knn",
            DecidedBy::Escalate => "escalate",
            DecidedBy::Llm => "llm",
            DecidedBy::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NeighborOut {
    pub id: String,
    pub label: String,
    pub score: f32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct LlmInfo {
    pub model: String,
    pub tokens_in: u32,
    pub tokens_out: u32,
    pub cost_usd: f64,
}

/// A row's result under an additional taxonomy (`classify --also`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaxOut {
    pub label: Option<String>,
    /// Multi-label taxonomies: the label set.
    pub labels: Option<Vec<String>>,
    /// Multi-label taxonomies decided by the head: the labels whose in/out verdict was not
    /// sure enough to keep (the row is `escalate` for those, kept for the rest).
    pub uncertain: Option<Vec<String>>,
    pub confidence: Option<f32>,
    pub decided_by: DecidedBy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    pub id: String,
    pub label: Option<String>,
    pub confidence: Option<f32>,
    pub margin: Option<f32>,
    pub top1_sim: Option<f32>,
    pub decided_by: DecidedBy,
    /// The kNN vote's label, also for escalated rows (what an LLM-less run would have said).
    pub knn_label: Option<String>,
    pub neighbors: Vec<NeighborOut>,
    pub error: Option<String>,
    pub llm: Option<LlmInfo>,
    pub passthrough: Vec<Value>,
    /// One entry per additional taxonomy, in the classifier's taxonomy order (empty for error
    /// rows).
    pub extra: Vec<TaxOut>,
    /// The row's language (ISO 639-1 where it has one), when it could be told.
    pub lang: Option<String>,
    /// Why the row went to the LLM tier (`confidence`, or `language`: the index's encoder was
    /// not trained on the row's language); `None` for rows kept by kNN and error rows.
    pub escalate_reason: Option<EscalateReason>,
    /// Personal data replaced before the row's text left for the LLM (or before embedding,
    /// when configured): entities by type, never the values. `None` when nothing was redacted
    /// or the text never left.
    pub redacted: Option<crate::pii::Counts>,
    /// How far the row is from what the index knows of its voted label (`crate::novelty`):
    /// 0–1, the share of that label's exemplars nearer to it; `None` without a novelty rule.
    pub novelty: Option<f32>,
    /// A kept row that was also asked of the LLM (`--audit-rate`): its answer.
    pub audit: Option<Audit>,
}

/// `audit_label` of an audited row the LLM answered with no label of the schema (a
/// disagreement: the row belongs to none of the index's labels, as the LLM sees it).
pub const OUTSIDE_SCHEMA: &str = "(outside the schema)";

/// The LLM's blind answer for an audited row.
#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    /// `None` when the LLM could not answer (the audit is missing, the row is kept as it was).
    pub label: Option<String>,
}

impl Audit {
    /// `agree`, `disagree` or `missing` (against the row's own label).
    pub fn verdict(&self, kept: Option<&str>) -> &'static str {
        match (&self.label, kept) {
            (None, _) => "missing",
            (Some(a), Some(k)) if a == k => "agree",
            _ => "disagree",
        }
    }
}

/// Why a row was escalated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscalateReason {
    /// The decision signal fell below the threshold.
    Confidence,
    /// The index's encoder does not cover the row's language.
    Language,
    /// The row is far from every exemplar of its voted label (`crate::novelty`).
    Novel,
    /// A guard holds the row's segment (label or language): its audited agreement with the
    /// LLM fell below the promise (`crate::guard`).
    Guard,
}

impl EscalateReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            EscalateReason::Confidence => "confidence",
            EscalateReason::Language => "language",
            EscalateReason::Novel => "novel",
            EscalateReason::Guard => "guard",
        }
    }
}

impl OutputRow {
    pub fn error(id: String, msg: String, passthrough: Vec<Value>) -> Self {
        OutputRow {
            id,
            label: None,
            confidence: None,
            margin: None,
            top1_sim: None,
            decided_by: DecidedBy::Error,
            knn_label: None,
            neighbors: Vec::new(),
            error: Some(msg),
            llm: None,
            passthrough,
            extra: Vec::new(),
            lang: None,
            escalate_reason: None,
            redacted: None,
            novelty: None,
            audit: None,
        }
    }
}
