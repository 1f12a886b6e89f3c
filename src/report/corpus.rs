//! What one corpus directory holds, measured: a generate step's `part-*.parquet` records (with
//! their constraint columns and teacher token counts), `rejects.parquet`, `stats.json` and
//! `manifest.json`; or any directory of documents (`.parquet`, `.jsonl`, `.txt`) with text only,
//! such as a reference corpus. Every record is read once; the texts of a bounded sample are kept.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use polars::prelude::{DataFrame, DataType};
use serde_json::Value;

use super::diversity::{self, Sampler};
use super::ReportError;
use crate::artifact::docs::{self, Doc};
use crate::artifact::shards::{self, Layout};
use crate::artifact::table;
use crate::generate::{exercises, stories, textbooks};

/// Columns of generated records that hold a drawn constraint (the rest are checks and provenance).
const CONSTRAINTS: [&str; 10] = [
    "topic",
    "subtopic",
    "audience",
    "style",
    "verb",
    "noun",
    "adjective",
    "features",
    "function_name",
    "difficulty",
];
/// The constraint that colours the projection and counts records per value, first present wins.
const LABELS: [&str; 4] = ["topic", "features", "difficulty", "style"];
/// Words that make an opening.
const OPENING_WORDS: usize = 3;

/// How often each value of one constraint was drawn, against the seed list it is drawn from.
#[derive(Debug, Clone)]
pub struct Coverage {
    pub column: String,
    pub counts: BTreeMap<String, u64>,
    /// Entries of phigen's built-in seed list for this column, where there is one.
    pub seeds: Option<usize>,
}

impl Coverage {
    pub fn entropy_bits(&self) -> f64 {
        diversity::entropy_bits(self.counts.values())
    }
}

/// A drop reason with its count and its first example.
#[derive(Debug, Clone)]
pub struct Drops {
    pub reason: String,
    pub count: u64,
    pub detail: String,
    pub text: String,
}

/// A corpus directory, measured.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub dir: PathBuf,
    /// `stats.json`, when the directory is a generate step's.
    pub stats: Option<Value>,
    pub manifest: Option<Value>,
    pub records: u64,
    /// Words of each record.
    pub words: Vec<u64>,
    /// Completion tokens of each record as the teacher counted them (generated corpora).
    pub tokens: Vec<u64>,
    /// Most common first words, with their counts.
    pub openings: Vec<(String, u64)>,
    pub coverage: Vec<Coverage>,
    pub drops: Vec<Drops>,
    /// The column [`Corpus::sample`]'s labels come from.
    pub label_column: Option<String>,
    /// The sampled records: text and label, least id hash first.
    pub sample: Vec<(String, String)>,
}

impl Corpus {
    pub fn kind(&self) -> Option<&str> {
        self.stats
            .as_ref()
            .or(self.manifest.as_ref())
            .and_then(|v| v["kind"].as_str())
    }

    /// The counts of the label column (records per topic).
    pub fn per_label(&self) -> Option<&Coverage> {
        let column = self.label_column.as_deref()?;
        self.coverage.iter().find(|c| c.column == column)
    }
}

/// Whether `dir` is a generate step's output: its records in `part-*.parquet` and a manifest.
pub fn is_generated(dir: &Path) -> bool {
    dir.join("manifest.json").is_file()
        && shards::list_files(dir, &Layout::Parts { prefix: "part" }).is_ok_and(|f| !f.is_empty())
}

fn read_json(path: &Path) -> Result<Option<Value>, ReportError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ReportError::BadJson {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ReportError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Counts as records arrive: lengths, openings, constraint values, the sample.
struct Tally {
    corpus: Corpus,
    openings: HashMap<String, u64>,
    counts: BTreeMap<String, BTreeMap<String, u64>>,
    sampler: Sampler<String>,
}

impl Tally {
    fn new(dir: &Path, sample: usize) -> Tally {
        Tally {
            corpus: Corpus {
                dir: dir.to_path_buf(),
                ..Corpus::default()
            },
            openings: HashMap::new(),
            counts: BTreeMap::new(),
            sampler: Sampler::new(sample),
        }
    }

    fn record(&mut self, id: &str, text: &str, label: impl FnOnce() -> String) {
        self.corpus.records += 1;
        let mut words = text.split_whitespace();
        let opening: Vec<String> = words
            .by_ref()
            .take(OPENING_WORDS)
            .map(str::to_lowercase)
            .collect();
        self.corpus
            .words
            .push((opening.len() + words.count()) as u64);
        if !opening.is_empty() {
            *self.openings.entry(opening.join(" ")).or_default() += 1;
        }
        self.sampler.offer(id, text, label);
    }

    fn finish(mut self) -> Corpus {
        let mut openings: Vec<(String, u64)> = self.openings.into_iter().collect();
        openings.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        openings.truncate(10);
        self.corpus.openings = openings;
        let kind = self.corpus.kind().map(str::to_string);
        self.corpus.coverage = self
            .counts
            .into_iter()
            .map(|(column, counts)| Coverage {
                seeds: kind.as_deref().and_then(|k| builtin_seeds(k, &column)),
                column,
                counts,
            })
            .collect();
        self.corpus.sample = self.sampler.into_sorted();
        self.corpus
    }
}

/// A generate step's directory: records with their columns, rejects, stats and manifest.
pub fn read_generated(dir: &Path, sample: usize) -> Result<Corpus, ReportError> {
    let mut tally = Tally::new(dir, sample);
    tally.corpus.stats = read_json(&dir.join("stats.json"))?;
    tally.corpus.manifest = read_json(&dir.join("manifest.json"))?;
    for path in shards::list_files(dir, &Layout::Parts { prefix: "part" })? {
        let polars_err = |source| ReportError::Polars {
            path: path.clone(),
            source,
        };
        // Only the columns measured: the prompts alone are about as large as the texts.
        let present = column_names(&path)?;
        let wanted: Vec<&str> = ["id", "text", "completion_tokens"]
            .iter()
            .chain(&CONSTRAINTS)
            .copied()
            .filter(|c| present.iter().any(|p| p == c))
            .collect();
        let df = table::read_columns(&path, &wanted)?;
        read_frame(&mut tally, &path, &df).map_err(polars_err)?;
    }
    let mut corpus = tally.finish();
    corpus.drops = read_drops(dir)?;
    Ok(corpus)
}

fn read_frame(tally: &mut Tally, path: &Path, df: &DataFrame) -> polars::prelude::PolarsResult<()> {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let has = |c: &str| names.iter().any(|n| n == c);
    let texts = df.column("text")?.str()?;
    let ids = if has("id") {
        Some(df.column("id")?.str()?)
    } else {
        None
    };
    if has("completion_tokens") {
        let tokens = df.column("completion_tokens")?.i64()?;
        let counted = tokens.iter().map(|t| t.unwrap_or(0).max(0) as u64);
        tally.corpus.tokens.extend(counted);
    }
    // Each constraint column's values per row (a list column: its entries joined by " + ").
    let mut columns: Vec<(&str, Vec<Vec<String>>)> = Vec::new();
    for c in CONSTRAINTS.iter().filter(|c| has(c)) {
        columns.push((c, values(df, c)?));
    }
    if tally.corpus.label_column.is_none() {
        tally.corpus.label_column = LABELS
            .iter()
            .find(|l| columns.iter().any(|(c, _)| c == *l))
            .map(|l| l.to_string());
    }
    let label_at = columns
        .iter()
        .position(|(c, _)| Some(*c) == tally.corpus.label_column.as_deref());
    for (row, text) in texts.iter().enumerate() {
        let Some(text) = text else { continue };
        let fallback;
        let id = match ids.and_then(|ids| ids.get(row)) {
            Some(id) => id,
            None => {
                fallback = format!("{}:{row}", path.display());
                &fallback
            }
        };
        for (c, vs) in &columns {
            let counts = tally.counts.entry(c.to_string()).or_default();
            for v in &vs[row] {
                *counts.entry(v.clone()).or_default() += 1;
            }
        }
        let label = || label_at.map_or(String::new(), |i| columns[i].1[row].join(" + "));
        tally.record(id, text, label);
    }
    Ok(())
}

/// The column names of a Parquet file, from its footer.
fn column_names(path: &Path) -> Result<Vec<String>, ReportError> {
    use polars::prelude::SerReader;
    let file = std::fs::File::open(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let schema = polars::prelude::ParquetReader::new(file)
        .schema()
        .map_err(|source| ReportError::Polars {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(schema.iter_names().map(|n| n.to_string()).collect())
}

/// The values of a text or text-list column, per row (none for a null).
fn values(df: &DataFrame, column: &str) -> polars::prelude::PolarsResult<Vec<Vec<String>>> {
    let c = df.column(column)?;
    if matches!(c.dtype(), DataType::List(_)) {
        let mut rows = Vec::with_capacity(c.len());
        for cell in c.list()?.series_iter() {
            let mut vs = Vec::new();
            if let Some(s) = cell {
                vs.extend(s.str()?.iter().flatten().map(str::to_string));
            }
            rows.push(vs);
        }
        Ok(rows)
    } else {
        Ok(c.str()?
            .iter()
            .map(|v| v.map(|v| vec![v.to_string()]).unwrap_or_default())
            .collect())
    }
}

/// Any directory of documents: texts only.
pub fn read_plain(dir: &Path, sample: usize) -> Result<Corpus, ReportError> {
    let mut tally = Tally::new(dir, sample);
    let inputs = docs::input_files(&[dir.to_path_buf()], Default::default())?;
    for f in &inputs.files {
        docs::read_documents(&f.path, |batch: Vec<Doc>| {
            for d in &batch {
                tally.record(&d.id, &d.text, String::new);
            }
            Ok::<(), ReportError>(())
        })?;
    }
    Ok(tally.finish())
}

/// `rejects.parquet`: each reason's count and first example.
fn read_drops(dir: &Path) -> Result<Vec<Drops>, ReportError> {
    let path = dir.join("rejects.parquet");
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let df = table::read_columns(&path, &["reason", "detail", "text"])?;
    let reasons = table::text_column(&df, &path, "reason")?;
    let details = table::text_column(&df, &path, "detail")?;
    let texts = table::text_column(&df, &path, "text")?;
    let mut by_reason: BTreeMap<String, Drops> = BTreeMap::new();
    for ((reason, detail), text) in reasons.into_iter().zip(details).zip(texts) {
        let reason = reason.unwrap_or_default();
        let d = by_reason.entry(reason.clone()).or_insert_with(|| Drops {
            reason,
            count: 0,
            detail: detail.unwrap_or_default(),
            text: text.unwrap_or_default(),
        });
        d.count += 1;
    }
    let mut drops: Vec<Drops> = by_reason.into_values().collect();
    drops.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.reason.cmp(&b.reason)));
    Ok(drops)
}

/// Entries of the built-in seed list a constraint column of `kind` is drawn from. A run given its
/// own lists (`--topics`, `--words`, …) drew from those instead; the page says so.
fn builtin_seeds(kind: &str, column: &str) -> Option<usize> {
    let plain = |text: &str| {
        textbooks::parse_plain("builtin", text)
            .ok()
            .map(|l| l.len())
    };
    let topics = || textbooks::parse_topics("builtin", textbooks::BUILTIN_TOPICS).ok();
    match (kind, column) {
        ("tinystories", _) => {
            let v = stories::Vocabulary::load(None).ok()?;
            match column {
                "verb" => Some(v.verbs.words.len()),
                "noun" => Some(v.nouns.words.len()),
                "adjective" => Some(v.adjectives.words.len()),
                "features" => Some(v.features.len()),
                _ => None,
            }
        }
        ("textbook", "topic") => {
            let mut names: Vec<String> = topics()?.into_iter().map(|t| t.topic).collect();
            names.sort();
            names.dedup();
            Some(names.len())
        }
        ("textbook", "subtopic") => Some(topics()?.iter().filter(|t| t.subtopic.is_some()).count()),
        ("textbook", "audience") => plain(textbooks::BUILTIN_AUDIENCES),
        ("textbook", "style") => plain(textbooks::BUILTIN_STYLES),
        ("exercise", "topic") => Some(topics()?.len()),
        ("exercise", "function_name") => {
            Some(plain(exercises::BUILTIN_VERBS)? * plain(exercises::BUILTIN_OBJECTS)?)
        }
        _ => None,
    }
}
