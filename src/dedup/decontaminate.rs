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
use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_64;

use super::words::{self, Piece};
use super::{io_err, minhash, DedupError};
use crate::artifact::atomic;
use crate::artifact::docs::{self, Doc};
use crate::artifact::outdir::{self, DirLock, Written};
use crate::artifact::table::{self, row, Row};
use crate::artifact::task::{self as array, ArrayError};
use crate::artifact::walk::{InputSkip, WalkOptions};

/// Solutions with fewer distinct placeholder n-grams (about 30 tokens) are too generic for the
/// renamed-identifier check: `return [ID for ID in ID if ID in ID]` is in every code base.
const MIN_RENAMED_NGRAMS: usize = 20;

pub const HITS_FILE: &str = "contaminated.parquet";
pub const REPORT_FILE: &str = "contamination.json";

/// Python's keywords, lowercased as tokens compare: they stay themselves under identifier renaming.
const KEYWORDS: [&[u8]; 35] = [
    b"false",
    b"none",
    b"true",
    b"and",
    b"as",
    b"assert",
    b"async",
    b"await",
    b"break",
    b"class",
    b"continue",
    b"def",
    b"del",
    b"elif",
    b"else",
    b"except",
    b"finally",
    b"for",
    b"from",
    b"global",
    b"if",
    b"import",
    b"in",
    b"is",
    b"lambda",
    b"nonlocal",
    b"not",
    b"or",
    b"pass",
    b"raise",
    b"return",
    b"try",
    b"while",
    b"with",
    b"yield",
];

/// A word of at most 8 bytes, ASCII-lowercased, as one integer (no keyword is longer).
const fn pack(word: &[u8]) -> u64 {
    let (mut v, mut i) = (0u64, 0);
    while i < word.len() && i < 8 {
        v |= (word[i].to_ascii_lowercase() as u64) << (8 * i);
        i += 1;
    }
    v
}

/// Whether `word`, ASCII-lowercased, is a keyword.
fn is_keyword(word: &[u8]) -> bool {
    const PACKED: [u64; KEYWORDS.len()] = {
        let mut out = [0u64; KEYWORDS.len()];
        let mut i = 0;
        while i < out.len() {
            out[i] = pack(KEYWORDS[i]);
            i += 1;
        }
        out
    };
    word.len() <= 8 && PACKED.contains(&pack(word))
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

/// Calls `each` with every token of `text` (see the module documentation), in order.
fn each_token(text: &str, mut each: impl FnMut(Token)) {
    let bytes = text.as_bytes();
    words::each_piece(bytes, true, |start, end, piece| {
        let first = bytes[start];
        let token = |hash, word, informative, identifier| Token {
            start: start as u32,
            end: end as u32,
            hash,
            word,
            informative,
            identifier,
        };
        each(match piece {
            Piece::Punctuation => {
                // One byte: a multiply spreads it over 64 bits (windows mix their hashes again).
                let hash = (u64::from(first) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                token(hash, false, false, false)
            }
            Piece::Word { capitals } => {
                let raw = &bytes[start..end];
                let hash = words::word_hash(raw, capitals);
                let digit = first.is_ascii_digit();
                let keyword = is_keyword(raw);
                token(hash, true, end - start >= 2 && !digit, !digit && !keyword)
            }
        });
    });
}

/// The tokens of `text`.
fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    each_token(text, |t| out.push(t));
    out
}

/// What a renamable identifier hashes to under the identifier check.
static PLACEHOLDER: std::sync::LazyLock<u64> =
    std::sync::LazyLock::new(|| xxh3_64(b"\0identifier"));

/// The token hashes, with every renamable identifier replaced by one placeholder when asked.
fn token_hashes(tokens: &[Token], placeholders: bool) -> Vec<u64> {
    tokens
        .iter()
        .map(|t| {
            if placeholders && t.identifier {
                *PLACEHOLDER
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
    /// Read symlinks that lead out of the input trees.
    pub follow_symlinks: bool,
    /// One task of an array: it scans the input files it owns (file i with i mod N = K, in path
    /// order) into `out/tasks/K`, then writes `out/completions/K`; [`merge`] combines the reports.
    pub task: Option<array::Task>,
}

/// n-gram hash → tasks, behind a two-probe Bloom filter of the hashes: almost every window of a
/// document is in no task, and two bit tests in a table small enough for the L1 cache (8 bits per
/// n-gram; about 3% false positives) turn it away before the hash-map lookup.
struct NgramMap {
    bits: Vec<u64>,
    /// log2 of the filter's size in bits.
    log2: u32,
    tasks: HashMap<u64, Vec<u32>>,
}

impl NgramMap {
    fn new(tasks: HashMap<u64, Vec<u32>>) -> Self {
        let log2 = (8 * tasks.len())
            .next_power_of_two()
            .trailing_zeros()
            .max(6);
        let mut map = NgramMap {
            bits: vec![0u64; 1 << (log2 - 6)],
            log2,
            tasks,
        };
        let keys: Vec<u64> = map.tasks.keys().copied().collect();
        for h in keys {
            for i in map.probes(h) {
                map.bits[i >> 6] |= 1 << (i & 63);
            }
        }
        map
    }

    /// The filter bits of `h`: its top and its bottom `log2` bits (the window hashes are mixed).
    #[inline(always)]
    fn probes(&self, h: u64) -> [usize; 2] {
        let mask = (1u64 << self.log2) - 1;
        [(h >> (64 - self.log2)) as usize, (h & mask) as usize]
    }

    #[inline(always)]
    fn get(&self, h: u64) -> &[u32] {
        let [i, j] = self.probes(h);
        let set = |k: usize| self.bits[k >> 6] >> (k & 63) & 1 == 1;
        if !(set(i) && set(j)) {
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

row! {
    /// One row of `hits.parquet`: a document, the benchmark task it matched, and the evidence.
    struct HitRow {
        id: String,
        file: String,
        row: usize,
        benchmark: String,
        task_id: String,
        /// `ngram` or `identifiers`.
        check: &'static str,
        matched: String,
        matches: usize,
    }
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
        thread_local! {
            // Word hashes and all-token hashes (identifiers as the placeholder), reused across
            // documents: fresh vectors for every document cost more in page faults than the scan.
            static HASHES: std::cell::RefCell<(Vec<u64>, Vec<u64>)> = const {
                std::cell::RefCell::new((Vec::new(), Vec::new()))
            };
        }
        // Hits with the window where each was first seen (a word index for the n-gram check, a
        // token index for the identifier check); the matched text is cut out at the end.
        let mut hits: BTreeMap<usize, (Hit, usize)> = BTreeMap::new();
        HASHES.with_borrow_mut(|(words, all)| {
            words.clear();
            all.clear();
            let placeholders = self.identifier_ngram > 0;
            each_token(text, |t| {
                if t.word {
                    words.push(t.hash);
                }
                if placeholders {
                    all.push(if t.identifier { *PLACEHOLDER } else { t.hash });
                }
            });
            for (s, h) in minhash::window_hashes(words, self.ngram) {
                for &t in self.exact.get(h) {
                    let hit = Hit {
                        task: t as usize,
                        check: "ngram",
                        matched: String::new(),
                        matches: 0,
                    };
                    hits.entry(t as usize).or_insert((hit, s)).0.matches += 1;
                }
            }
            if !placeholders {
                return;
            }
            let mut found: HashMap<u32, (HashSet<u64>, usize)> = HashMap::default();
            for (s, h) in minhash::window_hashes(all, self.identifier_ngram) {
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
                    let hit = Hit {
                        task: t as usize,
                        check: "identifiers",
                        matched: String::new(),
                        matches: set.len(),
                    };
                    hits.entry(t as usize).or_insert((hit, first));
                }
            }
        });
        if hits.is_empty() {
            return Vec::new();
        }
        let toks = tokens(text);
        let words: Vec<Token> = toks.iter().copied().filter(|t| t.word).collect();
        let span = |toks: &[Token], s: usize, n: usize| {
            text[toks[s].start as usize..toks[s + n - 1].end as usize].to_string()
        };
        hits.into_values()
            .map(|(mut hit, s)| {
                hit.matched = if hit.check == "ngram" {
                    span(&words, s, self.ngram)
                } else {
                    span(&toks, s, self.identifier_ngram)
                };
                hit
            })
            .collect()
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
    /// Input entries not read (symlinks out of the tree, FIFOs, devices …), by reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_inputs: BTreeMap<InputSkip, u64>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BenchmarkReport {
    pub tasks: usize,
    pub tasks_hit: usize,
    pub documents_per_task: BTreeMap<String, usize>,
}

/// Runs decontamination as the module documentation describes; `progress` is called with bytes
/// scanned.
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
    // Checked before anything is created: the lock file would be written into the input.
    outdir::check_apart(&opts.out, &opts.inputs)?;
    let out = opts.task.map_or(opts.out.clone(), |t| t.dir(&opts.out));
    if let Some(task) = opts.task.filter(|t| t.is_done(&opts.out)) {
        // A relaunched task that finished: its report, nothing redone.
        let path = out.join(REPORT_FILE);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        tracing::info!("task {task} is done (its marker exists): nothing to do");
        return serde_json::from_slice(&bytes).map_err(|e| {
            DedupError::Settings(format!(
                "{}: not a contamination report ({e}); delete {} and rerun the task",
                path.display(),
                task.marker(&opts.out).display()
            ))
        });
    }
    let lock = DirLock::exclusive(&out)?;
    let mut written = Written::open(&out, &lock)?;
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
    let inputs = docs::input_files(
        &opts.inputs,
        WalkOptions {
            follow_symlinks: opts.follow_symlinks,
        },
    )?;
    let files: Vec<_> = (inputs.files.into_iter().enumerate())
        .filter(|(i, _)| opts.task.is_none_or(|t| t.owns(*i)))
        .map(|(_, f)| f)
        .collect();
    // Everything this run writes, before the work: a file phigen did not write stops it now.
    for rel in files
        .iter()
        .map(|f| f.rel.as_path())
        .chain([Path::new(HITS_FILE), Path::new(REPORT_FILE)])
    {
        written.claim(rel)?;
    }
    let started = Instant::now();
    let (mut rows, mut documents, mut bytes) = (Vec::new(), 0usize, 0u64);
    let mut per_task: BTreeMap<usize, usize> = BTreeMap::new();
    let mut contaminated = 0usize;
    for file in &files {
        let dst = out.join(&file.rel);
        let mut dropped: HashSet<usize> = HashSet::default();
        // The copy that a clean file (and every file under --mode flag) ends up as is written and
        // fsynced while the file is scanned: most files hold no contamination, and the copy is
        // mostly waiting for the disk. It is put in place only once the scan says so.
        let copy = std::thread::scope(|scope| {
            let copy = scope.spawn(|| docs::stage_whole(&file.path, &dst));
            let scanned = docs::read_documents(&file.path, |batch: Vec<Doc>| {
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
                    dropped.insert(doc.row);
                    for hit in hits {
                        *per_task.entry(hit.task).or_default() += 1;
                        let task = &index.tasks()[hit.task];
                        let mut cells = Vec::with_capacity(HitRow::COLUMNS.len());
                        HitRow {
                            id: doc.id.clone(),
                            file: file.path.display().to_string(),
                            row: doc.row,
                            benchmark: task.benchmark.clone(),
                            task_id: task.id.clone(),
                            check: hit.check,
                            matched: hit.matched,
                            matches: hit.matches,
                        }
                        .push_cells(&mut cells);
                        rows.push(cells);
                    }
                }
                Ok::<(), DedupError>(())
            });
            let copy = copy.join().expect("copying a file does not panic");
            scanned.map(|()| copy)
        })?;
        if opts.mode == Mode::Flag || dropped.is_empty() {
            copy?.commit().map_err(io_err(&dst))?;
        } else {
            std::mem::drop(copy); // removes the staged copy before the subset takes its temp name
            docs::write_subset(&file.path, &dst, |r| dropped.contains(&r))?;
        }
    }
    table::write_parquet(&out.join(HITS_FILE), &HitRow::COLUMNS.to_vec(), &rows)?;
    let benchmarks = benchmark_reports(&index, per_task);
    let report = Report {
        ngram: opts.ngram,
        identifier_ngram: opts.identifier_ngram,
        mode: opts.mode,
        documents,
        bytes,
        contaminated_documents: contaminated,
        seconds: started.elapsed().as_secs_f64(),
        benchmarks,
        skipped_inputs: inputs.skipped,
    };
    let path = out.join(REPORT_FILE);
    atomic::write_json(&path, &report).map_err(io_err(&path))?;
    if let Some(task) = opts.task {
        let value = serde_json::to_value(&report).expect("reports serialize");
        task.mark_done(&opts.out, value)
            .map_err(io_err(&task.marker(&opts.out)))?;
    }
    Ok(report)
}

/// Combines the reports of the N tasks of a sharded decontamination in `dir` (each task's report
/// is in its marker) into `dir/contamination.json`: counts summed, documents per problem summed,
/// the longest task's seconds. The kept documents stay in `dir/tasks/K`.
pub fn merge(dir: &Path) -> Result<Report, ArrayError> {
    let markers = array::all_finished(dir)?;
    let mut reports = Vec::with_capacity(markers.len());
    for m in markers {
        let path = m.task.marker(dir);
        reports.push(serde_json::from_value::<Report>(m.stats).map_err(|e| {
            ArrayError::BadMarker {
                path,
                reason: format!("no contamination report in it: {e}"),
            }
        })?);
    }
    let mut merged = reports[0].clone();
    for r in &reports[1..] {
        merged.documents += r.documents;
        merged.bytes += r.bytes;
        merged.contaminated_documents += r.contaminated_documents;
        merged.seconds = merged.seconds.max(r.seconds);
        for (reason, n) in &r.skipped_inputs {
            *merged.skipped_inputs.entry(*reason).or_default() += n;
        }
        for (name, b) in &r.benchmarks {
            let into = merged.benchmarks.entry(name.clone()).or_default();
            for (id, n) in &b.documents_per_task {
                *into.documents_per_task.entry(id.clone()).or_default() += n;
            }
        }
    }
    for b in merged.benchmarks.values_mut() {
        b.tasks_hit = b.documents_per_task.len();
    }
    let path = dir.join(REPORT_FILE);
    atomic::write_json(&path, &merged).map_err(|source| ArrayError::Io { path, source })?;
    Ok(merged)
}

/// Per benchmark: its problems, and the documents hitting each problem (`per_task`: task index →
/// documents).
fn benchmark_reports(
    index: &Index,
    per_task: BTreeMap<usize, usize>,
) -> BTreeMap<String, BenchmarkReport> {
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
    benchmarks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `hits.parquet` keeps the columns (names, types, order) it had when its rows were built by
    /// column name, so readers of earlier runs read new ones alike.
    #[test]
    fn hits_table_keeps_its_columns() {
        use crate::artifact::table::Kind;
        assert_eq!(
            HitRow::COLUMNS,
            [
                ("id", Kind::Text),
                ("file", Kind::Text),
                ("row", Kind::Int),
                ("benchmark", Kind::Text),
                ("task_id", Kind::Text),
                ("check", Kind::Text),
                ("matched", Kind::Text),
                ("matches", Kind::Int),
            ]
        );
    }

    /// Keywords compare ASCII-case-insensitively and whole: prefixes and extensions are not
    /// keywords (Python's keyword list, `keyword.kwlist`).
    #[test]
    fn keywords_are_whole_words() {
        for word in ["None", "while", "nonlocal", "CONTINUE", "if", "yield"] {
            assert!(is_keyword(word.as_bytes()), "{word}");
        }
        for word in [
            "continued",
            "whil",
            "i",
            "",
            "nonlocals",
            "Nonee",
            "print",
            "self",
        ] {
            assert!(!is_keyword(word.as_bytes()), "{word}");
        }
    }
}
