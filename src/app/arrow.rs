//! Arrow in, Arrow out: classification of record batches with a fixed input schema, for the
//! Python binding (Spark `mapInArrow`, Polars, Ray). The batch is the unit: no files, no resume.

use crate::pipeline::{Classified, Classifier, Escalation};
use crate::row::{DecidedBy, OutputRow};
use crate::{Error, Result};
use std::sync::mpsc::sync_channel;

/// Classifies record batches of one input schema: the resolved columns and the output layout.
pub struct ArrowJob {
    pub columns: crate::input::BatchColumns,
    pub spec: crate::output::OutputSpec,
    stem: String,
}

impl ArrowJob {
    pub fn new(
        schema: &arrow_schema::Schema,
        cols: &crate::input::Columns,
        c: &Classifier,
    ) -> Result<ArrowJob> {
        let bc = crate::input::BatchColumns::resolve(schema, cols, false, "record batch")
            .map_err(Error::Config)?;
        let mut spec = crate::output::OutputSpec::new(
            cols.passthrough
                .iter()
                .cloned()
                .zip(bc.passthrough_types.iter().cloned())
                .collect(),
        );
        spec.taxonomies = c.taxonomy_columns();
        Ok(ArrowJob {
            columns: bc,
            spec,
            stem: "batch".into(),
        })
    }

    pub fn output_schema(&self) -> arrow_schema::SchemaRef {
        crate::output::schema(&self.spec)
    }

    /// Classifies one batch (rows numbered from `first_index` for generated ids). Escalated
    /// rows go through `escalation` when given (the LLM tier), else stay `escalate`. Output rows
    /// keep the input order.
    pub fn classify(
        &self,
        c: &Classifier,
        batch: &arrow_array::RecordBatch,
        first_index: u64,
        escalation: Option<&mut dyn Escalation>,
    ) -> Result<arrow_array::RecordBatch> {
        let rows = self
            .columns
            .rows(batch, None, first_index, &self.stem, "record batch");
        let order: std::collections::HashMap<String, usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.id.clone(), i))
            .collect();
        let (classified, _panics) = c.classify_guarded(rows)?;
        let mut out: Vec<OutputRow> = Vec::with_capacity(classified.len());
        match escalation {
            None => out.extend(classified.into_iter().map(|c| c.out)),
            Some(esc) => {
                let (e, d): (Vec<Classified>, Vec<Classified>) = classified
                    .into_iter()
                    .partition(|c| c.out.decided_by == DecidedBy::Escalate || c.audit);
                // Every result arrives as its own send at worst: room for all of them, so the
                // tier never blocks on this (unread until it finishes) channel.
                let (tx, rx) = sync_channel::<Vec<OutputRow>>(e.len() + 1);
                out.extend(d.into_iter().map(|c| c.out));
                if !e.is_empty() {
                    esc.submit(e, &tx)?;
                }
                esc.finish(&tx)?;
                drop(tx);
                out.extend(rx.try_iter().flatten());
            }
        }
        // Ids are unique within a batch in sane inputs; duplicates keep their relative order.
        out.sort_by_key(|r| order.get(&r.id).copied().unwrap_or(usize::MAX));
        crate::output::to_record_batch(&out, &self.spec)
    }
}
