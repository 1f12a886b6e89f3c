//! The educational-value filter of phi-1 (§2.1): a teacher rates a sample of web code files
//! ([`annotate`]), a random forest over file embeddings ([`embed`], [`forest`]) learns the ratings
//! ([`train`]), and every file of the dump is scored and kept or not ([`filter`]). The same
//! machinery filters general web text for phi-2 ([`preset`]: `--preset web`, FineWeb-Edu's
//! additive rating prompt and prose features).
//!
//! Reads: code files or web texts ([`input`]) and labels. Writes: a classifier file (JSON: preset,
//! embedder, forest, threshold) with `*.metrics.json` beside it, and a filter directory `OUT/` with `scored/` (every
//! input row with `score`, `kept`, `skip`), `kept/` (kept rows only, content as `text`, ready for
//! dedup and tokenize), `progress-K-of-N.jsonl` (finished parts) and `stats.json`. One run (or
//! one run per `--shard K/N` slice) writes a filter directory at a time, it may be neither an
//! input nor inside or above one, and files in it that phigen did not write are never replaced.

pub mod annotate;
pub mod bert;
pub mod embed;
pub mod forest;
pub mod input;
pub mod metrics;
pub mod pipeline;
pub mod preset;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use polars::prelude::{BooleanChunked, IntoColumn, NamedFrom, NewChunkedArray, Series};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::artifact::atomic;
use crate::artifact::outdir::{self, DirLock, OutDirError, Written};
use crate::artifact::table::{self, TableError};
use crate::artifact::walk::{InputSkip, WalkError, WalkOptions};
use crate::model::tokenizer::Encoding;
use embed::{embed_all, Cache, Embedder, EmbedderSpec};
use forest::{Forest, ForestError, ForestParams, Samples};
use input::{Loaded, Part, Skip};
use metrics::Metrics;
use preset::Preset;

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Table(#[from] TableError),
    /// Reading a jsonl file's lines (the reader [`crate::artifact::docs`] shares).
    #[error(transparent)]
    Docs(#[from] crate::artifact::docs::DocsError),
    #[error(transparent)]
    Shards(#[from] crate::artifact::shards::ShardError),
    #[error("{path}:{line}: expected a JSON object: {reason}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: --preset {preset} reads the text from a {} column, found columns {found:?}; rename the column{}", columns_named(*preset), other_preset_hint(*preset))]
    NoContentColumn {
        path: PathBuf,
        found: Vec<String>,
        preset: Preset,
    },
    #[error("nothing to read under {inputs:?} with --preset {preset}: expected .parquet or .jsonl(.gz) files{}", loose_files_named(extensions))]
    NoInputs {
        inputs: Vec<PathBuf>,
        extensions: Vec<String>,
        preset: Preset,
    },
    #[error("{a} and {b} would both be written as {rel:?}; give inputs with distinct names")]
    SameName {
        a: PathBuf,
        b: PathBuf,
        rel: PathBuf,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("{path}: {detail}; the inputs changed since this sample was rated: use a new --out, or restore the inputs")]
    SampleChanged { path: PathBuf, detail: String },
    #[error("none of the {labels} labeled files is in --input (labels name e.g. {label_example:?}, the input has e.g. {input_example:?}); ids are paths below the input's parent directory, or a table's `id` column, else FILE:ROW")]
    NoLabeledFiles {
        labels: usize,
        label_example: String,
        input_example: String,
    },
    #[error("--model {model}: this classifier was trained for --preset {trained}, but this run reads --preset {now} inputs (its features and ratings mean something else there); pass --preset {trained}, or train one for {now}: `phigen filter --preset {now}` without --model, or `phigen classify train --preset {now}`")]
    PresetMismatch {
        model: PathBuf,
        trained: Preset,
        now: Preset,
    },
    #[error("{model}: this classifier was trained on embedder `{trained}`, but its embedder now is `{now}` (weights changed?); retrain it")]
    EmbedderChanged {
        model: PathBuf,
        trained: String,
        now: String,
    },
    #[error(transparent)]
    OutDir(#[from] OutDirError),
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Forest(#[from] ForestError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// `` `text` `` or `` `content` (or `text`) ``.
fn columns_named(preset: Preset) -> String {
    let names: Vec<String> = preset
        .text_columns()
        .iter()
        .map(|c| format!("`{c}`"))
        .collect();
    match names.split_first() {
        Some((first, [])) => first.clone(),
        Some((first, rest)) => format!("{first} (or {})", rest.join(", ")),
        None => String::new(),
    }
}

fn other_preset_hint(preset: Preset) -> &'static str {
    match preset {
        Preset::Code => ", or pass --preset web for web text in `text`",
        Preset::Web => ", or pass --preset code for code in `content`",
    }
}

fn loose_files_named(extensions: &[String]) -> String {
    if extensions.is_empty() {
        " (pass --ext txt,md to read loose text files too)".into()
    } else {
        format!(" or files ending in {extensions:?} (change --ext)")
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClassifyError + '_ {
    move |source| ClassifyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Everything needed to score files without retraining.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Classifier {
    pub format: u32,
    /// What it was trained to score; classifiers written before presets were for code.
    #[serde(default)]
    pub preset: Preset,
    pub embedder: EmbedderSpec,
    /// [`Embedder::id`] at training time; scoring checks it.
    pub embedder_id: String,
    /// Ratings at or above this are positive (0–5 scores).
    pub positive_at: f64,
    /// Files scoring at or above this are kept.
    pub threshold: f32,
    pub params: ForestParams,
    pub forest: Forest,
}

const CLASSIFIER_FORMAT: u32 = 1;

impl Classifier {
    pub fn load(path: &Path) -> Result<Classifier, ClassifyError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let c: Classifier = serde_json::from_slice(&bytes).map_err(|e| ClassifyError::Bad {
            path: path.to_path_buf(),
            reason: format!(
                "not a phigen classifier ({e}); train one with `phigen classify train`"
            ),
        })?;
        if c.format != CLASSIFIER_FORMAT {
            return Err(ClassifyError::Bad {
                path: path.to_path_buf(),
                reason: format!(
                    "classifier format {} (this phigen reads {CLASSIFIER_FORMAT}); retrain it",
                    c.format
                ),
            });
        }
        Ok(c)
    }

    /// A short hash that names this classifier and threshold in progress files.
    fn fingerprint(&self, threshold: f32) -> String {
        let bytes = serde_json::to_vec(self).expect("classifiers serialize");
        let mut h = blake3::Hasher::new();
        h.update(&bytes);
        h.update(&threshold.to_le_bytes());
        h.finalize().to_hex()[..16].to_string()
    }
}

/// Where the code files (or web texts) are and how they are read.
#[derive(Clone, Debug)]
pub struct InputOptions {
    pub inputs: Vec<PathBuf>,
    /// What they hold: the text column read, the rating prompt and the hashed features follow it.
    pub preset: Preset,
    /// Extensions of loose source files (without dots).
    pub extensions: Vec<String>,
    /// Larger files are skipped as oversized.
    pub max_bytes: u64,
    /// Read symlinks that lead out of the input trees.
    pub follow_symlinks: bool,
}

impl InputOptions {
    pub fn parts(&self) -> Result<Vec<Part>, ClassifyError> {
        Ok(self.parts_and_skips()?.0)
    }

    /// The parts, and the input entries not read (by reason).
    pub fn parts_and_skips(&self) -> Result<(Vec<Part>, BTreeMap<InputSkip, u64>), ClassifyError> {
        let walk = WalkOptions {
            follow_symlinks: self.follow_symlinks,
        };
        input::parts(&self.inputs, &self.extensions, self.preset, walk)
    }

    /// Loads one of the parts.
    pub fn load(&self, part: &Part) -> Result<Loaded, ClassifyError> {
        input::load(part, self.max_bytes, self.preset)
    }
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub labels: PathBuf,
    pub input: InputOptions,
    pub out: PathBuf,
    pub embedder: EmbedderSpec,
    pub cache: Option<PathBuf>,
    pub forest: ForestParams,
    /// Share of labeled files held out for `metrics.json` (chosen by a hash of the id).
    pub holdout: f64,
    pub positive_at: f64,
    pub threshold: f32,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub labels: usize,
    pub found: usize,
    pub train: usize,
    pub held_out: usize,
    pub positives: usize,
    pub embed_seconds: f64,
    pub fit_seconds: f64,
    pub metrics: Option<Metrics>,
    pub metrics_path: PathBuf,
}

/// The model's metrics file: `models/edu.rf` → `models/edu.metrics.json`.
pub fn metrics_path(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map_or("classifier".into(), |s| s.to_string_lossy().into_owned());
    model.with_file_name(format!("{stem}.metrics.json"))
}

fn open_cache(dir: Option<&Path>, embedder: &dyn Embedder) -> Result<Option<Cache>, ClassifyError> {
    match dir {
        Some(d) if embedder.cacheable() => Ok(Some(Cache::open(d, embedder)?)),
        _ => Ok(None),
    }
}

/// Trains a classifier on the labeled files found in the inputs and writes it with its metrics.
pub fn train(opts: &TrainOptions) -> Result<TrainReport, ClassifyError> {
    let labels = annotate::load_labels(&opts.labels)?;
    let mut ids = Vec::new();
    let mut texts = Vec::new();
    let mut input_example = String::new();
    for part in opts.input.parts()? {
        for code in opts.input.load(&part)?.rows {
            if input_example.is_empty() {
                input_example = code.id.clone();
            }
            if let (Some(label), Ok(text)) = (labels.get(&code.id), code.content) {
                ids.push((code.id, label.positive(opts.positive_at)));
                texts.push(text);
            }
        }
    }
    if ids.is_empty() {
        return Err(ClassifyError::NoLabeledFiles {
            labels: labels.len(),
            label_example: labels.keys().min().cloned().unwrap_or_default(),
            input_example,
        });
    }
    if ids.len() < labels.len() {
        tracing::warn!(
            "{} of {} labeled files are not in --input (or not readable); training on {}",
            labels.len() - ids.len(),
            labels.len(),
            ids.len()
        );
    }
    let embedder = opts.embedder.load_for(opts.input.preset)?;
    let started = std::time::Instant::now();
    let mut cache = open_cache(opts.cache.as_deref(), embedder.as_ref())?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = embed_all(embedder.as_ref(), &refs, cache.as_mut())?;
    let embed_seconds = started.elapsed().as_secs_f64();
    let held = |id: &str| {
        (xxh3_64_with_seed(id.as_bytes(), 0x686f_6c64) as f64 / u64::MAX as f64) < opts.holdout
    };
    let (mut train_x, mut train_y, mut test_x, mut test_y) = (vec![], vec![], vec![], vec![]);
    for ((id, y), v) in ids.iter().zip(&vectors) {
        if held(id) {
            test_x.extend_from_slice(v);
            test_y.push(*y);
        } else {
            train_x.extend_from_slice(v);
            train_y.push(*y);
        }
    }
    let dim = embedder.dim();
    let started = std::time::Instant::now();
    let forest = Forest::fit(
        &Samples {
            rows: &train_x,
            features: dim,
        },
        &train_y,
        &opts.forest,
    )?;
    let fit_seconds = started.elapsed().as_secs_f64();
    let metrics = if test_y.iter().any(|&y| y) && test_y.iter().any(|&y| !y) {
        let scores = forest.score_all(&Samples {
            rows: &test_x,
            features: dim,
        })?;
        Some(Metrics::new(&scores, &test_y, opts.threshold))
    } else {
        tracing::warn!("the held-out files are not of both classes: no metrics (label more files or raise --holdout)");
        None
    };
    let classifier = Classifier {
        format: CLASSIFIER_FORMAT,
        preset: opts.input.preset,
        embedder: opts.embedder.clone(),
        embedder_id: embedder.id(),
        positive_at: opts.positive_at,
        threshold: opts.threshold,
        params: opts.forest.clone(),
        forest,
    };
    if let Some(parent) = opts.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    atomic::write_json(&opts.out, &classifier).map_err(io_err(&opts.out))?;
    let report = TrainReport {
        labels: labels.len(),
        found: ids.len(),
        train: train_y.len(),
        held_out: test_y.len(),
        positives: ids.iter().filter(|(_, y)| *y).count(),
        embed_seconds,
        fit_seconds,
        metrics,
        metrics_path: metrics_path(&opts.out),
    };
    atomic::write_json(&report.metrics_path, &report).map_err(io_err(&report.metrics_path))?;
    Ok(report)
}

/// Feature vectors of every readable file: a frame with `id` and one `f0`, `f1`, … column per
/// dimension (`phigen classify embed`, for inspection and for the forest benchmark).
pub fn embed_files(
    input: &InputOptions,
    spec: &EmbedderSpec,
    cache_dir: Option<&Path>,
) -> Result<polars::prelude::DataFrame, ClassifyError> {
    let embedder = spec.load_for(input.preset)?;
    let mut cache = open_cache(cache_dir, embedder.as_ref())?;
    let (mut ids, mut vectors) = (Vec::new(), Vec::new());
    for part in input.parts()? {
        let rows = input.load(&part)?.rows;
        let ok: Vec<&input::Code> = rows.iter().filter(|c| c.content.is_ok()).collect();
        let texts: Vec<&str> = ok
            .iter()
            .map(|c| c.content.as_deref().expect("Ok"))
            .collect();
        vectors.extend(embed_all(embedder.as_ref(), &texts, cache.as_mut())?);
        ids.extend(ok.iter().map(|c| c.id.clone()));
    }
    let mut columns = vec![Series::new("id".into(), &ids).into_column()];
    for d in 0..embedder.dim() {
        let col: Vec<f32> = vectors.iter().map(|v| v[d]).collect();
        columns.push(Series::new(format!("f{d}").into(), col).into_column());
    }
    polars::prelude::DataFrame::new(ids.len(), columns).map_err(|e| ClassifyError::Bad {
        path: PathBuf::from("features"),
        reason: e.to_string(),
    })
}

#[derive(Clone, Debug)]
pub struct FilterOptions {
    pub input: InputOptions,
    pub out: PathBuf,
    pub model: PathBuf,
    /// Overrides the classifier's threshold.
    pub threshold: Option<f32>,
    /// (K, N): this run does parts K, K+N, K+2N, … (0-based K).
    pub shard: (usize, usize),
    pub cache: Option<PathBuf>,
    /// Texts embedded at once.
    pub batch: usize,
    /// Count the GPT-2 tokens of the kept files (`--count-tokens`). Off, the run skips the BPE,
    /// its costliest part, and `tokens_kept` is absent; the kept set is the same either way.
    pub count_tokens: bool,
}

/// What one finished part contributed; a line of the progress file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartStats {
    pub rel: PathBuf,
    pub fingerprint: String,
    pub classifier: String,
    pub files: u64,
    pub scored: u64,
    pub kept: u64,
    pub skipped: BTreeMap<Skip, u64>,
    pub bytes_scored: u64,
    pub bytes_kept: u64,
    /// `None` when the run did not count them (no `--count-tokens`).
    #[serde(default)]
    pub tokens_kept: Option<u64>,
    /// Scores in 20 bins of width 0.05.
    pub histogram: Vec<u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FilterStats {
    pub model: PathBuf,
    /// What was filtered: code files or web text.
    pub preset: Preset,
    pub threshold: f32,
    pub parts: usize,
    pub parts_done: usize,
    pub files: u64,
    pub scored: u64,
    pub kept: u64,
    pub kept_share: f64,
    pub skipped: BTreeMap<Skip, u64>,
    pub bytes_scored: u64,
    pub bytes_kept: u64,
    /// GPT-2 tokens (phi-1's tokenizer family) of the kept files, as `phigen tokenize` encodes
    /// them (without the end-of-text token it adds to each); `None` unless every part was
    /// scored with `--count-tokens`.
    pub tokens_kept: Option<u64>,
    pub histogram: Vec<u64>,
    /// Parts finished by this run (the others were done before or belong to other shards).
    pub parts_this_run: usize,
    pub wall_seconds: f64,
    /// Input entries not read (symlinks out of the tree, FIFOs, devices …), by reason.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub skipped_inputs: BTreeMap<InputSkip, u64>,
}

/// Finished parts recorded in every progress file under `out`, latest line per part.
fn finished_parts(out: &Path) -> Result<HashMap<PathBuf, PartStats>, ClassifyError> {
    let mut done = HashMap::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(done);
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("progress") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(io_err(&f))?;
        // A torn last line (a crash mid-append) is ignored; that part is simply redone.
        for line in text.lines() {
            if let Ok(s) = serde_json::from_str::<PartStats>(line) {
                done.insert(s.rel.clone(), s);
            }
        }
    }
    Ok(done)
}

/// Scores every file of this shard's parts that is not done yet, then writes `stats.json` over all
/// parts finished so far (task K of an array of N: `stats-K-of-N.json`). `progress` is told the files of each finished part.
pub fn filter(
    opts: &FilterOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<FilterStats, ClassifyError> {
    let started = std::time::Instant::now();
    // Checked before anything is created: the lock file would be written into the input.
    outdir::check_apart(&opts.out, &opts.input.inputs)?;
    let (k, n) = opts.shard;
    let lock = if n > 1 {
        DirLock::slice(&opts.out, k, n)?
    } else {
        DirLock::exclusive(&opts.out)?
    };
    let mut written = Written::open(&opts.out, &lock)?;
    let classifier = Classifier::load(&opts.model)?;
    if classifier.preset != opts.input.preset {
        return Err(ClassifyError::PresetMismatch {
            model: opts.model.clone(),
            trained: classifier.preset,
            now: opts.input.preset,
        });
    }
    let threshold = opts.threshold.unwrap_or(classifier.threshold);
    let embedder = classifier.embedder.load_for(classifier.preset)?;
    if embedder.id() != classifier.embedder_id {
        return Err(ClassifyError::EmbedderChanged {
            model: opts.model.clone(),
            trained: classifier.embedder_id.clone(),
            now: embedder.id(),
        });
    }
    let mut cache = open_cache(opts.cache.as_deref(), embedder.as_ref())?;
    let fingerprint = classifier.fingerprint(threshold);
    let (parts, skipped_inputs) = opts.input.parts_and_skips()?;
    let done = finished_parts(&opts.out)?;
    // The files this run writes, before the work: one phigen did not write stops it now. A part a
    // progress line records was written by phigen (before it listed its files, perhaps).
    let outputs = |rel: &Path| [Path::new("scored").join(rel), Path::new("kept").join(rel)];
    for part in parts.iter().skip(k).step_by(n) {
        for rel in outputs(&part.rel) {
            if done.contains_key(&part.rel) && !written.contains(&rel) {
                written.adopt(&rel)?;
            }
            written.claim(&rel)?;
        }
    }
    // Tasks of an array run at once: each writes its own stats (as its own progress journal), or
    // their atomic writes of one file would race on its temp name; the merge writes stats.json.
    let stats_name = match n {
        1 => "stats.json".to_string(),
        _ => format!("stats-{k}-of-{n}.json"),
    };
    let stats_rel = Path::new(&stats_name);
    if !done.is_empty() && !written.contains(stats_rel) {
        written.adopt(stats_rel)?;
    }
    written.claim(stats_rel)?;
    let progress_path = opts.out.join(if n == 1 {
        "progress.jsonl".to_string()
    } else {
        format!("progress-{k}-of-{n}.jsonl")
    });
    let journal = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&progress_path)
        .map_err(io_err(&progress_path))?;
    let journal = Mutex::new(journal);
    // The tokenize module's encoder, so the count is what `phigen tokenize` will write.
    let counter = opts.count_tokens.then_some(Encoding::Gpt2);
    let this_run = AtomicUsize::new(0);
    let score_part = |part: &Part, cache: Option<&mut Cache>| -> Result<(), ClassifyError> {
        let part_fp = part.fingerprint();
        if done.get(&part.rel).is_some_and(|d| {
            d.fingerprint == part_fp
                && d.classifier == fingerprint
                && (counter.is_none() || d.tokens_kept.is_some())
        }) {
            return Ok(());
        }
        let loaded = opts.input.load(part)?;
        let scores = score_rows(&loaded, &classifier, embedder.as_ref(), cache, opts.batch)?;
        let kept: Vec<bool> = scores
            .iter()
            .map(|s| s.is_some_and(|s| s >= threshold))
            .collect();
        let mut stats = part_stats(part, part_fp, fingerprint.clone(), &loaded, &scores, &kept);
        if let Some(encoding) = counter {
            stats.tokens_kept = Some(count_kept_tokens(encoding, &loaded, &kept));
        }
        write_part(&opts.out, part, loaded, &scores, &kept)?;
        let line = serde_json::to_string(&stats).expect("stats serialize");
        let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(journal, "{line}")
            .and_then(|_| journal.sync_data())
            .map_err(io_err(&progress_path))?;
        drop(journal);
        progress(stats.files);
        this_run.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let mine: Vec<&Part> = parts.iter().skip(k).step_by(n).collect();
    match cache.as_mut() {
        // A model embedder uses every core itself, and its vectors go through one on-disk cache:
        // one part at a time.
        Some(cache) => mine
            .iter()
            .try_for_each(|part| score_part(part, Some(&mut *cache)))?,
        // Hashed features: one part per thread side by side (each part's rows in parallel too),
        // so one part's reading and Parquet writing overlap another's embedding. Windows of that
        // many parts bound the memory: a thread waiting inside a part would otherwise start
        // more. A row's score depends on its text alone, so nothing depends on the thread
        // count but the order of journal lines.
        None => mine
            .chunks(rayon::current_num_threads().max(1))
            .try_for_each(|window| {
                window
                    .par_iter()
                    .try_for_each(|part| score_part(part, None))
            })?,
    }
    let this_run = this_run.into_inner();
    let done = finished_parts(&opts.out)?;
    let mut total = FilterStats {
        model: opts.model.clone(),
        preset: opts.input.preset,
        threshold,
        parts: parts.len(),
        histogram: vec![0; 20],
        tokens_kept: Some(0),
        parts_this_run: this_run,
        skipped_inputs,
        ..FilterStats::default()
    };
    for part in &parts {
        let Some(s) = done.get(&part.rel).filter(|s| s.classifier == fingerprint) else {
            continue;
        };
        total.add_part(s);
    }
    total.kept_share = total.kept as f64 / total.scored.max(1) as f64;
    total.wall_seconds = started.elapsed().as_secs_f64();
    let stats_path = opts.out.join(stats_rel);
    atomic::write_json(&stats_path, &total).map_err(io_err(&stats_path))?;
    Ok(total)
}

/// Scores of a part's rows (None for a row that could not be read), `batch` rows at a time.
fn score_rows(
    loaded: &Loaded,
    classifier: &Classifier,
    embedder: &dyn Embedder,
    mut cache: Option<&mut Cache>,
    batch: usize,
) -> Result<Vec<Option<f32>>, ClassifyError> {
    let ok: Vec<usize> = (0..loaded.rows.len())
        .filter(|&i| loaded.rows[i].content.is_ok())
        .collect();
    let mut scores: Vec<Option<f32>> = vec![None; loaded.rows.len()];
    for chunk in ok.chunks(batch.max(1)) {
        let texts: Vec<&str> = chunk
            .iter()
            .map(|&i| loaded.rows[i].content.as_deref().expect("filtered to Ok"))
            .collect();
        let vectors = embed_all(embedder, &texts, cache.as_deref_mut())?;
        let flat: Vec<f32> = vectors.concat();
        let s = classifier.forest.score_all(&Samples {
            rows: &flat,
            features: embedder.dim(),
        })?;
        for (&i, s) in chunk.iter().zip(s) {
            scores[i] = Some(s);
        }
    }
    Ok(scores)
}

/// A scored part's progress line: counts and the score histogram (its tokens are counted apart,
/// on request).
fn part_stats(
    part: &Part,
    part_fp: String,
    classifier: String,
    loaded: &Loaded,
    scores: &[Option<f32>],
    kept: &[bool],
) -> PartStats {
    let mut stats = PartStats {
        rel: part.rel.clone(),
        fingerprint: part_fp,
        classifier,
        files: loaded.rows.len() as u64,
        histogram: vec![0; 20],
        ..PartStats::default()
    };
    for (i, code) in loaded.rows.iter().enumerate() {
        match (&code.content, scores[i]) {
            (Ok(text), Some(s)) => {
                stats.scored += 1;
                stats.bytes_scored += text.len() as u64;
                stats.histogram[((s * 20.0) as usize).min(19)] += 1;
                if kept[i] {
                    stats.kept += 1;
                    stats.bytes_kept += text.len() as u64;
                }
            }
            (Err(skip), _) => *stats.skipped.entry(*skip).or_default() += 1,
            (Ok(_), None) => unreachable!("every readable row is scored"),
        }
    }
    stats
}

/// Tokens of a part's kept rows in `encoding`, as `phigen tokenize` encodes a document's text
/// (without the end-of-text id it adds).
fn count_kept_tokens(encoding: Encoding, loaded: &Loaded, kept: &[bool]) -> u64 {
    (0..loaded.rows.len())
        .into_par_iter()
        .filter(|&i| kept[i])
        .map(|i| {
            let text = loaded.rows[i]
                .content
                .as_deref()
                .expect("kept rows are readable");
            encoding.count_ordinary(text) as u64
        })
        .sum()
}

/// `scored/REL` (the part with score, kept and skip columns) and `kept/REL` (its kept rows, the
/// content column named `text`).
fn write_part(
    out: &Path,
    part: &Part,
    loaded: Loaded,
    scores: &[Option<f32>],
    kept: &[bool],
) -> Result<(), ClassifyError> {
    let mut frame = loaded.frame;
    let skip: Vec<Option<&str>> = loaded
        .rows
        .iter()
        .map(|c| c.content.as_ref().err().map(|s| s.as_str()))
        .collect();
    for column in [
        Series::new("score".into(), &scores).into_column(),
        Series::new("kept".into(), &kept).into_column(),
        Series::new("skip".into(), skip).into_column(),
    ] {
        let name = column.name().clone();
        if frame.column(&name).is_ok() {
            frame.drop_in_place(&name).map_err(|e| bad_frame(part, e))?;
        }
        frame.with_column(column).map_err(|e| bad_frame(part, e))?;
    }
    let scored_path = out.join("scored").join(&part.rel);
    let kept_path = out.join("kept").join(&part.rel);
    for p in [&scored_path, &kept_path] {
        let dir = p.parent().expect("output paths have a parent");
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut kept_frame = frame
        .filter(&BooleanChunked::from_slice("kept".into(), kept))
        .map_err(|e| bad_frame(part, e))?;
    table::write_frame(&scored_path, &mut frame)?;
    kept_frame = kept_frame.drop_many(["score", "kept", "skip"]);
    if loaded.content_column != "text" && kept_frame.column("text").is_err() {
        kept_frame
            .rename(&loaded.content_column, "text".into())
            .map_err(|e| bad_frame(part, e))?;
    }
    table::write_frame(&kept_path, &mut kept_frame)?;
    Ok(())
}

impl FilterStats {
    /// Adds a finished part's counts.
    fn add_part(&mut self, s: &PartStats) {
        self.parts_done += 1;
        self.files += s.files;
        self.scored += s.scored;
        self.kept += s.kept;
        self.bytes_scored += s.bytes_scored;
        self.bytes_kept += s.bytes_kept;
        self.tokens_kept = self.tokens_kept.zip(s.tokens_kept).map(|(a, b)| a + b);
        for (r, c) in &s.skipped {
            *self.skipped.entry(*r).or_default() += c;
        }
        for (h, c) in self.histogram.iter_mut().zip(&s.histogram) {
            *h += c;
        }
    }
}

fn bad_frame(part: &Part, e: polars::prelude::PolarsError) -> ClassifyError {
    ClassifyError::Bad {
        path: part.paths()[0].to_path_buf(),
        reason: format!("could not add the score columns: {e}"),
    }
}

#[cfg(test)]
mod tests;
