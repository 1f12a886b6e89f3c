//! `phigen dedup`: exact and MinHash-LSH near-duplicate removal over corpus files.
//!
//! 1. **Signatures** (parallel over documents): each document's exact hash (of its normalised
//!    text) and MinHash signature go to `OUT/signatures/NNNNN.{bin,ids}`, then its completion
//!    marker (`signatures/completions/NNNNN`); a later run reuses the signatures of a signature
//!    array (`--stage signatures`) made from the same inputs and settings, computing missing tasks.
//! 2. **Clusters** (one process): documents are ordered by
//!    (input file in sorted path order, row); documents of `--index` come before all of them.
//!    Equal exact hashes are joined; so are documents sharing any LSH band key (each with the
//!    least document of the bucket; with `--verify-jaccard T` only when their exact shingle-set
//!    Jaccard is ≥ T). A union-find whose root is always the least member makes the first document
//!    of each cluster its kept representative: the result does not depend on thread count, input
//!    argument order or slicing.
//! 3. **Outputs**: each input file minus its removed rows, same format and columns, at the same
//!    relative path under `OUT`; `removed.parquet` (id, file, row, cluster, kept id, reason,
//!    estimated and exact similarity); `stats.json` last. With `--index DIR` the kept documents are
//!    added to the index, so a later run removes what duplicates them.
//!
//! The same steps run as array tasks (`--stage signatures|buckets|clusters|filter`, see
//! [`stages`]) write byte for byte what one run writes.
//!
//! One run at a time writes `OUT` (array tasks: side by side), and `OUT` may be
//! neither an input nor inside or above one. A file already in `OUT` is replaced only when phigen
//! wrote it (`OUT/.phigen.written` lists it).

pub mod decontaminate;
pub mod minhash;
pub mod stages;
mod words;

use foldhash::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::artifact::atomic;
use crate::artifact::docs::{self, DocsError, InputFile};
use crate::artifact::outdir::{self, DirLock, OutDirError, Written};
use crate::artifact::table::{self, row, Row, TableError};
use crate::artifact::task::Task;
use crate::artifact::walk::{InputSkip, WalkOptions};
use minhash::{MinHasher, Normalize, Params};
pub use stages::{Stage, TaskOutcome};

pub const STATS_FILE: &str = "stats.json";
pub const REMOVED_FILE: &str = "removed.parquet";
const FORMAT_VERSION: u32 = 1;
/// Per document in a signature table: file index, row, exact hash (2 words), then the signature.
const HEAD: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error(transparent)]
    Docs(#[from] DocsError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("{path}: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("{path}: made with other MinHash settings ({found}); this run uses {expected} — use a new --index directory or the same settings")]
    OtherSettings {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(transparent)]
    OutDir(#[from] OutDirError),
    #[error("{0}")]
    Settings(String),
    #[error("--stage {stage} with {flag}: array stages do not support it; run `phigen dedup` without --stage (one process) to use {flag}")]
    Unsupported { stage: Stage, flag: &'static str },
    #[error("--stage clusters runs as one task, found task {task}: launch it as a single job, without --shard or --shards")]
    OneTask { task: Task },
    #[error("{dir}: no `{stage}` task has finished for these inputs and settings; run `phigen dedup --stage {stage}` (with the same --input and settings) first")]
    StageNotRun { dir: PathBuf, stage: Stage },
    #[error("{dir}: `{stage}` tasks {ids} of {n} have no completion marker for these inputs and settings; relaunch the `--stage {stage}` array (finished tasks skip themselves) and run this stage after it")]
    Unfinished {
        dir: PathBuf,
        stage: Stage,
        n: usize,
        ids: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DedupError + '_ {
    move |e| docs::io_err(path)(e).into()
}

pub struct DedupOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    pub params: Params,
    pub exact: Normalize,
    pub verify_jaccard: Option<f64>,
    pub index: Option<PathBuf>,
    /// Run one array stage instead of the whole run ([`stages`]).
    pub stage: Option<Stage>,
    /// The stage's task (`None`: the stage as one task); alone, a signature task.
    pub shard: Option<Task>,
    /// Read symlinks that lead out of the input trees.
    pub follow_symlinks: bool,
    /// Which document of a cluster is kept.
    pub keep: Keep,
}

/// Which document of a duplicate cluster is kept (`--keep`); an `--index`'s documents always come
/// first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Keep {
    /// The first by (input file in sorted path order, row).
    #[default]
    First,
    /// The one with the least id (ties: the first by file and row): the same survivor whatever
    /// order the documents were written in, so a corpus generated in arrival order dedups to the
    /// same set on every run (recipe runs use it).
    LeastId,
}

/// An input file as a signature slice or `stats.json` records it (to tell stale results apart).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified_unix_ns: u128,
}

fn source_of(path: &Path) -> Result<Source, DedupError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    let modified = meta.modified().map_err(io_err(path))?;
    Ok(Source {
        path: path.to_path_buf(),
        bytes: meta.len(),
        modified_unix_ns: modified
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    })
}

/// What a signature table was made from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableMeta {
    format_version: u32,
    params: Params,
    exact: Normalize,
    /// Every input file of the run (slices index into it), or none for an index.
    sources: Vec<Source>,
    /// Always `None` (index files made before the array stages kept a slice here).
    slice: Option<Task>,
    docs: usize,
    /// Bumped on each update of an index; its files are `index-G.bin` / `index-G.ids`.
    generation: u64,
}

/// Documents' ids and signature records (`HEAD + num_perm` words each).
#[derive(Default)]
struct SigTable {
    ids: Vec<String>,
    words: Vec<u64>,
    /// CPU seconds spent in shingling + signatures, summed over documents.
    minhash_seconds: f64,
    /// Wall seconds the signature tasks took (of a table read back from their markers).
    signature_seconds: f64,
}

impl SigTable {
    /// Appends another table's documents (the next signature task's).
    fn append(&mut self, other: SigTable) {
        self.ids.extend(other.ids);
        self.words.extend(other.words);
        self.minhash_seconds += other.minhash_seconds;
        self.signature_seconds += other.signature_seconds;
    }

    fn write(&self, bin: &Path, ids: &Path) -> Result<(), DedupError> {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        atomic::write_bytes(bin, &bytes).map_err(io_err(bin))?;
        let mut text = String::new();
        for id in &self.ids {
            text.push_str(&serde_json::to_string(id).expect("a string serialises"));
            text.push('\n');
        }
        atomic::write_bytes(ids, text.as_bytes()).map_err(io_err(ids))
    }

    fn read(bin: &Path, ids: &Path, docs: usize, stride: usize) -> Result<Self, DedupError> {
        let damaged = |path: &Path, reason: String| DedupError::Damaged {
            path: path.to_path_buf(),
            reason: format!(
                "{reason}; delete it and its completion marker (or index.json) and run again"
            ),
        };
        let mut file = std::fs::File::open(bin).map_err(io_err(bin))?;
        let found = file.metadata().map_err(io_err(bin))?.len();
        if found != (docs * stride * 8) as u64 {
            let reason = format!(
                "expected {} bytes for {docs} documents, found {found}",
                docs * stride * 8
            );
            return Err(damaged(bin, reason));
        }
        // Read straight into the words: one buffer's page faults, not two (a bucket task reads
        // every signature file).
        let mut words = vec![0u64; docs * stride];
        file.read_exact(minhash::words_as_bytes_mut(&mut words))
            .map_err(io_err(bin))?;
        words.iter_mut().for_each(|w| *w = u64::from_le(*w));
        Ok(SigTable {
            ids: read_ids(ids, docs)?,
            words,
            ..SigTable::default()
        })
    }
}

/// The `docs` ids of a signature table's `.ids` file (one JSON string a line).
fn read_ids(path: &Path, docs: usize) -> Result<Vec<String>, DedupError> {
    let damaged = |reason: String| DedupError::Damaged {
        path: path.to_path_buf(),
        reason: format!(
            "{reason}; delete it and its completion marker (or index.json) and run again"
        ),
    };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let ids: Vec<String> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| damaged(e.to_string()))?;
    if ids.len() != docs {
        return Err(damaged(format!("expected {docs} ids, found {}", ids.len())));
    }
    Ok(ids)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DedupError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| DedupError::Damaged {
        path: path.to_path_buf(),
        reason: format!("{e}; delete it and run again"),
    })
}

/// A union-find whose root is always the least member.
struct Clusters {
    parent: Vec<u32>,
}

impl Clusters {
    fn new(n: usize) -> Self {
        Clusters {
            parent: (0..n as u32).collect(),
        }
    }

    fn find(&mut self, mut x: u32) -> u32 {
        while self.parent[x as usize] != x {
            let grand = self.parent[self.parent[x as usize] as usize];
            self.parent[x as usize] = grand;
            x = grand;
        }
        x
    }

    fn union(&mut self, a: u32, b: u32) {
        let (ra, rb) = (self.find(a), self.find(b));
        let (lo, hi) = (ra.min(rb), ra.max(rb));
        self.parent[hi as usize] = lo;
    }
}

/// What a run found; written as `stats.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub format_version: u32,
    pub params: Params,
    pub exact_normalize: Normalize,
    pub verify_jaccard: Option<f64>,
    /// Absent from a `stats.json` written before `--keep` existed: `first`.
    #[serde(default)]
    pub keep: Keep,
    pub sources: Vec<Source>,
    pub documents: usize,
    pub bytes: u64,
    pub kept: usize,
    pub removed_exact: usize,
    pub removed_near: usize,
    /// Clusters with at least one removed document.
    pub clusters: usize,
    /// Documents that matched an index document.
    pub removed_by_index: usize,
    pub candidate_pairs: u64,
    pub rejected_by_verify: u64,
    pub index_documents: usize,
    /// The index generation this run writes (None without --index).
    pub index_generation: Option<u64>,
    pub signature_seconds: f64,
    /// CPU seconds in shingling + MinHash alone (no reading, no exact hash), summed over
    /// documents and threads: the per-core signature speed is bytes / this.
    #[serde(default)]
    pub minhash_cpu_seconds: f64,
    pub cluster_seconds: f64,
    pub write_seconds: f64,
    pub threads: usize,
    /// Input entries not read (symlinks out of the tree, FIFOs, devices …), by reason.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub skipped_inputs: std::collections::BTreeMap<InputSkip, u64>,
}

#[derive(Debug)]
pub enum Outcome {
    /// `--stage`: one task of an array stage ran (or found its marker and skipped).
    Task(TaskOutcome),
    Done(Stats),
    UpToDate(Stats),
}

/// The input files of a run, as every stage and task sees them.
struct Corpus {
    files: Vec<InputFile>,
    sources: Vec<Source>,
    skipped: std::collections::BTreeMap<InputSkip, u64>,
}

impl Corpus {
    fn open(opts: &DedupOptions) -> Result<Corpus, DedupError> {
        let walk = WalkOptions {
            follow_symlinks: opts.follow_symlinks,
        };
        let inputs = docs::input_files(&opts.inputs, walk)?;
        let sources = inputs
            .files
            .iter()
            .map(|f| source_of(&f.path))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Corpus {
            files: inputs.files,
            sources,
            skipped: inputs.skipped,
        })
    }

    /// A run's stats from its removals (`total` documents, index ones included); timings and
    /// pair counts are the caller's to fill in.
    fn stats(&self, opts: &DedupOptions, removed: &Removals, total: usize) -> Stats {
        let documents = total - removed.indexed;
        Stats {
            format_version: FORMAT_VERSION,
            params: opts.params,
            exact_normalize: opts.exact,
            verify_jaccard: opts.verify_jaccard,
            keep: opts.keep,
            bytes: self.sources.iter().map(|s| s.bytes).sum(),
            sources: self.sources.clone(),
            documents,
            kept: documents - removed.exact - removed.near,
            removed_exact: removed.exact,
            removed_near: removed.near,
            clusters: removed.clusters,
            removed_by_index: removed.by_index,
            candidate_pairs: 0,
            rejected_by_verify: 0,
            index_documents: removed.indexed,
            index_generation: None,
            signature_seconds: 0.0,
            minhash_cpu_seconds: 0.0,
            cluster_seconds: 0.0,
            write_seconds: 0.0,
            threads: rayon::current_num_threads(),
            skipped_inputs: self.skipped.clone(),
        }
    }
}

/// Runs dedup as the module documentation describes, or one task of an array stage (`--stage`,
/// or `--shard` alone: a signature task); `progress` is called with bytes hashed.
pub fn run(opts: &DedupOptions, progress: &(dyn Fn(u64) + Sync)) -> Result<Outcome, DedupError> {
    check_settings(opts)?;
    // Checked before anything is created: the lock file would be written into the input.
    outdir::check_apart(&opts.out, &opts.inputs)?;
    let (lock, _index_lock) = lock_dirs(opts)?;
    let mut written = Written::open(&opts.out, &lock)?;
    let corpus = Corpus::open(opts)?;
    let hasher = MinHasher::new(opts.params);
    let cx = stages::Ctx {
        opts,
        corpus: &corpus,
        hasher: &hasher,
    };
    match array_stage(opts) {
        Some(stage) => stages::run_task(&cx, stage, opts.shard, &lock, &mut written, progress)
            .map(Outcome::Task),
        None => whole_run(&cx, &mut written, progress),
    }
}

/// The array stage this run is a task of: `--stage`, or a signature task for `--shard` alone.
fn array_stage(opts: &DedupOptions) -> Option<Stage> {
    opts.stage.or(opts.shard.map(|_| Stage::Signatures))
}

/// All of dedup in one process: the stages' functions over every file and band at once.
fn whole_run(
    cx: &stages::Ctx,
    written: &mut Written,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Outcome, DedupError> {
    let (opts, files, hasher) = (cx.opts, &cx.corpus.files, cx.hasher);
    let stats_path = opts.out.join(STATS_FILE);
    if let Some(old) = previous_stats(opts, &cx.corpus.sources, &stats_path, written)? {
        return Ok(Outcome::UpToDate(old));
    }
    // Everything this run writes, before the work: a file phigen did not write stops it now.
    for rel in files
        .iter()
        .map(|f| f.rel.as_path())
        .chain([Path::new(REMOVED_FILE), Path::new(STATS_FILE)])
    {
        written.claim(rel)?;
    }

    // 1. Signatures.
    let started = Instant::now();
    let table = stages::all_signatures(cx, written, progress)?;
    let signature_seconds = started.elapsed().as_secs_f64();
    let stride = HEAD + opts.params.num_perm();
    let (index_meta, index) = match &opts.index {
        Some(dir) => load_index(dir, &opts.params, opts.exact, stride)?,
        None => (None, SigTable::default()),
    };
    let all = Documents::new(&index, &table, stride, opts.keep);
    let sets: Option<Vec<Vec<u64>>> = match opts.verify_jaccard {
        Some(_) => Some(shingle_sets(
            files,
            hasher,
            all.new_positions()
                .map(|p| (all.record(p)[0], all.record(p)[1])),
        )?),
        None => None,
    };

    // 2. Clusters.
    let cluster_started = Instant::now();
    let verify = sets.as_deref().zip(opts.verify_jaccard);
    let Clustering {
        mut clusters,
        candidate_pairs,
        rejected,
    } = cluster(&all, hasher, opts.params.bands, verify);
    let cluster_seconds = cluster_started.elapsed().as_secs_f64();

    // 3. Outputs.
    let write_started = Instant::now();
    let removed = removals(&all, &mut clusters, files, sets.as_deref());
    write_kept(files, &removed.per_file, &opts.out, |_| true)?;
    write_removed(&removed, &opts.out)?;
    let index_generation = match &opts.index {
        Some(dir) => Some(write_next_index(
            dir,
            index_meta.as_ref(),
            &all,
            &mut clusters,
        )?),
        None => None,
    };
    let stats = Stats {
        candidate_pairs,
        rejected_by_verify: rejected,
        index_generation,
        signature_seconds,
        minhash_cpu_seconds: table.minhash_seconds,
        cluster_seconds,
        write_seconds: write_started.elapsed().as_secs_f64(),
        ..cx.corpus.stats(opts, &removed, all.len())
    };
    atomic::write_json(&stats_path, &stats).map_err(io_err(&stats_path))?;
    if let (Some(dir), Some(generation)) = (&opts.index, index_generation) {
        commit_index(dir, &opts.params, opts.exact, generation)?;
    }
    Ok(Outcome::Done(stats))
}

/// Locks `OUT` (an array task: its task only) and, for a whole run, the `--index` directory.
fn lock_dirs(opts: &DedupOptions) -> Result<(DirLock, Option<DirLock>), DedupError> {
    let array = array_stage(opts).is_some();
    let lock = match (array, opts.shard) {
        (true, Some(t)) => DirLock::slice(&opts.out, t.k, t.n)?,
        (true, None) => DirLock::slice(&opts.out, 0, 1)?,
        (false, _) => DirLock::exclusive(&opts.out)?,
    };
    let index_lock = match &opts.index {
        Some(dir) if !array && !same_dir(dir, &opts.out) => Some(DirLock::exclusive(dir)?),
        _ => None,
    };
    Ok((lock, index_lock))
}

/// Refuses settings no run can use, before anything is locked or written.
fn check_settings(opts: &DedupOptions) -> Result<(), DedupError> {
    if let Some(t) = opts.verify_jaccard {
        if !(0.0..=1.0).contains(&t) {
            return Err(DedupError::Settings(format!(
                "--verify-jaccard must be in [0, 1], found {t}"
            )));
        }
    }
    if opts.params.bands == 0 || opts.params.rows == 0 {
        return Err(DedupError::Settings(
            "--bands and --rows must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The `stats.json` of an earlier run of the same inputs and settings (its outputs stand; an
/// `--index` generation it wrote but did not commit is committed now). A stale one is removed.
fn previous_stats(
    opts: &DedupOptions,
    sources: &[Source],
    stats_path: &Path,
    written: &mut Written,
) -> Result<Option<Stats>, DedupError> {
    if !stats_path.exists() {
        return Ok(None);
    }
    let old: Stats = read_json(stats_path)?;
    if old.sources == sources
        && old.params == opts.params
        && old.exact_normalize == opts.exact
        && old.verify_jaccard == opts.verify_jaccard
        && old.keep == opts.keep
    {
        if let (Some(dir), Some(generation)) = (&opts.index, old.index_generation) {
            commit_index(dir, &opts.params, opts.exact, generation)?;
        }
        return Ok(Some(old));
    }
    written.claim(Path::new(STATS_FILE))?;
    std::fs::remove_file(stats_path).map_err(io_err(stats_path))?;
    Ok(None)
}

/// Every document in cluster order: position p < m is index document p; p ≥ m is new document
/// `order[p - m]`, new documents being ordered by (file, row), or by id for [`Keep::LeastId`].
struct Documents<'a> {
    index: &'a SigTable,
    new: &'a SigTable,
    order: Vec<usize>,
    stride: usize,
}

impl<'a> Documents<'a> {
    fn new(index: &'a SigTable, new: &'a SigTable, stride: usize, keep: Keep) -> Self {
        let mut order: Vec<usize> = (0..new.ids.len()).collect();
        let at = |i: usize| (new.words[i * stride], new.words[i * stride + 1]);
        match keep {
            Keep::First => order.sort_by_key(|&i| at(i)),
            Keep::LeastId => {
                order.sort_by(|&a, &b| new.ids[a].cmp(&new.ids[b]).then(at(a).cmp(&at(b))))
            }
        }
        Documents {
            index,
            new,
            order,
            stride,
        }
    }

    /// m: the number of index documents.
    fn indexed(&self) -> usize {
        self.index.ids.len()
    }

    fn len(&self) -> usize {
        self.indexed() + self.order.len()
    }

    /// Positions of this run's documents.
    fn new_positions(&self) -> std::ops::Range<usize> {
        self.indexed()..self.len()
    }

    /// Document p's signature record (`HEAD + num_perm` words).
    fn record(&self, p: usize) -> &'a [u64] {
        let (m, stride) = (self.indexed(), self.stride);
        if p < m {
            &self.index.words[p * stride..(p + 1) * stride]
        } else {
            let i = self.order[p - m];
            &self.new.words[i * stride..(i + 1) * stride]
        }
    }

    /// The index in the table of this run's documents of the one at position `p` (≥ m).
    fn new_index(&self, p: usize) -> usize {
        self.order[p - self.indexed()]
    }

    fn id(&self, p: usize) -> &'a str {
        let m = self.indexed();
        if p < m {
            &self.index.ids[p]
        } else {
            &self.new.ids[self.order[p - m]]
        }
    }

    fn exact_hash(&self, p: usize) -> (u64, u64) {
        let r = self.record(p);
        (r[2], r[3])
    }
}

struct Clustering {
    clusters: Clusters,
    candidate_pairs: u64,
    /// Candidate pairs whose verified similarity was under the threshold.
    rejected: u64,
}

/// Joins documents with equal exact hashes, then those sharing an LSH band key (each with the
/// least document of its bucket). `verify`: new documents' shingle sets and the Jaccard threshold
/// a candidate pair must reach.
fn cluster(
    all: &Documents,
    hasher: &MinHasher,
    bands: usize,
    verify: Option<(&[Vec<u64>], f64)>,
) -> Clustering {
    let m = all.indexed();
    let mut clusters = Clusters::new(all.len());
    join_exact(all, &mut clusters);
    let (mut candidate_pairs, mut rejected) = (0u64, 0u64);
    let mut verified: HashMap<(u32, u32), bool> = HashMap::default();
    let key = |p: u32, j| hasher.band_key(&all.record(p as usize)[HEAD..], j);
    each_candidate(&live_positions(all), 0..bands, key, |first, p| {
        candidate_pairs += 1;
        let similar = match verify {
            Some((sets, t)) => *verified.entry((first, p)).or_insert_with(|| {
                let (a, b) = (first as usize, p as usize);
                if a < m {
                    // An index document's text is gone: its signature is the best evidence.
                    minhash::estimated_similarity(&all.record(a)[HEAD..], &all.record(b)[HEAD..])
                        >= t
                } else {
                    minhash::jaccard(&sets[a - m], &sets[b - m]) >= t
                }
            }),
            None => true,
        };
        if similar {
            clusters.union(first, p);
        } else {
            rejected += 1;
        }
    });
    Clustering {
        clusters,
        candidate_pairs,
        rejected,
    }
}

/// Joins each document with the first document of its exact hash.
fn join_exact(all: &Documents, clusters: &mut Clusters) {
    let mut first_exact: HashMap<(u64, u64), u32> = HashMap::default();
    for p in 0..all.len() {
        let first = *first_exact.entry(all.exact_hash(p)).or_insert(p as u32);
        clusters.union(first, p as u32);
    }
}

/// The positions of the documents that have shingles (the others are in no LSH bucket).
fn live_positions(all: &Documents) -> Vec<u32> {
    (0..all.len() as u32)
        .filter(|&p| !minhash::is_empty(&all.record(p as usize)[HEAD..]))
        .collect()
}

/// Calls `pair(first, p)` for every `live` document `p` whose band-`j` key (`key(p, j)`) it shares
/// with a lesser one, `first` being the least document of that bucket (band by band, in key order).
fn each_candidate(
    live: &[u32],
    bands: std::ops::Range<usize>,
    key: impl Fn(u32, usize) -> u64 + Sync,
    mut pair: impl FnMut(u32, u32),
) {
    for j in bands {
        let mut keys: Vec<(u64, u32)> = live.par_iter().map(|&p| (key(p, j), p)).collect();
        keys.par_sort_unstable();
        for run in keys.chunk_by(|a, b| a.0 == b.0) {
            let first = run[0].1;
            for &(_, p) in &run[1..] {
                pair(first, p);
            }
        }
    }
}

row! {
    /// One row of `removed.parquet`: a removed document and the one its cluster kept.
    struct Removed {
        id: String,
        file: String,
        row: u64,
        cluster: usize,
        kept_id: String,
        /// `exact` or `near`.
        reason: &'static str,
        estimated_similarity: f64,
        /// The true Jaccard similarity, with --verify-jaccard and a kept document of this run.
        exact_similarity: Option<f64>,
    }
}

/// The new documents that are not their cluster's representative.
struct Removals {
    /// Removed rows, per input file.
    per_file: Vec<HashSet<usize>>,
    /// One row of `removed.parquet` per removed document, its cells in [`Removed::COLUMNS`] order.
    rows: Vec<Vec<Value>>,
    exact: usize,
    near: usize,
    /// Removed because they duplicate an index document.
    by_index: usize,
    /// Clusters with at least one removed document.
    clusters: usize,
    /// Index documents among those clustered.
    indexed: usize,
}

fn removals(
    all: &Documents,
    clusters: &mut Clusters,
    files: &[InputFile],
    sets: Option<&[Vec<u64>]>,
) -> Removals {
    let m = all.indexed();
    let mut per_file: Vec<HashSet<usize>> = vec![HashSet::default(); files.len()];
    let mut cluster_no: HashMap<u32, usize> = HashMap::default();
    let (mut rows, mut removed_exact, mut removed_near, mut by_index) = (Vec::new(), 0, 0, 0);
    for p in all.new_positions() {
        let rep = clusters.find(p as u32) as usize;
        if rep == p {
            continue;
        }
        let rec = all.record(p);
        per_file[rec[0] as usize].insert(rec[1] as usize);
        let next = cluster_no.len();
        let cluster = *cluster_no.entry(rep as u32).or_insert(next);
        let exact = all.exact_hash(p) == all.exact_hash(rep);
        if exact {
            removed_exact += 1;
        } else {
            removed_near += 1;
        }
        by_index += usize::from(rep < m);
        let exact_similarity = match sets {
            Some(sets) if rep >= m => Some(minhash::jaccard(&sets[p - m], &sets[rep - m])),
            _ => None,
        };
        let mut cells = Vec::with_capacity(Removed::COLUMNS.len());
        Removed {
            id: all.id(p).to_string(),
            file: files[rec[0] as usize].path.display().to_string(),
            row: rec[1],
            cluster,
            kept_id: all.id(rep).to_string(),
            reason: if exact { "exact" } else { "near" },
            estimated_similarity: minhash::estimated_similarity(
                &rec[HEAD..],
                &all.record(rep)[HEAD..],
            ),
            exact_similarity,
        }
        .push_cells(&mut cells);
        rows.push(cells);
    }
    Removals {
        per_file,
        rows,
        exact: removed_exact,
        near: removed_near,
        by_index,
        clusters: cluster_no.len(),
        indexed: m,
    }
}

/// Each input file `owns` accepts (by index), minus its removed rows.
fn write_kept(
    files: &[InputFile],
    per_file: &[HashSet<usize>],
    out: &Path,
    owns: impl Fn(usize) -> bool + Sync,
) -> Result<(), DedupError> {
    files
        .par_iter()
        .zip(per_file)
        .enumerate()
        .filter(|(f, _)| owns(*f))
        .try_for_each(|(_, (file, rows))| {
            let dst = out.join(&file.rel);
            if rows.is_empty() {
                docs::copy_whole(&file.path, &dst)
            } else {
                docs::write_subset(&file.path, &dst, |r| rows.contains(&r))
            }
        })?;
    Ok(())
}

/// `removed.parquet`: one row per removed document, in cluster order.
fn write_removed(removed: &Removals, out: &Path) -> Result<(), DedupError> {
    table::write_parquet(
        &out.join(REMOVED_FILE),
        &Removed::COLUMNS.to_vec(),
        &removed.rows,
    )?;
    Ok(())
}

/// Writes the index's next generation (its documents plus this run's kept ones) and returns its
/// number; `commit_index` makes it current once `stats.json` is written.
fn write_next_index(
    dir: &Path,
    meta: Option<&TableMeta>,
    all: &Documents,
    clusters: &mut Clusters,
) -> Result<u64, DedupError> {
    let generation = meta.map_or(0, |meta| meta.generation) + 1;
    let mut next = SigTable {
        ids: all.index.ids.clone(),
        words: all.index.words.clone(),
        ..SigTable::default()
    };
    for p in all.new_positions() {
        if clusters.find(p as u32) as usize == p {
            next.ids.push(all.id(p).to_string());
            next.words.extend_from_slice(all.record(p));
        }
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    next.write(
        &dir.join(format!("index-{generation}.bin")),
        &dir.join(format!("index-{generation}.ids")),
    )?;
    Ok(generation)
}

/// Whether two directories are one (an --index given as the --out itself is locked once).
fn same_dir(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// The shingle sets of the given (file, row) documents, in that order.
fn shingle_sets(
    files: &[InputFile],
    hasher: &MinHasher,
    wanted: impl Iterator<Item = (u64, u64)>,
) -> Result<Vec<Vec<u64>>, DedupError> {
    let wanted: Vec<(u64, u64)> = wanted.collect();
    let mut sets: HashMap<(u64, u64), Vec<u64>> =
        HashMap::with_capacity_and_hasher(wanted.len(), Default::default());
    for (f, file) in files.iter().enumerate() {
        docs::read_documents(&file.path, |batch| {
            let done: Vec<((u64, u64), Vec<u64>)> = batch
                .par_iter()
                .map(|d| ((f as u64, d.row as u64), hasher.shingle_set(&d.text)))
                .collect();
            sets.extend(done);
            Ok::<(), DedupError>(())
        })?;
    }
    Ok(wanted
        .iter()
        .map(|k| sets.remove(k).unwrap_or_default())
        .collect())
}

fn index_meta_path(dir: &Path) -> PathBuf {
    dir.join("index.json")
}

fn load_index(
    dir: &Path,
    params: &Params,
    exact: Normalize,
    stride: usize,
) -> Result<(Option<TableMeta>, SigTable), DedupError> {
    let path = index_meta_path(dir);
    if !path.exists() {
        return Ok((None, SigTable::default()));
    }
    let meta: TableMeta = read_json(&path)?;
    if meta.params != *params || meta.exact != exact {
        return Err(DedupError::OtherSettings {
            path,
            expected: format!("{params:?}, exact {exact:?}"),
            found: format!("{:?}, exact {:?}", meta.params, meta.exact),
        });
    }
    let g = meta.generation;
    let table = SigTable::read(
        &dir.join(format!("index-{g}.bin")),
        &dir.join(format!("index-{g}.ids")),
        meta.docs,
        stride,
    )?;
    Ok((Some(meta), table))
}

/// Points `index.json` at generation `g` (its files are written) and removes older generations.
fn commit_index(dir: &Path, params: &Params, exact: Normalize, g: u64) -> Result<(), DedupError> {
    let path = index_meta_path(dir);
    if path.exists() && read_json::<TableMeta>(&path)?.generation >= g {
        return Ok(());
    }
    let ids = std::fs::read_to_string(dir.join(format!("index-{g}.ids"))).map_err(io_err(dir))?;
    let meta = TableMeta {
        format_version: FORMAT_VERSION,
        params: *params,
        exact,
        sources: Vec::new(),
        slice: None,
        docs: ids.lines().count(),
        generation: g,
    };
    atomic::write_json(&path, &meta).map_err(io_err(&path))?;
    for old in 0..g {
        for ext in ["bin", "ids"] {
            let p = dir.join(format!("index-{old}.{ext}"));
            if p.exists() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
