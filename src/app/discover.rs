//! The discover job: what the taxonomy misses. Conversations (a whole file, or only the rows a
//! run escalated) are embedded with the index's encoder (or vectors a `semtel embed` run already
//! wrote are reused), clustered by density (`crate::cluster`: the number of clusters is found,
//! rows in no dense region stay noise), and each cluster that clears the privacy floor is named
//! by the LLM from a few central and diverse representatives — redacted first, cached, through a
//! Prompty template the user can replace. Named clusters are compared with the index's labels
//! (prototype similarity) and marked `new`, `looks_like` (a merge or split suggestion) or
//! `noise`; an optional second level groups clusters into broader topics. The proposal is
//! written as `taxonomy.toml` (what `bootstrap --labels` reads), `clusters.parquet`,
//! `summary.json` and a self-contained `report.html`.
//!
//! Privacy: a cluster with fewer than `min_conversations` distinct conversations is never named
//! and never reported with examples or ids; only redacted text is sent; the report carries row
//! text only when asked (`show_examples`, and then redacted).
//!
//! This module must never print or parse flags: it takes resolved options and returns a report.

use crate::cluster::{self, Params};
use crate::embed::{Encoder, EncoderOptions};
use crate::input::{self, InputOptions};
use crate::llm::client::{CallError, ChatRequest, HttpClient, LlmClient};
use crate::llm::prompty::Prompty;
use crate::llm::LlmConfig;
use crate::progress::Progress;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The naming prompt semtel ships (prompts/discover.prompty), compiled in.
pub const DISCOVER_PROMPTY: &str = include_str!("../../prompts/discover.prompty");
/// The second-level prompt (prompts/discover-groups.prompty), compiled in.
pub const GROUPS_PROMPTY: &str = include_str!("../../prompts/discover-groups.prompty");

/// Principal components clustered unless told otherwise: on CLINC150 and Banking77 alike NMI
/// against the gold intents rose from the full 384 dimensions to 32–128 components (a plateau,
/// best at 64) and fell below 32 (benches/discover.sh; README).
pub const DEFAULT_REDUCE: usize = 64;

/// HDBSCAN's `min_samples` unless given (see where it is used).
pub const DEFAULT_MIN_SAMPLES: usize = 2;

/// Clusters named per LLM call (each with its representatives).
const CLUSTERS_PER_CALL: usize = 4;
/// Rows drawn on the 2-D map (a stride sample of all rows).
const MAP_ROWS: usize = 3_000;

#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Conversations (JSONL or Parquet, the reader `classify` uses).
    pub input: PathBuf,
    pub input_opts: InputOptions,
    /// A `semtel embed` output whose vectors are reused for the ids it holds.
    pub vectors: Option<PathBuf>,
    /// A `classify` output: only its escalated rows (any `escalate_reason`, `novel` among them)
    /// are clustered.
    pub escalated_from: Option<PathBuf>,
    /// The index whose encoder embeds and whose labels clusters are compared with.
    pub index: Option<PathBuf>,
    /// The encoder when there is no index.
    pub encoder: EncoderOptions,
    /// `None`: clusters are found and reported, not named.
    pub llm: Option<LlmConfig>,
    /// Replaces the shipped naming prompt.
    pub prompt: Option<PathBuf>,
    pub out: PathBuf,
    /// Privacy floor: distinct conversations a cluster needs to be named or shown.
    pub min_conversations: usize,
    /// Smallest cluster (default: the privacy floor).
    pub min_cluster_size: Option<usize>,
    /// Density smoothing (default [`DEFAULT_MIN_SAMPLES`]).
    pub min_samples: Option<usize>,
    /// How clusters are chosen from the density tree.
    pub selection: cluster::Selection,
    /// Cluster on this many principal components (0: the full vectors).
    pub reduce: usize,
    /// Conversations shown to the LLM per cluster: half central, half diverse.
    pub representatives: usize,
    pub show_examples: bool,
    /// A column of timestamps (epoch seconds or RFC 3339) for the share over time.
    pub time_col: Option<String>,
    /// 1: clusters; 2: clusters grouped into broader topics as well.
    pub levels: usize,
    /// A cluster whose centroid is at least this similar (cosine) to a label's prototype looks
    /// like that label; default: the median similarity of each label to its nearest other label.
    pub similar_above: Option<f32>,
}

impl DiscoverOptions {
    pub fn new(input: PathBuf, out: PathBuf) -> DiscoverOptions {
        DiscoverOptions {
            input,
            input_opts: InputOptions::default(),
            vectors: None,
            escalated_from: None,
            index: None,
            encoder: EncoderOptions::default(),
            llm: None,
            prompt: None,
            out,
            min_conversations: 20,
            min_cluster_size: None,
            min_samples: None,
            selection: cluster::Selection::Eom,
            reduce: DEFAULT_REDUCE,
            representatives: 8,
            show_examples: false,
            time_col: None,
            levels: 1,
            similar_above: None,
        }
    }
}

/// One cluster as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub cluster: usize,
    pub rows: usize,
    /// Distinct conversations (identical texts count once).
    pub conversations: usize,
    /// `new`, `looks_like`, `noise` (the LLM found no shared topic), `unnamed` (no LLM or its
    /// answer was unusable) or `below_floor` (under the privacy floor: never named or shown).
    pub status: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Why an `unnamed` cluster has no name (no LLM configured, or no usable answer).
    pub unnamed_reason: Option<String>,
    /// The taxonomy entry this cluster was merged into (a near-duplicate name of a larger one).
    pub merged_into: Option<String>,
    pub nearest_label: Option<String>,
    pub similarity: Option<f32>,
    /// What to do about it: add, merge into a label, or split a label.
    pub suggestion: Option<String>,
    pub group: Option<usize>,
    /// Ids of its representatives (never for clusters under the floor).
    pub example_ids: Vec<String>,
    /// Their redacted text, only with `show_examples`.
    pub examples: Vec<String>,
    /// Share of each time window's rows (empty without a time column).
    pub share_by_window: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub group: usize,
    pub name: Option<String>,
    pub description: Option<String>,
    pub clusters: Vec<usize>,
    pub rows: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LlmSpend {
    pub calls: u64,
    pub cached: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub read_and_embed: f64,
    pub cluster: f64,
    pub name: f64,
    pub total: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiscoverReport {
    pub rows_read: usize,
    pub rows_clustered: usize,
    pub unreadable: usize,
    /// Rows left out because `escalated_from` did not escalate them.
    pub not_escalated: usize,
    pub vectors_reused: usize,
    pub embedded: usize,
    pub noise_rows: usize,
    pub min_cluster_size: usize,
    pub min_samples: usize,
    pub selection: String,
    pub min_conversations: usize,
    pub similar_above: Option<f32>,
    pub similarity_rule: String,
    pub clusters: Vec<ClusterReport>,
    pub groups: Vec<GroupReport>,
    /// The proposed additions (name → description), what `taxonomy.toml` lists as new.
    pub new_labels: BTreeMap<String, String>,
    pub windows: Vec<String>,
    pub llm: Option<LlmSpend>,
    pub seconds: Timings,
}

/// The 2-D map of the report: a sample of rows projected on two principal axes.
struct MapPoint {
    x: f32,
    y: f32,
    cluster: i32,
}

/// Everything read for one row that is clustered.
struct Item {
    id: String,
    text: String,
    hash: String,
    time: Option<f64>,
}

pub fn run(o: &DiscoverOptions, progress: &Progress) -> Result<DiscoverReport> {
    let t0 = Instant::now();
    if o.min_conversations == 0 {
        return Err(Error::Config(
            "--min-conversations must be at least 1".into(),
        ));
    }
    if !(1..=2).contains(&o.levels) {
        return Err(Error::Config("--levels is 1 or 2".into()));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    // The LLM first: a bad configuration or prompt stops before anything is embedded.
    let namer = match &o.llm {
        Some(cfg) => Some(Namer::new(cfg, o.prompt.as_deref())?),
        None => None,
    };
    let keep = match &o.escalated_from {
        Some(p) => Some(escalated_ids(p)?),
        None => None,
    };
    let reuse = match &o.vectors {
        Some(p) => read_vectors(p)?,
        None => (0, HashMap::new()),
    };
    let index = match &o.index {
        Some(dir) => Some(crate::index::ExemplarIndex::open(dir, true)?),
        None => None,
    };
    let mut enc_opts = o.encoder.clone();
    if let (Some(ix), None) = (&index, &enc_opts.model) {
        enc_opts.model = Some(crate::index::default_model(ix.dir(), &ix.manifest.model));
    }
    let mut encoder: Option<Encoder> = None;
    let mut opts = o.input_opts.clone();
    if let Some(c) = &o.time_col {
        if !opts.columns.passthrough.contains(c) {
            opts.columns.passthrough.push(c.clone());
        }
    }
    let time_pos = o
        .time_col
        .as_ref()
        .and_then(|c| opts.columns.passthrough.iter().position(|p| p == c));

    let mut items: Vec<Item> = Vec::new();
    let mut vectors: Vec<f32> = Vec::new();
    let mut dims = reuse.0;
    let (mut rows_read, mut unreadable, mut not_escalated, mut reused, mut embedded) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let mut reader = input::open(&o.input, &opts)?;
    while let Some(rows) = reader.next_batch()? {
        progress.inc(rows.len() as u64);
        rows_read += rows.len();
        let mut to_embed = Vec::new();
        for r in rows {
            if keep.as_ref().is_some_and(|k| !k.contains(&r.id)) {
                not_escalated += 1;
                continue;
            }
            let Ok(content) = &r.content else {
                unreadable += 1;
                continue;
            };
            let text = content.flatten();
            let time = time_pos
                .and_then(|p| r.passthrough.get(p))
                .and_then(|v| match v {
                    serde_json::Value::Number(n) => n.as_f64(),
                    serde_json::Value::String(s) => super::monitor::parse_time(s),
                    _ => None,
                });
            let item = Item {
                id: r.id.clone(),
                hash: crate::hash::text_hash(&text),
                text,
                time,
            };
            if let Some(v) = reuse.1.get(&r.id) {
                items.push(item);
                vectors.extend_from_slice(v);
                reused += 1;
            } else {
                to_embed.push((item, r));
            }
        }
        if to_embed.is_empty() {
            continue;
        }
        if encoder.is_none() {
            let e = Encoder::load(&enc_opts)?;
            if let Some(ix) = &index {
                ix.check_model(&e.files, e.dim())?;
            }
            if dims != 0 && dims != e.dim() {
                return Err(Error::Config(format!(
                    "the reused vectors have {dims} dimensions but the encoder gives {}: embed them with the same model",
                    e.dim()
                )));
            }
            dims = e.dim();
            encoder = Some(e);
        }
        let enc = encoder.as_ref().expect("loaded above");
        let (its, rows): (Vec<Item>, Vec<_>) = to_embed.into_iter().unzip();
        for (it, e) in its.into_iter().zip(enc.embed_rows(&rows)?) {
            match e {
                Ok(e) => {
                    vectors.extend_from_slice(&e.vector);
                    items.push(it);
                    embedded += 1;
                }
                Err(_) => unreadable += 1,
            }
        }
    }
    if let Some(ix) = &index {
        if dims != 0 && dims != ix.manifest.model.dims {
            return Err(Error::Config(format!(
                "the vectors have {dims} dimensions but the index's model has {}: use the index's encoder",
                ix.manifest.model.dims
            )));
        }
    }
    if dims > 0 {
        crate::embed::normalize_rows(&mut vectors, dims);
    }
    let t_embed = t0.elapsed().as_secs_f64();

    // Cluster.
    let t1 = Instant::now();
    let mcs = o.min_cluster_size.unwrap_or(o.min_conversations).max(2);
    // Core distances from the nearest neighbour: in embedding spaces of hundreds of
    // dimensions distances concentrate, and the k-th neighbour's distance says less about
    // density as k grows (benches/discover.sh: on Banking77 and CLINC150 alike, topics found
    // fell steadily from min_samples 2 to 20).
    let ms = o.min_samples.unwrap_or(DEFAULT_MIN_SAMPLES).clamp(1, mcs);
    let params = Params {
        selection: o.selection,
        ..Params::new(mcs, ms)
    };
    let clustering = if items.is_empty() {
        cluster::Clustering {
            labels: Vec::new(),
            strength: Vec::new(),
            stability: Vec::new(),
            n_clusters: 0,
        }
    } else if o.reduce > 0 && o.reduce < dims && items.len() > o.reduce {
        let r = cluster::pca_reduce(&vectors, dims, o.reduce);
        cluster::cluster(&r, o.reduce, &params)?
    } else {
        cluster::cluster(&vectors, dims, &params)?
    };
    let t_cluster = t1.elapsed().as_secs_f64();

    let k = clustering.n_clusters;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, &l) in clustering.labels.iter().enumerate() {
        if l >= 0 {
            members[l as usize].push(i);
        }
    }
    let centroids: Vec<Vec<f32>> = members
        .iter()
        .map(|m| centroid(&vectors, dims, m))
        .collect();

    // Compare with the index's labels.
    let (protos, rule_threshold) = match &index {
        Some(ix) => prototypes(ix)?,
        None => (Vec::new(), None),
    };
    let similar_above = o.similar_above.or(rule_threshold);
    let similarity_rule = match (o.similar_above, rule_threshold) {
        (Some(_), _) => "given (--similar-above)".to_string(),
        (None, Some(_)) => {
            "median cosine of each label's prototype to its nearest other label's".to_string()
        }
        (None, None) => "no index: nothing to compare with".to_string(),
    };

    // Time windows.
    let (windows, window_of) = time_windows(&items);
    // Rows per (cluster, window) and per window, in one pass.
    let mut per_window = vec![vec![0usize; windows.len()]; k];
    let mut all_window = vec![0usize; windows.len()];
    for (w, &l) in window_of.iter().zip(&clustering.labels) {
        if let Some(w) = *w {
            all_window[w] += 1;
            if l >= 0 {
                per_window[l as usize][w] += 1;
            }
        }
    }

    // Representatives and reports.
    let redactor = match &o.llm {
        Some(cfg) if cfg.redact != crate::pii::Level::Off => {
            Some(crate::pii::Redactor::new(cfg.redact, &cfg.redaction)?)
        }
        Some(_) => None,
        None => Some(crate::pii::Redactor::new(
            crate::pii::Level::Standard,
            &crate::pii::Rules::default(),
        )?),
    };
    let max_chars = o.llm.as_ref().map_or(1_500, |c| c.max_item_chars);
    let mut reports: Vec<ClusterReport> = Vec::with_capacity(k);
    let mut reps_text: Vec<Vec<String>> = Vec::with_capacity(k);
    for (c, m) in members.iter().enumerate() {
        let conversations = m
            .iter()
            .map(|&i| items[i].hash.as_str())
            .collect::<HashSet<_>>()
            .len();
        let below = conversations < o.min_conversations;
        let (nearest_label, similarity) = nearest(&protos, &centroids[c]);
        let share: Vec<f64> = per_window[c]
            .iter()
            .zip(&all_window)
            .map(|(&p, &a)| if a == 0 { 0.0 } else { p as f64 / a as f64 })
            .collect();
        let (ids, texts) = if below {
            (Vec::new(), Vec::new())
        } else {
            let picks =
                representatives(&vectors, dims, m, &centroids[c], &items, o.representatives);
            let texts: Vec<String> = picks
                .iter()
                .map(|&i| {
                    let t = match &redactor {
                        Some(r) => r.redact(&items[i].text).text,
                        None => items[i].text.clone(),
                    };
                    crate::llm::tier::head_tail_chars(&t, max_chars)
                })
                .collect();
            (picks.iter().map(|&i| items[i].id.clone()).collect(), texts)
        };
        reports.push(ClusterReport {
            cluster: c,
            rows: m.len(),
            conversations,
            status: if below { "below_floor" } else { "unnamed" }.into(),
            name: None,
            description: None,
            unnamed_reason: None,
            merged_into: None,
            nearest_label: if below { None } else { nearest_label },
            similarity: if below { None } else { similarity },
            suggestion: None,
            group: None,
            example_ids: ids,
            examples: if o.show_examples {
                texts.clone()
            } else {
                Vec::new()
            },
            share_by_window: if below { Vec::new() } else { share },
        });
        reps_text.push(texts);
    }

    // Name.
    let t2 = Instant::now();
    let known: Vec<String> = index
        .as_ref()
        .map(|ix| ix.labels().to_vec())
        .unwrap_or_default();
    if let Some(namer) = &namer {
        let eligible: Vec<usize> = (0..k)
            .filter(|&c| reports[c].status != "below_floor")
            .collect();
        let jobs: Vec<Vec<(usize, Vec<String>)>> = eligible
            .chunks(CLUSTERS_PER_CALL)
            .map(|ch| ch.iter().map(|&c| (c, reps_text[c].clone())).collect())
            .collect();
        let answers = namer.name_clusters(&jobs, &known)?;
        for (c, (name, desc)) in answers {
            reports[c].name = Some(name);
            reports[c].description = Some(desc);
        }
    }
    for r in reports
        .iter_mut()
        .filter(|r| r.status == "unnamed" && r.name.is_none())
    {
        r.unnamed_reason = Some(if namer.is_some() {
            "the LLM gave no usable name for it (the call failed after its retries, or the answer was unreadable); run again to retry".into()
        } else {
            "no --llm: clusters are found, not named".into()
        });
    }
    // Status, merging of near-duplicate names, suggestions.
    let mut entry_of: HashMap<String, String> = HashMap::new();
    let mut per_label: HashMap<String, Vec<usize>> = HashMap::new();
    for r in reports.iter_mut() {
        let Some(name) = r.name.clone() else { continue };
        if name == "noise" {
            r.status = "noise".into();
            continue;
        }
        let key = name_key(&name);
        // A later (smaller) cluster with the same or a near-duplicate name joins the first.
        match entry_of.get(&key) {
            Some(first) => r.merged_into = Some(first.clone()),
            None => {
                entry_of.insert(key, name.clone());
            }
        }
        let looks = match (r.similarity, similar_above, &r.nearest_label) {
            (Some(s), Some(t), Some(_)) => s >= t,
            _ => false,
        } || known.contains(&name);
        if looks {
            r.status = "looks_like".into();
            let l = if known.contains(&name) {
                name.clone()
            } else {
                r.nearest_label.clone().unwrap_or_default()
            };
            per_label.entry(l).or_default().push(r.cluster);
        } else {
            r.status = "new".into();
            r.suggestion = Some(match &r.merged_into {
                Some(m) => format!("part of the new label `{m}`"),
                None => format!("add the label `{name}`"),
            });
        }
    }
    for (label, cs) in &per_label {
        for &c in cs {
            reports[c].suggestion = Some(if cs.len() > 1 {
                format!("split `{label}`: {} clusters look like it", cs.len())
            } else {
                format!("merge into `{label}` (or refine its description)")
            });
        }
    }

    // Second level: broader topics over the named clusters.
    let mut groups = Vec::new();
    if o.levels == 2 {
        let named: Vec<usize> = reports
            .iter()
            .filter(|r| matches!(r.status.as_str(), "new" | "looks_like"))
            .map(|r| r.cluster)
            .collect();
        let target = ((named.len() as f64).sqrt().round() as usize).max(1);
        let parts = average_linkage(
            &named.iter().map(|&c| &centroids[c][..]).collect::<Vec<_>>(),
            target,
        );
        for (g, part) in parts.iter().enumerate() {
            let cl: Vec<usize> = part.iter().map(|&j| named[j]).collect();
            for &c in &cl {
                reports[c].group = Some(g);
            }
            groups.push(GroupReport {
                group: g,
                name: None,
                description: None,
                rows: cl.iter().map(|&c| reports[c].rows).sum(),
                clusters: cl,
            });
        }
        if let Some(namer) = &namer {
            let topics: Vec<(usize, Vec<(String, String)>)> = groups
                .iter()
                .map(|g| {
                    (
                        g.group,
                        g.clusters
                            .iter()
                            .filter_map(|&c| {
                                Some((
                                    reports[c].name.clone()?,
                                    reports[c].description.clone().unwrap_or_default(),
                                ))
                            })
                            .collect(),
                    )
                })
                .collect();
            for (g, (name, desc)) in namer.name_groups(&topics)? {
                groups[g].name = Some(name);
                groups[g].description = Some(desc);
            }
        }
    }
    let t_name = t2.elapsed().as_secs_f64();

    let mut new_labels = BTreeMap::new();
    for r in &reports {
        if r.status == "new" && r.merged_into.is_none() {
            if let Some(n) = &r.name {
                new_labels.insert(n.clone(), r.description.clone().unwrap_or_default());
            }
        }
    }
    let noise_rows = clustering.labels.iter().filter(|&&l| l < 0).count();
    let report = DiscoverReport {
        rows_read,
        rows_clustered: items.len(),
        unreadable,
        not_escalated,
        vectors_reused: reused,
        embedded,
        noise_rows,
        min_cluster_size: mcs,
        min_samples: ms,
        selection: format!("{:?}", o.selection).to_lowercase(),
        min_conversations: o.min_conversations,
        similar_above,
        similarity_rule,
        clusters: reports,
        groups,
        new_labels,
        windows,
        llm: namer.as_ref().map(|n| n.spend()),
        seconds: Timings {
            read_and_embed: t_embed,
            cluster: t_cluster,
            name: t_name,
            total: t0.elapsed().as_secs_f64(),
        },
    };
    let map = map_points(&vectors, dims, &clustering.labels);
    write_outputs(o, &report, &items, &clustering, index.as_ref(), &map)?;
    Ok(report)
}

/// Ids of the rows a `classify` output escalated (its `escalate_reason` is set).
fn escalated_ids(path: &Path) -> Result<HashSet<String>> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    let mut out = HashSet::new();
    if crate::output::OutFormat::of(path) == crate::output::OutFormat::Jsonl {
        use std::io::BufRead;
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        for line in std::io::BufReader::new(f).split(b'\n') {
            let line = line.map_err(|e| Error::io(path, e))?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            let reason = v.get("escalate_reason").and_then(|x| x.as_str());
            if let (Some(id), Some(r)) = (v.get("id").and_then(|x| x.as_str()), reason) {
                if !r.is_empty() {
                    out.insert(id.to_string());
                }
            }
        }
        return Ok(out);
    }
    for b in crate::output::read_output_batches(path)? {
        let col = |n: &str| {
            b.column_by_name(n)
                .map(|c| arrow_cast::cast(c, &arrow_schema::DataType::Utf8))
                .transpose()
                .map_err(|e| Error::output(path, e.to_string()))
        };
        let (Some(ids), Some(reasons)) = (col("id")?, col("escalate_reason")?) else {
            return Err(Error::output(
                path,
                "not a semtel classify output (no id or escalate_reason column)",
            ));
        };
        let (ids, reasons) = (ids.as_string::<i32>(), reasons.as_string::<i32>());
        for i in 0..b.num_rows() {
            if !reasons.is_null(i) && !reasons.value(i).is_empty() && !ids.is_null(i) {
                out.insert(ids.value(i).to_string());
            }
        }
    }
    Ok(out)
}

/// `semtel embed` vectors by id (dimensions, map).
fn read_vectors(path: &Path) -> Result<(usize, HashMap<String, Vec<f32>>)> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .and_then(|b| b.build())
        .map_err(|e| Error::input(path, format!("not a readable Parquet file: {e}")))?;
    let mut map = HashMap::new();
    let mut dims = 0usize;
    for b in reader {
        let b = b.map_err(|e| Error::input(path, e.to_string()))?;
        let (Some(ids), Some(vecs)) = (b.column_by_name("id"), b.column_by_name("vector")) else {
            return Err(Error::input(
                path,
                "not a `semtel embed` output: it needs `id` and `vector` columns",
            ));
        };
        let ids = arrow_cast::cast(ids, &arrow_schema::DataType::Utf8)
            .map_err(|e| Error::input(path, e.to_string()))?;
        let ids = ids.as_string::<i32>();
        let Some(list) = vecs.as_fixed_size_list_opt() else {
            return Err(Error::input(
                path,
                "`vector` is not a fixed-size list of floats",
            ));
        };
        let d = list.value_length() as usize;
        let Some(values) = list
            .values()
            .as_primitive_opt::<arrow_array::types::Float32Type>()
        else {
            return Err(Error::input(path, "`vector` is not a list of float32"));
        };
        if dims != 0 && d != dims {
            return Err(Error::input(path, "vectors of different lengths"));
        }
        dims = d;
        for i in 0..b.num_rows() {
            if ids.is_null(i) || list.is_null(i) {
                continue;
            }
            let v = &values.values()[i * d..(i + 1) * d];
            if v.iter().all(|x| x.is_finite()) {
                map.insert(ids.value(i).to_string(), v.to_vec());
            }
        }
    }
    Ok((dims, map))
}

fn centroid(v: &[f32], d: usize, members: &[usize]) -> Vec<f32> {
    let mut c = vec![0.0f32; d];
    for &i in members {
        for (a, b) in c.iter_mut().zip(&v[i * d..(i + 1) * d]) {
            *a += b;
        }
    }
    let n = c.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        c.iter_mut().for_each(|x| *x /= n);
    }
    c
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Each label's normalised mean exemplar vector.
type Prototypes = Vec<(String, Vec<f32>)>;

/// Normalised mean exemplar vector of every label, and the default "looks like" threshold: the
/// median over labels of the cosine between a label's prototype and its nearest other label's.
/// Labels the taxonomy keeps apart are at least about this distinct; a cluster closer than that
/// to a label is more likely that label (or a part of it) than a new topic.
fn prototypes(ix: &crate::index::ExemplarIndex) -> Result<(Prototypes, Option<f32>)> {
    let d = ix.manifest.model.dims;
    let v = ix.vectors()?;
    let labels = ix.labels();
    let mut by: Vec<Vec<usize>> = vec![Vec::new(); labels.len()];
    for (i, &l) in ix.label_indices().iter().enumerate() {
        by[l as usize].push(i);
    }
    let protos: Vec<(String, Vec<f32>)> = labels
        .iter()
        .zip(&by)
        .filter(|(_, m)| !m.is_empty())
        .map(|(l, m)| (l.clone(), centroid(&v, d, m)))
        .collect();
    if protos.len() < 2 {
        return Ok((protos, None));
    }
    let mut nn: Vec<f32> = protos
        .iter()
        .enumerate()
        .map(|(i, (_, a))| {
            protos
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, (_, b))| dot(a, b))
                .fold(f32::MIN, f32::max)
        })
        .collect();
    nn.sort_by(f32::total_cmp);
    Ok((protos, Some(nn[nn.len() / 2])))
}

fn nearest(protos: &[(String, Vec<f32>)], c: &[f32]) -> (Option<String>, Option<f32>) {
    protos
        .iter()
        .map(|(l, p)| (l, dot(p, c)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map_or((None, None), |(l, s)| (Some(l.clone()), Some(s)))
}

/// Up to `n` rows of a cluster for the LLM: half the most central (closest to the centroid),
/// the rest spread out (farthest-point picks among the cluster), identical texts once.
fn representatives(
    v: &[f32],
    d: usize,
    members: &[usize],
    c: &[f32],
    items: &[Item],
    n: usize,
) -> Vec<usize> {
    let mut by_sim: Vec<(usize, f32)> = members
        .iter()
        .map(|&i| (i, dot(&v[i * d..(i + 1) * d], c)))
        .collect();
    by_sim.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut seen = HashSet::new();
    let mut picks = Vec::new();
    for &(i, _) in &by_sim {
        if picks.len() >= n.div_ceil(2) {
            break;
        }
        if seen.insert(items[i].hash.as_str()) {
            picks.push(i);
        }
    }
    // Farthest-point picks over (a stride sample of) the cluster.
    let step = (members.len() / 2_000).max(1);
    let pool: Vec<usize> = members.iter().step_by(step).copied().collect();
    let mut best: Vec<f32> = pool
        .iter()
        .map(|&i| {
            picks
                .iter()
                .map(|&p| dot(&v[i * d..(i + 1) * d], &v[p * d..(p + 1) * d]))
                .fold(f32::MIN, f32::max)
        })
        .collect();
    while picks.len() < n {
        let Some((j, _)) = best
            .iter()
            .enumerate()
            .filter(|(j, _)| !seen.contains(items[pool[*j]].hash.as_str()))
            .min_by(|a, b| a.1.total_cmp(b.1))
        else {
            break;
        };
        let i = pool[j];
        seen.insert(items[i].hash.as_str());
        picks.push(i);
        for (k, b) in best.iter_mut().enumerate() {
            let q = pool[k];
            *b = b.max(dot(&v[q * d..(q + 1) * d], &v[i * d..(i + 1) * d]));
        }
    }
    picks
}

/// A label-name key under which near-duplicate names meet: lower-case words, filler words
/// dropped, order ignored ("card_delivery" = "delivery of card").
fn name_key(name: &str) -> String {
    const FILLER: [&str; 10] = [
        "a", "an", "the", "of", "for", "and", "or", "to", "with", "about",
    ];
    let mut w: Vec<String> = name
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .filter(|w| !FILLER.contains(&w.as_str()))
        .map(|w| {
            w.strip_suffix('s')
                .filter(|s| s.len() > 2)
                .map_or(w.clone(), str::to_string)
        })
        .collect();
    w.sort();
    w.dedup();
    w.join("_")
}

/// A label name as the taxonomy stores it: snake_case, at most 48 bytes, never empty.
pub fn clean_name(raw: &str) -> Option<String> {
    let mut s = String::new();
    for c in raw.trim().chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('_') && !s.is_empty() {
            s.push('_');
        }
        if s.len() >= 48 {
            break;
        }
    }
    while s.ends_with('_') {
        s.pop();
    }
    (!s.is_empty()).then_some(s)
}

fn clean_description(raw: &str) -> String {
    let one: String = raw.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut end = one.len().min(200);
    while !one.is_char_boundary(end) {
        end -= 1;
    }
    one[..end].to_string()
}

/// Parses `{"1": {"name": …, "description": …}, …}` (a bare string is a name alone) for the
/// numbers asked; anything else is left out.
fn parse_names(reply: &str, asked: usize) -> Option<Vec<Option<(String, String)>>> {
    let json = crate::llm::parse::extract_json(reply)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let obj = v.as_object()?;
    let out: Vec<Option<(String, String)>> = (1..=asked)
        .map(|n| {
            let x = obj.get(&n.to_string())?;
            let (name, desc) = match x {
                serde_json::Value::String(s) => (s.as_str(), ""),
                serde_json::Value::Object(o) => (
                    o.get("name")?.as_str()?,
                    o.get("description").and_then(|d| d.as_str()).unwrap_or(""),
                ),
                _ => return None,
            };
            Some((clean_name(name)?, clean_description(desc)))
        })
        .collect();
    out.iter().any(Option::is_some).then_some(out)
}

/// Calls the LLM for names: one call per few clusters, concurrently, cached, retried on
/// transient failures, over the configured endpoints in turn.
struct Namer {
    cfg: LlmConfig,
    clients: Vec<Arc<HttpClient>>,
    prompt: Prompty,
    groups_prompt: Prompty,
    cache: Mutex<crate::llm::cache::Cache>,
    spend: Mutex<LlmSpend>,
    rt: tokio::runtime::Runtime,
}

impl Namer {
    fn new(cfg: &LlmConfig, prompt: Option<&Path>) -> Result<Namer> {
        let sent = match &cfg.show_sent {
            Some(p) => Some(Arc::new(crate::llm::client::SentLog::open(p)?)),
            None => None,
        };
        let clients = cfg
            .endpoints
            .iter()
            .map(|e| HttpClient::new(e).map(|c| Arc::new(c.with_sent_log(sent.clone()))))
            .collect::<Result<Vec<_>>>()?;
        let prompt = match prompt {
            Some(p) => Prompty::load(p)?,
            None => Prompty::parse(DISCOVER_PROMPTY, "prompts/discover.prompty (built in)")?,
        };
        let groups_prompt =
            Prompty::parse(GROUPS_PROMPTY, "prompts/discover-groups.prompty (built in)")?;
        let cache = match cfg.cache_path() {
            Some(p) => crate::llm::cache::Cache::open(&p)?,
            None => crate::llm::cache::Cache::disabled(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::Llm(e.to_string()))?;
        Ok(Namer {
            cfg: cfg.clone(),
            clients,
            prompt,
            groups_prompt,
            cache: Mutex::new(cache),
            spend: Mutex::new(LlmSpend::default()),
            rt,
        })
    }

    fn spend(&self) -> LlmSpend {
        self.spend.lock().unwrap().clone()
    }

    fn name_clusters(
        &self,
        jobs: &[Vec<(usize, Vec<String>)>],
        known: &[String],
    ) -> Result<Vec<(usize, (String, String))>> {
        let reqs: Vec<(Vec<usize>, ChatRequest)> = jobs
            .iter()
            .map(|job| {
                let clusters: Vec<serde_json::Value> = job
                    .iter()
                    .enumerate()
                    .map(|(n, (_, ex))| {
                        let ex: Vec<String> = ex
                            .iter()
                            .map(|t| crate::llm::tier::escape_text(t))
                            .collect();
                        serde_json::json!({"n": n + 1, "examples": ex})
                    })
                    .collect();
                let ctx = serde_json::json!({"clusters": clusters, "known": known});
                let req = self.request(&self.prompt, &ctx, job.len())?;
                Ok((job.iter().map(|(c, _)| *c).collect(), req))
            })
            .collect::<Result<_>>()?;
        self.ask(&self.prompt, reqs)
    }

    fn name_groups(
        &self,
        groups: &[(usize, Vec<(String, String)>)],
    ) -> Result<Vec<(usize, (String, String))>> {
        let reqs: Vec<(Vec<usize>, ChatRequest)> = groups
            .chunks(CLUSTERS_PER_CALL * 2)
            .map(|ch| {
                let gs: Vec<serde_json::Value> = ch
                    .iter()
                    .enumerate()
                    .map(|(n, (_, topics))| {
                        let t: Vec<serde_json::Value> = topics
                            .iter()
                            .map(|(a, b)| serde_json::json!({"name": a, "description": crate::llm::tier::escape_text(b)}))
                            .collect();
                        serde_json::json!({"n": n + 1, "topics": t})
                    })
                    .collect();
                let req = self.request(&self.groups_prompt, &serde_json::json!({"groups": gs}), ch.len())?;
                Ok((ch.iter().map(|(g, _)| *g).collect(), req))
            })
            .collect::<Result<_>>()?;
        self.ask(&self.groups_prompt, reqs)
    }

    fn request(&self, prompt: &Prompty, ctx: &serde_json::Value, n: usize) -> Result<ChatRequest> {
        Ok(ChatRequest {
            messages: prompt.render(ctx)?,
            parameters: prompt.parameters.clone(),
            max_tokens: (n * 60 + 32) as u32,
        })
    }

    /// Sends every request (concurrently, at most 8 at once), answers by the ids each carries.
    fn ask(
        &self,
        prompt: &Prompty,
        reqs: Vec<(Vec<usize>, ChatRequest)>,
    ) -> Result<Vec<(usize, (String, String))>> {
        let model = self.cfg.endpoints[0].model.clone();
        let mut out = Vec::new();
        let mut todo = Vec::new();
        for (ids, req) in reqs {
            let key = crate::hash::text_hash(
                &req.messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
            let hit = self
                .cache
                .lock()
                .unwrap()
                .get(&prompt.version, &model, &key)
                .cloned();
            match hit.and_then(|h| parse_names(&h, ids.len())) {
                Some(names) => {
                    self.spend.lock().unwrap().cached += 1;
                    out.extend(
                        ids.into_iter()
                            .zip(names)
                            .filter_map(|(c, n)| Some((c, n?))),
                    );
                }
                None => todo.push((ids, req, key)),
            }
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(8));
        let results: Vec<(Vec<usize>, String, Option<Answer>)> = self.rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for (ids, req, key) in todo {
                let clients = self.clients.clone();
                let sem = sem.clone();
                let cfg = self.cfg.clone();
                set.spawn(async move {
                    let _permit = sem.acquire_owned().await;
                    let got = call_with_retries(&cfg, &clients, &req, ids.len()).await;
                    (ids, key, got)
                });
            }
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                if let Ok(r) = r {
                    all.push(r);
                }
            }
            all
        });
        for (ids, key, got) in results {
            let mut s = self.spend.lock().unwrap();
            match got {
                Some((content, pt, ct, ep)) => {
                    s.calls += 1;
                    s.prompt_tokens += pt as u64;
                    s.completion_tokens += ct as u64;
                    let e = &self.cfg.endpoints[ep];
                    s.cost_usd += pt as f64 / 1000.0 * e.price_in_per_1k
                        + ct as f64 / 1000.0 * e.price_out_per_1k;
                    if let Some(names) = parse_names(&content, ids.len()) {
                        self.cache
                            .lock()
                            .unwrap()
                            .put(&prompt.version, &model, &key, &content);
                        out.extend(
                            ids.into_iter()
                                .zip(names)
                                .filter_map(|(c, n)| Some((c, n?))),
                        );
                    } else {
                        s.failed += 1;
                    }
                }
                None => s.failed += 1,
            }
        }
        Ok(out)
    }
}

/// An answer: (content, prompt tokens, completion tokens, endpoint index).
type Answer = (String, u32, u32, usize);

/// One call, retried on transient failures with jittered backoff (honouring `Retry-After`), the
/// endpoints taken in turn. Returns (content, prompt tokens, completion tokens, endpoint).
async fn call_with_retries(
    cfg: &LlmConfig,
    clients: &[Arc<HttpClient>],
    req: &ChatRequest,
    n: usize,
) -> Option<Answer> {
    let attempts = cfg.max_attempts.max(1) as usize;
    let est_tokens: usize = req
        .messages
        .iter()
        .map(|m| m.content.len() / 4)
        .sum::<usize>()
        + n * 60;
    let timeout = Duration::from_secs_f64(
        cfg.timeout_base_s + cfg.timeout_per_1k_tokens_s * est_tokens as f64 / 1000.0,
    );
    for a in 0..attempts {
        let ep = a % clients.len();
        match clients[ep].chat(req, timeout).await {
            Ok(r) => {
                if parse_names(&r.content, n).is_some() || a + 1 == attempts {
                    return Some((r.content, r.prompt_tokens, r.completion_tokens, ep));
                }
            }
            Err(e) if !e.retryable() => {
                if matches!(
                    e,
                    CallError::Refused(..) | CallError::Fatal(..) | CallError::QuotaExhausted(_)
                ) && clients.len() > 1
                    && a + 1 < attempts
                {
                    continue;
                }
                return None;
            }
            Err(e) => {
                let base = cfg.backoff_base_s * 2f64.powi(a as i32);
                let mut wait = fastrand::f64() * base.min(cfg.backoff_max_s);
                if let CallError::RateLimited(info) = &e {
                    if let Some(ra) = info.retry_after {
                        wait = ra.as_secs_f64().min(cfg.max_retry_after_s);
                    }
                }
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
        }
    }
    None
}

/// Average-linkage agglomeration of unit vectors into `target` groups (cluster counts are
/// small: a few hundred at most, so the quadratic loop is fine).
fn average_linkage(c: &[&[f32]], target: usize) -> Vec<Vec<usize>> {
    let mut parts: Vec<Vec<usize>> = (0..c.len()).map(|i| vec![i]).collect();
    let sim = |a: &Vec<usize>, b: &Vec<usize>| -> f32 {
        let mut s = 0.0;
        for &i in a {
            for &j in b {
                s += dot(c[i], c[j]);
            }
        }
        s / (a.len() * b.len()) as f32
    };
    while parts.len() > target.max(1) {
        let mut best = (0, 1, f32::MIN);
        for i in 0..parts.len() {
            for j in i + 1..parts.len() {
                let s = sim(&parts[i], &parts[j]);
                if s > best.2 {
                    best = (i, j, s);
                }
            }
        }
        let b = parts.remove(best.1);
        parts[best.0].extend(b);
    }
    parts
}

/// Twelve equal windows over the rows' time span (none without times).
fn time_windows(items: &[Item]) -> (Vec<String>, Vec<Option<usize>>) {
    let times: Vec<f64> = items.iter().filter_map(|i| i.time).collect();
    if times.len() < 2 {
        return (Vec::new(), vec![None; items.len()]);
    }
    let lo = times.iter().copied().fold(f64::MAX, f64::min);
    let hi = times.iter().copied().fold(f64::MIN, f64::max);
    if hi <= lo {
        return (Vec::new(), vec![None; items.len()]);
    }
    let n = 12usize;
    let w = (hi - lo) / n as f64;
    let names = (0..n)
        .map(|i| super::monitor::format_time(lo + w * i as f64))
        .collect();
    let of = items
        .iter()
        .map(|it| {
            it.time
                .map(|t| (((t - lo) / w).floor() as usize).min(n - 1))
        })
        .collect();
    (names, of)
}

/// A stride sample of rows on their two principal axes (power iteration on the covariance).
fn map_points(v: &[f32], d: usize, labels: &[i32]) -> Vec<MapPoint> {
    let n = labels.len();
    if n == 0 || d == 0 {
        return Vec::new();
    }
    let step = (n / MAP_ROWS).max(1);
    let rows: Vec<usize> = (0..n).step_by(step).collect();
    let mut mean = vec![0.0f64; d];
    for &i in &rows {
        for (m, x) in mean.iter_mut().zip(&v[i * d..(i + 1) * d]) {
            *m += *x as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows.len() as f64);
    let centred: Vec<Vec<f64>> = rows
        .iter()
        .map(|&i| {
            v[i * d..(i + 1) * d]
                .iter()
                .zip(&mean)
                .map(|(x, m)| *x as f64 - m)
                .collect()
        })
        .collect();
    let axis = |other: Option<&Vec<f64>>| -> Vec<f64> {
        let mut a: Vec<f64> = (0..d).map(|j| ((j * 7919 % 13) as f64) - 6.0).collect();
        for _ in 0..60 {
            let mut next = vec![0.0f64; d];
            for x in &centred {
                let p: f64 = x.iter().zip(&a).map(|(u, w)| u * w).sum();
                for (nx, u) in next.iter_mut().zip(x) {
                    *nx += p * u;
                }
            }
            if let Some(o) = other {
                let p: f64 = next.iter().zip(o).map(|(u, w)| u * w).sum();
                for (nx, w) in next.iter_mut().zip(o) {
                    *nx -= p * w;
                }
            }
            let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm == 0.0 {
                break;
            }
            a = next.into_iter().map(|x| x / norm).collect();
        }
        a
    };
    let a1 = axis(None);
    let a2 = axis(Some(&a1));
    rows.iter()
        .zip(&centred)
        .map(|(&i, x)| MapPoint {
            x: x.iter().zip(&a1).map(|(u, w)| u * w).sum::<f64>() as f32,
            y: x.iter().zip(&a2).map(|(u, w)| u * w).sum::<f64>() as f32,
            cluster: labels[i],
        })
        .collect()
}

fn write_outputs(
    o: &DiscoverOptions,
    r: &DiscoverReport,
    items: &[Item],
    c: &cluster::Clustering,
    index: Option<&crate::index::ExemplarIndex>,
    map: &[MapPoint],
) -> Result<()> {
    // clusters.parquet: id → cluster (-1: noise), its strength and the cluster's name.
    {
        use arrow_array::{ArrayRef, Float32Array, Int32Array, RecordBatch, StringArray};
        use arrow_schema::{DataType, Field, Schema};
        let path = o.out.join("clusters.parquet");
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("cluster", DataType::Int32, false),
            Field::new("strength", DataType::Float32, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let name_of = |l: i32| -> Option<String> {
            if l < 0 {
                return None;
            }
            let rep = &r.clusters[l as usize];
            rep.merged_into.clone().or_else(|| rep.name.clone())
        };
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                items.iter().map(|i| i.id.as_str()),
            )),
            Arc::new(Int32Array::from(c.labels.clone())),
            Arc::new(Float32Array::from(c.strength.clone())),
            Arc::new(StringArray::from_iter(c.labels.iter().map(|&l| name_of(l)))),
        ];
        let batch = RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| Error::output(&path, e.to_string()))?;
        let tmp = path.with_extension("parquet.tmp");
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None)
            .map_err(|e| Error::output(&path, e.to_string()))?;
        w.write(&batch)
            .map_err(|e| Error::output(&path, e.to_string()))?;
        w.close().map_err(|e| Error::output(&path, e.to_string()))?;
        crate::fsio::commit(&tmp, &path)?;
    }
    let json = serde_json::to_string_pretty(r).map_err(|e| Error::Config(e.to_string()))?;
    crate::fsio::write_atomic(&o.out.join("summary.json"), json.as_bytes())?;
    crate::fsio::write_atomic(
        &o.out.join("taxonomy.toml"),
        taxonomy_toml(r, o, index).as_bytes(),
    )?;
    crate::fsio::write_atomic(&o.out.join("report.html"), html(r, map).as_bytes())?;
    Ok(())
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn comment(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `taxonomy.toml`: the index's labels (when there is one), then the proposed new labels, in
/// the `[labels]` table `bootstrap --labels` reads; sizes, example ids and the clusters that
/// look like existing labels as comments.
fn taxonomy_toml(
    r: &DiscoverReport,
    o: &DiscoverOptions,
    index: Option<&crate::index::ExemplarIndex>,
) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "# semtel discover: {} clusters in {} rows ({} noise); clusters under {} distinct conversations are not named.\n",
        r.clusters.len(),
        r.rows_clustered,
        r.noise_rows,
        r.min_conversations
    ));
    t.push_str("# Review before use: `semtel bootstrap --labels taxonomy.toml` reads the [labels] table.\n\n[labels]\n");
    let descs = o.llm.as_ref().map(|c| &c.labels);
    if let Some(ix) = index {
        t.push_str("# labels the index has\n");
        for l in ix.labels() {
            let d = descs.and_then(|m| m.get(l)).cloned().unwrap_or_default();
            t.push_str(&format!("{} = {}\n", toml_str(l), toml_str(&d)));
        }
        t.push('\n');
    }
    t.push_str("# proposed: clusters unlike any label\n");
    let known: HashSet<&str> = index
        .map(|i| i.labels().iter().map(String::as_str).collect())
        .unwrap_or_default();
    for c in &r.clusters {
        if c.status != "new" {
            continue;
        }
        let Some(name) = &c.name else { continue };
        match &c.merged_into {
            Some(m) => t.push_str(&format!(
                "# cluster {} ({} conversations) merged into {m}; example ids: {}\n",
                c.cluster,
                c.conversations,
                comment(&c.example_ids.join(", "))
            )),
            None if known.contains(name.as_str()) => {}
            None => {
                t.push_str(&format!(
                    "# cluster {}: {} conversations ({} rows){}; example ids: {}\n{} = {}\n",
                    c.cluster,
                    c.conversations,
                    c.rows,
                    c.nearest_label.as_ref().map_or(String::new(), |l| format!(
                        ", nearest label {l} at {:.3}",
                        c.similarity.unwrap_or(0.0)
                    )),
                    comment(&c.example_ids.join(", ")),
                    toml_str(name),
                    toml_str(c.description.as_deref().unwrap_or(""))
                ));
            }
        }
    }
    let looks: Vec<&ClusterReport> = r
        .clusters
        .iter()
        .filter(|c| c.status == "looks_like")
        .collect();
    if !looks.is_empty() {
        t.push_str("\n# clusters that look like a label (merge or split suggestions, not added)\n");
        for c in looks {
            t.push_str(&format!(
                "# cluster {} `{}` ({} conversations): {}\n",
                c.cluster,
                comment(c.name.as_deref().unwrap_or("")),
                c.conversations,
                comment(c.suggestion.as_deref().unwrap_or(""))
            ));
        }
    }
    t
}

/// The report as one self-contained HTML page (inline SVG, no scripts, no network).
fn html(r: &DiscoverReport, map: &[MapPoint]) -> String {
    use crate::html::esc;
    const PALETTE: [&str; 12] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf", "#393b79", "#637939",
    ];
    let colour = |c: i32| {
        if c < 0 {
            "#dddddd"
        } else {
            PALETTE[c as usize % PALETTE.len()]
        }
    };
    let mut h = String::from("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>semtel discover</title><style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}.new{color:#0a0;font-weight:bold}.looks_like{color:#a60}.below_floor,.noise,.unnamed{color:#888}</style></head><body>");
    h.push_str(&format!(
        "<h1>What the taxonomy misses</h1><p>{} rows clustered ({} read, {} unreadable{}), {} clusters, {} rows in no cluster (noise). Clusters under {} distinct conversations are never named or shown. HDBSCAN: min_cluster_size {}, min_samples {}. Similarity rule: {}{}.</p>",
        r.rows_clustered,
        r.rows_read,
        r.unreadable,
        if r.not_escalated > 0 { format!(", {} not escalated", r.not_escalated) } else { String::new() },
        r.clusters.len(),
        r.noise_rows,
        r.min_conversations,
        r.min_cluster_size,
        r.min_samples,
        esc(&r.similarity_rule),
        r.similar_above.map_or(String::new(), |t| format!(" ({t:.3})"))
    ));
    if let Some(l) = &r.llm {
        h.push_str(&format!(
            "<p>LLM: {} calls ({} from cache, {} failed), {} prompt + {} completion tokens, ${:.4}.</p>",
            l.calls, l.cached, l.failed, l.prompt_tokens, l.completion_tokens, l.cost_usd
        ));
    }
    // Map.
    if !map.is_empty() {
        let (w, hgt, pad) = (720.0f32, 480.0f32, 20.0f32);
        let (mut x0, mut x1, mut y0, mut y1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
        for p in map {
            x0 = x0.min(p.x);
            x1 = x1.max(p.x);
            y0 = y0.min(p.y);
            y1 = y1.max(p.y);
        }
        let sx = |x: f32| pad + (x - x0) / (x1 - x0).max(1e-6) * (w - 2.0 * pad);
        let sy = |y: f32| hgt - pad - (y - y0) / (y1 - y0).max(1e-6) * (hgt - 2.0 * pad);
        h.push_str(&format!("<h2>Map</h2><p>A sample of rows on their two principal axes; grey: noise.</p><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\"><rect width=\"{w}\" height=\"{hgt}\" fill=\"white\" stroke=\"#ccc\"/>"));
        for p in map
            .iter()
            .filter(|p| p.cluster < 0)
            .chain(map.iter().filter(|p| p.cluster >= 0))
        {
            h.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2\" fill=\"{}\"/>",
                sx(p.x),
                sy(p.y),
                colour(p.cluster)
            ));
        }
        // Cluster names at their mean position.
        let mut acc: BTreeMap<i32, (f32, f32, usize)> = BTreeMap::new();
        for p in map.iter().filter(|p| p.cluster >= 0) {
            let e = acc.entry(p.cluster).or_default();
            e.0 += p.x;
            e.1 += p.y;
            e.2 += 1;
        }
        for (c, (x, y, n)) in acc {
            let rep = &r.clusters[c as usize];
            let label = rep.name.clone().unwrap_or_else(|| format!("#{c}"));
            h.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>",
                sx(x / n as f32),
                sy(y / n as f32),
                esc(&label)
            ));
        }
        h.push_str("</svg>");
    }
    // Share over time.
    if !r.windows.is_empty() {
        let (w, hgt, pad) = (720.0f32, 260.0f32, 30.0f32);
        let top: Vec<&ClusterReport> = r
            .clusters
            .iter()
            .filter(|c| !c.share_by_window.is_empty())
            .take(10)
            .collect();
        let max = top
            .iter()
            .flat_map(|c| c.share_by_window.iter().copied())
            .fold(0.0f64, f64::max)
            .max(1e-6);
        let nw = r.windows.len();
        h.push_str(&format!("<h2>Share over time</h2><p>Share of each window's rows, the ten largest clusters; windows from {} to {}.</p><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\"><rect width=\"{w}\" height=\"{hgt}\" fill=\"white\" stroke=\"#ccc\"/>", esc(&r.windows[0]), esc(&r.windows[nw - 1])));
        for c in top {
            let pts: Vec<String> = c
                .share_by_window
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    format!(
                        "{:.1},{:.1}",
                        pad + i as f32 / (nw.max(2) - 1) as f32 * (w - 2.0 * pad),
                        hgt - pad - (*s / max) as f32 * (hgt - 2.0 * pad)
                    )
                })
                .collect();
            h.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
                colour(c.cluster as i32),
                pts.join(" "),
                esc(c.name.as_deref().unwrap_or(""))
            ));
        }
        h.push_str("</svg>");
    }
    if !r.groups.is_empty() {
        h.push_str("<h2>Broader topics</h2><table><tr><th>group</th><th>name</th><th>description</th><th>clusters</th><th>rows</th></tr>");
        for g in &r.groups {
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                g.group,
                esc(g.name.as_deref().unwrap_or("")),
                esc(g.description.as_deref().unwrap_or("")),
                g.clusters
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                g.rows
            ));
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Clusters</h2><table><tr><th>#</th><th>rows</th><th>conversations</th><th>status</th><th>name</th><th>description</th><th>nearest label (cosine)</th><th>suggestion</th><th>example ids</th></tr>");
    for c in &r.clusters {
        h.push_str(&format!(
            "<tr><td><span style=\"color:{}\">&#9679;</span> {}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            colour(c.cluster as i32),
            c.cluster,
            c.rows,
            c.conversations,
            esc(&c.status),
            esc(&c.status),
            esc(c.name.as_deref().unwrap_or("")),
            esc(c.description.as_deref().unwrap_or("")),
            c.nearest_label.as_ref().map_or(String::new(), |l| format!("{} ({:.3})", esc(l), c.similarity.unwrap_or(0.0))),
            esc(c.suggestion.as_deref().unwrap_or("")),
            esc(&c.example_ids.join(", "))
        ));
        if !c.examples.is_empty() {
            h.push_str(&format!(
                "<tr><td></td><td colspan=\"8\"><ul>{}</ul></td></tr>",
                c.examples
                    .iter()
                    .map(|e| format!("<li>{}</li>", esc(e)))
                    .collect::<String>()
            ));
        }
    }
    h.push_str("</table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_near_duplicates_meet() {
        assert_eq!(
            clean_name(" Card Delivery! ").as_deref(),
            Some("card_delivery")
        );
        assert_eq!(
            clean_name("Überweisung—Status").as_deref(),
            Some("überweisung_status")
        );
        assert_eq!(clean_name("  ?? "), None);
        assert_eq!(name_key("card_delivery"), name_key("Delivery of cards"));
        assert_ne!(name_key("card_delivery"), name_key("card_activation"));
    }

    #[test]
    fn replies_are_read_in_every_shape_and_never_panic() {
        let r = "```json\n{\"1\": {\"name\": \"Card delivery\", \"description\": \"when\\nit comes\"}, \"2\": \"refunds\"}\n```";
        let got = parse_names(r, 3).unwrap();
        assert_eq!(
            got[0],
            Some(("card_delivery".into(), "when it comes".into()))
        );
        assert_eq!(got[1], Some(("refunds".into(), String::new())));
        assert_eq!(got[2], None);
        for bad in ["", "{", "[1,2]", "{\"1\": 5}", "<html>", "\u{0}{\"1\":{}}"] {
            assert!(parse_names(bad, 2).is_none_or(|v| v.len() == 2));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]
        /// Whatever an LLM answers (any text, any script, broken JSON), reading it never panics
        /// and every name it yields is a clean, non-empty snake_case key.
        #[test]
        fn any_reply_is_read_without_panic(reply in "\\PC*", n in 0usize..6) {
            if let Some(v) = parse_names(&reply, n) {
                proptest::prop_assert_eq!(v.len(), n);
                for (name, desc) in v.into_iter().flatten() {
                    proptest::prop_assert!(!name.is_empty() && name.len() <= 52);
                    proptest::prop_assert!(!name.contains(char::is_whitespace));
                    proptest::prop_assert!(!desc.contains('\n'));
                }
            }
            let _ = name_key(&reply);
            if let Some(c) = clean_name(&reply) {
                proptest::prop_assert!(!c.starts_with('_') && !c.ends_with('_'));
            }
        }

        /// A name inside a JSON answer, in any script, survives as a name.
        #[test]
        fn names_in_any_script_survive(name in "[\\p{L}\\p{N}][\\p{L}\\p{N} _-]{0,30}") {
            let reply = serde_json::json!({"1": {"name": name, "description": "d"}}).to_string();
            let got = parse_names(&reply, 1).unwrap();
            proptest::prop_assert!(got[0].is_some());
        }
    }

    #[test]
    fn average_linkage_joins_the_closest() {
        let a = [1.0f32, 0.0];
        let b = [0.99f32, 0.141];
        let c = [0.0f32, 1.0];
        let parts = average_linkage(&[&a, &b, &c], 2);
        assert_eq!(parts.len(), 2);
        assert!(parts
            .iter()
            .any(|p| p.len() == 2 && p.contains(&0) && p.contains(&1)));
    }
}
