//! Labels for the classifier: a teacher rates a deterministic sample of the input files
//! (`phigen annotate`), or the user brings a labels file.
//!
//! Annotation is a corpus of the generation engine ([`Annotate`]): slot `i` rates the `i`-th file
//! of the sample, so it inherits resume, retries, the cost cap and `--dry-run`. The sample is the
//! `n` files with the smallest `xxh3(seed, id)` — a bottom-k sample, so a larger `n` extends a
//! smaller one — and is recorded in `OUT/sample.json`; a later run over changed inputs that would
//! rate other files is refused rather than mixing two samples.

use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};

use polars::prelude::{DataFrame, PolarsResult};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::input::{self, Part};
use super::{io_err, ClassifyError};
use crate::artifact::atomic;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::generate::prompt::Template;
use crate::generate::{Corpus, Drop, DropReason};

pub const BUILTIN_TEMPLATE: &str = include_str!("../../prompts/educational-value.txt");
const RECORDS: Layout = Layout::Parts { prefix: "part" };

row! {
    /// A file chosen for rating: its id, a hash of its full text and its head as the teacher sees
    /// it (in the prompt, not in the record).
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Sampled {
        pub file_id: String,
        pub content_hash: String,
    } not columns {
        #[serde(skip)]
        pub head: String,
    }
}

/// The same file with the same content (the head is not recorded in `sample.json`).
impl PartialEq for Sampled {
    fn eq(&self, other: &Self) -> bool {
        self.file_id == other.file_id && self.content_hash == other.content_hash
    }
}

/// Draws the sample: the `n` readable files with the smallest `xxh3(seed, id)`, in that order.
/// Only the head (`max_chars` characters) of each is kept.
pub fn draw_sample(
    parts: &[Part],
    n: usize,
    seed: u64,
    max_bytes: u64,
    max_chars: usize,
) -> Result<Vec<Sampled>, ClassifyError> {
    let mut heap: BinaryHeap<(u64, String, String, String)> = BinaryHeap::new();
    for part in parts {
        for code in input::load(part, max_bytes)?.rows {
            let Ok(text) = code.content else { continue };
            let key = xxh3_64_with_seed(code.id.as_bytes(), seed);
            if heap.len() == n && heap.peek().is_some_and(|top| top.0 <= key) {
                continue;
            }
            let hash = blake3::hash(text.as_bytes()).to_hex()[..16].to_string();
            let head: String = text.chars().take(max_chars).collect();
            heap.push((key, code.id, hash, head));
            if heap.len() > n {
                heap.pop();
            }
        }
    }
    Ok(heap
        .into_sorted_vec()
        .into_iter()
        .map(|(_, file_id, content_hash, head)| Sampled {
            file_id,
            content_hash,
            head,
        })
        .collect())
}

/// Checks `OUT/sample.json` against a fresh sample (which must extend it) and records the latter.
/// `OUT` may be neither one of `inputs` nor inside or above one, and is locked while it is written
/// (the ratings themselves are written under the generation engine's lock).
pub fn record_sample(
    out: &Path,
    inputs: &[PathBuf],
    seed: u64,
    sample: &[Sampled],
) -> Result<(), ClassifyError> {
    crate::artifact::outdir::check_apart(out, inputs)?;
    let _lock = crate::artifact::outdir::DirLock::exclusive(out)?;
    let path = out.join("sample.json");
    #[derive(Serialize, Deserialize)]
    struct Recorded {
        seed: u64,
        files: Vec<Sampled>,
    }
    if let Ok(bytes) = std::fs::read(&path) {
        let old: Recorded = serde_json::from_slice(&bytes).map_err(|e| ClassifyError::Bad {
            path: path.clone(),
            reason: format!("not a phigen sample file: {e}"),
        })?;
        let common = old.files.len().min(sample.len());
        if old.seed != seed || old.files[..common] != sample[..common] {
            let first = (0..common).find(|&i| old.files[i] != sample[i]);
            return Err(ClassifyError::SampleChanged {
                path,
                detail: match first {
                    Some(i) if old.files[i].file_id == sample[i].file_id => format!(
                        "file {i} of the sample, {}, has changed since it was drawn",
                        sample[i].file_id
                    ),
                    Some(i) => format!(
                        "file {i} of the sample was {} and would now be {}",
                        old.files[i].file_id, sample[i].file_id
                    ),
                    None => format!("it was drawn with --seed {}", old.seed),
                },
            });
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    atomic::write_json(
        &path,
        &Recorded {
            seed,
            files: sample.to_vec(),
        },
    )
    .map_err(io_err(&path))
}

/// The annotation corpus of the generation engine.
pub struct Annotate {
    template: Template,
    sample: Vec<Sampled>,
}

impl Annotate {
    pub fn new(template: Template, sample: Vec<Sampled>) -> Annotate {
        Annotate { template, sample }
    }
}

row! {
    #[derive(Clone, Debug)]
    pub struct Rating {
        pub score: i64,
        pub reason: String,
    }
}

/// The score of an answer: the last line that reads `Score: N` (any case, `**` allowed), N in 0..=5;
/// the reason is the text before it.
pub fn parse_rating(text: &str) -> Result<Rating, Drop> {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate().rev() {
        let clean = line.replace('*', "");
        let lower = clean.trim().to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("score") else {
            continue;
        };
        let digits: String = rest
            .trim_start_matches([':', ' ', '='])
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        return match digits.parse::<i64>() {
            Ok(score) if (0..=5).contains(&score) => Ok(Rating {
                score,
                reason: lines[..i].join(" ").trim().to_string(),
            }),
            _ => Err(Drop::new(
                DropReason::Unparseable,
                format!("`{}` is not a score from 0 to 5", line.trim()),
            )),
        };
    }
    Err(Drop::new(
        DropReason::Unparseable,
        "no line of the form `Score: N`",
    ))
}

impl Corpus for Annotate {
    type Constraints = Sampled;
    type Checks = Rating;

    fn kind(&self) -> &'static str {
        "educational_value"
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> Sampled {
        self.sample[slot as usize].clone()
    }

    fn prompt_vars(&self, s: &Sampled) -> Vec<(&'static str, String)> {
        vec![("path", s.file_id.clone()), ("code", s.head.clone())]
    }

    fn check(&self, _: &Sampled, text: &str) -> impl Future<Output = Result<Rating, Drop>> + Send {
        std::future::ready(parse_rating(text))
    }

    fn unique_answers(&self) -> bool {
        false
    }

    fn word_bounds(&self) -> (usize, usize) {
        (2, 400)
    }

    fn typical_completion_tokens(&self) -> u64 {
        60
    }

    fn summary_columns(&self) -> Vec<&'static str> {
        vec!["score"]
    }

    fn summarize(&self, df: &DataFrame) -> PolarsResult<Value> {
        let mut hist = [0u64; 6];
        for s in df.column("score")?.i64()?.iter().flatten() {
            hist[s.clamp(0, 5) as usize] += 1;
        }
        Ok(json!({ "rated": df.height(), "score_histogram": hist }))
    }
}

/// A label as given: a 0–5 score, or a yes/no.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Label {
    Score(f64),
    Binary(bool),
}

impl Label {
    pub fn positive(self, positive_at: f64) -> bool {
        match self {
            Label::Score(s) => s >= positive_at,
            Label::Binary(b) => b,
        }
    }

    fn parse(s: &str) -> Option<Label> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" | "yes" | "true" | "good" => Some(Label::Binary(true)),
            "low" | "no" | "false" | "bad" => Some(Label::Binary(false)),
            other => other.parse().ok().map(Label::Score),
        }
    }
}

/// Labels by file id from an annotation directory (`phigen annotate --out`), a `path,label` CSV
/// (`id` may stand for `path`, `score` for `label`) or a Parquet file with those columns.
pub fn load_labels(path: &Path) -> Result<HashMap<String, Label>, ClassifyError> {
    let bad = |reason: String| ClassifyError::Bad {
        path: path.to_path_buf(),
        reason,
    };
    let mut labels = HashMap::new();
    if path.is_dir() {
        for file in shards::list_files(path, &RECORDS)? {
            let df = table::read_columns(&file, &["file_id", "score"])?;
            let ids = table::text_column(&df, &file, "file_id")?;
            let scores = table::int_column(&df, &file, "score")?;
            for (id, score) in ids.into_iter().zip(scores) {
                if let (Some(id), Some(score)) = (id, score) {
                    labels.insert(id, Label::Score(score as f64));
                }
            }
        }
        if labels.is_empty() {
            return Err(bad("no ratings (part-*.parquet) here; run `phigen annotate --out` on this directory first, or pass a labels file".into()));
        }
        return Ok(labels);
    }
    let name = path.to_string_lossy();
    let (ids, values): (Vec<Option<String>>, Vec<Option<String>>) = if name.ends_with(".parquet") {
        let df = table::read_frame(path, None)?;
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        fn pick<'a>(names: &[String], cands: &[&'a str]) -> Option<&'a str> {
            cands
                .iter()
                .find(|c| names.iter().any(|n| n == *c))
                .copied()
        }
        let pick = |cands: &[&'static str]| pick(&names, cands);
        let (Some(idc), Some(lc)) = (pick(&["path", "id", "file_id"]), pick(&["label", "score"]))
        else {
            return Err(bad(format!(
                "expected columns `path` (or `id`) and `label` (or `score`), found {names:?}"
            )));
        };
        let ids = table::text_column(&df, path, idc)?;
        let values = df
            .column(lc)
            .and_then(|c| c.cast(&polars::prelude::DataType::String))
            .and_then(|c| c.str().cloned())
            .map_err(|e| bad(format!("column `{lc}`: {e}")))?
            .iter()
            .map(|v| v.map(str::to_string))
            .collect();
        (ids, values)
    } else {
        let text = std::fs::read_to_string(path).map_err(io_err(path))?;
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<String> = lines
            .next()
            .unwrap_or("")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        let col = |cands: &[&str]| header.iter().position(|h| cands.contains(&h.as_str()));
        let (Some(ic), Some(lc)) = (col(&["path", "id", "file_id"]), col(&["label", "score"]))
        else {
            return Err(bad(format!(
                "expected a CSV header `path,label`, found `{}`",
                header.join(",")
            )));
        };
        lines
            .map(|l| {
                // `path,label`: the label is after the last comma, so paths may contain commas.
                let fields: Vec<&str> = match (header.len(), l.rsplit_once(',')) {
                    (2, Some((a, b))) if ic == 0 => vec![a, b],
                    _ => l.split(',').collect(),
                };
                let get = |k: usize| fields.get(k).map(|s| s.to_string());
                (get(ic), get(lc))
            })
            .unzip()
    };
    for (row, (id, value)) in ids.into_iter().zip(values).enumerate() {
        let (Some(id), Some(value)) = (id, value) else {
            continue;
        };
        let label = Label::parse(&value).ok_or_else(|| {
            bad(format!(
                "row {}: label `{value}` is neither a number nor high/low/yes/no/true/false",
                row + 1
            ))
        })?;
        labels.insert(id.trim().to_string(), label);
    }
    if labels.is_empty() {
        return Err(bad("no labels".into()));
    }
    Ok(labels)
}

/// Where `phigen filter` keeps the steps of its recipe.
pub fn recipe_paths(out: &Path) -> (PathBuf, PathBuf) {
    (out.join("labels"), out.join("model.rf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_parse_the_last_score_line() {
        let r = parse_rating("Clear docstrings and a worked example.\nScore: 4").unwrap();
        assert_eq!(
            (r.score, r.reason.as_str()),
            (4, "Clear docstrings and a worked example.")
        );
        assert_eq!(parse_rating("Meh.\n**Score:** 2\n").unwrap().score, 2);
        assert_eq!(parse_rating("score = 0").unwrap().score, 0);
        let reason = |t: &str| parse_rating(t).unwrap_err().reason;
        assert_eq!(reason("It is good."), DropReason::Unparseable);
        assert_eq!(reason("Score: 9"), DropReason::Unparseable);
        assert_eq!(reason("Score: high"), DropReason::Unparseable);
    }

    /// CSV labels: numbers and words, a path with a comma, and a clear error for a bad label.
    #[test]
    fn label_files_are_read_or_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("labels.csv");
        std::fs::write(&csv, "path,label\na.py,4\nb,c.py,low\nd.py,high\n").unwrap();
        let l = load_labels(&csv).unwrap();
        assert_eq!(l["a.py"], Label::Score(4.0));
        assert_eq!(l["b,c.py"], Label::Binary(false));
        assert!(l["d.py"].positive(3.0) && l["a.py"].positive(3.0) && !l["a.py"].positive(4.5));
        std::fs::write(&csv, "path,label\na.py,maybe\n").unwrap();
        let e = load_labels(&csv).unwrap_err().to_string();
        assert!(e.contains("labels.csv") && e.contains("maybe"), "{e}");
        std::fs::write(&csv, "file,grade\n").unwrap();
        let e = load_labels(&csv).unwrap_err().to_string();
        assert!(e.contains("path,label") && e.contains("file,grade"), "{e}");
    }

    /// Bottom-k: the sample of 3 is the first 3 of the sample of 5; a changed input is refused.
    #[test]
    fn samples_extend_and_changes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        for i in 0..20 {
            std::fs::write(src.join(format!("f{i}.py")), format!("x = {i}\n")).unwrap();
        }
        let walk = crate::artifact::walk::WalkOptions::default();
        let (parts, _) = input::parts(std::slice::from_ref(&src), &["py".into()], walk).unwrap();
        let five = draw_sample(&parts, 5, 1, 1 << 20, 100).unwrap();
        let three = draw_sample(&parts, 3, 1, 1 << 20, 100).unwrap();
        assert_eq!(five[..3], three[..]);
        let out = dir.path().join("labels");
        record_sample(&out, std::slice::from_ref(&src), 1, &three).unwrap();
        record_sample(&out, std::slice::from_ref(&src), 1, &five).unwrap();
        std::fs::write(
            src.join(format!(
                "{}.py",
                five[0]
                    .file_id
                    .trim_start_matches("src/")
                    .trim_end_matches(".py")
            )),
            "changed\n",
        )
        .unwrap();
        let changed = draw_sample(&parts, 5, 1, 1 << 20, 100).unwrap();
        let e = record_sample(&out, std::slice::from_ref(&src), 1, &changed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sample.json"), "{e}");
        // Labels written into the code they rate would be read back as code.
        let e = record_sample(&src.join("labels"), std::slice::from_ref(&src), 1, &five)
            .unwrap_err()
            .to_string();
        assert!(e.contains("inside --input"), "{e}");
    }
}
