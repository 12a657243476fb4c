//! The result log of `async` items: the journal of accepted items, the writer of their
//! results, and what the service knows about every id.
//!
//! On disk, beside the result log `<results>`:
//! - `<results>.accepted.jsonl` (mode 0600): one line per accepted item that has no result
//!   yet — its id and conversation, exactly what classifying it again after a crash needs. A
//!   line is fsynced before its item is acknowledged, and the journal is rewritten without
//!   finished items (after the result log is fsynced) once they outnumber the pending ones,
//!   so it holds the text of pending items only, never for longer than the item waits for
//!   the LLM. A torn last line (a crash or a full disk mid-write) is cut off at open, and a
//!   failed append is rolled back, so the next item is never glued onto it.
//! - `<results>` itself: the output rows (labels, scores, no text), as long as the user keeps
//!   them.
//!
//! In memory: the ids of pending items, the last [`RESULTS_IN_MEMORY`] results (read by
//! `GET /v1/results/{id}`), and a 16-byte digest of every other finished id, so an id is
//! never accepted twice and an old one still reads as "stored" without its text or row.
//!
//! This module never classifies; it must never lose an acknowledged id or write one twice.

use crate::conversation::Row;
use crate::output::{Existing, OutputSpec, OutputWriter};
use crate::row::OutputRow;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{BufRead, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Results kept whole in memory for `GET /v1/results/{id}` (older ones read as `Stored`).
pub const RESULTS_IN_MEMORY: usize = 100_000;

/// The journal is rewritten once it holds this many lines and four times as many as pending.
const COMPACT_MIN_LINES: usize = 4096;

/// State of one `async` id.
#[derive(Debug, Clone)]
pub enum AsyncStatus {
    /// Accepted; the LLM has not answered yet.
    Pending,
    /// Its result row (as the output writes it).
    Done(Value),
    /// Done in an earlier run or long ago; the row is in the result log.
    Stored,
}

fn id_digest(id: &str) -> u128 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(id.as_bytes());
    u128::from_le_bytes(h[..16].try_into().expect("16 bytes"))
}

#[derive(Default)]
struct Known {
    pending: HashSet<String>,
    recent: HashMap<String, Value>,
    order: VecDeque<String>,
    finished: HashSet<u128>,
}

struct Journal {
    path: PathBuf,
    file: std::fs::File,
    /// Bytes in the file (where the next append starts).
    len: u64,
    lines: usize,
}

/// The journal and the result writer of the service's `async` items.
pub struct ResultLog {
    journal: Mutex<Journal>,
    writer: Mutex<OutputWriter>,
    last_checkpoint: Mutex<Instant>,
    known: Mutex<Known>,
}

/// `<results>.accepted.jsonl`.
pub fn journal_path(results: &Path) -> PathBuf {
    let mut s = results.as_os_str().to_owned();
    s.push(".accepted.jsonl");
    PathBuf::from(s)
}

fn owner_only(f: &std::fs::File, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(path, e))?;
    }
    let _ = (f, path);
    Ok(())
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).read(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let f = o.open(path).map_err(|e| Error::io(path, e))?;
    owner_only(&f, path)?;
    Ok(f)
}

/// Cuts a last line that has no newline (written in part when the process died or the disk
/// filled): it was never acknowledged, and appending after it would glue the next item on.
fn repair_tail(f: &mut std::fs::File, path: &Path) -> Result<u64> {
    use std::io::Read;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(0);
    }
    // Read backwards in blocks to the last newline.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    let mut keep = 0;
    'search: while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(std::io::SeekFrom::Start(start))
            .map_err(|e| Error::io(path, e))?;
        f.read_exact(&mut buf[..n])
            .map_err(|e| Error::io(path, e))?;
        if start + n as u64 == len && buf[n - 1] == b'\n' {
            return Ok(len);
        }
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            keep = start + i as u64 + 1;
            break 'search;
        }
        end = start;
    }
    f.set_len(keep).map_err(|e| Error::io(path, e))?;
    f.sync_data().map_err(|e| Error::io(path, e))?;
    tracing::warn!(
        "{}: cut {} bytes of an unfinished last line (an item never acknowledged)",
        path.display(),
        len - keep
    );
    Ok(keep)
}

impl ResultLog {
    /// Opens (and locks) the result log; returns it with the journaled items that have no
    /// result yet, to resume.
    pub fn open(path: &Path, spec: OutputSpec) -> Result<(ResultLog, Vec<Row>)> {
        let (writer, mut done) = OutputWriter::open(path, spec, Existing::Resume)?;
        let jpath = journal_path(path);
        let mut file = open_append(&jpath)?;
        let len = repair_tail(&mut file, &jpath)?;
        let mut known = Known::default();
        let mut todo = Vec::new();
        let mut lines = 0;
        {
            let cols = crate::input::Columns::default();
            let reader = std::io::BufReader::new(
                std::fs::File::open(&jpath).map_err(|e| Error::io(&jpath, e))?,
            );
            for (i, line) in reader.split(b'\n').enumerate() {
                let line = line.map_err(|e| Error::io(&jpath, e))?;
                lines += 1;
                let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let row = crate::input::row_from_json(&o, i as u64, "journal", &cols);
                if known.pending.contains(&row.id) {
                    continue;
                }
                if done.take(&row.id) {
                    known.finished.insert(id_digest(&row.id));
                } else {
                    known.pending.insert(row.id.clone());
                    todo.push(row);
                }
            }
        }
        for id in done.ids() {
            known.finished.insert(id_digest(id));
        }
        let log = ResultLog {
            journal: Mutex::new(Journal {
                path: jpath,
                file,
                len,
                lines,
            }),
            writer: Mutex::new(writer),
            last_checkpoint: Mutex::new(Instant::now()),
            known: Mutex::new(known),
        };
        Ok((log, todo))
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `ids` for new async items: an id already accepted (pending or finished, in this
    /// run or an earlier one, or earlier in the same list) is refused.
    pub fn claim(&self, ids: &[&str]) -> Vec<bool> {
        let mut k = self.known();
        ids.iter()
            .map(|id| {
                if k.pending.contains(*id)
                    || k.recent.contains_key(*id)
                    || k.finished.contains(&id_digest(id))
                {
                    false
                } else {
                    k.pending.insert(id.to_string());
                    true
                }
            })
            .collect()
    }

    /// Gives back claims whose items were never acknowledged (their journal write failed).
    pub fn unclaim(&self, ids: &[String]) {
        let mut k = self.known();
        for id in ids {
            k.pending.remove(id);
        }
    }

    /// Appends the accepted items to the journal and makes them durable (before they are
    /// acknowledged); on failure the journal is as it was.
    pub fn journal(&self, items: &[Value]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for v in items {
            buf.push_str(&v.to_string());
            buf.push('\n');
        }
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let before = j.len;
        let wrote = j
            .file
            .write_all(buf.as_bytes())
            .and_then(|_| j.file.sync_data());
        if let Err(e) = wrote {
            // Roll back whatever part was written, so the next append starts on a line.
            let _ = j.file.set_len(before);
            let _ = j.file.sync_data();
            return Err(Error::io(&j.path, e));
        }
        j.len = before + buf.len() as u64;
        j.lines += items.len();
        Ok(())
    }

    /// Writes finished rows to the result log; they stop being pending.
    pub fn write(&self, rows: &[OutputRow], spec: &OutputSpec) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        {
            let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            w.write(rows)?;
            let mut last = self
                .last_checkpoint
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if last.elapsed() >= Duration::from_millis(200) {
                w.checkpoint()?;
                *last = Instant::now();
            }
        }
        let (lines, pending) = {
            let mut k = self.known();
            for r in rows {
                k.pending.remove(&r.id);
                k.finished.insert(id_digest(&r.id));
                k.recent
                    .insert(r.id.clone(), crate::output::to_json(r, spec));
                k.order.push_back(r.id.clone());
            }
            while k.order.len() > RESULTS_IN_MEMORY {
                if let Some(old) = k.order.pop_front() {
                    k.recent.remove(&old);
                }
            }
            let lines = self.journal.lock().unwrap_or_else(|e| e.into_inner()).lines;
            (lines, k.pending.len())
        };
        if lines >= COMPACT_MIN_LINES && lines > 4 * pending {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the journal with the pending items only. The result log is made durable first,
    /// so an item leaves the journal only once its result cannot be lost.
    pub fn compact(&self) -> Result<()> {
        self.checkpoint()?;
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        // Pending ids read under the journal's lock: an item claimed after this appends to the
        // new file (it waits for the lock), one claimed before is in the old one and kept.
        let pending = self.known().pending.clone();
        let tmp = j.path.with_extension("jsonl.tmp");
        let mut kept = 0;
        {
            let mut o = std::fs::OpenOptions::new();
            o.create(true).write(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                o.mode(0o600);
            }
            let out = o.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut out = std::io::BufWriter::new(out);
            let reader = std::io::BufReader::new(
                std::fs::File::open(&j.path).map_err(|e| Error::io(&j.path, e))?,
            );
            for line in reader.split(b'\n') {
                let line = line.map_err(|e| Error::io(&j.path, e))?;
                let id = serde_json::from_slice::<Value>(&line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
                if id.is_some_and(|id| pending.contains(&id)) {
                    out.write_all(&line)
                        .and_then(|_| out.write_all(b"\n"))
                        .map_err(|e| Error::io(&tmp, e))?;
                    kept += 1;
                }
            }
            let f = out
                .into_inner()
                .map_err(|e| Error::io(&tmp, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        crate::fsio::commit(&tmp, &j.path)?;
        if let Some(dir) = j.path.parent() {
            crate::fsio::sync_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            });
        }
        j.file = open_append(&j.path)?;
        j.len = j.file.metadata().map_err(|e| Error::io(&j.path, e))?.len();
        j.lines = kept;
        Ok(())
    }

    pub fn checkpoint(&self) -> Result<()> {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .checkpoint()
    }

    /// The state of an id.
    pub fn status(&self, id: &str) -> Option<AsyncStatus> {
        let k = self.known();
        if k.pending.contains(id) {
            Some(AsyncStatus::Pending)
        } else if let Some(v) = k.recent.get(id) {
            Some(AsyncStatus::Done(v.clone()))
        } else if k.finished.contains(&id_digest(id)) {
            Some(AsyncStatus::Stored)
        } else {
            None
        }
    }

    /// Lines in the journal now (for tests and `/metrics`).
    pub fn journal_lines(&self) -> usize {
        self.journal.lock().unwrap_or_else(|e| e.into_inner()).lines
    }
}

/// An accepted row as its journal line (the input shape, so the journal is read back by the
/// same parser): the id and the conversation, nothing else.
pub fn journal_line(r: &Row) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), Value::String(r.id.clone()));
    match &r.content {
        Ok(crate::conversation::Content::Text(t)) => {
            o.insert("text".into(), Value::String(t.clone()));
        }
        Ok(crate::conversation::Content::Turns(ts)) => {
            o.insert(
                "messages".into(),
                serde_json::to_value(ts).unwrap_or(Value::Null),
            );
        }
        Err(e) => {
            o.insert("error".into(), Value::String(e.clone()));
        }
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::OutputRow;

    fn spec() -> OutputSpec {
        OutputSpec::new(Vec::new())
    }

    fn item(id: &str) -> Value {
        serde_json::json!({"id": id, "text": format!("text of {id}")})
    }

    #[test]
    fn journal_lines_read_back_as_the_same_rows() {
        let cols = crate::input::Columns::default();
        for content in [
            Ok(crate::conversation::Content::Text(
                "héllo 世界 \u{0} 🙂".into(),
            )),
            Ok(crate::conversation::Content::Turns(vec![
                crate::conversation::Turn {
                    role: crate::conversation::Role::User,
                    content: "مرحبا".into(),
                },
                crate::conversation::Turn {
                    role: crate::conversation::Role::Assistant,
                    content: "नमस्ते".into(),
                },
            ])),
        ] {
            let r = crate::conversation::Row {
                index: 0,
                id: "a1".into(),
                content,
                label: None,
                passthrough: Vec::new(),
            };
            let v = journal_line(&r);
            let back = crate::input::row_from_json(v.as_object().unwrap(), 0, "j", &cols);
            assert_eq!(back.id, "a1");
            assert_eq!(back.content, r.content);
        }
    }

    #[test]
    fn torn_tail_is_cut_and_the_next_item_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("semtel-journal-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let results = dir.join("r.jsonl");
        {
            let (log, todo) = ResultLog::open(&results, spec()).unwrap();
            assert!(todo.is_empty());
            assert_eq!(log.claim(&["a"]), vec![true]);
            log.journal(&[item("a")]).unwrap();
        }
        // A crash mid-write of a second line.
        let j = journal_path(&results);
        let mut f = std::fs::OpenOptions::new().append(true).open(&j).unwrap();
        f.write_all(b"{\"id\": \"b\", \"te").unwrap();
        drop(f);
        {
            let (log, todo) = ResultLog::open(&results, spec()).unwrap();
            assert_eq!(todo.len(), 1, "a is pending; b was never acknowledged");
            assert_eq!(log.claim(&["c", "a"]), vec![true, false]);
            log.journal(&[item("c")]).unwrap();
        }
        let (_log, todo) = ResultLog::open(&results, spec()).unwrap();
        let ids: Vec<_> = todo.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c"], "c was not glued onto the torn line");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&j).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn finished_items_leave_the_journal_and_stay_refused() {
        let dir = std::env::temp_dir().join(format!("semtel-journal-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let results = dir.join("r.jsonl");
        let n = COMPACT_MIN_LINES + 10;
        {
            let (log, _) = ResultLog::open(&results, spec()).unwrap();
            let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            assert!(log.claim(&refs).iter().all(|&b| b));
            let items: Vec<Value> = ids.iter().map(|i| item(i)).collect();
            log.journal(&items).unwrap();
            // All but the last five finish.
            let rows: Vec<OutputRow> = ids[..n - 5]
                .iter()
                .map(|i| OutputRow::error(i.clone(), "x".into(), Vec::new()))
                .collect();
            log.write(&rows, &spec()).unwrap();
            assert_eq!(log.journal_lines(), 5, "compacted to the pending items");
            assert!(matches!(log.status("id-0"), Some(AsyncStatus::Done(_))));
            assert!(matches!(
                log.status(&ids[n - 1]),
                Some(AsyncStatus::Pending)
            ));
            log.checkpoint().unwrap();
        }
        let (log, todo) = ResultLog::open(&results, spec()).unwrap();
        assert_eq!(todo.len(), 5);
        assert!(matches!(log.status("id-0"), Some(AsyncStatus::Stored)));
        assert_eq!(log.claim(&["id-0", "id-new"]), vec![false, true]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
