//! `semtel monitor`: the drift report of an output, as JSON and HTML; exit 3 on an alert.

use crate::args::MonitorArgs;
use anyhow::{Context, Result};
use semtel::app::monitor::{AlertThresholds, MonitorOptions, Window};

pub fn run(a: MonitorArgs) -> Result<()> {
    let window: Window = a.window.parse().map_err(anyhow::Error::msg)?;
    let report = semtel::app::monitor::monitor(&MonitorOptions {
        input: a.input.clone(),
        window,
        time_col: a.time_col.clone(),
        index: a.index.clone(),
        thresholds: AlertThresholds {
            novel_share: a.max_novel_share,
            label_divergence: a.max_label_divergence,
            escalation_rise: a.max_escalation_rise,
            min_rows: a.min_rows,
        },
    })?;
    if let Some(p) = &a.html {
        std::fs::write(p, semtel::app::monitor::html(&report))
            .with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    let json = serde_json::to_string_pretty(&report)?;
    match a.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => println!("{json}"),
        Some(p) => std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?,
        None => {}
    }
    eprintln!(
        "{} rows in {} windows of {}{}",
        report.rows,
        report.windows.len(),
        report.window,
        if report.unreadable_lines > 0 {
            format!(" ({} unreadable lines skipped)", report.unreadable_lines)
        } else {
            String::new()
        }
    );
    for w in &report.windows {
        eprintln!(
            "  {:<28} rows {:>7}  kept {:>5.1}%  escalated {:>5.1}%  novel {:>5.1}%  guard {:>5.1}%  label divergence {:.3}{}",
            w.window,
            w.rows,
            100.0 * w.kept_share,
            100.0 * w.escalated_share,
            100.0 * w.novel_share,
            100.0 * w.guard_share,
            w.label_divergence,
            w.audit_agreement.map_or(String::new(), |x| format!(
                "  audit {:.1}% [{:.1}–{:.1}] of {}",
                100.0 * x.value,
                100.0 * x.lo,
                100.0 * x.hi,
                w.audited
            ))
        );
    }
    if report.alerted() {
        for a in &report.alerts {
            eprintln!("ALERT {a}");
        }
        return Err(super::RunHadErrors(format!(
            "{} alert(s): drift or guard thresholds crossed",
            report.alerts.len()
        ))
        .into());
    }
    eprintln!("no alert");
    Ok(())
}
