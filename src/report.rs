//! The accuracy-versus-cost report of `semtel bench accuracy-cost`: the curve of (share sent
//! to the LLM, overall accuracy, cost per 1,000 conversations) from kNN-only to LLM-only,
//! written as JSON, CSV, a PNG and an SVG plot (plotters) and a one-page HTML report.
//! This module only formats figures it is given; it must never classify or call an LLM.

use crate::{Error, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Share of rows sent to the LLM.
    pub escalated: f64,
    /// Accuracy over all rows (kNN on the kept ones, the LLM on the escalated ones).
    pub accuracy: f64,
    pub cost_per_1k_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AccuracyCost {
    pub set: String,
    pub rows: usize,
    /// What answered the escalated rows ("oracle …" is a simulated LLM, never a real one).
    pub llm: String,
    pub signal: String,
    /// How the LLM cost per row was obtained.
    pub cost_basis: String,
    pub llm_cost_per_row_usd: f64,
    pub knn_only: CurvePoint,
    pub llm_only: CurvePoint,
    /// The index's calibrated thresholds.
    pub operating_point: CurvePoint,
    pub curve: Vec<CurvePoint>,
}

/// Builds the curve from per-row facts: kNN correctness, LLM correctness and confidence.
pub fn curve(
    knn_ok: &[bool],
    llm_ok: &[bool],
    confidence: &[f32],
    cost_per_row: f64,
    steps: usize,
) -> Vec<CurvePoint> {
    let n = knn_ok.len();
    let mut order: Vec<usize> = (0..n).collect();
    // Least confident first: they go to the LLM first.
    order.sort_by(|&a, &b| {
        confidence[a]
            .partial_cmp(&confidence[b])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    (0..=steps)
        .map(|s| {
            let f = s as f64 / steps as f64;
            let k = (f * n as f64).round() as usize;
            let right = order
                .iter()
                .enumerate()
                .filter(|&(r, &i)| if r < k { llm_ok[i] } else { knn_ok[i] })
                .count();
            CurvePoint {
                escalated: k as f64 / n.max(1) as f64,
                accuracy: right as f64 / n.max(1) as f64,
                cost_per_1k_usd: k as f64 * cost_per_row / n.max(1) as f64 * 1000.0,
            }
        })
        .collect()
}

fn font() {
    // Registering twice is harmless; the bitmap backend needs a font (no system fonts used).
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    r: &AccuracyCost,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Display| Error::Report {
        path: PathBuf::from("plot"),
        msg: e.to_string(),
    };
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (title, body) = root.split_vertically(40);
    title
        .titled(
            &format!(
                "{} — accuracy versus LLM share and cost ({} rows; LLM: {})",
                r.set, r.rows, r.llm
            ),
            ("sans-serif", 18),
        )
        .map_err(|e| err(&e))?;
    let panels = body.split_evenly((1, 2));
    let ys: Vec<f64> = r.curve.iter().map(|p| p.accuracy * 100.0).collect();
    let ymin = ys
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .min(r.llm_only.accuracy * 100.0);
    let ymax = ys
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(r.llm_only.accuracy * 100.0);
    let (ylo, yhi) = ((ymin - 1.0).floor(), (ymax + 1.0).ceil().min(100.0));
    let blue = RGBColor(31, 119, 180);
    let red = RGBColor(214, 39, 40);
    let grey = RGBColor(120, 120, 120);
    // Left: accuracy versus share sent to the LLM.
    {
        let mut c = ChartBuilder::on(&panels[0])
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..100f64, ylo..yhi)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .light_line_style(WHITE)
            .x_desc("share of conversations sent to the LLM (%)")
            .y_desc("overall accuracy (%)")
            .draw()
            .map_err(|e| err(&e))?;
        c.draw_series(LineSeries::new(
            r.curve
                .iter()
                .map(|p| (p.escalated * 100.0, p.accuracy * 100.0)),
            blue.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("semtel (least confident escalated first)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
        for (v, label, col) in [
            (r.llm_only.accuracy, "LLM only", grey),
            (r.knn_only.accuracy, "kNN only", grey),
        ] {
            c.draw_series(LineSeries::new(
                vec![(0.0, v * 100.0), (100.0, v * 100.0)],
                col.stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
            c.draw_series(std::iter::once(Text::new(
                label.to_string(),
                (2.0, v * 100.0 + 0.15),
                ("sans-serif", 13).into_font().color(&col),
            )))
            .map_err(|e| err(&e))?;
        }
        let op = &r.operating_point;
        c.draw_series(std::iter::once(Circle::new(
            (op.escalated * 100.0, op.accuracy * 100.0),
            6,
            red.filled(),
        )))
        .map_err(|e| err(&e))?
        .label(format!(
            "calibrated thresholds: {:.1}% to LLM, {:.1}% accuracy",
            op.escalated * 100.0,
            op.accuracy * 100.0
        ))
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, red.filled()));
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
    }
    // Right: accuracy versus cost per 1,000 conversations.
    {
        let xmax = (r.llm_only.cost_per_1k_usd * 1.05).max(1e-6);
        let mut c = ChartBuilder::on(&panels[1])
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..xmax, ylo..yhi)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .light_line_style(WHITE)
            .x_desc("LLM cost per 1,000 conversations (USD)")
            .y_desc("overall accuracy (%)")
            .x_label_formatter(&|x| format!("{x:.3}"))
            .draw()
            .map_err(|e| err(&e))?;
        c.draw_series(LineSeries::new(
            r.curve
                .iter()
                .map(|p| (p.cost_per_1k_usd, p.accuracy * 100.0)),
            blue.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
        let op = &r.operating_point;
        c.draw_series(std::iter::once(Circle::new(
            (op.cost_per_1k_usd, op.accuracy * 100.0),
            6,
            red.filled(),
        )))
        .map_err(|e| err(&e))?;
        c.draw_series(std::iter::once(Text::new(
            format!(
                "${:.4} vs ${:.4} LLM-only ({:.0}% saved)",
                op.cost_per_1k_usd,
                r.llm_only.cost_per_1k_usd,
                100.0 * (1.0 - op.cost_per_1k_usd / r.llm_only.cost_per_1k_usd.max(1e-12))
            ),
            (xmax * 0.05, ylo + 0.5),
            ("sans-serif", 13).into_font().color(&red),
        )))
        .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `accuracy_cost.{json,csv,png,svg}` and `report.html` into `dir`.
pub fn write(dir: &Path, r: &AccuracyCost) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let io = |p: &Path, e: std::io::Error| Error::io(p, e);
    let json = dir.join("accuracy_cost.json");
    std::fs::write(&json, serde_json::to_string_pretty(r).expect("json"))
        .map_err(|e| io(&json, e))?;
    let csv = dir.join("accuracy_cost.csv");
    let mut s = String::from("escalated_share,overall_accuracy,llm_cost_per_1k_usd\n");
    for p in &r.curve {
        s.push_str(&format!(
            "{:.4},{:.4},{:.6}\n",
            p.escalated, p.accuracy, p.cost_per_1k_usd
        ));
    }
    std::fs::write(&csv, s).map_err(|e| io(&csv, e))?;
    let (w, h) = (1400u32, 560u32);
    font();
    let svg = dir.join("accuracy_cost.svg");
    draw(SVGBackend::new(&svg, (w, h)).into_drawing_area(), r)?;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(
        BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area(),
        r,
    )?;
    let png = dir.join("accuracy_cost.png");
    let f = std::fs::File::create(&png).map_err(|e| io(&png, e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&buf))
        .map_err(|e| Error::Report {
            path: png.to_path_buf(),
            msg: e.to_string(),
        })?;
    let svg_text = std::fs::read_to_string(&svg).map_err(|e| io(&svg, e))?;
    let html = dir.join("report.html");
    std::fs::write(&html, html_page(r, &svg_text)).map_err(|e| io(&html, e))?;
    Ok(())
}

use crate::html::esc;

fn html_page(r: &AccuracyCost, svg: &str) -> String {
    let row = |name: &str, p: &CurvePoint| {
        format!(
            "<tr><td>{}</td><td>{:.1}%</td><td>{:.2}%</td><td>${:.4}</td></tr>",
            esc(name),
            p.escalated * 100.0,
            p.accuracy * 100.0,
            p.cost_per_1k_usd
        )
    };
    let mut rows = vec![
        row("kNN only", &r.knn_only),
        row("semtel, calibrated thresholds", &r.operating_point),
    ];
    for target in [0.1, 0.2, 0.3, 0.5] {
        if let Some(p) = r.curve.iter().min_by(|a, b| {
            (a.escalated - target)
                .abs()
                .partial_cmp(&(b.escalated - target).abs())
                .unwrap()
        }) {
            rows.push(row(
                &format!("semtel, {:.0}% to the LLM", p.escalated * 100.0),
                p,
            ));
        }
    }
    rows.push(row("LLM only", &r.llm_only));
    let saved =
        100.0 * (1.0 - r.operating_point.cost_per_1k_usd / r.llm_only.cost_per_1k_usd.max(1e-12));
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>semtel — accuracy versus cost: {set}</title>
<style>body{{font-family:sans-serif;max-width:1450px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}.note{{color:#555;font-size:0.9em}}</style>
</head><body>
<h1>Accuracy versus cost — {set}</h1>
<p><b>{rows}</b> labelled conversations. Escalated rows are answered by <b>{llm}</b>. Confidence signal: <b>{signal}</b>.
At the index's calibrated thresholds semtel sends <b>{opesc:.1}%</b> of conversations to the LLM and reaches
<b>{opacc:.2}%</b> accuracy (LLM-only: {llmacc:.2}%), for <b>{saved:.0}%</b> less LLM spend.</p>
<table><tr><th>setting</th><th>sent to LLM</th><th>overall accuracy</th><th>LLM cost / 1k conversations</th></tr>
{table}
</table>
{svg}
<p class="note">Cost basis: {basis} (${cpr:.6} per LLM-labelled conversation). The curve escalates the least confident
conversations first; kNN decides the rest. Figures, CSV and JSON: accuracy_cost.*. Generated by semtel {ver}.</p>
</body></html>
"#,
        set = esc(&r.set),
        rows = r.rows,
        llm = esc(&r.llm),
        signal = esc(&r.signal),
        opesc = r.operating_point.escalated * 100.0,
        opacc = r.operating_point.accuracy * 100.0,
        llmacc = r.llm_only.accuracy * 100.0,
        saved = saved,
        table = rows.join("\n"),
        svg = svg,
        basis = esc(&r.cost_basis),
        cpr = r.llm_cost_per_row_usd,
        ver = crate::VERSION
    )
}

/// Writes `bootstrap.svg` and `report.html` for a bootstrap into `dir` (its work folder): per
/// round, the share of the corpus the index would escalate and the agreement with the LLM on
/// the rows it keeps (with its interval).
pub fn write_bootstrap(dir: &Path, r: &crate::app::bootstrap::BootstrapReport) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    font();
    let svg = dir.join("bootstrap.svg");
    let err = |e: &dyn std::fmt::Display| Error::Report {
        path: svg.clone(),
        msg: e.to_string(),
    };
    {
        let root = SVGBackend::new(&svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let n = r.rounds.len().max(1) as f64;
        let mut c = ChartBuilder::on(&root)
            .margin(15)
            .caption(
                format!(
                    "bootstrap: {} LLM-labelled rows, ${:.4}",
                    r.labelled_rows, r.spent_usd
                ),
                ("sans-serif", 16),
            )
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..100f64)
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .light_line_style(WHITE)
            .x_desc("round")
            .y_desc("%")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        let blue = RGBColor(31, 119, 180);
        let red = RGBColor(214, 39, 40);
        let pts = |f: &dyn Fn(&crate::app::bootstrap::RoundReport) -> f64| -> Vec<(f64, f64)> {
            r.rounds.iter().map(|x| (x.round as f64, f(x))).collect()
        };
        c.draw_series(LineSeries::new(
            pts(&|x| 100.0 * x.escalated_share),
            red.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("share of the corpus that would escalate")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
        c.draw_series(LineSeries::new(
            pts(&|x| 100.0 * x.agreement.value),
            blue.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("agreement with the LLM on kept rows (95 % interval)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(2)));
        for x in &r.rounds {
            c.draw_series(std::iter::once(PathElement::new(
                vec![
                    (x.round as f64, 100.0 * x.agreement.lo),
                    (x.round as f64, 100.0 * x.agreement.hi),
                ],
                blue.stroke_width(1),
            )))
            .map_err(|e| err(&e))?;
        }
        c.configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    let svg_text = std::fs::read_to_string(&svg).map_err(|e| Error::io(&svg, e))?;
    let mut rows = String::new();
    for x in &r.rounds {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>${:.4}</td><td>{:.1}% [{:.1}, {:.1}]</td><td>{:.1}%</td></tr>",
            x.round,
            x.labelled,
            x.labelled_total,
            x.spent_usd,
            100.0 * x.agreement.value,
            100.0 * x.agreement.lo,
            100.0 * x.agreement.hi,
            100.0 * x.escalated_share
        ));
    }
    let names = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            esc(&v.join(", "))
        }
    };
    let html = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>semtel bootstrap</title>\
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{padding:4px 10px;text-align:right}}</style></head><body>\
<h1>Bootstrap of {}</h1><p>{} rows read, {} embedded ({} duplicates skipped); sampling {:?}; stopped: {}.</p>\
<p>LLM self-agreement {} on {} rows asked twice{}; thresholds calibrated for {:.1}% agreement with the LLM.</p>\
{}<table><tr><th>round</th><th>labelled</th><th>in all</th><th>spent</th><th>agreement on kept rows</th><th>would escalate</th></tr>{}</table>\
<p>Projected LLM cost per million conversations: <b>${:.2}</b> hybrid vs ${:.2} LLM-only.</p>\
<p>Labels the LLM never gave: {}. Labels given to fewer than 3 rows: {}.</p></body></html>",
        esc(&r.index.display().to_string()),
        r.input_rows,
        r.pool_rows,
        r.duplicates_skipped,
        r.sampling,
        esc(&r.stopped_because),
        r.llm_self_agreement
            .map_or("not measured".into(), |a| format!("{:.1}%", 100.0 * a)),
        r.llm_retest_rows,
        r.llm_self_agreement_kept.map_or(String::new(), |k| format!(
            " ({:.1}% on the {} the index keeps)",
            100.0 * k,
            r.llm_retest_kept_rows
        )),
        100.0 * r.target,
        svg_text,
        rows,
        r.hybrid_per_million_usd,
        r.llm_only_per_million_usd,
        names(&r.labels_unused),
        names(&r.labels_rare),
    );
    let p = dir.join("report.html");
    std::fs::write(&p, html).map_err(|e| Error::io(&p, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_runs_from_knn_only_to_llm_only() {
        let knn = [true, false, true, false];
        let llm = [true, true, true, false];
        let conf = [0.9, 0.1, 0.8, 0.2];
        let c = curve(&knn, &llm, &conf, 0.01, 4);
        assert_eq!(c.first().unwrap().accuracy, 0.5);
        assert_eq!(c.last().unwrap().accuracy, 0.75);
        // escalating the least confident (row 1) first fixes it
        assert_eq!(c[1].accuracy, 0.75);
        assert!((c.last().unwrap().cost_per_1k_usd - 10.0).abs() < 1e-9);
    }
}

/// A grouped bar chart as SVG: one group per distinct first field (in order of appearance),
/// one coloured bar per distinct second field, heights in 0..1 (drawn as percent).
pub fn grouped_bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    bars: &[(String, String, f64)],
) -> Result<()> {
    font();
    let err = |e: &dyn std::fmt::Display| Error::Report {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let mut groups: Vec<&str> = Vec::new();
    let mut series: Vec<&str> = Vec::new();
    for (g, s, _) in bars {
        if !groups.contains(&g.as_str()) {
            groups.push(g);
        }
        if !series.contains(&s.as_str()) {
            series.push(s);
        }
    }
    let colours = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    let width = (groups.len() * series.len()) as u32 * 18 + groups.len() as u32 * 14 + 140;
    let root = SVGBackend::new(path, (width.max(640), 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = (groups.len() * (series.len() + 1)) as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n, 0f64..100f64)
        .map_err(|e| err(&e))?;
    let per = series.len() + 1;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * per)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if i % per == per / 2 {
                groups.get(i / per).map_or(String::new(), |g| g.to_string())
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(|e| err(&e))?;
    for (si, s) in series.iter().enumerate() {
        let col = colours[si % colours.len()];
        c.draw_series(bars.iter().filter(|b| b.1 == *s).map(|(g, _, v)| {
            let gi = groups.iter().position(|x| x == g).unwrap_or(0);
            let x0 = (gi * per + si) as f64;
            Rectangle::new([(x0, 0.0), (x0 + 0.9, v * 100.0)], col.filled())
        }))
        .map_err(|e| err(&e))?
        .label(s.to_string())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], col.filled()));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod bar_tests {
    #[test]
    fn grouped_bars_draw_with_the_bundled_font() {
        let dir = std::env::temp_dir().join(format!("semtel-bars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bars.svg");
        let bars = vec![
            ("en".to_string(), "a".to_string(), 0.9),
            ("en".to_string(), "b".to_string(), 0.8),
            ("zh".to_string(), "a".to_string(), 0.3),
            ("zh".to_string(), "b".to_string(), 0.7),
        ];
        super::grouped_bars(&p, "title", "accuracy (%)", &bars).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.contains("<rect") && svg.contains("zh"), "{svg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
