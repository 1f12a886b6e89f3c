//! Dedup as four array stages, in datatrove's MinHash shape: signatures → buckets → clusters →
//! filter. Each stage runs as N tasks of a Slurm array or a Kubernetes Indexed Job
//! ([`crate::artifact::task`]); together they write exactly what one `phigen dedup` writes.
//!
//! Below `OUT` (task K of N; `NNNNN` is K in five digits):
//!
//! | stage | task K does | writes |
//! |---|---|---|
//! | `signatures` | hashes the input files `i ≡ K mod N` | `signatures/NNNNN.{bin,ids}` |
//! | `buckets` | reads every signature file, keys bands `[K·B/N, (K+1)·B/N)` | `buckets/NNNNN.pairs` |
//! | `clusters` | one task: union-find over every pair and equal exact hash | `removed.parquet`, `clusters/removed-rows.bin` |
//! | `filter` | writes the kept rows of the input files `i ≡ K mod N` | those files; the last task `stats.json` |
//!
//! Every task writes its files atomically, then its marker `STAGE/completions/NNNNN` holding a
//! fingerprint of the inputs (paths, sizes, mtimes) and settings. A relaunched task whose marker
//! matches skips its work; a killed one left at most a `.tmp` file, which the relaunch overwrites.
//! A stage reading an earlier one's output first checks that all its markers are there (the task
//! count is read from the markers) and names the missing task ids.
//!
//! Documents are numbered as in one run (by file and row, or by id), so a pair found
//! by any bucket task is the pair one run finds, and the clusters, their survivors and
//! `removed.parquet` (written whole by the one clusters task, rows in one run's order) are one
//! run's, whatever each stage's task count or the order its tasks ran in. `stats.json` is written
//! by every filter task that finds all filter markers present (the last to finish, or a
//! relaunch); each writes the same bytes under a temp name of its own.
//!
//! `--index` and `--verify-jaccard` need one process: the stages after `signatures` refuse them.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use foldhash::{HashMap, HashSet};
use rayon::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::*;
use crate::artifact::task::{id_list, Marker, Task, COMPLETIONS};

pub const SIGNATURES: &str = "signatures";
pub const BUCKETS: &str = "buckets";
pub const CLUSTERS: &str = "clusters";
pub const FILTER: &str = "filter";
/// The clusters task's removed (file, row) pairs, for the filter tasks.
const REMOVED_ROWS: &str = "clusters/removed-rows.bin";

/// One of dedup's array stages (`--stage`), in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Task K hashes the input files it owns (i mod N = K).
    Signatures,
    /// Task K finds the duplicate pairs of its contiguous range of LSH bands.
    Buckets,
    /// One task: union-find over all pairs; writes removed.parquet.
    Clusters,
    /// Task K writes the kept documents of the input files it owns; the last one stats.json.
    Filter,
}

impl Stage {
    /// The stage's directory below `OUT`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Stage::Signatures => SIGNATURES,
            Stage::Buckets => BUCKETS,
            Stage::Clusters => CLUSTERS,
            Stage::Filter => FILTER,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// What one task of a stage did.
#[derive(Debug)]
pub struct TaskOutcome {
    pub stage: Stage,
    pub task: Task,
    /// Its marker was there, made from these inputs and settings: nothing was redone.
    pub skipped: bool,
    /// A filter task that found every filter task finished: the `stats.json` it wrote.
    pub merged: Option<Stats>,
}

/// What a stage task needs: the options, the input files and the hasher.
pub(super) struct Ctx<'a> {
    pub opts: &'a DedupOptions,
    pub corpus: &'a Corpus,
    pub hasher: &'a MinHasher,
}

impl Ctx<'_> {
    fn stride(&self) -> usize {
        HEAD + self.opts.params.num_perm()
    }

    fn dir(&self, stage: Stage) -> PathBuf {
        self.opts.out.join(stage.dir_name())
    }

    /// What signatures depend on: the inputs, the MinHash and exact-hash settings.
    fn signature_fingerprint(&self) -> String {
        self.fingerprint(None)
    }

    /// What the later stages depend on: that, and which document a cluster keeps.
    fn run_fingerprint(&self) -> String {
        self.fingerprint(Some(self.opts.keep))
    }

    fn fingerprint(&self, keep: Option<Keep>) -> String {
        #[derive(Serialize)]
        struct Of<'a> {
            format_version: u32,
            params: &'a Params,
            exact: Normalize,
            keep: Option<Keep>,
            sources: &'a [Source],
        }
        let of = Of {
            format_version: FORMAT_VERSION,
            params: &self.opts.params,
            exact: self.opts.exact,
            keep,
            sources: &self.corpus.sources,
        };
        let bytes = serde_json::to_vec(&of).expect("settings serialise");
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes))
    }
}

/// A signature task's marker stats.
#[derive(Serialize, Deserialize)]
struct SignaturesDone {
    fingerprint: String,
    documents: usize,
    minhash_cpu_seconds: f64,
    seconds: f64,
}

/// A bucket task's marker stats.
#[derive(Serialize, Deserialize)]
struct BucketsDone {
    fingerprint: String,
    bands: Range<usize>,
    /// Candidate pairs met, repeats across bands included (as one run counts them).
    candidate_pairs: u64,
    /// Distinct pairs written.
    pairs: usize,
    seconds: f64,
}

/// The clusters task's marker stats: the run's stats but the filter tasks' write time.
#[derive(Serialize, Deserialize)]
struct ClustersDone {
    fingerprint: String,
    stats: Stats,
}

/// A filter task's marker stats.
#[derive(Serialize, Deserialize)]
struct FilterDone {
    fingerprint: String,
    files: usize,
    seconds: f64,
}

/// Runs task `task` of `stage` (`None`: the stage as one task, 0/1).
pub(super) fn run_task(
    cx: &Ctx,
    stage: Stage,
    task: Option<Task>,
    lock: &DirLock,
    written: &mut Written,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<TaskOutcome, DedupError> {
    check_stage_settings(cx.opts, stage)?;
    let task = task.unwrap_or(Task { k: 0, n: 1 });
    let (skipped, merged) = match stage {
        Stage::Signatures => match signatures_done(cx, task) {
            Some(_) => (true, None),
            None => (
                signature_task(cx, task, written, progress).map(|_| false)?,
                None,
            ),
        },
        Stage::Buckets => (bucket_task(cx, task, written)?, None),
        Stage::Clusters => {
            if task.n != 1 {
                return Err(DedupError::OneTask { task });
            }
            (clusters_task(cx, written)?, None)
        }
        Stage::Filter => {
            let skipped = filter_task(cx, task, written)?;
            (skipped, merge(cx, task.n, lock)?)
        }
    };
    Ok(TaskOutcome {
        stage,
        task,
        skipped,
        merged,
    })
}

/// `--index` and `--verify-jaccard` change what is clustered, so only signature tasks (whose
/// output they do not change, and which a later whole run with them reuses) accept them.
fn check_stage_settings(opts: &DedupOptions, stage: Stage) -> Result<(), DedupError> {
    let unsupported = if stage == Stage::Signatures {
        None
    } else if opts.index.is_some() {
        Some("--index")
    } else if opts.verify_jaccard.is_some() {
        Some("--verify-jaccard")
    } else {
        None
    };
    match unsupported {
        Some(flag) => Err(DedupError::Unsupported { stage, flag }),
        None => Ok(()),
    }
}

/// The marker of `task` below `dir`, when it was written by that task for this fingerprint.
fn finished<T: DeserializeOwned>(dir: &Path, task: Task, fingerprint: &str) -> Option<T> {
    let marker: Marker = serde_json::from_slice(&std::fs::read(task.marker(dir)).ok()?).ok()?;
    let same = marker.stats.get("fingerprint").and_then(Value::as_str) == Some(fingerprint);
    (marker.task == task && same)
        .then(|| serde_json::from_value(marker.stats).ok())
        .flatten()
}

/// The task count of the array whose markers for this fingerprint are below `dir`, if any: the
/// count of a complete set (an array relaunched with fewer tasks leaves the higher markers of the
/// old one), else the count most of them name.
fn task_count(dir: &Path, fingerprint: &str) -> Result<Option<usize>, DedupError> {
    let completions = dir.join(COMPLETIONS);
    let Ok(entries) = std::fs::read_dir(&completions) else {
        return Ok(None);
    };
    let mut counts: HashMap<usize, usize> = HashMap::default();
    for entry in entries {
        let path = entry.map_err(io_err(&completions))?.path();
        let Some(marker) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
        else {
            continue;
        };
        if marker.stats.get("fingerprint").and_then(Value::as_str) == Some(fingerprint) {
            *counts.entry(marker.task.n).or_default() += 1;
        }
    }
    let complete = counts
        .iter()
        .filter(|&(n, count)| n == count)
        .map(|(&n, _)| n)
        .min();
    Ok(complete.or_else(|| {
        counts
            .into_iter()
            .max_by_key(|&(n, count)| (count, n))
            .map(|(n, _)| n)
    }))
}

/// Every task's marker stats of a finished stage, in task order; else which tasks are missing.
fn finished_stage<T: DeserializeOwned>(
    cx: &Ctx,
    stage: Stage,
    fingerprint: &str,
) -> Result<Vec<T>, DedupError> {
    let dir = cx.dir(stage);
    let n = task_count(&dir, fingerprint)?.ok_or_else(|| DedupError::StageNotRun {
        dir: dir.clone(),
        stage,
    })?;
    let mut found = Vec::with_capacity(n);
    let mut missing = Vec::new();
    for k in 0..n {
        match finished(&dir, Task { k, n }, fingerprint) {
            Some(t) => found.push(t),
            None => missing.push(k),
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(DedupError::Unfinished {
            dir,
            stage,
            n,
            ids: id_list(&missing),
        })
    }
}

/// Claims a task's files, its marker included, before any is written.
fn claim_all(written: &mut Written, rels: &[PathBuf]) -> Result<(), DedupError> {
    for rel in rels {
        written.claim(rel)?;
    }
    Ok(())
}

/// Writes `task`'s marker below `stage`'s directory, after all its files.
fn mark_done(cx: &Ctx, stage: Stage, task: Task, stats: &impl Serialize) -> Result<(), DedupError> {
    let dir = cx.dir(stage);
    let value = serde_json::to_value(stats).expect("marker stats serialise");
    task.mark_done(&dir, value)
        .map_err(io_err(&task.marker(&dir)))
}

fn signature_files(k: usize) -> [PathBuf; 2] {
    ["bin", "ids"].map(|ext| Path::new(SIGNATURES).join(format!("{k:05}.{ext}")))
}

/// Signature task `task`'s marker, when it was made from these inputs and settings.
fn signatures_done(cx: &Ctx, task: Task) -> Option<SignaturesDone> {
    finished(
        &cx.dir(Stage::Signatures),
        task,
        &cx.signature_fingerprint(),
    )
}

/// The signatures a finished signature task wrote.
fn read_signature_task(cx: &Ctx, k: usize, done: &SignaturesDone) -> Result<SigTable, DedupError> {
    let [bin, ids] = signature_files(k).map(|rel| cx.opts.out.join(rel));
    let mut table = SigTable::read(&bin, &ids, done.documents, cx.stride())?;
    table.minhash_seconds = done.minhash_cpu_seconds;
    table.signature_seconds = done.seconds;
    Ok(table)
}

/// Signature task `task`: hashes the documents of the input files it owns, writes them, then its
/// marker.
fn signature_task(
    cx: &Ctx,
    task: Task,
    written: &mut Written,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SigTable, DedupError> {
    let [bin, ids] = signature_files(task.k);
    let marker = task.marker(Path::new(SIGNATURES));
    claim_all(written, &[bin.clone(), ids.clone(), marker])?;
    let started = Instant::now();
    let owned = cx
        .corpus
        .files
        .iter()
        .enumerate()
        .filter(|(f, _)| task.owns(*f));
    let mut table = hash_files(cx, owned, progress)?;
    let dir = cx.dir(Stage::Signatures);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    table.write(&cx.opts.out.join(&bin), &cx.opts.out.join(&ids))?;
    table.signature_seconds = started.elapsed().as_secs_f64();
    let done = SignaturesDone {
        fingerprint: cx.signature_fingerprint(),
        documents: table.ids.len(),
        minhash_cpu_seconds: table.minhash_seconds,
        seconds: table.signature_seconds,
    };
    mark_done(cx, Stage::Signatures, task, &done)?;
    Ok(table)
}

/// Each document's record (file index, row, exact hash, signature) and id, file by file.
fn hash_files<'a>(
    cx: &Ctx,
    files: impl Iterator<Item = (usize, &'a InputFile)>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SigTable, DedupError> {
    let mut table = SigTable::default();
    let minhash_nanos = std::sync::atomic::AtomicU64::new(0);
    for (f, file) in files {
        docs::read_documents(&file.path, |batch| {
            let records: Vec<Vec<u64>> = batch
                .par_iter()
                .map(|d| {
                    let exact = minhash::exact_hash(&d.text, cx.opts.exact);
                    let mut rec = vec![f as u64, d.row as u64, exact as u64, (exact >> 64) as u64];
                    let started = Instant::now();
                    rec.extend(cx.hasher.signature(&d.text));
                    let nanos = started.elapsed().as_nanos() as u64;
                    minhash_nanos.fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
                    rec
                })
                .collect();
            progress(batch.iter().map(|d| d.text.len() as u64).sum());
            table.words.extend(records.into_iter().flatten());
            table.ids.extend(batch.into_iter().map(|d| d.id));
            Ok::<(), DedupError>(())
        })?;
    }
    table.minhash_seconds = minhash_nanos.into_inner() as f64 * 1e-9;
    Ok(table)
}

/// One run's signatures: every task of the signature array whose markers are there (computing the
/// missing ones), or one task 0/1 of everything.
pub(super) fn all_signatures(
    cx: &Ctx,
    written: &mut Written,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<SigTable, DedupError> {
    let n = task_count(&cx.dir(Stage::Signatures), &cx.signature_fingerprint())?.unwrap_or(1);
    let mut table = SigTable::default();
    for k in 0..n {
        let task = Task { k, n };
        table.append(match signatures_done(cx, task) {
            Some(done) => read_signature_task(cx, k, &done)?,
            None => signature_task(cx, task, written, progress)?,
        });
    }
    Ok(table)
}

/// The signatures of a finished signature array, for the later stages.
fn read_signatures(cx: &Ctx) -> Result<SigTable, DedupError> {
    let done: Vec<SignaturesDone> =
        finished_stage(cx, Stage::Signatures, &cx.signature_fingerprint())?;
    let mut table = SigTable::default();
    for (k, done) in done.iter().enumerate() {
        table.append(read_signature_task(cx, k, done)?);
    }
    Ok(table)
}

/// Bucket task `task`'s contiguous share of the `bands` LSH bands.
pub fn band_range(task: Task, bands: usize) -> Range<usize> {
    task.k * bands / task.n..(task.k + 1) * bands / task.n
}

fn pairs_file(k: usize) -> PathBuf {
    Path::new(BUCKETS).join(format!("{k:05}.pairs"))
}

/// Finds the candidate pairs of its bands (positions in one run's numbering, each document with
/// the least of its bucket) and writes them distinct and sorted, as little-endian u32 pairs.
fn bucket_task(cx: &Ctx, task: Task, written: &mut Written) -> Result<bool, DedupError> {
    let fingerprint = cx.run_fingerprint();
    if finished::<BucketsDone>(&cx.dir(Stage::Buckets), task, &fingerprint).is_some() {
        return Ok(true);
    }
    let bands = band_range(task, cx.opts.params.bands);
    let (table, has_shingles) = read_band_keys(cx, &bands)?;
    let rel = pairs_file(task.k);
    claim_all(written, &[rel.clone(), task.marker(Path::new(BUCKETS))])?;
    let started = Instant::now();
    let none = SigTable::default();
    let all = Documents::new(&none, &table, HEAD + bands.len(), cx.opts.keep);
    let live: Vec<u32> = (0..all.len())
        .filter(|&p| has_shingles[all.new_index(p)])
        .map(|p| p as u32)
        .collect();
    let key = |p: u32, j: usize| all.record(p as usize)[HEAD + j - bands.start];
    let mut pairs: Vec<(u32, u32)> = Vec::new();
    each_candidate(&live, bands.clone(), key, |a, b| pairs.push((a, b)));
    let candidate_pairs = pairs.len() as u64;
    pairs.par_sort_unstable();
    pairs.dedup();
    let bytes: Vec<u8> = pairs
        .iter()
        .flat_map(|&(a, b)| a.to_le_bytes().into_iter().chain(b.to_le_bytes()))
        .collect();
    let path = cx.opts.out.join(&rel);
    let dir = cx.dir(Stage::Buckets);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    atomic::write_bytes(&path, &bytes).map_err(io_err(&path))?;
    let done = BucketsDone {
        fingerprint,
        bands,
        candidate_pairs,
        pairs: pairs.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    mark_done(cx, Stage::Buckets, task, &done)?;
    Ok(false)
}

/// A bucket task's view of the signatures, in signature-task order: per document its head (file,
/// row, exact hash) and the keys of `bands` (a table of stride `HEAD + bands.len()`), and whether
/// it has shingles. Read a block at a time: a task holds its bands' keys, not every signature.
fn read_band_keys(cx: &Ctx, bands: &Range<usize>) -> Result<(SigTable, Vec<bool>), DedupError> {
    const BLOCK: usize = 4096;
    let done: Vec<SignaturesDone> =
        finished_stage(cx, Stage::Signatures, &cx.signature_fingerprint())?;
    let stride = cx.stride();
    let mut table = SigTable::default();
    let mut has_shingles = Vec::new();
    let mut block = vec![0u64; BLOCK * stride];
    for (k, done) in done.iter().enumerate() {
        let [bin, ids] = signature_files(k).map(|rel| cx.opts.out.join(rel));
        table.ids.extend(read_ids(&ids, done.documents)?);
        let mut file = std::fs::File::open(&bin).map_err(io_err(&bin))?;
        let found = file.metadata().map_err(io_err(&bin))?.len();
        if found != (done.documents * stride * 8) as u64 {
            return Err(DedupError::Damaged {
                path: bin,
                reason: format!(
                    "expected {} bytes for {} documents, found {found}; delete it and its \
                     completion marker and relaunch that signature task",
                    done.documents * stride * 8,
                    done.documents
                ),
            });
        }
        let mut left = done.documents;
        while left > 0 {
            let records = &mut block[..left.min(BLOCK) * stride];
            file.read_exact(minhash::words_as_bytes_mut(records))
                .map_err(io_err(&bin))?;
            for rec in records.chunks_exact_mut(stride) {
                rec.iter_mut().for_each(|w| *w = u64::from_le(*w));
                let (head, sig) = rec.split_at(HEAD);
                table.words.extend_from_slice(head);
                table
                    .words
                    .extend(bands.clone().map(|j| cx.hasher.band_key(sig, j)));
                has_shingles.push(!minhash::is_empty(sig));
            }
            left -= left.min(BLOCK);
        }
    }
    Ok((table, has_shingles))
}

fn read_pairs(path: &Path, expected: usize) -> Result<Vec<(u32, u32)>, DedupError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.len() != expected * 8 {
        return Err(DedupError::Damaged {
            path: path.to_path_buf(),
            reason: format!(
                "expected {expected} pairs ({} bytes), found {} bytes; delete it and its marker \
                 and relaunch that bucket task",
                expected * 8,
                bytes.len()
            ),
        });
    }
    let word = |c: &[u8]| u32::from_le_bytes(c.try_into().expect("4 bytes"));
    Ok(bytes
        .chunks_exact(8)
        .map(|c| (word(&c[..4]), word(&c[4..])))
        .collect())
}

/// The one clusters task: joins equal exact hashes and every bucket task's pairs, then writes
/// `removed.parquet` (one run's rows, in its order) and the removed (file, row) list.
fn clusters_task(cx: &Ctx, written: &mut Written) -> Result<bool, DedupError> {
    let task = Task { k: 0, n: 1 };
    let fingerprint = cx.run_fingerprint();
    if finished::<ClustersDone>(&cx.dir(Stage::Clusters), task, &fingerprint).is_some() {
        return Ok(true);
    }
    let table = read_signatures(cx)?;
    let buckets: Vec<BucketsDone> = finished_stage(cx, Stage::Buckets, &fingerprint)?;
    claim_all(
        written,
        &[
            PathBuf::from(REMOVED_FILE),
            PathBuf::from(REMOVED_ROWS),
            task.marker(Path::new(CLUSTERS)),
        ],
    )?;
    let started = Instant::now();
    let none = SigTable::default();
    let all = Documents::new(&none, &table, cx.stride(), cx.opts.keep);
    let mut clusters = Clusters::new(all.len());
    join_exact(&all, &mut clusters);
    for (k, done) in buckets.iter().enumerate() {
        for (a, b) in read_pairs(&cx.opts.out.join(pairs_file(k)), done.pairs)? {
            clusters.union(a, b);
        }
    }
    let cluster_seconds =
        started.elapsed().as_secs_f64() + buckets.iter().map(|b| b.seconds).sum::<f64>();
    let write_started = Instant::now();
    let removed = removals(&all, &mut clusters, &cx.corpus.files, None);
    write_removed(&removed, &cx.opts.out)?;
    write_removed_rows(&cx.opts.out.join(REMOVED_ROWS), &removed.per_file)?;
    let mut stats = cx.corpus.stats(cx.opts, &removed, all.len());
    stats.candidate_pairs = buckets.iter().map(|b| b.candidate_pairs).sum();
    stats.signature_seconds = table.signature_seconds;
    stats.minhash_cpu_seconds = table.minhash_seconds;
    stats.cluster_seconds = cluster_seconds;
    stats.write_seconds = write_started.elapsed().as_secs_f64();
    mark_done(
        cx,
        Stage::Clusters,
        task,
        &ClustersDone { fingerprint, stats },
    )?;
    Ok(false)
}

/// The removed rows as little-endian (file, row) u64 pairs, by file then row.
fn write_removed_rows(path: &Path, per_file: &[HashSet<usize>]) -> Result<(), DedupError> {
    let mut bytes = Vec::new();
    for (f, rows) in per_file.iter().enumerate() {
        let mut rows: Vec<usize> = rows.iter().copied().collect();
        rows.sort_unstable();
        for row in rows {
            bytes.extend((f as u64).to_le_bytes());
            bytes.extend((row as u64).to_le_bytes());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    atomic::write_bytes(path, &bytes).map_err(io_err(path))
}

/// The removed rows of the files `owns` accepts, per input file.
fn read_removed_rows(
    path: &Path,
    files: usize,
    owns: impl Fn(usize) -> bool,
) -> Result<Vec<HashSet<usize>>, DedupError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let damaged = |reason: String| DedupError::Damaged {
        path: path.to_path_buf(),
        reason: format!("{reason}; delete clusters/ and relaunch `--stage clusters`"),
    };
    if !bytes.len().is_multiple_of(16) {
        return Err(damaged(format!(
            "{} bytes is not a whole number of (file, row) pairs",
            bytes.len()
        )));
    }
    let mut per_file = vec![HashSet::default(); files];
    for pair in bytes.chunks_exact(16) {
        let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize;
        let (f, row) = (word(&pair[..8]), word(&pair[8..]));
        if f >= files {
            return Err(damaged(format!(
                "file index {f}, but there are {files} input files"
            )));
        }
        if owns(f) {
            per_file[f].insert(row);
        }
    }
    Ok(per_file)
}

/// The clusters task's marker, which the filter tasks need.
fn clusters_done(cx: &Ctx, fingerprint: &str) -> Result<ClustersDone, DedupError> {
    let dir = cx.dir(Stage::Clusters);
    finished(&dir, Task { k: 0, n: 1 }, fingerprint).ok_or(DedupError::StageNotRun {
        dir,
        stage: Stage::Clusters,
    })
}

/// Writes the kept documents of the input files task `task` owns.
fn filter_task(cx: &Ctx, task: Task, written: &mut Written) -> Result<bool, DedupError> {
    let fingerprint = cx.run_fingerprint();
    if finished::<FilterDone>(&cx.dir(Stage::Filter), task, &fingerprint).is_some() {
        return Ok(true);
    }
    clusters_done(cx, &fingerprint)?;
    let files = &cx.corpus.files;
    let owned: Vec<PathBuf> = files
        .iter()
        .enumerate()
        .filter(|(f, _)| task.owns(*f))
        .map(|(_, file)| file.rel.clone())
        .collect();
    claim_all(written, &owned)?;
    written.claim(&task.marker(Path::new(FILTER)))?;
    let started = Instant::now();
    let per_file = read_removed_rows(&cx.opts.out.join(REMOVED_ROWS), files.len(), |f| {
        task.owns(f)
    })?;
    write_kept(files, &per_file, &cx.opts.out, |f| task.owns(f))?;
    let done = FilterDone {
        fingerprint,
        files: owned.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    mark_done(cx, Stage::Filter, task, &done)?;
    Ok(false)
}

/// Once every filter task of the array of `n` has finished: `stats.json`, as one run writes it.
/// The last two tasks may both get here at once; each writes the same bytes under its own temp
/// name and renames it into place.
fn merge(cx: &Ctx, n: usize, lock: &DirLock) -> Result<Option<Stats>, DedupError> {
    let fingerprint = cx.run_fingerprint();
    let dir = cx.dir(Stage::Filter);
    let mut writes = 0.0;
    for k in 0..n {
        match finished::<FilterDone>(&dir, Task { k, n }, &fingerprint) {
            Some(done) => writes += done.seconds,
            None => return Ok(None),
        }
    }
    let mut stats = clusters_done(cx, &fingerprint)?.stats;
    stats.write_seconds += writes;
    // A fresh view of the ledger: the other last task may have listed stats.json since ours opened.
    let mut written = Written::open(&cx.opts.out, lock)?;
    written.claim(Path::new(STATS_FILE))?;
    let path = cx.opts.out.join(STATS_FILE);
    let mut bytes = serde_json::to_vec_pretty(&stats).expect("stats serialise");
    bytes.push(b'\n');
    // Not atomic::write_bytes(stats.json): two tasks would write one temp file at once.
    let own = cx
        .opts
        .out
        .join(format!(".{STATS_FILE}.{}", std::process::id()));
    atomic::write_bytes(&own, &bytes).map_err(io_err(&own))?;
    std::fs::rename(&own, &path).map_err(io_err(&path))?;
    Ok(Some(stats))
}
