//! `phigen decontaminate`: documents that share long n-grams with evaluation problems.
//!
//! The n-gram check: texts become words — runs of letters, digits, `_` and non-ASCII bytes,
//! ASCII-lowercased; punctuation, whitespace and layout are ignored, so re-indented or
//! re-wrapped copies still match — and a document is contaminated by a task when it shares one
//! 13-word n-gram (phi-1 §5) with the task's prompt + canonical solution. A task's n-grams that are
//! mostly numbers or one-letter names (list literals such as `[1, 2, 3, 4, …]`) are not used.
//!
//! A second, code-aware check catches solutions copied with renamed identifiers, which share no
//! long n-gram with the original: over all tokens (punctuation included), every identifier that is
//! not a Python keyword becomes one placeholder, and a document that contains at least
//! `identifier_share` of the distinct placeholder n-grams (10 tokens by default) of a task's
//! canonical solution is a hit too — for solutions long enough to be distinctive.

use std::collections::BTreeMap;

use foldhash::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use xxhash_rust::xxh3::xxh3_64;

use super::{io_err, minhash, DedupError};
use crate::artifact::atomic;
use crate::artifact::docs::{self, Doc};
use crate::artifact::table::{self, Kind, Schema};

/// Solutions with fewer distinct placeholder n-grams (about 30 tokens) are too generic for the
/// renamed-identifier check: `return [ID for ID in ID if ID in ID]` is in every code base.
const MIN_RENAMED_NGRAMS: usize = 20;

pub const HITS_FILE: &str = "contaminated.parquet";
pub const REPORT_FILE: &str = "contamination.json";

/// Python's keywords (lowercased, as tokens are): they stay themselves under identifier renaming.
fn is_keyword(word: &[u8]) -> bool {
    matches!(
        word,
        b"false"
            | b"none"
            | b"true"
            | b"and"
            | b"as"
            | b"assert"
            | b"async"
            | b"await"
            | b"break"
            | b"class"
            | b"continue"
            | b"def"
            | b"del"
            | b"elif"
            | b"else"
            | b"except"
            | b"finally"
            | b"for"
            | b"from"
            | b"global"
            | b"if"
            | b"import"
            | b"in"
            | b"is"
            | b"lambda"
            | b"nonlocal"
            | b"not"
            | b"or"
            | b"pass"
            | b"raise"
            | b"return"
            | b"try"
            | b"while"
            | b"with"
            | b"yield"
    )
}

/// One evaluation problem.
#[derive(Clone, Debug)]
pub struct Task {
    pub benchmark: String,
    pub id: String,
    /// Everything a model would be shown or asked to write.
    pub text: String,
    /// The reference solution (code only), for the identifier-renaming check.
    pub solution: String,
}

/// Reads HumanEval (`task_id`, `prompt`, `canonical_solution`) or MBPP (`task_id`, `text`, `code`)
/// problems from `.jsonl` or `.jsonl.gz`; the benchmark is named after the file.
pub fn load_benchmark(path: &Path) -> Result<Vec<Task>, DedupError> {
    let reader = crate::artifact::docs::open_maybe_gz(path).map_err(io_err(path))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("benchmark");
    let benchmark = name
        .trim_end_matches(".gz")
        .trim_end_matches(".jsonl")
        .trim_end_matches(".json")
        .to_string();
    let bad = |line: usize, reason: String| {
        DedupError::Damaged {
        path: path.to_path_buf(),
        reason: format!(
            "line {line}: {reason}; expected HumanEval jsonl (task_id, prompt, canonical_solution) or MBPP jsonl (task_id, text, code)"
        ),
    }
    };
    let mut tasks = Vec::new();
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Map<String, Value> =
            serde_json::from_str(&line).map_err(|e| bad(i + 1, e.to_string()))?;
        let field = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
        let id = match row.get("task_id") {
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Number(_)) => v.to_string(),
            _ => return Err(bad(i + 1, "no task_id".into())),
        };
        let (text, solution) = match (
            field("prompt"),
            field("canonical_solution"),
            field("text"),
            field("code"),
        ) {
            (Some(prompt), Some(solution), _, _) => (format!("{prompt}{solution}"), solution),
            (_, _, Some(text), Some(code)) => (format!("{text}\n{code}"), code),
            _ => {
                let keys: Vec<&String> = row.keys().collect();
                return Err(bad(i + 1, format!("found fields {keys:?}")));
            }
        };
        tasks.push(Task {
            benchmark: benchmark.clone(),
            id,
            text,
            solution,
        });
    }
    if tasks.is_empty() {
        return Err(bad(0, "no problems in the file".into()));
    }
    Ok(tasks)
}

/// One token: its byte span, its hash, and whether it is a renamable identifier.
#[derive(Clone, Copy)]
struct Token {
    start: u32,
    end: u32,
    hash: u64,
    /// Letters, digits, `_` (not punctuation).
    word: bool,
    /// A word of two or more characters that is not a number.
    informative: bool,
    identifier: bool,
}

/// The tokens of `text` (see the module documentation).
fn tokens(text: &str) -> Vec<Token> {
    // Punctuation tokens are single bytes: their hashes are looked up, not computed.
    static SINGLE: std::sync::LazyLock<[u64; 256]> =
        std::sync::LazyLock::new(|| std::array::from_fn(|c| xxh3_64(&[c as u8])));
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 4);
    let mut lower = Vec::with_capacity(32);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        i += 1;
        let mut capitals = minhash::CLASS[c as usize];
        if capitals == 0 {
            if !c.is_ascii_whitespace() {
                out.push(Token {
                    start: start as u32,
                    end: i as u32,
                    hash: SINGLE[c as usize],
                    word: false,
                    informative: false,
                    identifier: false,
                });
            }
            continue;
        }
        while let Some(&d) = bytes.get(i) {
            let class = minhash::CLASS[d as usize];
            if class == 0 {
                break;
            }
            capitals |= class;
            i += 1;
        }
        let raw = &bytes[start..i];
        let text = if capitals & 2 != 0 {
            lower.clear();
            lower.extend(raw.iter().map(u8::to_ascii_lowercase));
            &lower[..]
        } else {
            raw
        };
        out.push(Token {
            start: start as u32,
            end: i as u32,
            hash: xxh3_64(text),
            word: true,
            informative: i - start >= 2 && !c.is_ascii_digit(),
            identifier: !c.is_ascii_digit() && !is_keyword(text),
        });
    }
    out
}

/// The token hashes, with every renamable identifier replaced by one placeholder when asked.
fn token_hashes(tokens: &[Token], placeholders: bool) -> Vec<u64> {
    let placeholder = xxh3_64(b"\0identifier");
    tokens
        .iter()
        .map(|t| {
            if placeholders && t.identifier {
                placeholder
            } else {
                t.hash
            }
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Leave contaminated documents out of the output.
    Drop,
    /// Keep every document; only report.
    Flag,
}

pub struct DecontaminateOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub benchmarks: Vec<PathBuf>,
    pub ngram: usize,
    /// n of the identifier-placeholder check; `None` turns it off.
    pub identifier_ngram: Option<usize>,
    pub identifier_share: f64,
    pub mode: Mode,
}

/// n-gram hash → tasks, behind a bit set of the hashes' top bits: almost every window of a
/// document is in no task, and one bit test turns it away before the hash-map lookup.
struct NgramMap {
    bits: Vec<u64>,
    tasks: HashMap<u64, Vec<u32>>,
}

impl NgramMap {
    const BITS_LOG2: u32 = 20;

    fn new(tasks: HashMap<u64, Vec<u32>>) -> Self {
        let mut bits = vec![0u64; 1 << (Self::BITS_LOG2 - 6)];
        for &h in tasks.keys() {
            let i = h >> (64 - Self::BITS_LOG2);
            bits[(i >> 6) as usize] |= 1 << (i & 63);
        }
        NgramMap { bits, tasks }
    }

    fn get(&self, h: u64) -> &[u32] {
        let i = h >> (64 - Self::BITS_LOG2);
        if self.bits[(i >> 6) as usize] & (1 << (i & 63)) == 0 {
            return &[];
        }
        self.tasks.get(&h).map_or(&[], Vec::as_slice)
    }
}

/// The n-grams of every task, ready to scan documents with.
pub struct Index {
    tasks: Vec<Task>,
    ngram: usize,
    exact: NgramMap,
    identifier_ngram: usize,
    renamed: NgramMap,
    /// Distinct placeholder n-grams of each task's solution.
    renamed_sizes: Vec<usize>,
    identifier_share: f64,
}

/// One document × task hit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Hit {
    pub task: usize,
    /// `ngram` or `identifiers`.
    pub check: &'static str,
    pub matched: String,
    pub matches: usize,
}

impl Index {
    pub fn new(
        tasks: Vec<Task>,
        ngram: usize,
        identifier_ngram: Option<usize>,
        identifier_share: f64,
    ) -> Self {
        let (mut exact, mut renamed): (HashMap<u64, Vec<u32>>, HashMap<u64, Vec<u32>>) =
            Default::default();
        let mut renamed_sizes = Vec::with_capacity(tasks.len());
        let n_id = identifier_ngram.unwrap_or(0);
        for (t, task) in tasks.iter().enumerate() {
            let words: Vec<Token> = tokens(&task.text).into_iter().filter(|t| t.word).collect();
            let mut informative = vec![0usize; words.len() + 1]; // prefix sums
            for (k, w) in words.iter().enumerate() {
                informative[k + 1] = informative[k] + usize::from(w.informative);
            }
            let n = ngram.max(1);
            for (s, h) in minhash::window_hashes(&token_hashes(&words, false), n) {
                if 2 * (informative[s + n] - informative[s]) < n {
                    continue; // mostly numbers and one-letter names: `[1, 2, 3, …]` is everywhere
                }
                let list = exact.entry(h).or_default();
                if list.last() != Some(&(t as u32)) {
                    list.push(t as u32);
                }
            }
            let distinct: HashSet<u64> = if n_id > 0 {
                let hashes = token_hashes(&tokens(&task.solution), true);
                minhash::window_hashes(&hashes, n_id)
                    .map(|(_, h)| h)
                    .collect()
            } else {
                HashSet::default()
            };
            renamed_sizes.push(distinct.len());
            for h in distinct {
                renamed.entry(h).or_default().push(t as u32);
            }
        }
        Index {
            tasks,
            ngram: ngram.max(1),
            exact: NgramMap::new(exact),
            identifier_ngram: n_id,
            renamed: NgramMap::new(renamed),
            renamed_sizes,
            identifier_share,
        }
    }

    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    /// Every task `text` hits, in task order.
    pub fn scan(&self, text: &str) -> Vec<Hit> {
        let toks = tokens(text);
        let words: Vec<Token> = toks.iter().copied().filter(|t| t.word).collect();
        let span = |toks: &[Token], s: usize, n: usize| {
            text[toks[s].start as usize..toks[s + n - 1].end as usize].to_string()
        };
        let mut hits: BTreeMap<usize, Hit> = BTreeMap::new();
        for (s, h) in minhash::window_hashes(&token_hashes(&words, false), self.ngram) {
            for &t in self.exact.get(h) {
                hits.entry(t as usize)
                    .or_insert_with(|| Hit {
                        task: t as usize,
                        check: "ngram",
                        matched: span(&words, s, self.ngram),
                        matches: 0,
                    })
                    .matches += 1;
            }
        }
        if self.identifier_ngram > 0 {
            let mut found: HashMap<u32, (HashSet<u64>, usize)> = HashMap::default();
            for (s, h) in minhash::window_hashes(&token_hashes(&toks, true), self.identifier_ngram)
            {
                for &t in self.renamed.get(h) {
                    found
                        .entry(t)
                        .or_insert_with(|| (HashSet::default(), s))
                        .0
                        .insert(h);
                }
            }
            for (t, (set, first)) in found {
                let size = self.renamed_sizes[t as usize];
                if size >= MIN_RENAMED_NGRAMS
                    && set.len() as f64 >= self.identifier_share * size as f64
                {
                    hits.entry(t as usize).or_insert_with(|| Hit {
                        task: t as usize,
                        check: "identifiers",
                        matched: span(&toks, first, self.identifier_ngram),
                        matches: set.len(),
                    });
                }
            }
        }
        hits.into_values().collect()
    }
}

/// `contamination.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub ngram: usize,
    pub identifier_ngram: Option<usize>,
    pub mode: Mode,
    pub documents: usize,
    pub bytes: u64,
    pub contaminated_documents: usize,
    pub seconds: f64,
    /// Per benchmark: problems, and documents hitting each problem (problems with none left out).
    pub benchmarks: BTreeMap<String, BenchmarkReport>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BenchmarkReport {
    pub tasks: usize,
    pub tasks_hit: usize,
    pub documents_per_task: BTreeMap<String, usize>,
}

pub fn run(
    opts: &DecontaminateOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Report, DedupError> {
    if opts.benchmarks.is_empty() {
        return Err(DedupError::Settings(
            "no --bench files: give HumanEval.jsonl.gz and/or MBPP jsonl".into(),
        ));
    }
    if opts.ngram == 0 {
        return Err(DedupError::Settings("--ngram must be at least 1".into()));
    }
    super::check_out(&opts.out, &opts.inputs)?;
    let mut tasks = Vec::new();
    for b in &opts.benchmarks {
        tasks.extend(load_benchmark(b)?);
    }
    let index = Index::new(
        tasks,
        opts.ngram,
        opts.identifier_ngram,
        opts.identifier_share,
    );
    let files = docs::input_files(&opts.inputs)?;
    let started = Instant::now();
    let (mut rows, mut documents, mut bytes) = (Vec::new(), 0usize, 0u64);
    let mut per_task: BTreeMap<usize, usize> = BTreeMap::new();
    let mut contaminated = 0usize;
    for file in &files {
        let mut drop: HashSet<usize> = HashSet::default();
        docs::read_documents(&file.path, |batch: Vec<Doc>| {
            let found: Vec<Vec<Hit>> = batch.par_iter().map(|d| index.scan(&d.text)).collect();
            let batch_bytes: u64 = batch.iter().map(|d| d.text.len() as u64).sum();
            progress(batch_bytes);
            bytes += batch_bytes;
            documents += batch.len();
            for (doc, hits) in batch.iter().zip(found) {
                if hits.is_empty() {
                    continue;
                }
                contaminated += 1;
                drop.insert(doc.row);
                for hit in hits {
                    *per_task.entry(hit.task).or_default() += 1;
                    let task = &index.tasks()[hit.task];
                    let row = json!({
                        "id": doc.id, "file": file.path.display().to_string(), "row": doc.row,
                        "benchmark": task.benchmark, "task_id": task.id, "check": hit.check,
                        "matched": hit.matched, "matches": hit.matches,
                    });
                    rows.push(row.as_object().expect("object").clone());
                }
            }
            Ok::<(), DedupError>(())
        })?;
        let dst = opts.out.join(&file.rel);
        if opts.mode == Mode::Flag || drop.is_empty() {
            docs::copy_whole(&file.path, &dst)?;
        } else {
            docs::write_subset(&file.path, &dst, |r| drop.contains(&r))?;
        }
    }
    let schema: Schema = vec![
        ("id", Kind::Text),
        ("file", Kind::Text),
        ("row", Kind::Int),
        ("benchmark", Kind::Text),
        ("task_id", Kind::Text),
        ("check", Kind::Text),
        ("matched", Kind::Text),
        ("matches", Kind::Int),
    ];
    table::write_parquet(&opts.out.join(HITS_FILE), &schema, &rows)?;
    let mut benchmarks: BTreeMap<String, BenchmarkReport> = BTreeMap::new();
    for task in index.tasks() {
        benchmarks.entry(task.benchmark.clone()).or_default().tasks += 1;
    }
    for (t, n) in per_task {
        let task = &index.tasks()[t];
        let b = benchmarks
            .get_mut(&task.benchmark)
            .expect("every task's benchmark is listed");
        b.tasks_hit += 1;
        b.documents_per_task.insert(task.id.clone(), n);
    }
    let report = Report {
        ngram: opts.ngram,
        identifier_ngram: opts.identifier_ngram,
        mode: opts.mode,
        documents,
        bytes,
        contaminated_documents: contaminated,
        seconds: started.elapsed().as_secs_f64(),
        benchmarks,
    };
    let path = opts.out.join(REPORT_FILE);
    atomic::write_json(&path, &report).map_err(io_err(&path))?;
    Ok(report)
}
