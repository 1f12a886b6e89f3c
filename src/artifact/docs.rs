//! Documents of a corpus, as every stage after generation reads them, and subsets of them written
//! back in the same format.
//!
//! Inputs are files or directory trees of `*.parquet` (column `text`, `id` when present; other
//! columns are carried along by [`write_subset`]), `*.jsonl` or `*.jsonl.gz` (field `text`, `id`
//! when present) and `*.txt` (documents separated by `<|endoftext|>`), read in sorted path order;
//! regular files only, as [`walk`] finds them. The reports stages write next to their data
//! ([`REPORT_FILES`]) and generation's crash journals are not documents.
//!
//! The low-level row reading is shared with the filter's code reader (`classify::input`, which
//! reads a `content` column and every other column too): the format of a file by its name
//! ([`Format::of`]), the rows of a jsonl file ([`jsonl_batches`]) and the id of a row
//! ([`row_ids`], [`row_id`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use polars::prelude::{BooleanChunked, DataFrame, DataType, NewChunkedArray};
use rayon::prelude::*;
use serde::Deserialize;

use super::atomic;
use super::table::{self, TableError};
use super::walk::{self, InputSkip, WalkError, WalkOptions};

/// Documents handed over at once by [`read_documents`], at most: a batch also ends once its texts
/// reach [`BATCH_BYTES`], so the memory of one batch is reused by the next instead of the whole
/// file's texts living at once (fresh pages cost a page fault and a zeroing each).
pub const BATCH_DOCS: usize = 4096;
pub const BATCH_BYTES: usize = 4 << 20;
pub const EOT_TEXT: &str = "<|endoftext|>";
/// Files stages write next to their output that hold no documents.
pub const REPORT_FILES: [&str; 3] = ["rejects.parquet", "removed.parquet", "contaminated.parquet"];

#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error("{path}:{line}: expected a JSON object with a string `text` field: {reason}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("no .parquet, .jsonl, .jsonl.gz or .txt files under {0:?}; point --input at corpus directories or files")]
    NoInputs(Vec<PathBuf>),
    #[error("{a} and {b} would both be written as {rel:?}; give inputs with distinct names")]
    SameName {
        a: PathBuf,
        b: PathBuf,
        rel: PathBuf,
    },
}

/// The table formats stages read, by file name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Parquet,
    /// `.jsonl`, or `.jsonl.gz` (one or more gzip members).
    Jsonl,
    /// `.txt`: documents separated by `<|endoftext|>`.
    Text,
}

impl Format {
    /// The format of the file named `name`; `None` for any other file, and for the reports and
    /// crash journals stages write next to their documents.
    pub fn of(name: &str) -> Option<Format> {
        if is_stage_report(name) {
            None
        } else if name.ends_with(".parquet") {
            Some(Format::Parquet)
        } else if name.ends_with(".jsonl") || name.ends_with(".jsonl.gz") {
            Some(Format::Jsonl)
        } else if name.ends_with(".txt") {
            Some(Format::Text)
        } else {
            None
        }
    }

    fn of_path(path: &Path) -> Option<Format> {
        Format::of(path.file_name()?.to_str()?)
    }
}

/// Whether a stage wrote the file named `name` next to its documents (a report or a journal).
pub fn is_stage_report(name: &str) -> bool {
    REPORT_FILES.contains(&name) || name.ends_with(".journal.jsonl")
}

/// A row's id: its own, else `PATH:ROW` (the same rule for every format and every reader).
pub fn row_id(path: &Path, row: usize, id: Option<String>) -> String {
    id.unwrap_or_else(|| format!("{}:{row}", path.display()))
}

/// The ids of a table's rows: its `id` column as text (numbers written as numbers are), where it
/// has one, else [`row_id`]'s `PATH:ROW`.
pub fn row_ids(df: &DataFrame, path: &Path) -> Vec<String> {
    let ids: Vec<Option<String>> = df
        .column("id")
        .ok()
        .and_then(|c| c.cast(&DataType::String).ok())
        .and_then(|c| {
            c.str()
                .ok()
                .map(|ca| ca.iter().map(|v| v.map(str::to_string)).collect())
        })
        .unwrap_or_else(|| vec![None; df.height()]);
    ids.into_iter()
        .enumerate()
        .map(|(row, id)| row_id(path, row, id))
        .collect()
}

/// The id a jsonl row gives itself: a string as it is, a number or other value as JSON text.
pub fn json_id(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Reads the jsonl file `path` (gunzipped when its name ends in `.gz`) in batches of its
/// non-blank lines: `each` gets the batch's buffer and each line's span in it with its 0-based
/// line number. Lines are read serially into one buffer, reused from batch to batch (so its pages
/// fault once); a batch ends at [`BATCH_DOCS`] lines or [`BATCH_BYTES`] bytes, so callers can
/// parse it in parallel.
pub fn jsonl_batches<E: From<DocsError>>(
    path: &Path,
    mut each: impl FnMut(&[u8], &[(Range<usize>, usize)]) -> Result<(), E>,
) -> Result<(), E> {
    let mut reader = BufReader::new(open_maybe_gz(path).map_err(io_err(path))?);
    // Room for a batch and the line that ends it, made once: growing it would copy the batch.
    let mut buf = Vec::with_capacity(2 * BATCH_BYTES);
    let (mut lines, mut row) = (Vec::new(), 0);
    loop {
        let start = buf.len();
        let read = reader.read_until(b'\n', &mut buf).map_err(io_err(path))?;
        if !buf[start..].trim_ascii().is_empty() {
            lines.push((start..buf.len(), row));
        }
        row += 1;
        if read == 0 || lines.len() == BATCH_DOCS || buf.len() >= BATCH_BYTES {
            if !lines.is_empty() {
                each(&buf, &lines)?;
            }
            buf.clear();
            lines.clear();
        }
        if read == 0 {
            return Ok(());
        }
    }
}

pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DocsError + '_ {
    move |source| DocsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One document: its id (from the file, else `PATH:ROW`), its text and its row in the file
/// (Parquet row, jsonl line or `.txt` piece), which [`write_subset`] selects by.
#[derive(Clone, Debug)]
pub struct Doc {
    pub id: String,
    pub text: String,
    pub row: usize,
}

/// An input file and where a stage writes its version of it under an output directory: the path
/// below the named input directory, prefixed by that directory's name (a named file: its name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InputFile {
    pub path: PathBuf,
    pub rel: PathBuf,
}

/// Opens `path` for reading, decompressing it when its name ends in `.gz` (one or more gzip members).
pub fn open_maybe_gz(path: &Path) -> std::io::Result<Box<dyn std::io::Read>> {
    let file = File::open(path)?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

/// The document files of a stage's inputs, and the entries passed over (see [`walk`]).
#[derive(Debug)]
pub struct Inputs {
    pub files: Vec<InputFile>,
    pub skipped: BTreeMap<InputSkip, u64>,
}

/// Every document file under `inputs`, sorted by path.
pub fn input_files(inputs: &[PathBuf], opts: WalkOptions) -> Result<Inputs, DocsError> {
    let found = walk::walk(inputs, opts)?;
    let mut files: Vec<InputFile> = found
        .files
        .into_iter()
        .filter(|f| Format::of_path(&f.path).is_some())
        .map(|f| InputFile {
            path: f.path,
            rel: f.rel,
        })
        .collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(DocsError::NoInputs(inputs.to_vec()));
    }
    let mut seen: BTreeMap<&Path, &Path> = BTreeMap::new();
    for f in &files {
        if let Some(a) = seen.insert(&f.rel, &f.path) {
            return Err(DocsError::SameName {
                a: a.to_path_buf(),
                b: f.path.clone(),
                rel: f.rel.clone(),
            });
        }
    }
    Ok(Inputs {
        files,
        skipped: found.skipped,
    })
}

/// Calls `each` with batches of at most [`BATCH_DOCS`] documents (and about [`BATCH_BYTES`] of
/// text) of one file, in file order.
/// Parquet rows with a null `text` and blank jsonl lines are not documents.
pub fn read_documents<E: From<DocsError>>(
    path: &Path,
    mut each: impl FnMut(Vec<Doc>) -> Result<(), E>,
) -> Result<(), E> {
    let mut batch = Vec::with_capacity(BATCH_DOCS);
    let mut bytes = 0;
    let mut push = |doc: Doc, batch: &mut Vec<Doc>| {
        bytes += doc.text.len();
        batch.push(doc);
        if batch.len() == BATCH_DOCS || bytes >= BATCH_BYTES {
            bytes = 0;
            each(std::mem::take(batch))
        } else {
            Ok(())
        }
    };
    match Format::of_path(path).unwrap_or(Format::Text) {
        Format::Parquet => {
            let has_id = table::read_columns(path, &["id"]).is_ok();
            let columns: &[&str] = if has_id { &["id", "text"] } else { &["text"] };
            let df = table::read_columns(path, columns).map_err(DocsError::from)?;
            let texts = table::text_column(&df, path, "text").map_err(DocsError::from)?;
            for ((row, text), id) in texts.into_iter().enumerate().zip(row_ids(&df, path)) {
                if let Some(text) = text {
                    push(Doc { id, text, row }, &mut batch)?;
                }
            }
        }
        Format::Jsonl => return read_jsonl(path, each),
        Format::Text => {
            let text = std::fs::read_to_string(path).map_err(io_err(path))?;
            for (row, piece) in text_pieces(&text).enumerate() {
                let id = row_id(path, row, None);
                push(
                    Doc {
                        id,
                        text: piece.to_string(),
                        row,
                    },
                    &mut batch,
                )?;
            }
        }
    }
    if batch.is_empty() {
        Ok(())
    } else {
        each(batch)
    }
}

/// The documents of a jsonl file, in batches parsed in parallel (parsing is most of the cost of
/// reading jsonl).
fn read_jsonl<E: From<DocsError>>(
    path: &Path,
    mut each: impl FnMut(Vec<Doc>) -> Result<(), E>,
) -> Result<(), E> {
    #[derive(Deserialize)]
    struct Row {
        text: String,
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    let parse = |line: &[u8], row: usize| -> Result<Doc, DocsError> {
        let parsed: Row = serde_json::from_slice(line).map_err(|e| DocsError::Jsonl {
            path: path.to_path_buf(),
            line: row + 1,
            reason: e.to_string(),
        })?;
        Ok(Doc {
            id: row_id(path, row, json_id(parsed.id.as_ref())),
            text: parsed.text,
            row,
        })
    };
    jsonl_batches(path, |buf, lines| {
        let parsed: Vec<Result<Doc, DocsError>> = lines
            .par_iter()
            .map(|(span, row)| parse(&buf[span.clone()], *row))
            .collect();
        // The first bad line in file order is the one reported.
        each(parsed.into_iter().collect::<Result<Vec<Doc>, _>>()?)
    })
}

fn text_pieces(text: &str) -> impl Iterator<Item = &str> {
    text.split(EOT_TEXT)
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Copies `src` to `dst` atomically: the subset that drops nothing.
pub fn copy_whole(src: &Path, dst: &Path) -> Result<(), DocsError> {
    stage_whole(src, dst)?.commit().map_err(io_err(dst))
}

/// Copies `src` to `dst`'s temp name (fsynced), to be put in place by [`atomic::Staged::commit`].
pub fn stage_whole(src: &Path, dst: &Path) -> Result<atomic::Staged, DocsError> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let mut from = File::open(src).map_err(io_err(src))?;
    let (staged, _) =
        atomic::stage_with(dst, |to| std::io::copy(&mut from, to)).map_err(io_err(dst))?;
    Ok(staged)
}

/// Writes `src` to `dst` (atomically, same format, every column) without the document rows
/// `drop` names. Parquet rows with a null `text` are kept; blank jsonl lines are not.
pub fn write_subset(src: &Path, dst: &Path, drop: impl Fn(usize) -> bool) -> Result<(), DocsError> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    match Format::of_path(src).unwrap_or(Format::Text) {
        Format::Parquet => {
            let df = table::read_frame(src, None)?;
            let mask: Vec<bool> = (0..df.height()).map(|row| !drop(row)).collect();
            let mut kept = df
                .filter(&BooleanChunked::from_slice("keep".into(), &mask))
                .map_err(|source| TableError::Read {
                    path: src.to_path_buf(),
                    source,
                })?;
            table::write_frame(dst, &mut kept)?;
        }
        Format::Jsonl => {
            let mut reader = BufReader::new(open_maybe_gz(src).map_err(io_err(src))?);
            let gz = src.extension().is_some_and(|e| e == "gz");
            atomic::write_with(dst, |file| {
                let out = std::io::BufWriter::with_capacity(1 << 20, file);
                // A gzipped input is written gzipped, under the same name.
                if gz {
                    let mut out = flate2::write::GzEncoder::new(out, Default::default());
                    copy_kept_lines(&mut reader, &mut out, &drop)?;
                    out.finish()?.flush()
                } else {
                    let mut out = out;
                    copy_kept_lines(&mut reader, &mut out, &drop)?;
                    out.flush()
                }
            })
            .map_err(io_err(dst))?;
        }
        Format::Text => {
            let text = std::fs::read_to_string(src).map_err(io_err(src))?;
            let mut kept = String::with_capacity(text.len());
            for (row, piece) in text_pieces(&text).enumerate() {
                if !drop(row) {
                    kept.push_str(piece);
                    kept.push('\n');
                    kept.push_str(EOT_TEXT);
                    kept.push('\n');
                }
            }
            atomic::write_bytes(dst, kept.as_bytes()).map_err(io_err(dst))?;
        }
    }
    Ok(())
}

/// The non-blank lines of a jsonl file that `drop` does not name, each ended by one `\n`.
fn copy_kept_lines(
    reader: &mut impl BufRead,
    out: &mut impl Write,
    drop: &impl Fn(usize) -> bool,
) -> std::io::Result<()> {
    let mut line = Vec::new();
    for row in 0.. {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        if !line.trim_ascii().is_empty() && !drop(row) {
            let text = line.strip_suffix(b"\n").unwrap_or(&line);
            out.write_all(text.strip_suffix(b"\r").unwrap_or(text))?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs_of(path: &Path) -> Vec<(String, String, usize)> {
        let mut all = Vec::new();
        read_documents(path, |batch| {
            all.extend(batch.into_iter().map(|d| (d.id, d.text, d.row)));
            Ok::<(), DocsError>(())
        })
        .unwrap();
        all
    }

    /// Each format drops exactly the named rows and keeps every other column and document as it was.
    #[test]
    fn subsets_keep_format_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("a.jsonl");
        std::fs::write(
            &jsonl,
            "{\"text\":\"one\",\"k\":1}\n\n{\"text\":\"two\",\"k\":2}\n{\"text\":\"three\"}\n",
        )
        .unwrap();
        write_subset(&jsonl, &dir.path().join("out/a.jsonl"), |row| row == 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/a.jsonl")).unwrap(),
            "{\"text\":\"one\",\"k\":1}\n{\"text\":\"three\"}\n"
        );
        let txt = dir.path().join("b.txt");
        std::fs::write(&txt, "first<|endoftext|>\n\nsecond<|endoftext|>third").unwrap();
        write_subset(&txt, &dir.path().join("out/b.txt"), |row| row == 1).unwrap();
        let texts: Vec<String> = docs_of(&dir.path().join("out/b.txt"))
            .into_iter()
            .map(|d| d.1)
            .collect();
        assert_eq!(texts, ["first", "third"]);

        let pq = dir.path().join("c.parquet");
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = ["x", "y", "z"]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"id": format!("id{i}"), "text": t, "n": i})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect();
        let schema = vec![
            ("id", table::Kind::Text),
            ("text", table::Kind::Text),
            ("n", table::Kind::Int),
        ];
        table::write_parquet(&pq, &schema, &rows).unwrap();
        write_subset(&pq, &dir.path().join("out/c.parquet"), |row| row == 0).unwrap();
        let out = table::read_frame(&dir.path().join("out/c.parquet"), None).unwrap();
        let p = dir.path().join("out/c.parquet");
        assert_eq!(
            table::int_column(&out, &p, "n").unwrap(),
            vec![Some(1), Some(2)]
        );
        assert_eq!(
            docs_of(&p).into_iter().map(|d| d.0).collect::<Vec<_>>(),
            ["id1", "id2"]
        );
    }

    #[test]
    fn inputs_skip_reports_and_journals_and_refuse_name_clashes() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "d/part-00000.parquet",
            "d/removed.parquet",
            "d/records.journal.jsonl",
            "d/x.jsonl",
            "d/notes.md",
        ] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        let files = input_files(&[dir.path().join("d")], WalkOptions::default())
            .unwrap()
            .files;
        let rels: Vec<_> = files.iter().map(|f| f.rel.clone()).collect();
        assert_eq!(
            rels,
            [
                PathBuf::from("d/part-00000.parquet"),
                PathBuf::from("d/x.jsonl")
            ]
        );
        std::fs::create_dir_all(dir.path().join("e/d")).unwrap();
        std::fs::write(dir.path().join("e/d/x.jsonl"), "").unwrap();
        let err = input_files(
            &[dir.path().join("d"), dir.path().join("e/d")],
            WalkOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("distinct names"), "{err}");
    }

    /// A gzipped jsonl is read like a plain one and its subset is written gzipped under the same
    /// name; ids follow one rule in every format: a string id as is, a number as its JSON text,
    /// none as `PATH:ROW` (the expected ids are written out by hand).
    #[test]
    fn gzipped_jsonl_and_ids_follow_one_rule() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("a.jsonl.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), Default::default());
        enc.write_all(b"{\"text\":\"one\",\"id\":7}\n\n{\"text\":\"two\",\"id\":\"b\"}\n{\"text\":\"three\"}\n")
            .unwrap();
        enc.finish().unwrap();
        assert_eq!(Format::of("a.jsonl.gz"), Some(Format::Jsonl));
        assert_eq!(Format::of("rejects.parquet"), None);
        assert_eq!(
            docs_of(&gz),
            [
                ("7".to_string(), "one".to_string(), 0),
                ("b".to_string(), "two".to_string(), 2),
                (format!("{}:3", gz.display()), "three".to_string(), 3)
            ]
        );
        let out = dir.path().join("out/a.jsonl.gz");
        write_subset(&gz, &out, |row| row == 2).unwrap();
        let mut plain = String::new();
        flate2::read::GzDecoder::new(File::open(&out).unwrap())
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, "{\"text\":\"one\",\"id\":7}\n{\"text\":\"three\"}\n");

        // A Parquet `id` column of numbers, with a null: the numbers as text, the null PATH:ROW.
        let pq = dir.path().join("n.parquet");
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = [Some(5), None]
            .iter()
            .map(|id| {
                serde_json::json!({"id": id, "text": "x"})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect();
        let schema = vec![("id", table::Kind::Int), ("text", table::Kind::Text)];
        table::write_parquet(&pq, &schema, &rows).unwrap();
        let ids: Vec<String> = docs_of(&pq).into_iter().map(|d| d.0).collect();
        assert_eq!(ids, ["5".to_string(), format!("{}:1", pq.display())]);
    }
}
