//! `semtel bench encoders`: every encoder on the same labelled rows in one run — kNN and head
//! accuracy, the share kept at the calibrated 97 % target (thresholds chosen without the test
//! split) and what it really is on test, and tokens/s on this machine's threads.
//!
//! Sets: Banking77 (index from train, cross-validated calibration, test), CLINC150 with `oos`
//! (train, calibrated on validation, test) and xSID (`data/xsid`: the same queries in 13
//! languages; an index from the English rows scored on every language, and an index per
//! language). Everything runs through the application layer (`app::index`, `app::calibrate`,
//! `app::eval`), as a user's commands would. This module writes reports; it never prints.

use crate::app::calibrate::{CalibrateJob, Calibrated};
use crate::calibrate::CalibrateOptions;
use crate::embed::{Encoder, EncoderOptions};
use crate::input::InputOptions;
use crate::pipeline::{Classifier, ClassifierOptions};
use crate::progress::Progress;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What to run.
#[derive(Debug, Clone)]
pub struct EncoderBenchOptions {
    /// Model folders or names (as `--model` takes them).
    pub models: Vec<String>,
    /// Any of `banking77`, `clinc150`, `xsid`.
    pub sets: Vec<String>,
    pub shared: PathBuf,
    /// `data/xsid/xsid.jsonl.gz`.
    pub xsid: PathBuf,
    /// Which xSID indexes: `en` (the English rows, per-language centring as `auto` decides),
    /// `en-centred` / `en-uncentred` (the English rows, centring on / off), `own` (each
    /// language's own rows).
    pub xsid_indexes: Vec<String>,
    /// Indexes and reports go here.
    pub out: PathBuf,
    pub target: f64,
    pub encoder: EncoderOptions,
}

/// One (model, set, test language) result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EncoderBenchRow {
    pub model: String,
    pub set: String,
    /// Test language (xSID), and what the index was built from.
    pub lang: Option<String>,
    pub trained_on: String,
    pub test_rows: usize,
    pub knn_accuracy: f64,
    /// The learned head's accuracy (the head signal), where calibration trained one.
    pub head_accuracy: Option<f64>,
    /// The signal calibration chose and what its thresholds keep on test.
    pub signal: String,
    pub kept_share: f64,
    pub kept_accuracy: Option<f64>,
    /// Best share keepable at the target with thresholds chosen on test itself (the ceiling).
    pub kept_share_ceiling: Option<f64>,
    /// Embedding speed on this set's test texts (median of three passes).
    pub tokens_per_s: f64,
    pub seconds: f64,
}

fn opts(split: Option<&str>) -> InputOptions {
    InputOptions {
        split: split.map(str::to_string),
        ..Default::default()
    }
}

/// Runs the benchmark, calling `each` with every row as it is measured.
pub fn encoder_benchmark(
    o: &EncoderBenchOptions,
    each: &mut dyn FnMut(&EncoderBenchRow),
) -> Result<Vec<EncoderBenchRow>> {
    if let Some(bad) = o
        .xsid_indexes
        .iter()
        .find(|x| !["en", "en-centred", "en-uncentred", "own"].contains(&x.as_str()))
    {
        return Err(Error::Config(format!(
            "unknown xSID index `{bad}` (en, en-centred, en-uncentred, own)"
        )));
    }
    std::fs::create_dir_all(&o.out).map_err(|e| Error::io(&o.out, e))?;
    let mut rows = Vec::new();
    let xsid_files = if o.sets.iter().any(|s| s == "xsid") {
        Some(split_xsid(&o.xsid, &o.out.join("xsid-data"))?)
    } else {
        None
    };
    for model in &o.models {
        let mut eo = o.encoder.clone();
        eo.model = Some(model.clone());
        let encoder = Encoder::load(&eo)?;
        let name = encoder
            .files
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| model.clone());
        // Speed once per set (the same texts for every index of it).
        let mut speeds: std::collections::HashMap<String, f64> = Default::default();
        let mut run = |set: &str,
                       lang: Option<&str>,
                       trained_on: &str,
                       center: crate::center::CenterChoice,
                       train: (&Path, Option<&str>),
                       held: Option<(&Path, Option<&str>)>,
                       test: (&Path, Option<&str>)|
         -> Result<()> {
            let t = std::time::Instant::now();
            let dir = o.out.join("idx").join(format!(
                "{name}-{set}-{}",
                trained_on.replace([' ', '/'], "_")
            ));
            let _ = std::fs::remove_dir_all(&dir);
            crate::app::index::build_index_with(
                &encoder,
                &[(train.0.to_path_buf(), opts(train.1))],
                &dir,
                10,
                None,
                false,
                center,
                false,
                &Progress::hidden(),
            )?;
            let job = CalibrateJob {
                index: dir.clone(),
                classifier: ClassifierOptions {
                    encoder: eo.clone(),
                    ..Default::default()
                },
                labelled: held.map(|(p, s)| (p.to_path_buf(), opts(s))),
                options: CalibrateOptions {
                    target: Some(o.target),
                    ..Default::default()
                },
            };
            let calibrated = crate::app::calibrate::run(&job)?;
            let signal = match &calibrated.report {
                Calibrated::Single(r) => r.signal.clone(),
                Calibrated::Multi(_) => "multi".into(),
            };
            let classifier = Classifier::open(
                &dir,
                &ClassifierOptions {
                    encoder: eo.clone(),
                    ..Default::default()
                },
            )?;
            let ev = crate::app::eval::evaluate(
                &classifier,
                test.0,
                &opts(test.1),
                &Progress::hidden(),
            )?;
            let acc = |name: &str| {
                ev.by_signal
                    .iter()
                    .find(|(s, _)| s.name() == name)
                    .map(|(_, r)| r.accuracy)
            };
            let at = ev.report.at_index_thresholds.clone();
            let ceiling = ev
                .report
                .at_target
                .iter()
                .find(|p| (p.target - o.target).abs() < 1e-9)
                .map(|p| p.coverage);
            let tokens_per_s = match speeds.get(set) {
                Some(&v) => v,
                None => {
                    let texts: Vec<String> = crate::input::read_all(test.0, &opts(test.1))?
                        .into_iter()
                        .filter_map(|r| r.content.ok().map(|c| c.flatten()))
                        .take(300)
                        .collect();
                    let v = crate::app::models::speed(&encoder, &texts)?;
                    speeds.insert(set.to_string(), v);
                    v
                }
            };
            let row = EncoderBenchRow {
                model: name.clone(),
                set: set.to_string(),
                lang: lang.map(str::to_string),
                trained_on: trained_on.to_string(),
                test_rows: ev.report.rows,
                knn_accuracy: acc("vote").unwrap_or(ev.report.accuracy),
                head_accuracy: acc("head"),
                signal,
                kept_share: at.as_ref().map_or(0.0, |a| a.coverage),
                kept_accuracy: at.and_then(|a| a.kept_accuracy),
                kept_share_ceiling: ceiling,
                tokens_per_s,
                seconds: t.elapsed().as_secs_f64(),
            };
            each(&row);
            rows.push(row);
            Ok(())
        };
        for set in &o.sets {
            match set.as_str() {
                "banking77" => {
                    let f = o.shared.join("data/banking77/banking77.jsonl");
                    run(
                        "banking77",
                        None,
                        "train",
                        Default::default(),
                        (&f, Some("train")),
                        None,
                        (&f, Some("test")),
                    )?;
                }
                "clinc150" => {
                    let f = o.shared.join("data/clinc150/clinc150.jsonl");
                    run(
                        "clinc150",
                        None,
                        "train",
                        Default::default(),
                        (&f, Some("train")),
                        Some((&f, Some("validation"))),
                        (&f, Some("test")),
                    )?;
                }
                "xsid" => {
                    let files = xsid_files.as_ref().expect("split above");
                    let en_valid = files.join("en.valid.jsonl");
                    let wants = |k: &str| o.xsid_indexes.iter().any(|x| x == k);
                    for lang in XSID_LANGS {
                        let test = files.join(format!("{lang}.test.jsonl"));
                        // English rows only: does the encoder carry labels across languages?
                        for (key, trained, center) in [
                            ("en", "en valid", crate::center::CenterChoice::Auto),
                            (
                                "en-centred",
                                "en valid centred",
                                crate::center::CenterChoice::On,
                            ),
                            (
                                "en-uncentred",
                                "en valid uncentred",
                                crate::center::CenterChoice::Off,
                            ),
                        ] {
                            if wants(key) {
                                run(
                                    "xsid",
                                    Some(lang),
                                    trained,
                                    center,
                                    (&en_valid, None),
                                    None,
                                    (&test, None),
                                )?;
                            }
                        }
                        if *lang != "en" && wants("own") {
                            let valid = files.join(format!("{lang}.valid.jsonl"));
                            run(
                                "xsid",
                                Some(lang),
                                &format!("{lang} valid"),
                                Default::default(),
                                (&valid, None),
                                None,
                                (&test, None),
                            )?;
                        }
                    }
                }
                other => {
                    return Err(Error::Config(format!(
                        "unknown set `{other}` (banking77, clinc150, xsid)"
                    )))
                }
            }
        }
    }
    write_reports(&o.out, &rows)?;
    Ok(rows)
}

const XSID_LANGS: &[&str] = &[
    "en", "ar", "da", "de", "id", "it", "ja", "kk", "lt", "nl", "sr", "tr", "zh",
];

/// Writes `<lang>.<split>.jsonl` files from the xSID set (the reader filters by split only).
fn split_xsid(src: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text = {
        use std::io::Read;
        let f = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
        let mut s = String::new();
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut s)
            .map_err(|e| Error::io(src, e))?;
        s
    };
    let mut files: std::collections::BTreeMap<String, String> = Default::default();
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| Error::input(src, format!("bad row: {e}")))?;
        let key = format!(
            "{}.{}",
            v["lang"].as_str().unwrap_or("?"),
            v["split"].as_str().unwrap_or("?")
        );
        let f = files.entry(key).or_default();
        f.push_str(line);
        f.push('\n');
    }
    for (k, body) in files {
        let p = dir.join(format!("{k}.jsonl"));
        std::fs::write(&p, body).map_err(|e| Error::io(&p, e))?;
    }
    Ok(dir.to_path_buf())
}

/// Rewrites the CSV and the plot from a run's `encoders.json` (`--replot`).
pub fn replot(dir: &Path) -> Result<Vec<EncoderBenchRow>> {
    let p = dir.join("encoders.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let rows: Vec<EncoderBenchRow> =
        serde_json::from_str(&text).map_err(|e| Error::input(&p, e.to_string()))?;
    write_reports(dir, &rows)?;
    Ok(rows)
}

/// `encoders.json`, `encoders.csv` and `encoders.svg` (xSID kNN accuracy per language for an
/// English-only index, one bar per model).
fn write_reports(dir: &Path, rows: &[EncoderBenchRow]) -> Result<()> {
    let p = dir.join("encoders.json");
    std::fs::write(
        &p,
        serde_json::to_string_pretty(rows).map_err(|e| Error::Config(e.to_string()))?,
    )
    .map_err(|e| Error::io(&p, e))?;
    let mut csv = String::from("model,set,lang,trained_on,test_rows,knn_accuracy,head_accuracy,signal,kept_share,kept_accuracy,kept_share_ceiling,tokens_per_s,seconds\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    for r in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{:.4},{},{},{:.4},{},{},{:.0},{:.1}\n",
            r.model,
            r.set,
            r.lang.as_deref().unwrap_or(""),
            r.trained_on,
            r.test_rows,
            r.knn_accuracy,
            opt(r.head_accuracy),
            r.signal,
            r.kept_share,
            opt(r.kept_accuracy),
            opt(r.kept_share_ceiling),
            r.tokens_per_s,
            r.seconds
        ));
    }
    let p = dir.join("encoders.csv");
    std::fs::write(&p, csv).map_err(|e| Error::io(&p, e))?;
    let bars: Vec<(String, String, f64)> = rows
        .iter()
        .filter(|r| r.set == "xsid" && r.trained_on == "en valid")
        .map(|r| {
            (
                r.lang.clone().unwrap_or_default(),
                r.model.clone(),
                r.knn_accuracy,
            )
        })
        .collect();
    if !bars.is_empty() {
        crate::report::grouped_bars(
            &dir.join("encoders.svg"),
            "xSID: kNN accuracy per language, index from English rows only",
            "kNN accuracy (%)",
            &bars,
        )?;
    }
    Ok(())
}
