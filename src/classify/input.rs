//! Code files or web texts to rate and score, as the filter stage reads them.
//!
//! `--input` names directories or files of three kinds: loose files (by extension, `.py` by
//! default for code, none for web text), Parquet files with a `content` column (The Stack's
//! layout; `text` also works) and jsonl / jsonl.gz files with a `content` or `text` field; with
//! `--preset web`, only `text` (FineWeb's layout). Other columns are carried along.
//! The unit of work is a [`Part`]: one Parquet or jsonl file, or up to [`FILES_PER_PART`] loose
//! files of one input directory in path order. A part is loaded whole, so memory is bounded by the
//! largest input file (or part), never by the corpus.
//!
//! Files that cannot be code are not errors: each gets a [`Skip`] reason that is counted.
//! Directories are walked as [`walk`] does for every stage: regular files only, symlinks out of
//! the input tree only with `--follow-symlinks`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame, IntoColumn, NamedFrom, Series};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::artifact::docs::{self, Format};
use crate::artifact::table;
use crate::artifact::walk::{self, InputSkip, WalkOptions};

use super::preset::Preset;
use super::{io_err, ClassifyError};

/// Loose source files in one part.
pub const FILES_PER_PART: usize = 1024;
/// Bytes looked at for a NUL, which marks a binary file (as git does).
const BINARY_PROBE: usize = 8000;

/// Why a file is not scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    Binary,
    InvalidUtf8,
    Empty,
    Oversized,
    /// A table row whose content is null or not a string.
    NoContent,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Binary => "binary",
            Skip::InvalidUtf8 => "invalid_utf8",
            Skip::Empty => "empty",
            Skip::Oversized => "oversized",
            Skip::NoContent => "no_content",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// Loose files: (path, id = the path below the input's parent directory).
    Files(Vec<(PathBuf, String)>),
    Parquet(PathBuf),
    Jsonl(PathBuf),
}

/// A unit of work and where its outputs go below an output directory (`rel`, always `.parquet`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Part {
    pub rel: PathBuf,
    pub source: Source,
}

impl Part {
    pub fn paths(&self) -> Vec<&Path> {
        match &self.source {
            Source::Files(files) => files.iter().map(|(p, _)| p.as_path()).collect(),
            Source::Parquet(p) | Source::Jsonl(p) => vec![p.as_path()],
        }
    }

    /// Changes when any of its files is added, removed, resized or touched.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        for p in self.paths() {
            h.update(p.to_string_lossy().as_bytes());
            if let Ok(m) = std::fs::metadata(p) {
                h.update(&m.len().to_le_bytes());
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                h.update(&mtime.to_le_bytes());
            }
        }
        h.finalize().to_hex()[..16].to_string()
    }
}

/// One file (or row): its id and its text, or why it has none.
#[derive(Clone, Debug)]
pub struct Code {
    pub id: String,
    pub content: Result<String, Skip>,
}

/// A loaded part: its rows as a frame (every input column; loose files get `id` and `text`),
/// the name of the content column, and the code of each row.
pub struct Loaded {
    pub frame: DataFrame,
    pub content_column: String,
    pub rows: Vec<Code>,
}

/// Every part under `inputs`, sorted; `extensions` are the loose files wanted (without dots),
/// `preset` says what the inputs hold (for the error when there are none). Also the input
/// entries that were not read, by reason.
pub fn parts(
    inputs: &[PathBuf],
    extensions: &[String],
    preset: Preset,
    opts: WalkOptions,
) -> Result<(Vec<Part>, BTreeMap<InputSkip, u64>), ClassifyError> {
    let mut parts = Vec::new();
    let found = walk::walk(inputs, opts)?;
    let mut loose: BTreeMap<(usize, PathBuf), Vec<(PathBuf, String)>> = BTreeMap::new();
    for walk::Found { path, rel, input } in found.files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if docs::is_stage_report(name) {
            continue;
        }
        let rel_parquet = |r: &Path| {
            let s = r.to_string_lossy();
            let stem = s
                .strip_suffix(".gz")
                .unwrap_or(&s)
                .trim_end_matches(".jsonl")
                .trim_end_matches(".parquet")
                .to_string();
            PathBuf::from(stem + ".parquet")
        };
        let format = Format::of(name);
        if format == Some(Format::Parquet) {
            parts.push(Part {
                rel: rel_parquet(&rel),
                source: Source::Parquet(path),
            });
        } else if format == Some(Format::Jsonl) {
            parts.push(Part {
                rel: rel_parquet(&rel),
                source: Source::Jsonl(path),
            });
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| extensions.iter().any(|x| x.trim_start_matches('.') == e))
        {
            // Loose files are grouped by the input they were found under, named by its name
            // (the first component of `rel`).
            let base = rel
                .components()
                .next()
                .map_or_else(PathBuf::new, |c| PathBuf::from(c.as_os_str()));
            let id = rel.to_string_lossy().into_owned();
            loose.entry((input, base)).or_default().push((path, id));
        }
    }
    for ((_, dir), mut files) in loose {
        files.sort();
        for (k, chunk) in files.chunks(FILES_PER_PART).enumerate() {
            parts.push(Part {
                rel: dir.join(format!("files-{k:05}.parquet")),
                source: Source::Files(chunk.to_vec()),
            });
        }
    }
    parts.sort();
    let mut seen: BTreeMap<&Path, &Part> = BTreeMap::new();
    for p in &parts {
        if let Some(a) = seen.insert(&p.rel, p) {
            return Err(ClassifyError::SameName {
                a: a.paths()[0].to_path_buf(),
                b: p.paths()[0].to_path_buf(),
                rel: p.rel.clone(),
            });
        }
    }
    if parts.is_empty() {
        return Err(ClassifyError::NoInputs {
            inputs: inputs.to_vec(),
            extensions: extensions.to_vec(),
            preset,
        });
    }
    Ok((parts, found.skipped))
}

/// The text of a file's bytes, or why it is not code.
fn classify_bytes(bytes: Vec<u8>, max_bytes: u64) -> Result<String, Skip> {
    if bytes.len() as u64 > max_bytes {
        return Err(Skip::Oversized);
    }
    if bytes[..bytes.len().min(BINARY_PROBE)].contains(&0) {
        return Err(Skip::Binary);
    }
    let text = String::from_utf8(bytes).map_err(|_| Skip::InvalidUtf8)?;
    if text.trim().is_empty() {
        return Err(Skip::Empty);
    }
    Ok(text)
}

/// Loads one part; a table's text is in the first of `preset`'s text columns it has. Files larger
/// than `max_bytes` are not read.
pub fn load(part: &Part, max_bytes: u64, preset: Preset) -> Result<Loaded, ClassifyError> {
    match &part.source {
        Source::Files(files) => {
            let mut rows = Vec::with_capacity(files.len());
            for (path, id) in files {
                let size = std::fs::metadata(path).map_err(io_err(path))?.len();
                let content = if size > max_bytes {
                    Err(Skip::Oversized)
                } else {
                    let bytes = std::fs::read(path).map_err(io_err(path))?;
                    classify_bytes(bytes, max_bytes)
                };
                rows.push(Code {
                    id: id.clone(),
                    content,
                });
            }
            let ids: Vec<&str> = rows.iter().map(|c| c.id.as_str()).collect();
            let texts: Vec<Option<&str>> = rows.iter().map(|c| c.content.as_deref().ok()).collect();
            let frame = DataFrame::new(
                rows.len(),
                vec![
                    Series::new("id".into(), ids).into_column(),
                    Series::new("text".into(), texts).into_column(),
                ],
            )
            .expect("two columns of equal length");
            Ok(Loaded {
                frame,
                content_column: "text".into(),
                rows,
            })
        }
        Source::Parquet(path) => {
            let frame = table::read_frame(path, None)?;
            let names: Vec<String> = frame
                .get_column_names()
                .iter()
                .map(|s| s.to_string())
                .collect();
            let column = content_column(path, &names, preset)?;
            let texts = table::text_column(&frame, path, &column)?;
            let ids = docs::row_ids(&frame, path);
            let rows = texts
                .into_iter()
                .zip(ids)
                .map(|(t, id)| Code {
                    id,
                    content: t
                        .ok_or(Skip::NoContent)
                        .and_then(|t| classify_bytes(t.into_bytes(), max_bytes)),
                })
                .collect();
            Ok(Loaded {
                frame,
                content_column: column,
                rows,
            })
        }
        Source::Jsonl(path) => load_jsonl(path, max_bytes, preset),
    }
}

fn content_column(path: &Path, names: &[String], preset: Preset) -> Result<String, ClassifyError> {
    preset
        .text_columns()
        .iter()
        .find(|c| names.iter().any(|n| n == *c))
        .map(|c| c.to_string())
        .ok_or_else(|| ClassifyError::NoContentColumn {
            path: path.to_path_buf(),
            found: names.to_vec(),
            preset,
        })
}

fn load_jsonl(path: &Path, max_bytes: u64, preset: Preset) -> Result<Loaded, ClassifyError> {
    let mut objects: Vec<Map<String, Value>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    docs::jsonl_batches(path, |buf, lines| {
        for (span, row) in lines {
            let obj: Map<String, Value> =
                serde_json::from_slice(&buf[span.clone()]).map_err(|e| ClassifyError::Jsonl {
                    path: path.to_path_buf(),
                    line: row + 1,
                    reason: e.to_string(),
                })?;
            for k in obj.keys() {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
            objects.push(obj);
        }
        Ok::<(), ClassifyError>(())
    })?;
    let column = content_column(path, &names, preset)?;
    let cell = |o: &Map<String, Value>, k: &str| match o.get(k) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => Some(v.to_string()),
    };
    let columns: Vec<Column> = names
        .iter()
        .map(|k| {
            let values: Vec<Option<String>> = objects.iter().map(|o| cell(o, k)).collect();
            Series::new(k.as_str().into(), values).into_column()
        })
        .collect();
    let frame = DataFrame::new(objects.len(), columns).expect("columns of equal length");
    let ids = docs::row_ids(&frame, path);
    let rows = objects
        .iter()
        .zip(ids)
        .map(|(o, id)| Code {
            id,
            content: match o.get(&column) {
                Some(Value::String(s)) => classify_bytes(s.clone().into_bytes(), max_bytes),
                _ => Err(Skip::NoContent),
            },
        })
        .collect();
    Ok(Loaded {
        frame,
        content_column: column,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Each kind of bad file gets its reason; good ones their text; ids are paths below the input.
    #[test]
    fn loose_files_are_read_or_skipped_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let stack = dir.path().join("stack");
        std::fs::create_dir_all(stack.join("pkg")).unwrap();
        std::fs::write(stack.join("pkg/good.py"), "def f():\n    return 1\n").unwrap();
        std::fs::write(stack.join("binary.py"), b"abc\0def").unwrap();
        std::fs::write(stack.join("latin1.py"), b"x = '\xe9'\n").unwrap();
        std::fs::write(stack.join("empty.py"), " \n\n").unwrap();
        std::fs::write(stack.join("big.py"), "x = 1\n".repeat(100)).unwrap();
        std::fs::write(stack.join("notes.md"), "not code").unwrap();
        let parts = parts(
            std::slice::from_ref(&stack),
            &["py".into()],
            Preset::Code,
            WalkOptions::default(),
        )
        .unwrap()
        .0;
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].rel, PathBuf::from("stack/files-00000.parquet"));
        let loaded = load(&parts[0], 200, Preset::Code).unwrap();
        let got: Vec<(String, Result<String, Skip>)> =
            loaded.rows.into_iter().map(|c| (c.id, c.content)).collect();
        assert_eq!(
            got,
            vec![
                ("stack/big.py".into(), Err(Skip::Oversized)),
                ("stack/binary.py".into(), Err(Skip::Binary)),
                ("stack/empty.py".into(), Err(Skip::Empty)),
                ("stack/latin1.py".into(), Err(Skip::InvalidUtf8)),
                (
                    "stack/pkg/good.py".into(),
                    Ok("def f():\n    return 1\n".into())
                ),
            ]
        );
    }

    /// The Stack's layout: `content` plus other columns, in Parquet and in gzipped jsonl.
    #[test]
    fn tables_keep_their_columns() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("data.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
        writeln!(
            enc,
            r#"{{"content": "print(1)\n", "repo": "a/b", "stars": 3}}"#
        )
        .unwrap();
        writeln!(enc, r#"{{"content": null, "repo": "c/d"}}"#).unwrap();
        enc.finish().unwrap();
        let mut df = DataFrame::new(
            2,
            vec![
                Series::new("content".into(), ["x = 1\n", ""]).into_column(),
                Series::new("path".into(), ["a.py", "b.py"]).into_column(),
            ],
        )
        .unwrap();
        table::write_frame(&dir.path().join("t.parquet"), &mut df).unwrap();
        let parts = parts(
            &[dir.path().to_path_buf()],
            &["py".into()],
            Preset::Code,
            WalkOptions::default(),
        )
        .unwrap()
        .0;
        assert_eq!(parts.len(), 2);
        let j = load(&parts[0], 1 << 20, Preset::Code).unwrap();
        assert_eq!(j.content_column, "content");
        assert_eq!(j.frame.get_column_names(), ["content", "repo", "stars"]);
        assert_eq!(j.rows[0].content, Ok("print(1)\n".into()));
        assert_eq!(j.rows[1].content, Err(Skip::NoContent));
        assert!(j.rows[0].id.ends_with("data.jsonl.gz:0"));
        let p = load(&parts[1], 1 << 20, Preset::Code).unwrap();
        assert_eq!(p.frame.get_column_names(), ["content", "path"]);
        assert_eq!(p.rows[1].content, Err(Skip::Empty));
    }

    #[test]
    fn a_table_without_content_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.jsonl"), "{\"code\": \"a\"}\n").unwrap();
        let parts = parts(
            &[dir.path().to_path_buf()],
            &["py".into()],
            Preset::Code,
            WalkOptions::default(),
        )
        .unwrap()
        .0;
        let err = load(&parts[0], 100, Preset::Code)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("x.jsonl") && err.contains("content") && err.contains("code"),
            "{err}"
        );
    }

    /// `--preset web` reads FineWeb's `text` field and no loose files by default; a table with
    /// only `content` is refused naming the file, the preset, the column wanted and what to do.
    #[test]
    fn web_text_is_read_from_text_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("web.jsonl"),
            "{\"text\": \"The water cycle has four stages.\", \"url\": \"u\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("loose.py"), "x = 1\n").unwrap();
        let walk = WalkOptions::default();
        let web = Preset::Web.default_extensions();
        let (found, _) = parts(&[dir.path().to_path_buf()], &web, Preset::Web, walk).unwrap();
        assert_eq!(found.len(), 1, "the loose .py file is not web text");
        let loaded = load(&found[0], 1 << 20, Preset::Web).unwrap();
        assert_eq!(loaded.content_column, "text");
        assert_eq!(
            loaded.rows[0].content,
            Ok("The water cycle has four stages.".into())
        );
        std::fs::write(dir.path().join("web.jsonl"), "{\"content\": \"a\"}\n").unwrap();
        let e = load(&found[0], 1 << 20, Preset::Web)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("web.jsonl") && e.contains("--preset web") && e.contains("`text`"),
            "{e}"
        );
        std::fs::remove_file(dir.path().join("web.jsonl")).unwrap();
        let e = parts(&[dir.path().to_path_buf()], &web, Preset::Web, walk)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--preset web") && e.contains("--ext"), "{e}");
    }
}
