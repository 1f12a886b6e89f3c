//! Records of table files, as the stages that read whole rows (SFT and DPO data, `chat-data
//! --input`, `prefs --input`/`--prompts`) read them: every field of every row as JSON.
//!
//! A table file is `*.jsonl`, `*.jsonl.gz` (one JSON object a line; blank lines are not records)
//! or `*.parquet` (a row a record: strings stay strings, list-of-struct columns such as
//! `messages` become arrays of objects, so both formats go through the same deserializer).
//! [`table_files`] lists the files a user named, [`read`] gives one file's records with where each
//! stands (its 0-based row among the records, and for jsonl its 1-based line) and, for a jsonl
//! line that is not JSON, why: callers decide whether that fails the file or drops the record.
//!
//! Formats are told by name as [`docs::Format::of`] tells them, so the reports and journals
//! stages write next to their records are never read as records.

use std::borrow::Cow;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use polars::prelude::AnyValue;
use serde_json::Value;

use super::docs::{self, Format};
use super::table;

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("{path}: not found — expected a .jsonl, .jsonl.gz or .parquet file, or a directory of them; check the path")]
    Missing { path: PathBuf },
    #[error("{path}: {found}, not a .jsonl, .jsonl.gz or .parquet file — give record files, or a directory of them")]
    Format { path: PathBuf, found: String },
    #[error("{path}: a directory without .jsonl, .jsonl.gz or .parquet files — point at record files, or at a directory that holds them")]
    NoFiles { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: could not read Parquet: {reason}")]
    Parquet { path: PathBuf, reason: String },
}

/// The table format of the file `path` names, by its name; `None` for any other file.
fn format_of(path: &Path) -> Option<Format> {
    let name = path.file_name()?.to_str()?;
    Format::of(name).filter(|f| matches!(f, Format::Jsonl | Format::Parquet))
}

/// Whether `path` names a table file (by its name).
pub fn is_table_file(path: &Path) -> bool {
    format_of(path).is_some()
}

/// What a file that is not a table file is, for the error that refuses it.
fn found(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if docs::is_stage_report(&name) {
        format!("`{name}`, a report a stage writes next to its records")
    } else {
        match path.extension() {
            Some(ext) => format!("a `.{}` file", ext.to_string_lossy()),
            None => "a file with no extension".to_string(),
        }
    }
}

/// The table files `paths` name, in their order: a file as it is (it must exist and be a table
/// file), a directory's table files (regular files only, not its subdirectories) sorted by path.
/// A missing path, a file of another format and a directory without table files are errors.
pub fn table_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, RecordsError> {
    let mut files = Vec::new();
    for p in paths {
        let io = |source| RecordsError::Io {
            path: p.clone(),
            source,
        };
        let meta = match std::fs::metadata(p) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordsError::Missing { path: p.clone() })
            }
            Err(e) => return Err(io(e)),
        };
        if !meta.is_dir() {
            if format_of(p).is_none() {
                return Err(RecordsError::Format {
                    path: p.clone(),
                    found: found(p),
                });
            }
            files.push(p.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io)?;
        found.retain(|f| f.is_file() && format_of(f).is_some());
        found.sort();
        if found.is_empty() {
            return Err(RecordsError::NoFiles { path: p.clone() });
        }
        files.extend(found);
    }
    Ok(files)
}

/// One record of a table file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The record, or why its jsonl line is not JSON (`not JSON: …`); a Parquet row always is.
    pub value: Result<Value, String>,
    /// 0-based among the file's records (blank jsonl lines are not records): the row
    /// [`docs::row_id`] names a record without an id by.
    pub row: usize,
    /// The 1-based line of a jsonl record; `None` for Parquet.
    pub line: Option<usize>,
    /// The jsonl line as read. A Parquet row's text is made only when asked for ([`Record::raw`]):
    /// SFT reads whole datasets and never asks.
    text: Option<String>,
}

impl Record {
    /// Where the record stands, from 1: its jsonl line, else its Parquet row + 1.
    pub fn number(&self) -> usize {
        self.line.unwrap_or(self.row + 1)
    }

    /// The record as read: the jsonl line, or the Parquet row as JSON text.
    pub fn raw(&self) -> Cow<'_, str> {
        match (&self.text, &self.value) {
            (Some(text), _) => Cow::Borrowed(text),
            (None, Ok(value)) => Cow::Owned(value.to_string()),
            (None, Err(_)) => {
                unreachable!("only jsonl lines fail to parse, and they keep their text")
            }
        }
    }
}

/// The records of the table file `path` (jsonl, gunzipped when its name ends in `.gz`, unless it
/// is named `.parquet`), in file order.
pub fn read(path: &Path) -> Result<Vec<Record>, RecordsError> {
    if format_of(path) == Some(Format::Parquet) {
        return Ok(parquet_values(path)?
            .into_iter()
            .enumerate()
            .map(|(row, value)| Record {
                value: Ok(value),
                row,
                line: None,
                text: None,
            })
            .collect());
    }
    let io = |source| RecordsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let reader = std::io::BufReader::new(docs::open_maybe_gz(path).map_err(io)?);
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(Record {
            value: serde_json::from_str(&line).map_err(|e| format!("not JSON: {e}")),
            row: records.len(),
            line: Some(i + 1),
            text: Some(line),
        });
    }
    Ok(records)
}

/// Parquet rows as JSON objects, a field a column.
fn parquet_values(path: &Path) -> Result<Vec<Value>, RecordsError> {
    let parquet = |reason: String| RecordsError::Parquet {
        path: path.to_path_buf(),
        reason,
    };
    let df = table::read_frame(path, None).map_err(|e| parquet(e.to_string()))?;
    let columns = df.columns();
    (0..df.height())
        .map(|row| {
            let mut obj = serde_json::Map::new();
            for c in columns {
                let v = c.get(row).map_err(|e| parquet(e.to_string()))?;
                obj.insert(c.name().to_string(), json(&v));
            }
            Ok(Value::Object(obj))
        })
        .collect()
}

/// A Parquet cell as JSON: lists as arrays, structs as objects, other scalars as their text.
fn json(v: &AnyValue) -> Value {
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::List(s) => Value::Array(s.iter().map(|v| json(&v)).collect()),
        AnyValue::Struct(_, _, fields) => {
            let values: Vec<AnyValue> = v._iter_struct_av().collect();
            Value::Object(
                fields
                    .iter()
                    .zip(values)
                    .map(|(f, v)| (f.name().to_string(), json(&v)))
                    .collect(),
            )
        }
        AnyValue::StructOwned(b) => Value::Object(
            b.1.iter()
                .zip(&b.0)
                .map(|(f, v)| (f.name().to_string(), json(v)))
                .collect(),
        ),
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// (value, row, line, raw) of a record, the shape the expected values are written in.
    type Seen = (Result<Value, String>, usize, Option<usize>, String);

    fn rows(path: &Path) -> Vec<Seen> {
        read(path)
            .unwrap()
            .into_iter()
            .map(|r| {
                let raw = r.raw().into_owned();
                (r.value, r.row, r.line, raw)
            })
            .collect()
    }

    /// Blank lines are not records but count as lines; a line that is not JSON is a record with
    /// the reason, its text kept as read (the `\r` of a CRLF line dropped); rows count records.
    #[test]
    fn jsonl_records_keep_lines_rows_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.jsonl");
        std::fs::write(&f, "{\"a\":1}\n\n   \n{oops\r\n{\"b\":\"x\"}").unwrap();
        let got = rows(&f);
        assert_eq!(got.len(), 3);
        assert_eq!(
            (&got[0].0, got[0].1, got[0].2, got[0].3.as_str()),
            (&Ok(serde_json::json!({"a": 1})), 0, Some(1), "{\"a\":1}")
        );
        assert_eq!(
            (got[1].1, got[1].2, got[1].3.as_str()),
            (1, Some(4), "{oops")
        );
        let why = got[1].0.as_ref().unwrap_err();
        assert!(why.starts_with("not JSON: "), "{why}");
        assert_eq!(
            (&got[2].0, got[2].1, got[2].2, got[2].3.as_str()),
            (
                &Ok(serde_json::json!({"b": "x"})),
                2,
                Some(5),
                "{\"b\":\"x\"}"
            )
        );
        let numbers: Vec<usize> = read(&f).unwrap().iter().map(Record::number).collect();
        assert_eq!(numbers, [1, 4, 5]);
    }

    /// A `.jsonl.gz` of two gzip members reads as the plain text it holds.
    #[test]
    fn gzipped_jsonl_reads_as_plain() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.jsonl.gz");
        let mut bytes = Vec::new();
        for part in ["{\"n\":1}\n\n", "{\"n\":2}\n"] {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), Default::default());
            enc.write_all(part.as_bytes()).unwrap();
            bytes.extend(enc.finish().unwrap());
        }
        std::fs::write(&f, bytes).unwrap();
        assert_eq!(
            rows(&f),
            [
                (
                    Ok(serde_json::json!({"n": 1})),
                    0,
                    Some(1),
                    "{\"n\":1}".into()
                ),
                (
                    Ok(serde_json::json!({"n": 2})),
                    1,
                    Some(3),
                    "{\"n\":2}".into()
                ),
            ]
        );
    }

    /// Parquet rows are objects with every column: a `messages` list-of-struct cell an array of
    /// `{role, content}` objects, a null cell null; rows from 0, no line, numbered from 1; the raw
    /// text is the row's JSON.
    #[test]
    fn parquet_rows_read_as_objects() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.parquet");
        let schema: table::Schema = vec![
            ("id", table::Kind::Text),
            ("messages", table::Kind::Messages),
        ];
        let conv = serde_json::json!([
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}
        ]);
        table::write_parquet(
            &f,
            &schema,
            &[
                vec![Value::String("r0".into()), conv.clone()],
                vec![Value::String("r1".into()), Value::Null],
            ],
        )
        .unwrap();
        let got = read(&f).unwrap();
        assert_eq!(
            got.iter().map(|r| r.value.clone()).collect::<Vec<_>>(),
            [
                Ok(serde_json::json!({"id": "r0", "messages": conv})),
                Ok(serde_json::json!({"id": "r1", "messages": null})),
            ]
        );
        assert_eq!(
            got.iter()
                .map(|r| (r.row, r.line, r.number()))
                .collect::<Vec<_>>(),
            [(0, None, 1), (1, None, 2)]
        );
        assert_eq!(got[1].raw(), "{\"id\":\"r1\",\"messages\":null}");
    }

    /// A directory lists its table files sorted, not its reports, other files or subdirectories;
    /// named files keep the order given.
    #[test]
    fn directories_list_sorted_table_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("d");
        std::fs::create_dir_all(d.join("sub.jsonl")).unwrap();
        for f in [
            "b.parquet",
            "a.jsonl.gz",
            "c.jsonl",
            "rejects.parquet",
            "x.journal.jsonl",
            "stats.json",
            "notes.txt",
        ] {
            std::fs::write(d.join(f), "").unwrap();
        }
        let single = dir.path().join("z.jsonl");
        std::fs::write(&single, "").unwrap();
        assert_eq!(
            table_files(&[single.clone(), d.clone()]).unwrap(),
            [
                single,
                d.join("a.jsonl.gz"),
                d.join("b.parquet"),
                d.join("c.jsonl")
            ]
        );
    }

    /// A missing path, a file of another format and a directory without table files are refused,
    /// each naming the path, what was expected and what was found.
    #[test]
    fn bad_paths_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let err = table_files(std::slice::from_ref(&missing)).unwrap_err();
        assert!(matches!(&err, RecordsError::Missing { path } if *path == missing));
        let msg = err.to_string();
        assert!(
            msg.contains("nope.jsonl: not found") && msg.contains(".jsonl.gz"),
            "{msg}"
        );

        let csv = dir.path().join("x.csv");
        std::fs::write(&csv, "a,b\n").unwrap();
        let msg = table_files(&[csv]).unwrap_err().to_string();
        assert!(
            msg.contains("x.csv: a `.csv` file, not a .jsonl, .jsonl.gz or .parquet file"),
            "{msg}"
        );
        let report = dir.path().join("rejects.parquet");
        std::fs::write(&report, "").unwrap();
        let msg = table_files(&[report]).unwrap_err().to_string();
        assert!(msg.contains("`rejects.parquet`, a report"), "{msg}");

        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(empty.join("readme.md"), "").unwrap();
        let err = table_files(std::slice::from_ref(&empty)).unwrap_err();
        assert!(matches!(&err, RecordsError::NoFiles { path } if *path == empty));
        assert!(
            err.to_string().contains("a directory without .jsonl"),
            "{err}"
        );
    }
}
