//! The drift report (`semtel monitor`): a classify output (or a service's result log) read
//! back window by window — escalation and novelty shares, the label mix against the
//! exemplars', the language mix, audited agreement with its interval, guard trips — as JSON
//! and a self-contained HTML page, with alerts a scheduler can act on (the CLI exits 3).
//!
//! Windows are rows in output order, or spans of time from a pass-through timestamp column.
//! This module reads outputs and writes nothing but the report the caller asks for; it must
//! never classify or call the LLM.

use crate::index::Interval;
use crate::output::OutFormat;
use crate::{Error, Result};
use arrow_array::cast::AsArray;
use arrow_array::Array;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// How rows are grouped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    Rows(u64),
    Seconds(f64),
}

impl std::str::FromStr for Window {
    type Err = String;
    /// `10000rows`, `10000`, `30m`, `1h`, `1d`, `45s`.
    fn from_str(s: &str) -> std::result::Result<Window, String> {
        let s = s.trim();
        let bad =
            || format!("window `{s}`: use rows (`10000rows`) or a time span (`30m`, `1h`, `1d`)");
        let num = |t: &str| {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| *x > 0.0 && x.is_finite())
        };
        if let Some(n) = s.strip_suffix("rows").or(s.strip_suffix("row")) {
            return num(n).map(|x| Window::Rows(x as u64)).ok_or_else(bad);
        }
        for (suffix, mult) in [("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0)] {
            if let Some(n) = s.strip_suffix(suffix) {
                return num(n).map(|x| Window::Seconds(x * mult)).ok_or_else(bad);
            }
        }
        num(s).map(|x| Window::Rows(x as u64)).ok_or_else(bad)
    }
}

/// What `semtel monitor` is asked.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    pub input: PathBuf,
    pub window: Window,
    /// A timestamp column of the output (a pass-through column): RFC 3339 text or epoch
    /// seconds. Needed for time windows.
    pub time_col: Option<String>,
    /// The index the output came from: the exemplars' label mix, the promise and the novelty
    /// rate the alerts compare with.
    pub index: Option<PathBuf>,
    pub thresholds: AlertThresholds,
}

/// When a window raises an alert.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AlertThresholds {
    /// Novel rows above this share of a window (default: 5 × the index's novelty rate, at
    /// least 5 %).
    pub novel_share: f64,
    /// Jensen–Shannon divergence (bits, 0–1) of a window's label mix from the reference mix
    /// (the exemplars', else the first window's).
    pub label_divergence: f64,
    /// Escalated share this many points above the first window's.
    pub escalation_rise: f64,
    /// Rows a window needs before its shares can alert.
    pub min_rows: u64,
}

impl Default for AlertThresholds {
    fn default() -> Self {
        AlertThresholds {
            novel_share: 0.05,
            label_divergence: 0.10,
            escalation_rise: 0.10,
            min_rows: 200,
        }
    }
}

/// One output row, as the report needs it.
#[derive(Debug, Clone, Default)]
struct Fact {
    label: Option<String>,
    decided_by: String,
    reason: Option<String>,
    lang: Option<String>,
    audit: Option<String>,
    time: Option<f64>,
}

/// One window's figures.
#[derive(Debug, Clone, Serialize, Default)]
pub struct WindowReport {
    pub window: String,
    pub rows: u64,
    pub errors: u64,
    pub kept_share: f64,
    pub escalated_share: f64,
    pub novel_share: f64,
    pub guard_share: f64,
    pub language_share: f64,
    /// Jensen–Shannon divergence (bits) of the label mix from the reference.
    pub label_divergence: f64,
    pub languages: BTreeMap<String, u64>,
    pub labels: BTreeMap<String, u64>,
    pub audited: u64,
    /// Agreement of audited kept rows with the LLM (95 % Wilson), when any was answered.
    pub audit_agreement: Option<Interval>,
    pub alerts: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorReport {
    pub input: String,
    pub window: String,
    pub rows: u64,
    /// Output lines that could not be read (counted, never fatal).
    pub unreadable_lines: u64,
    pub reference_mix: String,
    pub promised_accuracy: f64,
    pub thresholds: AlertThresholds,
    pub windows: Vec<WindowReport>,
    /// The guards' state beside the output, when the run had guards.
    pub guards: Option<crate::guard::GuardReport>,
    /// Every alert, `window: what`.
    pub alerts: Vec<String>,
}

impl MonitorReport {
    pub fn alerted(&self) -> bool {
        !self.alerts.is_empty()
    }
}

/// Reads the output and builds the report.
pub fn monitor(opts: &MonitorOptions) -> Result<MonitorReport> {
    if matches!(opts.window, Window::Seconds(_)) && opts.time_col.is_none() {
        return Err(Error::Config(
            "a time window needs --time-col (a timestamp column passed through into the output); or use a row window such as 10000rows".into(),
        ));
    }
    let (facts, unreadable) = read_facts(&opts.input, opts.time_col.as_deref())?;
    let mut thresholds = opts.thresholds;
    let mut promised = 0.97;
    let mut reference: Option<BTreeMap<String, f64>> = None;
    let mut reference_mix = "the first window's label mix".to_string();
    if let Some(dir) = &opts.index {
        let index = crate::index::ExemplarIndex::open(dir, true)?;
        let d = &index.manifest.decision;
        if let Some(p) = d.calibration.as_ref().and_then(|c| c.promised_accuracy()) {
            promised = p;
        }
        if let Some(n) = &d.novelty {
            thresholds.novel_share = thresholds.novel_share.max(5.0 * n.rate);
        }
        let mut mix: BTreeMap<String, f64> = BTreeMap::new();
        let labels = index.labels();
        for &l in index.label_indices() {
            *mix.entry(labels[l as usize].clone()).or_default() += 1.0;
        }
        reference = Some(mix);
        reference_mix = format!("the exemplars' of {}", dir.display());
    }
    let groups = group(&facts, opts.window);
    let mut windows: Vec<WindowReport> = groups
        .iter()
        .map(|(name, rows)| window_report(name, rows))
        .collect();
    if reference.is_none() {
        reference = windows
            .iter()
            .find(|w| w.rows >= thresholds.min_rows)
            .or(windows.first())
            .map(|w| {
                w.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), *v as f64))
                    .collect()
            });
    }
    let base_escalation = windows
        .iter()
        .find(|w| w.rows >= thresholds.min_rows)
        .map(|w| w.escalated_share);
    let mut alerts = Vec::new();
    for w in &mut windows {
        if let Some(r) = &reference {
            w.label_divergence = js_divergence(r, &w.labels);
        }
        if w.rows >= thresholds.min_rows {
            if w.novel_share > thresholds.novel_share {
                w.alerts.push(format!(
                    "novelty: {:.1}% of rows are far from every exemplar of their label (alert above {:.1}%)",
                    100.0 * w.novel_share,
                    100.0 * thresholds.novel_share
                ));
            }
            if w.label_divergence > thresholds.label_divergence {
                w.alerts.push(format!(
                    "label mix: divergence {:.3} from {} (alert above {:.3})",
                    w.label_divergence, reference_mix, thresholds.label_divergence
                ));
            }
            if let Some(b) = base_escalation {
                if w.escalated_share > b + thresholds.escalation_rise {
                    w.alerts.push(format!(
                        "escalation: {:.1}% against {:.1}% in the first window",
                        100.0 * w.escalated_share,
                        100.0 * b
                    ));
                }
            }
        }
        if let Some(a) = &w.audit_agreement {
            if a.hi < promised {
                w.alerts.push(format!(
                    "audit: kept rows agree with the LLM {:.1}% [{:.1}–{:.1}], below the promised {:.1}%",
                    100.0 * a.value,
                    100.0 * a.lo,
                    100.0 * a.hi,
                    100.0 * promised
                ));
            }
        }
        alerts.extend(w.alerts.iter().map(|a| format!("{}: {a}", w.window)));
    }
    let guards_file = crate::app::classify::guards_path(&opts.input);
    let guards = if guards_file.exists() {
        let g = crate::guard::Guards::load_or_new(&guards_file, Default::default())?;
        Some(g.snapshot())
    } else {
        None
    };
    if let Some(g) = &guards {
        for e in g.events.iter().filter(|e| e.event == "trip") {
            alerts.push(format!(
                "guard tripped on {} at row {} ({} of {} audited rows agreed)",
                e.segment, e.at_row, e.agreed, e.observed
            ));
        }
    }
    Ok(MonitorReport {
        input: opts.input.display().to_string(),
        window: match opts.window {
            Window::Rows(n) => format!("{n} rows"),
            Window::Seconds(s) => format!("{s} s"),
        },
        rows: facts.len() as u64,
        unreadable_lines: unreadable,
        reference_mix,
        promised_accuracy: promised,
        thresholds,
        windows,
        guards,
        alerts,
    })
}

fn group(facts: &[Fact], window: Window) -> Vec<(String, Vec<&Fact>)> {
    let mut out: BTreeMap<i64, Vec<&Fact>> = BTreeMap::new();
    let mut untimed = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        match window {
            Window::Rows(n) => out.entry((i as u64 / n.max(1)) as i64).or_default().push(f),
            Window::Seconds(s) => match f.time {
                Some(t) => out.entry((t / s).floor() as i64).or_default().push(f),
                None => untimed.push(f),
            },
        }
    }
    let mut named: Vec<(String, Vec<&Fact>)> = out
        .into_iter()
        .map(|(k, v)| {
            let name = match window {
                Window::Rows(n) => {
                    let a = k as u64 * n;
                    format!("rows {a}-{}", a + v.len() as u64 - 1)
                }
                Window::Seconds(s) => format_time(k as f64 * s),
            };
            (name, v)
        })
        .collect();
    if !untimed.is_empty() {
        named.push(("no timestamp".into(), untimed));
    }
    named
}

fn window_report(name: &str, rows: &[&Fact]) -> WindowReport {
    let mut w = WindowReport {
        window: name.to_string(),
        rows: rows.len() as u64,
        ..Default::default()
    };
    let (mut kept, mut esc, mut novel, mut guard, mut lang, mut agreed, mut answered) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for f in rows {
        match f.decided_by.as_str() {
            "error" => {
                w.errors += 1;
                continue;
            }
            "knn" => kept += 1,
            _ => esc += 1,
        }
        match f.reason.as_deref() {
            Some("novel") => novel += 1,
            Some("guard") => guard += 1,
            Some("language") => lang += 1,
            _ => {}
        }
        *w.languages
            .entry(f.lang.clone().unwrap_or_else(|| "und".into()))
            .or_default() += 1;
        if let Some(l) = &f.label {
            *w.labels.entry(l.clone()).or_default() += 1;
        }
        if let Some(a) = &f.audit {
            w.audited += 1;
            if a != "missing" {
                answered += 1;
                agreed += u64::from(a == "agree");
            }
        }
    }
    let n = (w.rows - w.errors).max(1) as f64;
    w.kept_share = kept as f64 / n;
    w.escalated_share = esc as f64 / n;
    w.novel_share = novel as f64 / n;
    w.guard_share = guard as f64 / n;
    w.language_share = lang as f64 / n;
    w.audit_agreement =
        (answered > 0).then(|| crate::calibrate::wilson(agreed as usize, answered as usize));
    w
}

/// Jensen–Shannon divergence in bits (0 = same mix, 1 = disjoint) of two count maps.
pub fn js_divergence(a: &BTreeMap<String, f64>, b: &BTreeMap<String, u64>) -> f64 {
    let ta: f64 = a.values().sum();
    let tb: f64 = b.values().map(|&x| x as f64).sum();
    if ta <= 0.0 || tb <= 0.0 {
        return 0.0;
    }
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut d = 0.0;
    for k in keys {
        let p = a.get(k).copied().unwrap_or(0.0) / ta;
        let q = b.get(k).copied().unwrap_or(0) as f64 / tb;
        let m = 0.5 * (p + q);
        if p > 0.0 {
            d += 0.5 * p * (p / m).log2();
        }
        if q > 0.0 {
            d += 0.5 * q * (q / m).log2();
        }
    }
    d.clamp(0.0, 1.0)
}

fn read_facts(path: &Path, time_col: Option<&str>) -> Result<(Vec<Fact>, u64)> {
    let mut facts = Vec::new();
    let mut bad = 0u64;
    match OutFormat::of(path) {
        OutFormat::Jsonl => {
            let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            for line in std::io::BufReader::new(f).split(b'\n') {
                let line = line.map_err(|e| Error::io(path, e))?;
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                    bad += u64::from(!line.iter().all(u8::is_ascii_whitespace));
                    continue;
                };
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
                let Some(by) = s("decided_by") else {
                    bad += 1;
                    continue;
                };
                facts.push(Fact {
                    label: s("label"),
                    decided_by: by,
                    reason: s("escalate_reason"),
                    lang: s("lang"),
                    audit: s("audit"),
                    time: time_col.and_then(|c| v.get(c)).and_then(|t| match t {
                        serde_json::Value::Number(n) => n.as_f64(),
                        serde_json::Value::String(s) => parse_time(s),
                        _ => None,
                    }),
                });
            }
        }
        _ => {
            for b in crate::output::read_output_batches(path)? {
                let s = |n: &str| {
                    b.column_by_name(n)
                        .filter(|c| c.data_type() == &arrow_schema::DataType::Utf8)
                        .map(|c| c.as_string::<i32>().clone())
                };
                let Some(by) = s("decided_by") else {
                    return Err(Error::output(
                        path,
                        "not a semtel output (no decided_by column)",
                    ));
                };
                let (label, reason, lang, audit) =
                    (s("label"), s("escalate_reason"), s("lang"), s("audit"));
                let time = time_col.and_then(|c| b.column_by_name(c)).cloned();
                let time = time.as_ref().map(|c| {
                    arrow_cast::cast(c, &arrow_schema::DataType::Utf8)
                        .map(|c| c.as_string::<i32>().clone())
                });
                let get = |c: &Option<arrow_array::StringArray>, i: usize| {
                    c.as_ref()
                        .filter(|c| !c.is_null(i))
                        .map(|c| c.value(i).to_string())
                };
                for i in 0..b.num_rows() {
                    let t = match &time {
                        Some(Ok(c)) if !c.is_null(i) => parse_time(c.value(i)),
                        _ => None,
                    };
                    facts.push(Fact {
                        label: get(&label, i),
                        decided_by: by.value(i).to_string(),
                        reason: get(&reason, i),
                        lang: get(&lang, i),
                        audit: get(&audit, i),
                        time: t,
                    });
                }
            }
        }
    }
    Ok((facts, bad))
}

/// Epoch seconds from a number or an RFC 3339 / ISO 8601 timestamp (`2026-12-05T10:00:00Z`,
/// `2026-12-05 10:00:00+02:00`, `2026-12-05`); `None` for anything else.
pub fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(x) = s.parse::<f64>() {
        return x.is_finite().then_some(x);
    }
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        (!t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()))
            .then(|| t.parse().ok())
            .flatten()
    };
    if b.len() < 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let (y, mo, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let (mut h, mut mi, mut sec, mut frac, mut off) = (0i64, 0i64, 0i64, 0.0f64, 0i64);
    if b.len() > 10 {
        if !matches!(b[10], b'T' | b't' | b' ') || b.len() < 19 {
            return None;
        }
        h = digits(11..13)?;
        mi = digits(14..16)?;
        sec = digits(17..19)?;
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            let start = i;
            i += 1;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            frac = s.get(start..i)?.parse::<f64>().unwrap_or(0.0);
        }
        match b.get(i) {
            None => {}
            Some(b'Z' | b'z') if i + 1 == b.len() => {}
            Some(&c @ (b'+' | b'-')) if b.len() == i + 6 && b[i + 3] == b':' => {
                let o = digits(i + 1..i + 3)? * 3600 + digits(i + 4..i + 6)? * 60;
                off = if c == b'+' { o } else { -o };
            }
            _ => return None,
        }
        if h > 23 || mi > 59 || sec > 60 {
            return None;
        }
    }
    // Days from the civil date (proleptic Gregorian), 1970-01-01 = 0.
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86400 + h * 3600 + mi * 60 + sec - off) as f64 + frac)
}

/// `YYYY-MM-DD HH:MM` (UTC) of epoch seconds.
pub fn format_time(t: f64) -> String {
    let secs = t.floor() as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// The report as one self-contained HTML page (inline SVG, no scripts, no network).
pub fn html(r: &MonitorReport) -> String {
    use crate::html::esc;
    let series = |f: &dyn Fn(&WindowReport) -> Option<f64>| -> Vec<Option<f64>> {
        r.windows.iter().map(f).collect()
    };
    let chart = |title: &str, lines: &[(&str, &str, Vec<Option<f64>>)]| -> String {
        let (w, h, pad) = (640.0, 180.0, 30.0);
        let n = r.windows.len().max(2) as f64 - 1.0;
        let mut svg = format!(
            "<h3>{}</h3><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\"><rect x=\"{pad}\" y=\"5\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#ccc\"/>",
            esc(title),
            w - pad - 5.0,
            h - pad - 5.0
        );
        for (tick, y) in [
            ("0%", h - pad),
            ("50%", (h - pad + 5.0) / 2.0),
            ("100%", 5.0),
        ] {
            svg.push_str(&format!(
                "<text x=\"2\" y=\"{:.1}\" font-size=\"10\">{tick}</text>",
                y + 3.0
            ));
        }
        for (k, (name, colour, vals)) in lines.iter().enumerate() {
            let pts: Vec<String> = vals
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    v.map(|v| {
                        let x = pad + (w - pad - 5.0) * i as f64 / n;
                        let y = 5.0 + (h - pad - 5.0) * (1.0 - v.clamp(0.0, 1.0));
                        format!("{x:.1},{y:.1}")
                    })
                })
                .collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            ));
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                svg.push_str(&format!(
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{colour}\"/>"
                ));
            }
            svg.push_str(&format!(
                "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{colour}\">{}</text>",
                pad + 10.0 + 150.0 * k as f64,
                h - 8.0,
                esc(name)
            ));
        }
        svg.push_str("</svg>");
        svg
    };
    let mut s = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>semtel drift report</title><style>body{font-family:sans-serif;max-width:980px;margin:2em auto}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}th{background:#f4f4f4}.alert{color:#b00020}</style></head><body>",
    );
    s.push_str(&format!(
        "<h1>semtel drift report</h1><p>{} — {} rows in windows of {}; label mix compared with {}; promised kept-accuracy {:.1}%.</p>",
        esc(&r.input),
        r.rows,
        esc(&r.window),
        esc(&r.reference_mix),
        100.0 * r.promised_accuracy
    ));
    if r.alerts.is_empty() {
        s.push_str("<p>No alert.</p>");
    } else {
        s.push_str("<h2 class=\"alert\">Alerts</h2><ul>");
        for a in &r.alerts {
            s.push_str(&format!("<li class=\"alert\">{}</li>", esc(a)));
        }
        s.push_str("</ul>");
    }
    s.push_str(&chart(
        "Shares of rows per window",
        &[
            ("kept", "#1b7837", series(&|w| Some(w.kept_share))),
            ("escalated", "#d95f02", series(&|w| Some(w.escalated_share))),
            ("novel", "#7570b3", series(&|w| Some(w.novel_share))),
            ("guard", "#e7298a", series(&|w| Some(w.guard_share))),
        ],
    ));
    s.push_str(&chart(
        "Audited agreement with the LLM, and label-mix divergence",
        &[
            (
                "agreement",
                "#1b9e77",
                series(&|w| w.audit_agreement.map(|a| a.value)),
            ),
            (
                "lower bound",
                "#66a61e",
                series(&|w| w.audit_agreement.map(|a| a.lo)),
            ),
            (
                "divergence",
                "#a6761d",
                series(&|w| Some(w.label_divergence)),
            ),
        ],
    ));
    s.push_str("<h2>Windows</h2><table><tr><th>window</th><th>rows</th><th>kept</th><th>escalated</th><th>novel</th><th>guard</th><th>language</th><th>label divergence</th><th>audited</th><th>agreement [95%]</th><th>top languages</th></tr>");
    for w in &r.windows {
        let mut langs: Vec<(&String, &u64)> = w.languages.iter().collect();
        langs.sort_by(|a, b| b.1.cmp(a.1));
        let langs: Vec<String> = langs
            .iter()
            .take(4)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        s.push_str(&format!(
            "<tr{}><td>{}</td><td>{}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if w.alerts.is_empty() { "" } else { " class=\"alert\"" },
            esc(&w.window),
            w.rows,
            100.0 * w.kept_share,
            100.0 * w.escalated_share,
            100.0 * w.novel_share,
            100.0 * w.guard_share,
            100.0 * w.language_share,
            w.label_divergence,
            w.audited,
            w.audit_agreement.map_or("-".into(), |a| format!(
                "{:.1}% [{:.1}–{:.1}]",
                100.0 * a.value,
                100.0 * a.lo,
                100.0 * a.hi
            )),
            esc(&langs.join(", "))
        ));
    }
    s.push_str("</table>");
    if let Some(g) = &r.guards {
        s.push_str(&format!(
            "<h2>Guards</h2><p>Required agreement {:.3} (target {:.3} × LLM accuracy {:.3}, {}); {} trips, {} releases; tripped now: {}.</p><table><tr><th>segment</th><th>event</th><th>at row</th><th>agreed</th><th>of</th></tr>",
            g.required_agreement,
            g.target,
            g.llm_accuracy,
            esc(&g.llm_accuracy_source),
            g.trips,
            g.releases,
            if g.tripped.is_empty() { "none".to_string() } else { esc(&g.tripped.join(", ")) }
        ));
        for e in &g.events {
            s.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&e.segment),
                e.event,
                e.at_row,
                e.agreed,
                e.observed
            ));
        }
        s.push_str("</table>");
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse() {
        assert_eq!("10000rows".parse::<Window>(), Ok(Window::Rows(10000)));
        assert_eq!("500".parse::<Window>(), Ok(Window::Rows(500)));
        assert_eq!("1h".parse::<Window>(), Ok(Window::Seconds(3600.0)));
        assert_eq!("30m".parse::<Window>(), Ok(Window::Seconds(1800.0)));
        assert!("-1h".parse::<Window>().is_err());
        assert!("soon".parse::<Window>().is_err());
        assert!("".parse::<Window>().is_err());
    }

    #[test]
    fn timestamps_parse_and_print() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_time("2026-12-05T10:00:00Z"), Some(1_796_464_800.0));
        assert_eq!(
            parse_time("2026-12-05T12:00:00+02:00"),
            Some(1_796_464_800.0)
        );
        assert_eq!(parse_time("2026-12-05"), Some(1_796_428_800.0));
        assert_eq!(parse_time("1796464800"), Some(1_796_464_800.0));
        for bad in [
            "",
            "2026-13-01",
            "2026-12-05T25:00:00Z",
            "yesterday",
            "2026-12-05T10:00:00Q",
            "٢٠٢٦-١٢-٠٥",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(format_time(1_796_464_800.0), "2026-12-05 10:00");
    }

    #[test]
    fn divergence_is_zero_for_the_same_mix_and_one_for_disjoint() {
        let a: BTreeMap<String, f64> = [("x".to_string(), 2.0), ("y".to_string(), 2.0)].into();
        let same: BTreeMap<String, u64> = [("x".to_string(), 5), ("y".to_string(), 5)].into();
        let other: BTreeMap<String, u64> = [("z".to_string(), 5)].into();
        assert!(js_divergence(&a, &same) < 1e-9);
        assert!((js_divergence(&a, &other) - 1.0).abs() < 1e-9);
    }
}
