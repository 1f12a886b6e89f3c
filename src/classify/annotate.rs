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
use super::preset::Preset;
use super::{io_err, ClassifyError};
use crate::artifact::atomic;
use crate::artifact::shards::{self, Layout};
use crate::artifact::table::{self, row};
use crate::artifact::task::{self, Task};
use crate::generate::prompt::Template;
use crate::generate::{Corpus, Drop, DropReason};

/// The code preset's built-in prompt ([`Preset::builtin_prompt`] has both).
pub const BUILTIN_TEMPLATE: &str = super::preset::CODE_PROMPT;
const RECORDS: Layout = Layout::Parts { prefix: "part" };

row! {
    /// A file chosen for rating: its id, a hash of its full text, and what of it the teacher sees:
    /// the head that fits the per-file token budget ([`FileBudget`]; the head itself is in the
    /// prompt, not in the record), its length and token count, and how many characters were cut.
    /// `sample.json` holds only the id and hash: it is written before the teacher's tokenizer cuts
    /// the heads.
    #[derive(Clone, Debug, Serialize, Deserialize)]
    pub struct Sampled {
        pub file_id: String,
        pub content_hash: String,
        /// Characters of the file in the prompt.
        #[serde(skip)]
        pub kept_chars: u64,
        /// Characters of the file not in the prompt (0: the teacher saw it whole).
        #[serde(skip)]
        pub truncated_chars: u64,
        /// Tokens of the kept head, as the budget counted them (`stats.json` says with what).
        #[serde(skip)]
        pub kept_tokens: u64,
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

/// Each file's share of the rating prompt: at most `tokens` tokens of its head, counted by
/// `count`. Prefill is what a rating costs a local teacher, and a long file's head rarely
/// changes its rating, so the share is capped and the record says what was cut.
pub struct FileBudget<'a> {
    pub tokens: usize,
    /// Tokens of a text.
    pub count: &'a (dyn Fn(&str) -> usize + Sync),
    /// What `count` counts with, for `stats.json` (e.g. the teacher's tokenizer).
    pub counted_with: String,
}

impl FileBudget<'_> {
    /// The longest head of `text` within the budget, ending at a line end where a whole line
    /// fits (inside the first line otherwise), and its token count. Token counts of prefixes
    /// grow with the prefix, so a binary search over the cut points finds it.
    pub fn fit<'t>(&self, text: &'t str) -> (&'t str, usize) {
        let count = |end: usize| (self.count)(&text[..end]);
        let whole = count(text.len());
        if whole <= self.tokens {
            return (text, whole);
        }
        let line_ends: Vec<usize> = text.match_indices('\n').map(|(i, _)| i + 1).collect();
        let end = largest_fitting(&line_ends, |e| count(e) <= self.tokens).unwrap_or_else(|| {
            let first_line = line_ends.first().copied().unwrap_or(text.len());
            let chars: Vec<usize> = text[..first_line]
                .char_indices()
                .map(|(i, _)| i)
                .skip(1)
                .collect();
            largest_fitting(&chars, |e| count(e) <= self.tokens).unwrap_or(0)
        });
        (&text[..end], count(end))
    }
}

/// The last of the ascending `cuts` that `fits`, given that a cut fits whenever a later one does.
fn largest_fitting(cuts: &[usize], fits: impl Fn(usize) -> bool) -> Option<usize> {
    let (mut lo, mut hi, mut best) = (0, cuts.len(), None);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if fits(cuts[mid]) {
            best = Some(cuts[mid]);
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    best
}

/// Draws the sample: the `n` readable files (texts, with `preset`) with the smallest
/// `xxh3(seed, id)`, in that order. Only the head (`max_chars` characters) of each is kept;
/// [`fit_sample`] then cuts it to the token budget.
pub fn draw_sample(
    parts: &[Part],
    preset: Preset,
    n: usize,
    seed: u64,
    max_bytes: u64,
    max_chars: usize,
) -> Result<Vec<Sampled>, ClassifyError> {
    let mut heap: BinaryHeap<(u64, String, String, String, u64)> = BinaryHeap::new();
    for part in parts {
        for code in input::load(part, max_bytes, preset)?.rows {
            let Ok(text) = code.content else { continue };
            let key = xxh3_64_with_seed(code.id.as_bytes(), seed);
            if heap.len() == n && heap.peek().is_some_and(|top| top.0 <= key) {
                continue;
            }
            let hash = blake3::hash(text.as_bytes()).to_hex()[..16].to_string();
            let head: String = text.chars().take(max_chars).collect();
            let chars = text.chars().count() as u64;
            heap.push((key, code.id, hash, head, chars));
            if heap.len() > n {
                heap.pop();
            }
        }
    }
    Ok(heap
        .into_sorted_vec()
        .into_iter()
        .map(|(_, file_id, content_hash, head, chars)| {
            let kept_chars = head.chars().count() as u64;
            Sampled {
                file_id,
                content_hash,
                kept_chars,
                truncated_chars: chars - kept_chars,
                kept_tokens: 0,
                head,
            }
        })
        .collect())
}

/// Cuts each sampled head to `budget` and records what was kept and cut.
pub fn fit_sample(sample: &mut [Sampled], budget: &FileBudget) {
    for s in sample {
        let (head, tokens) = budget.fit(&s.head);
        let kept_chars = head.chars().count() as u64;
        s.truncated_chars += s.kept_chars - kept_chars;
        s.kept_chars = kept_chars;
        s.kept_tokens = tokens as u64;
        let end = head.len();
        s.head.truncate(end);
    }
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
    /// The budget the heads were cut to (tokens, what counted them), for `stats.json`.
    budget: Option<(usize, String)>,
    /// What the reader of these ratings should know about the rater (`stats.json`'s
    /// `corpus.rater_note`), e.g. that a small local one barely tells good code from bad.
    rater_note: Option<&'static str>,
    /// Code files or web text: the prompt's variables and the corpus's kind.
    preset: Preset,
}

impl Annotate {
    pub fn new(template: Template, sample: Vec<Sampled>) -> Annotate {
        Annotate {
            template,
            sample,
            budget: None,
            rater_note: None,
            preset: Preset::Code,
        }
    }

    /// The same corpus, rating texts of `preset` (its template must use that preset's variables).
    pub fn with_preset(self, preset: Preset) -> Annotate {
        Annotate { preset, ..self }
    }

    /// The same corpus, with a note on the rater for `stats.json`.
    pub fn with_rater_note(self, note: &'static str) -> Annotate {
        Annotate {
            rater_note: Some(note),
            ..self
        }
    }

    /// The corpus of a sample cut by [`fit_sample`] to `budget`, which `stats.json` states.
    pub fn fitted(template: Template, sample: Vec<Sampled>, budget: &FileBudget) -> Annotate {
        Annotate {
            budget: Some((budget.tokens, budget.counted_with.clone())),
            ..Annotate::new(template, sample)
        }
    }
}

row! {
    #[derive(Clone, Debug)]
    pub struct Rating {
        pub score: i64,
        pub reason: String,
    }
}

/// The score of an answer: the last line with `score` followed by a number (`Score: N`, any
/// case, `**` allowed; also `My score is N`, `Score: N/5`), N in 0..=5; the reason is the text
/// before it. A line that starts with `score` but holds no score from 0 to 5 is refused.
pub fn parse_rating(text: &str) -> Result<Rating, Drop> {
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate().rev() {
        let clean = line.replace('*', "");
        let lower = clean.trim().to_ascii_lowercase();
        let Some(at) = lower.rfind("score") else {
            continue;
        };
        let rest = lower[at + "score".len()..].trim_start_matches([':', ' ', '=', '-']);
        let rest = rest
            .strip_prefix("is ")
            .or_else(|| rest.strip_prefix("of "))
            .unwrap_or(rest)
            .trim_start();
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        match digits.parse::<i64>() {
            Ok(score) if (0..=5).contains(&score) => {
                return Ok(Rating {
                    score,
                    reason: lines[..i].join(" ").trim().to_string(),
                })
            }
            _ if at == 0 => {
                return Err(Drop::new(
                    DropReason::Unparseable,
                    format!("`{}` is not a score from 0 to 5", line.trim()),
                ))
            }
            // A sentence that mentions a score without giving one.
            _ => continue,
        }
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
        self.preset.rating_kind()
    }

    fn template(&self) -> &Template {
        &self.template
    }

    fn sample(&self, slot: u64, _rng: &mut ChaCha8Rng) -> Sampled {
        self.sample[slot as usize].clone()
    }

    fn prompt_vars(&self, s: &Sampled) -> Vec<(&'static str, String)> {
        let mut text = s.head.clone();
        if s.truncated_chars > 0 {
            // The teacher should rate what it sees, not fault the file for ending mid-way.
            text.push_str(&format!(
                "\n[... the {} goes on: {} more characters not shown]",
                self.preset.unit(),
                s.truncated_chars
            ));
        }
        self.preset.prompt_vars(&s.file_id, text)
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
        let mut summary = json!({
            "rated": df.height(),
            "score_histogram": hist,
            "preset": self.preset,
        });
        if let Some((tokens, counted_with)) = &self.budget {
            let cut = self.sample.iter().filter(|s| s.truncated_chars > 0);
            summary["file_budget"] = json!({
                "tokens": tokens,
                "counted_with": counted_with,
                "files_in_sample": self.sample.len(),
                "files_cut": cut.clone().count(),
                "chars_cut": cut.map(|s| s.truncated_chars).sum::<u64>(),
            });
        }
        if let Some(note) = self.rater_note {
            summary["rater_note"] = json!(note);
        }
        Ok(summary)
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
        // The ratings of one run, or of the N tasks of an array (`phigen annotate --shard`), each
        // in its own `tasks/K`, all of them finished (`phigen merge` checks that too).
        let dirs: Vec<PathBuf> = if path.join(task::COMPLETIONS).is_dir() {
            let n = task::all_finished(path)
                .map_err(|e| bad(e.to_string()))?
                .len();
            (0..n).map(|k| Task { k, n }.dir(path)).collect()
        } else {
            vec![path.to_path_buf()]
        };
        let files = dirs
            .iter()
            .map(|d| shards::list_files(d, &RECORDS))
            .collect::<Result<Vec<_>, _>>()?;
        for file in files.into_iter().flatten() {
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
        // Forms a small local rater writes.
        assert_eq!(parse_rating("Fine.\nMy score is 3.").unwrap().score, 3);
        assert_eq!(parse_rating("Educational score: 2/5").unwrap().score, 2);
        let r = parse_rating("Score: 4\nA higher score would need docs.").unwrap();
        assert_eq!(r.score, 4);
        let reason = |t: &str| parse_rating(t).unwrap_err().reason;
        assert_eq!(reason("It is good."), DropReason::Unparseable);
        assert_eq!(reason("Score: 9"), DropReason::Unparseable);
        assert_eq!(reason("Score: high"), DropReason::Unparseable);
    }

    /// The budget keeps whole lines while they fit and cuts inside a first line that does not;
    /// a whitespace word count stands in for a tokenizer, so the expected heads are counted by
    /// hand.
    #[test]
    fn heads_are_cut_to_the_budget_at_line_ends() {
        let words = |t: &str| t.split_whitespace().count();
        let budget = |tokens| FileBudget {
            tokens,
            count: &words,
            counted_with: "words".into(),
        };
        let text = "a b\nc d\ne f\n";
        assert_eq!(budget(6).fit(text), (text, 6));
        assert_eq!(budget(5).fit(text), ("a b\nc d\n", 4));
        assert_eq!(budget(1).fit(text), ("a ", 1));
        assert_eq!(budget(2).fit("a b c d"), ("a b ", 2));
    }

    /// A long file is cut to the budget in tiktoken's count, and its record says what was kept
    /// and cut; the prompt tells the teacher the file goes on.
    #[test]
    fn a_long_file_is_cut_and_the_record_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let long: String = (0..400)
            .map(|i| format!("def f{i}(x):\n    return x + {i}\n"))
            .collect();
        std::fs::write(src.join("long.py"), &long).unwrap();
        std::fs::write(src.join("short.py"), "x = 1\n").unwrap();
        let walk = crate::artifact::walk::WalkOptions::default();
        let (parts, _) = input::parts(
            std::slice::from_ref(&src),
            &["py".into()],
            Preset::Code,
            walk,
        )
        .unwrap();
        let mut sample = draw_sample(&parts, Preset::Code, 2, 0, 1 << 20, 6000).unwrap();
        let bpe = tiktoken_rs::cl100k_base_singleton();
        let count = |t: &str| bpe.encode_ordinary(t).len();
        let budget = FileBudget {
            tokens: 100,
            count: &count,
            counted_with: "cl100k_base".into(),
        };
        fit_sample(&mut sample, &budget);
        let find = |name: &str| sample.iter().find(|s| s.file_id.ends_with(name)).unwrap();
        let (cut, whole) = (find("long.py"), find("short.py"));
        let total = long.chars().count() as u64;
        assert!(cut.kept_tokens <= 100 && cut.kept_tokens > 80, "{cut:?}");
        assert_eq!(cut.kept_tokens, count(&cut.head) as u64);
        assert_eq!(cut.kept_chars, cut.head.chars().count() as u64);
        assert_eq!(cut.kept_chars + cut.truncated_chars, total);
        assert!(long.starts_with(&cut.head) && cut.head.ends_with('\n'));
        assert_eq!((whole.truncated_chars, whole.kept_chars), (0, 6));
        let corpus = Annotate::fitted(
            Template::parse("t", BUILTIN_TEMPLATE).unwrap(),
            sample.clone(),
            &budget,
        );
        let code = |s: &Sampled| corpus.prompt_vars(s)[1].1.clone();
        assert!(code(cut).ends_with(&format!(
            "{} more characters not shown]",
            cut.truncated_chars
        )));
        assert_eq!(code(whole), "x = 1\n");
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
        let (parts, _) = input::parts(
            std::slice::from_ref(&src),
            &["py".into()],
            Preset::Code,
            walk,
        )
        .unwrap();
        let five = draw_sample(&parts, Preset::Code, 5, 1, 1 << 20, 100).unwrap();
        let three = draw_sample(&parts, Preset::Code, 3, 1, 1 << 20, 100).unwrap();
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
        let changed = draw_sample(&parts, Preset::Code, 5, 1, 1 << 20, 100).unwrap();
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
