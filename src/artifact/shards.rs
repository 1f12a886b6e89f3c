//! Crash-safe, exactly-once output of records.
//!
//! Every accepted row is appended at once to a journal (`NAME.journal.jsonl`, one JSON object a
//! line, one `write` per line) so a `kill -9` loses nothing that was answered. When enough rows
//! have gathered they are written as one Parquet file (temp name, fsync, rename) and the journal is
//! emptied. Opening the output again first packs what a crashed run left in its journal, skipping
//! rows whose `id` already reached Parquet (a crash between the rename and emptying the journal),
//! and ignoring a torn last line. Rows are JSON objects; the [`Schema`] gives their Parquet types.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use super::atomic;
use super::table::{self, Schema, TableError};

/// Where a table's rows end up.
#[derive(Debug, Clone)]
pub enum Layout {
    /// `part-00000.parquet`, `part-00001.parquet`, … — one new file per flush.
    Parts { prefix: &'static str },
    /// One file rewritten (atomically) with the old rows plus the new ones on every flush.
    Single { file: &'static str },
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: damaged journal line (not JSON: {message}); only the last line may be torn by a crash — move the file away to discard its rows")]
    Journal {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub struct ShardWriter {
    dir: PathBuf,
    name: &'static str,
    layout: Layout,
    schema: Schema,
    flush_every: usize,
    journal_path: PathBuf,
    journal: File,
    pending: Vec<Vec<Value>>,
}

/// A row as the journal line it is written as: `{"column": cell, …}` without the null cells.
struct Named<'a>(&'a Schema, &'a [Value]);

impl Serialize for Named<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for ((name, _), cell) in self.0.iter().zip(self.1) {
            if !cell.is_null() {
                map.serialize_entry(name, cell)?;
            }
        }
        map.end()
    }
}

impl ShardWriter {
    /// Opens (creating `dir` if needed) and recovers what a previous run left in the journal.
    pub fn open(
        dir: &Path,
        name: &'static str,
        layout: Layout,
        schema: Schema,
        flush_every: usize,
    ) -> Result<ShardWriter, ShardError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let journal_path = dir.join(format!("{name}.journal.jsonl"));
        let recovered = read_journal_rows(&journal_path)?;
        let journal = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(io_err(&journal_path))?;
        let mut writer = ShardWriter {
            dir: dir.to_path_buf(),
            name,
            layout,
            schema,
            flush_every: flush_every.max(1),
            journal_path,
            journal,
            pending: Vec::new(),
        };
        writer.remove_stale_temps()?;
        if !recovered.is_empty() {
            let written = writer.ids()?;
            let schema = &writer.schema;
            writer.pending = recovered
                .into_iter()
                .filter(|r| {
                    r.get("id")
                        .and_then(Value::as_str)
                        .is_none_or(|id| !written.contains(id))
                })
                .map(|mut r| {
                    let mut take = |name: &str| r.remove(name).unwrap_or(Value::Null);
                    schema.iter().map(|(name, _)| take(name)).collect()
                })
                .collect();
            tracing::info!(rows = writer.pending.len(), journal = %writer.journal_path.display(), "recovered rows from an interrupted run");
            writer.flush()?;
        }
        Ok(writer)
    }

    /// The Parquet files of this table, in order.
    pub fn files(&self) -> Result<Vec<PathBuf>, ShardError> {
        list_files(&self.dir, &self.layout)
    }

    /// Every `id` already in Parquet.
    pub fn ids(&self) -> Result<HashSet<String>, ShardError> {
        let mut ids = HashSet::new();
        for path in self.files()? {
            let df = table::read_columns(&path, &["id"])?;
            ids.extend(table::text_column(&df, &path, "id")?.into_iter().flatten());
        }
        Ok(ids)
    }

    /// Makes `rows` (cells in schema order) durable against a crash of this process (one `write`
    /// for all of them), and packs a Parquet file when due.
    pub fn append(&mut self, rows: Vec<Vec<Value>>) -> Result<(), ShardError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::new();
        for row in &rows {
            debug_assert_eq!(row.len(), self.schema.len(), "a row of {}", self.name);
            serde_json::to_writer(&mut lines, &Named(&self.schema, row))
                .expect("JSON values always serialize");
            lines.push(b'\n');
        }
        // A killed process leaves whole lines, or a torn last one that recovery skips.
        self.journal
            .write_all(&lines)
            .map_err(io_err(&self.journal_path))?;
        self.pending.extend(rows);
        if self.pending.len() >= self.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Packs pending rows into Parquet, then empties the journal.
    pub fn flush(&mut self) -> Result<(), ShardError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        match self.layout {
            Layout::Parts { prefix } => {
                let next = self
                    .files()?
                    .iter()
                    .filter_map(|p| part_number(p, prefix))
                    .max()
                    .map_or(0, |n| n + 1);
                let path = self.dir.join(format!("{prefix}-{next:05}.parquet"));
                table::write_parquet(&path, &self.schema, &self.pending)?;
            }
            Layout::Single { file } => {
                let path = self.dir.join(file);
                let mut df = table::frame(&self.schema, &self.pending).map_err(|source| {
                    TableError::Write {
                        path: path.clone(),
                        source,
                    }
                })?;
                if path.exists() {
                    let names: Vec<&str> = self.schema.iter().map(|(n, _)| *n).collect();
                    let old = table::read_columns(&path, &names)?;
                    df = old.vstack(&df).map_err(|source| TableError::Write {
                        path: path.clone(),
                        source,
                    })?;
                }
                atomic::write_with(&path, |f| {
                    ParquetWriter::new(f)
                        .with_compression(ParquetCompression::Zstd(None))
                        .finish(&mut df)
                        .map_err(std::io::Error::other)
                })
                .map_err(io_err(&path))?;
            }
        }
        self.pending.clear();
        self.journal
            .set_len(0)
            .map_err(io_err(&self.journal_path))?;
        self.journal
            .sync_all()
            .map_err(io_err(&self.journal_path))?;
        tracing::debug!(table = self.name, "flushed");
        Ok(())
    }

    /// Packs what is pending and removes the (then empty) journal.
    pub fn close(mut self) -> Result<(), ShardError> {
        self.flush()?;
        fs::remove_file(&self.journal_path).map_err(io_err(&self.journal_path))
    }

    /// Temp files of this table a crash left behind; only names of its own scheme are touched.
    fn remove_stale_temps(&self) -> Result<(), ShardError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let path = entry.map_err(io_err(&self.dir))?.path();
            let is_ours = path
                .to_str()
                .and_then(|p| p.strip_suffix(".tmp"))
                .is_some_and(|p| {
                    let p = Path::new(p);
                    match &self.layout {
                        Layout::Parts { prefix } => part_number(p, prefix).is_some(),
                        Layout::Single { file } => p.file_name().is_some_and(|n| n == *file),
                    }
                });
            if is_ours {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }
}

/// The Parquet files of a table in `dir`, in order.
pub fn list_files(dir: &Path, layout: &Layout) -> Result<Vec<PathBuf>, ShardError> {
    let mut files = Vec::new();
    match layout {
        Layout::Single { file } => {
            let p = dir.join(file);
            if p.exists() {
                files.push(p);
            }
        }
        Layout::Parts { prefix } => {
            if !dir.exists() {
                return Ok(files);
            }
            for entry in fs::read_dir(dir).map_err(io_err(dir))? {
                let path = entry.map_err(io_err(dir))?.path();
                if part_number(&path, prefix).is_some() {
                    files.push(path);
                }
            }
            files.sort();
        }
    }
    Ok(files)
}

fn part_number(path: &Path, prefix: &str) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix(prefix)?
        .strip_prefix('-')?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// The rows of a journal; a torn last line (a crash mid-write) is skipped.
pub fn read_journal_rows(path: &Path) -> Result<Vec<Map<String, Value>>, ShardError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(io_err(path))?;
    let mut rows = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Map<String, Value>>(line) {
            Ok(row) => rows.push(row),
            Err(_) if i + 1 == lines.len() => {
                tracing::warn!(journal = %path.display(), "ignoring a torn last line left by a crash");
            }
            Err(e) => {
                return Err(ShardError::Journal {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                });
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::table::Kind;
    use serde_json::json;

    /// A row of `schema()`: cells in column order.
    fn row(id: &str) -> Vec<Value> {
        vec![json!(id), json!(format!("text of {id}"))]
    }

    /// The journal line of `row(id)`, keys in another order than the schema's.
    fn line(id: &str) -> String {
        format!("{{\"text\":\"text of {id}\",\"id\":\"{id}\"}}")
    }

    fn schema() -> Schema {
        vec![("id", Kind::Text), ("text", Kind::Text)]
    }

    /// The `records` table of `dir` in parts, packed every `flush_every` rows.
    fn records(dir: &Path, flush_every: usize) -> Result<ShardWriter, ShardError> {
        ShardWriter::open(
            dir,
            "records",
            Layout::Parts { prefix: "part" },
            schema(),
            flush_every,
        )
    }

    #[test]
    fn a_crashed_journal_is_packed_once_and_a_torn_line_ignored() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = records(dir.path(), 2).unwrap();
            for id in ["a", "b", "c"] {
                w.append(vec![row(id)]).unwrap(); // a, b → part-00000; c stays in the journal
            }
            // simulate kill -9: no flush; plus a torn half line at the end
            let mut j = OpenOptions::new()
                .append(true)
                .open(dir.path().join("records.journal.jsonl"))
                .unwrap();
            j.write_all(b"{\"id\": \"d\", \"te").unwrap();
        }
        // and a crash between renaming part-00000 and emptying the journal: a and b are in both
        fs::write(
            dir.path().join("records.journal.jsonl"),
            [
                line("a"),
                line("b"),
                line("c"),
                "{\"id\": \"d\", \"te".to_string(),
            ]
            .join("\n"),
        )
        .unwrap();
        let w = records(dir.path(), 2).unwrap();
        let files = w.files().unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        let mut ids: Vec<String> = w.ids().unwrap().into_iter().collect();
        ids.sort();
        assert_eq!(ids, ["a", "b", "c"]);
        // The recovered row's cells land in their columns although its line listed them in
        // another order.
        let df = table::read_columns(&files[1], &["id", "text"]).unwrap();
        assert_eq!(
            table::text_column(&df, &files[1], "text").unwrap(),
            [Some("text of c".to_string())]
        );
        assert_eq!(
            fs::metadata(dir.path().join("records.journal.jsonl"))
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn journal_lines_name_their_columns_and_leave_out_null_cells() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = records(dir.path(), 10).unwrap();
        w.append(vec![vec![json!("a"), Value::Null], row("b")])
            .unwrap();
        let journal = dir.path().join("records.journal.jsonl");
        assert_eq!(
            fs::read_to_string(&journal).unwrap(),
            "{\"id\":\"a\"}\n{\"id\":\"b\",\"text\":\"text of b\"}\n"
        );
        w.close().unwrap();
        let path = dir.path().join("part-00000.parquet");
        let df = table::read_columns(&path, &["id", "text"]).unwrap();
        assert_eq!(
            table::text_column(&df, &path, "text").unwrap(),
            [None, Some("text of b".to_string())]
        );
    }

    #[test]
    fn a_damaged_line_in_the_middle_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("records.journal.jsonl"),
            "garbage\n{\"id\": \"a\"}\n",
        )
        .unwrap();
        let err = records(dir.path(), 2).err().unwrap();
        assert!(err.to_string().contains("records.journal.jsonl:1"), "{err}");
    }

    #[test]
    fn the_single_layout_accumulates_rows_across_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::open(
            dir.path(),
            "rejects",
            Layout::Single {
                file: "rejects.parquet",
            },
            schema(),
            100,
        )
        .unwrap();
        w.append(vec![row("x")]).unwrap();
        w.flush().unwrap();
        w.append(vec![row("y")]).unwrap();
        w.flush().unwrap();
        assert_eq!(w.ids().unwrap().len(), 2);
    }
}
